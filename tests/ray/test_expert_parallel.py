"""Expert parallelism over 2 gloo processes equals the EP=1 computation (outputs and gradients)."""

import os

import pytest
import torch

from tests.spawn_ranks import init_file, spawn

T_PER_RANK = (7, 12)  # uneven token counts: the split sizes differ per rank and direction
SEED = 11


def _config():
    from moeray.platform.config import tiny

    # 8 experts in 4 groups, top-3 over 2 groups: an odd K and 4 experts per rank
    return tiny().replace(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)


def _full_moe():
    from moeray.platform.model.moe import MoE

    torch.manual_seed(SEED)
    moe = MoE(_config())
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    # a nonzero bias so selection differs from the plain top-k (as after some balancing steps)
    moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, moe.experts.num_experts))
    return moe


def _inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    D = _config().hidden_size
    x = torch.randn(1, T_PER_RANK[rank], D, generator=g)
    dy = torch.randn(1, T_PER_RANK[rank], D, generator=g)
    return x, dy


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from moeray.platform.parallel.expert import ExpertParallelMoE

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        moe = ExpertParallelMoE(_full_moe(), None, rank, world)
        x, dy = _inputs(rank)
        x.requires_grad_()
        y = moe(x)
        y.backward(dy)
        torch.save(
            {
                "y": y.detach(),
                "x_grad": x.grad,
                "grads": {n: p.grad for n, p in moe.named_parameters()},
                "counts": moe.last_routing.counts_E,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_expert_parallel_matches_single_process(tmp_path):
    world = 2
    spawn(_worker, args=(world, init_file(tmp_path), str(tmp_path)), nprocs=world)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    # EP=1 reference: the same weights on all tokens of both ranks in one process
    moe = _full_moe()
    xs, dys = zip(*(_inputs(r) for r in range(world)), strict=False)
    x = torch.cat(xs, dim=1).requires_grad_()
    y = moe(x)
    y.backward(torch.cat(dys, dim=1))
    splits = list(T_PER_RANK)

    for r, (y_ref, gx_ref) in enumerate(
        zip(y.detach().split(splits, 1), x.grad.split(splits, 1), strict=False)
    ):
        torch.testing.assert_close(got[r]["y"], y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[r]["x_grad"], gx_ref, rtol=1e-5, atol=1e-6)
    # tokens really crossed ranks: each rank routed some assignments to experts it does not own
    E, L = moe.experts.num_experts, moe.experts.num_experts // world
    for r in range(world):
        counts = got[r]["counts"]
        assert counts.sum() == T_PER_RANK[r] * 3
        assert counts[[e for e in range(E) if e // L != r]].sum() > 0

    ref = dict(moe.named_parameters())

    # Tokens reach an expert in a different order than in the single process, so the fp32 sums
    # behind each weight gradient round differently: bound the error by the gradient's scale.
    def tol(g):
        return {"rtol": 1e-5, "atol": 1e-5 * float(g.abs().max())}

    for name, p in ref.items():
        if name.startswith("experts."):
            # each rank holds (and gets gradients for) its own slice of the stacked experts
            shards = torch.cat([got[r]["grads"][name] for r in range(world)])
            torch.testing.assert_close(shards, p.grad, **tol(p.grad))
            assert got[0]["grads"][name].shape[0] == L
        else:
            # replicated parameters: the per-rank gradients sum (all-reduce) to the full gradient
            total = sum(got[r]["grads"][name] for r in range(world))
            torch.testing.assert_close(total, p.grad, **tol(p.grad))
    assert ref["gate.weight"].grad.abs().sum() > 0  # routing-weight gradients flow through combine


def test_shard_rejects_uneven_split():
    from moeray.platform.parallel.expert import shard_experts

    with pytest.raises(ValueError, match="ep_size"):
        shard_experts(_full_moe(), 0, 3)
