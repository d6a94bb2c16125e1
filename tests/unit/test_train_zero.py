"""ZeRO-1 (`train/zero.py`) over two gloo ranks of the PP = 1 replica: after several steps the
parameters and the optimizer state gathered from the ranks equal the unsharded run's, each rank
holds about half the state (DP = 2; with EP = 2 the expert shards are not dealt again), bf16
moments halve the bytes and still train; bad config values are refused naming them."""

import copy
import os

import pytest
import torch
from test_pipeline import LOSS, SEED, B, S, _tokens
from test_train_layouts import _bias_LE

from moeray.platform.parallel.distributed import Topology
from moeray.platform.parallel.expert import is_expert_param
from moeray.platform.train import step as ts
from moeray.platform.train import zero
from moeray.platform.train.job_config import TrainJobConfig
from moeray.platform.train.replica import FlatReplica
from tests.spawn_ranks import init_file, spawn

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
    spawn(_worker, args=(2, init_file(tmp), str(tmp), cases), nprocs=2)
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


def test_fused_update_reads_the_norm_after_the_step_and_leaves_small_gradients(monkeypatch):
    """With a fused AdamW the gradient norm is read to the host only after optimizer.step (on a
    GPU, reading it first drains the device before the optimizer is launched), and gradients
    under the clip are divided by exactly 1: the parameters equal an unclipped step's."""
    cfg = ts.OptimConfig(lr=1e-2, warmup_steps=0, clip=1e6)
    torch.manual_seed(0)
    ref, mine = (torch.nn.Linear(8, 4) for _ in range(2))
    mine.load_state_dict(ref.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=cfg.lr, fused=True) for m in (ref, mine)]
    for m in (ref, mine):
        m(torch.ones(3, 8)).sum().backward()
    opts[0].step()
    events = []
    real_step, real_float = opts[1].step, torch.Tensor.__float__
    monkeypatch.setattr(opts[1], "step", lambda: events.append("step") or real_step())
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: events.append("read") or real_float(t))
    norm, _ = ts.apply_update(mine, opts[1], 0, cfg)
    assert events == ["step", "read"] and norm > 0
    for p, q in zip(ref.parameters(), mine.parameters(), strict=True):
        assert torch.equal(q, p)


class _Experts(torch.nn.Module):
    """Two linears, a norm and a 3-D stacked weight (the routed experts' layout); `skip` leaves
    the stack out of the loss (its gradient stays None and its step counter lags)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.stack = torch.nn.Parameter(torch.randn(3, 16, 5) * 0.2)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, skip: bool = False) -> torch.Tensor:
        h = self.norm(self.inp(x))
        if not skip:
            h = h + torch.einsum("bd,edf->bf", h, self.stack).sum(-1, keepdim=True)
        return self.out(h)


def _bf16_steps(model, opt, cfg, steps, start: int = 0) -> None:
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for i in range(start, start + steps):
        model(x * (i + 1), skip=i == 0).pow(2).mean().backward()
        ts.apply_update(model, opt, i, cfg)


def _bf16_optimizer(model, cfg):
    opt = zero.ShardedAdamW(model, cfg)
    opt.defaults["fused"] = True  # as on CUDA: clipping through grad_scale, read by the update
    return opt


def test_fused_adamw_path_equals_the_loop(monkeypatch):
    """ShardedAdamW with bf16 moments through the kernel (the chooser forced on; the interpreter
    runs it on CPU) against its PyTorch loop over 3 clipped steps, one of them without a gradient
    for the 3-D stack (its step counter lags: two calls for that group): the same state layout,
    moments bit for bit, parameters within the reference's CPU sqrt rounding."""
    from moeray.kernels.common import interpreting

    if not interpreting():
        pytest.skip("CPU tensors run the kernel only under the interpreter (TRITON_INTERPRET=1)")
    calls: list[tuple[int, float]] = []

    def spy(params, *args, step, **kwargs):
        calls.append((len(params), step))
        return adamw_step(params, *args, step=step, **kwargs)

    adamw_step = zero.adamw_step
    monkeypatch.setattr(zero, "adamw_step", spy)
    cfg = ts.OptimConfig(moments_dtype="bfloat16", clip=0.05, warmup_steps=0)
    got = []
    for fused in (False, True):
        monkeypatch.setattr(zero, "use_fused_adamw", lambda device, on=fused: on)
        model = _Experts()
        opt = _bf16_optimizer(model, cfg)
        _bf16_steps(model, opt, cfg, 3)
        got.append((model, opt))
    # step 1 without the stack; steps 2-3: the stack (step 1, then 2) apart from the other
    # matrices (steps 2, 3); the 1-D group (biases, norm) in one call each step
    assert sorted(calls) == sorted(
        [(2, 1.0), (4, 1.0), (2, 2.0), (1, 1.0), (4, 2.0), (2, 3.0), (1, 2.0), (4, 3.0)]
    )
    (m0, o0), (m1, o1) = got
    for (name, p0), p1 in zip(m0.named_parameters(), m1.parameters(), strict=True):
        s0, s1 = o0.state[p0], o1.state[p1]
        assert s0.keys() == s1.keys() == {"step", "exp_avg", "exp_avg_sq"}, name
        assert s1["step"].device.type == "cpu" and torch.equal(s0["step"], s1["step"]), name
        for k in ("exp_avg", "exp_avg_sq"):
            assert s1[k].dtype == torch.bfloat16 and torch.equal(s0[k], s1[k]), (name, k)
        torch.testing.assert_close(p1, p0, rtol=1e-6, atol=1e-9, msg=name)
    assert float(o1.state[m1.stack]["step"]) == 2.0


def test_fused_adamw_chooser(monkeypatch):
    """One place decides: CUDA only (CPU keeps the loop), and MOERAY_FUSED_ADAMW=0 switches it
    off; the tensors are checked by adamw_step_applies."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv("MOERAY_FUSED_ADAMW", raising=False)
    assert zero.use_fused_adamw(cuda) and not zero.use_fused_adamw(cpu)
    monkeypatch.setenv("MOERAY_FUSED_ADAMW", "0")
    assert not zero.use_fused_adamw(cuda)


def test_bf16_state_dict_round_trip_continues_the_run(monkeypatch):
    """A checkpointed bf16-moment state (per-parameter exp_avg, exp_avg_sq, step) loads into a
    new ShardedAdamW with the same layout (moments bf16, step counters CPU fp32) and the next
    step equals the uninterrupted run's, through the kernel path where it runs."""
    monkeypatch.setattr(zero, "use_fused_adamw", lambda device: True)
    cfg = ts.OptimConfig(moments_dtype="bfloat16", warmup_steps=0)
    model = _Experts()
    opt = _bf16_optimizer(model, cfg)
    _bf16_steps(model, opt, cfg, 2)
    # as a checkpoint holds them: copies (a live state_dict shares the step tensors)
    saved, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    again = _Experts()
    again.load_state_dict(saved)
    opt2 = _bf16_optimizer(again, cfg)
    opt2.load_state_dict(state)
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        a, b = opt.state[p], opt2.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert b["exp_avg"].dtype == torch.bfloat16 and b["step"].dtype == torch.float32
        assert b["step"].device.type == "cpu"
    _bf16_steps(model, opt, cfg, 1, start=2)
    _bf16_steps(again, opt2, cfg, 1, start=2)
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)
