"""ZeRO-1 (`train/zero.py`) over two gloo ranks of the PP = 1 replica: after several steps the
parameters and the optimizer state gathered from the ranks equal the unsharded run's, each rank
holds about half the state (DP = 2; with EP = 2 the expert shards are not dealt again), bf16
moments halve the bytes and still train; bad config values are refused naming them."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from test_pipeline import LOSS, SEED, B, S, _tokens
from test_train_layouts import _bias_LE

from moeray.platform.parallel.distributed import Topology
from moeray.platform.parallel.expert import is_expert_param
from moeray.platform.train import step as ts
from moeray.platform.train import zero
from moeray.platform.train.job_config import TrainJobConfig
from moeray.platform.train.replica import FlatReplica

STEPS = 3


def _job(parallel: dict, optim: dict) -> TrainJobConfig:
    return TrainJobConfig.from_dict(
        {
            "seed": SEED,
            "steps": 10,
            "parallel": parallel,
            "data": {"global_batch": B, "seq_len": S},
            "optim": {"warmup_steps": 1, "total_steps": 10, **optim},
            "loss": {"mtp_lambda": LOSS.mtp_lambda, "balance_alpha": LOSS.balance_alpha},
        }
    )


def _worker(rank, world, init_file, out_dir, cases):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, parallel, optim in cases:
            job = _job(parallel, optim)
            replica = FlatReplica(job, rank, world, torch.device("cpu"))
            replica.set_biases(_bias_LE())
            opt = zero.build_optimizer(replica.module, job.optim, replica.groups)
            topology = Topology(1, job.parallel.dp, job.parallel.ep)
            rows = B // topology.shards
            shard = topology.shard(rank)
            for step in range(STEPS):
                batch = torch.roll(_tokens(), step, dims=0)[shard * rows : (shard + 1) * rows]
                parts = replica.step(batch)
                ts.apply_update(replica.module, opt, step, job.optim, total_norm=parts.norm)
            names = {p: n for n, p in replica.module.named_parameters()}
            state = {
                names[p]: {k: v.clone() for k, v in st.items() if k != "step"}
                for p, st in opt.state.items()
            }
            torch.save(
                {
                    "params": {n: p.detach().clone() for n, p in replica.module.named_parameters()},
                    "state": state,
                    "bytes": zero.state_bytes(opt),
                },
                os.path.join(out_dir, f"{name}-rank{rank}.pt"),
            )
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero")
    cases = [
        ("dp", {"dp": 2}, {}),
        ("dp-zero", {"dp": 2}, {"zero_stage": 1}),
        ("dp-zero-bf16", {"dp": 2}, {"zero_stage": 1, "moments_dtype": "bfloat16"}),
        ("ep", {"ep": 2}, {}),
        ("ep-zero", {"ep": 2}, {"zero_stage": 1}),
    ]
    mp.spawn(_worker, args=(2, str(tmp / "pg"), str(tmp), cases), nprocs=2, join=True)
    return {name: [torch.load(tmp / f"{name}-rank{r}.pt") for r in range(2)] for name, *_ in cases}


def _gathered(ranks: list[dict], experts: bool = True) -> dict:
    """The union of the ranks' state shards by name, each name held once (`experts`=False:
    replicated parameters only)."""
    out: dict = {}
    for r in ranks:
        mine = {n: st for n, st in r["state"].items() if experts or not is_expert_param(n)}
        assert not set(mine) & set(out), "a parameter's state is on two ranks"
        out.update(mine)
    return out


def _assert_close_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for n, st in want.items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[n][k], st[k], rtol=1e-6, atol=1e-9, msg=n)


def _assert_same_params(plain: list[dict], sharded: list[dict]) -> None:
    for r in range(2):  # every rank ends with the unsharded run's parameters
        for n, p in plain[r]["params"].items():
            torch.testing.assert_close(sharded[r]["params"][n], p, rtol=1e-6, atol=1e-7, msg=n)


def test_zero1_over_dp_equals_the_unsharded_run(runs):
    plain, sharded = runs["dp"], runs["dp-zero"]
    assert plain[0]["params"].keys() == sharded[0]["params"].keys()
    assert plain[0]["params"]["lm_head.weight"].ne(runs["ep"][0]["params"]["lm_head.weight"]).any()
    _assert_same_params(plain, sharded)
    _assert_close_state(_gathered(sharded), plain[0]["state"])  # DP: ranks hold the same state
    for r in range(2):  # about half the bytes each (largest-first dealing)
        assert 0.45 < sharded[r]["bytes"] / plain[r]["bytes"] < 0.55, sharded[r]["bytes"]


def test_zero1_with_ep_deals_only_replicated_parameters(runs):
    plain, sharded = runs["ep"], runs["ep-zero"]
    _assert_same_params(plain, sharded)
    replicated = {n: st for n, st in plain[0]["state"].items() if not is_expert_param(n)}
    _assert_close_state(_gathered(sharded, experts=False), replicated)
    for r in range(2):
        # each rank's own experts keep all their state on it: not dealt across EP ranks
        experts = {n: st for n, st in plain[r]["state"].items() if is_expert_param(n)}
        assert experts
        _assert_close_state({n: sharded[r]["state"][n] for n in experts}, experts)
        replicated = {n for n in sharded[r]["state"] if not is_expert_param(n)}
        others = {n for n in sharded[1 - r]["state"] if not is_expert_param(n)}
        assert replicated and not replicated & others
        assert sharded[r]["bytes"] < plain[r]["bytes"]


def test_bf16_moments_halve_the_state_and_track_fp32(runs):
    fp32, bf16 = runs["dp-zero"], runs["dp-zero-bf16"]
    for r in range(2):
        assert all(
            v.dtype == torch.bfloat16 for st in bf16[r]["state"].values() for v in st.values()
        )
        assert 0.45 < bf16[r]["bytes"] / fp32[r]["bytes"] < 0.55
        assert bf16[r]["params"]["lm_head.weight"].equal(bf16[1 - r]["params"]["lm_head.weight"])
    # an AdamW step moves a weight by up to about lr = 3e-3; bf16 moments (8-bit mantissa) change
    # 3 steps by under a third of one (measured: 4.4e-4 at most, on experts with few tokens)
    for n, p in fp32[0]["params"].items():
        torch.testing.assert_close(bf16[0]["params"][n], p, rtol=0, atol=1e-3, msg=n)


@pytest.mark.parametrize(
    "optim, parallel, match",
    [
        ({"zero_stage": 2}, {}, r"optim.zero_stage=2 .*accepted: 0, 1"),
        ({"moments_dtype": "fp8"}, {}, r"optim.moments_dtype='fp8' .*float32, bfloat16"),
        ({"zero_stage": 1}, {"pp": 2, "schedule": "1f1b"}, r"zero_stage=1 needs parallel.pp=1"),
    ],
)
def test_bad_zero_config_is_refused(optim, parallel, match):
    with pytest.raises(ValueError, match=match):
        _job(parallel, optim)


def test_low_precision_path_is_adamw():
    """The bf16-moment update's arithmetic, run with fp64 moments, is torch's AdamW exactly."""

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))

    ref, mine = model(), model()
    cfg = ts.OptimConfig()
    ref_opt, opt = ts.build_optimizer(ref, cfg), zero.ShardedAdamW(mine, cfg)
    opt.moments_dtype = torch.float64  # not float32: takes the hand-written update
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for i in range(4):
        for m, o in ((ref, ref_opt), (mine, opt)):
            m(x * (i + 1)).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    assert all(
        v.dtype == torch.float64 for st in opt.state.values() for v in st.values() if v.dim()
    )
    for p, q in zip(ref.parameters(), mine.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["fused", "low_precision"])
def test_clipping_through_grad_scale_equals_clip_grad_norm(kind):
    """apply_update with a fused AdamW (and ShardedAdamW's own update, which reads grad_scale the
    same way) clips by dividing the gradients inside the optimizer step: the parameters equal
    clip_grad_norm_ then a step, with gradients large enough to be clipped every step."""

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))

    cfg = ts.OptimConfig(lr=1e-2, warmup_steps=0, clip=0.5)
    ref, mine = model(), model()
    groups = [{"params": list(m.parameters()), "weight_decay": cfg.weight_decay} for m in (ref,)]
    if kind == "fused":
        ref_opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8, fused=True)
        opt = torch.optim.AdamW(
            [{"params": list(mine.parameters()), "weight_decay": cfg.weight_decay}],
            lr=cfg.lr,
            betas=cfg.betas,
            eps=1e-8,
            fused=True,
        )
    else:
        ref_opt, opt = zero.ShardedAdamW(ref, cfg), zero.ShardedAdamW(mine, cfg)
        for o in (ref_opt, opt):
            o.moments_dtype = torch.float64  # the hand-written update
            o.defaults["fused"] = True  # as on CUDA: apply_update hands clipping to the step
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    norms = []
    for i in range(3):
        for m in (ref, mine):
            m(x * (i + 5)).pow(2).mean().backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), cfg.clip)))
        for g in ref_opt.param_groups:
            g["lr"] = ts.learning_rate(i, cfg)
        ref_opt.step()
        ref_opt.zero_grad()
        norm, _ = ts.apply_update(mine, opt, i, cfg)
        assert norm == pytest.approx(norms[-1], rel=1e-5)
        assert getattr(opt, "grad_scale", None) is None  # not left set for the next step
    assert min(norms) > cfg.clip  # every step clipped
    for p, q in zip(ref.parameters(), mine.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)
