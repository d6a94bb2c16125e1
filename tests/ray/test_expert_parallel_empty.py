"""An EP rank that receives no tokens must still run the backward all-to-alls (else its peers
hang or abort on a collective mismatch)."""

import datetime
import os

import torch
import torch.multiprocessing as mp


def _config():
    from moeray.platform.config import tiny

    return tiny().replace(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from moeray.platform.model.moe import MoE
    from moeray.platform.parallel.expert import ExpertParallelMoE

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.manual_seed(0)
        moe = MoE(_config())
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.2)
        # Experts 0-3 (rank 0's) win every selection: rank 1 receives zero rows.
        moe.gate.e_score_correction_bias.copy_(torch.tensor([10.0] * 4 + [0.0] * 4))
        ep = ExpertParallelMoE(moe, None, rank, world)
        x = torch.randn(
            1,
            9,
            _config().hidden_size,
            generator=torch.Generator().manual_seed(rank),
            requires_grad=True,
        )
        ep(x).square().sum().backward()
        torch.save(
            {"x_grad": x.grad, "counts": ep.last_routing.counts_E},
            os.path.join(out_dir, f"{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_rank_without_tokens_completes_backward(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "init"), str(tmp_path)))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    out = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert int(out[0]["counts"][4:].sum()) == 0 and int(out[1]["counts"][4:].sum()) == 0
    assert all(o["x_grad"] is not None and torch.isfinite(o["x_grad"]).all() for o in out)
