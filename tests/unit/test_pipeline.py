"""Pipeline parallelism: 1F1B, ZB1P and DualPipe over gloo processes give the gradients of a
single-process step (same weights, same batch; MTP and the sequence-balance loss included), for
PP=2, PP=4 and PP=2 x EP=2; stage layout; the deferred weight-grad split on its own; every
process group made on every rank and checked before the first step; the timeout and bench flags."""

import os
from types import SimpleNamespace

import pytest
import torch

from moeray.platform.config import tiny
from moeray.platform.parallel.distributed import (
    CUDA_ENV,
    DEFAULT_TIMEOUT_S,
    GRAPHS_CUDA_ENV,
    TIMEOUT_ENV,
    Topology,
    apply_cuda_env,
    check_groups,
    dist_timeout_s,
    init_distributed,
)
from moeray.platform.parallel.experts_mlp import (
    ExpertsMLP,
    GroupedExperts,
    experts_layout,
    experts_mlp,
)
from moeray.platform.parallel.pipeline import PipelineModel, PipelineSpec
from moeray.platform.parallel.stages import PipelineStage, enable_weight_grad_split, split_layers
from moeray.platform.parallel.weight_grad import WeightGradStore
from moeray.platform.train import step as ts
from tests.spawn_ranks import init_file, spawn

SEED = 5
B, S = 8, 12
LOSS = ts.LossConfig(mtp_lambda=0.3, balance_alpha=0.01)  # alpha x100: balance grads are visible


def _biases(model):
    # nonzero selection biases, as after some balancing steps (the same on every process)
    g = torch.Generator().manual_seed(77)
    ts.set_biases(
        model, 0.05 * torch.randn(len(ts.moe_layers(model)), tiny().n_routed_experts, generator=g)
    )


def _tokens():
    return torch.randint(
        0, tiny().vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(9)
    )


def _reference():
    from moeray.platform.model.transformer import Transformer

    model = Transformer(tiny())
    model.reset_parameters(seed=SEED)
    _biases(model)
    parts = ts.compute_loss(model, _tokens(), LOSS)
    parts.total.backward()
    return parts, {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, world, init_file, out_dir, cases):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, spec, overlap in cases:
            pm = PipelineModel(
                tiny(), spec, rank, seed=SEED, seq_len=S, overlap=overlap, full_init=_biases
            )
            shard = spec.topology.shard(rank)
            rows = B // spec.topology.shards
            out = pm.forward_backward(_tokens()[shard * rows : (shard + 1) * rows], LOSS)
            norm = pm.sync_gradients()
            stats = torch.tensor([out.main_sum, out.mtp_sum, out.balance_sum], dtype=torch.float64)
            dist.all_reduce(stats)
            torch.save(
                {
                    "grads": {n: p.grad for n, p in pm.named_parameters().items()},
                    "stats": stats / spec.topology.shards,
                    "norm": norm,
                    "loads": out.loads_LE,
                    "ep_rank": pm.ep_rank,
                    "pp_rank": pm.pp_rank,
                    "busy": out.timings.busy,
                    "wall": out.timings.wall,
                    "groups": [(n, r) for n, r, _ in pm.groups.made],
                    "kinds": sorted({s.kind for s in out.timings.slots}),
                    "grouped_fp8": pm.grouped_fp8,
                },
                os.path.join(out_dir, f"{name}-rank{rank}.pt"),
            )
            pm.close()
            dist.barrier()
        # a rank that believes in other members than the group has is caught, not left waiting
        with pytest.raises(RuntimeError, match="created their groups differently"):
            check_groups(
                [("world", tuple(range(world + 1)), None)], rank, world, torch.device("cpu")
            )
    finally:
        dist.destroy_process_group()


def _run(tmp_path, world, cases):
    spawn(_worker, args=(world, init_file(tmp_path), str(tmp_path), cases), nprocs=world)
    return {
        name: [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(world)]
        for name, _, _ in cases
    }


def _check(results, ref_parts, ref_grads, ep=1):
    E = tiny().n_routed_experts
    for name, ranks in results.items():
        seen = set()
        # grouped FP8 experts default to CUDA only: on CPU the per-expert path runs
        assert not any(r["grouped_fp8"] for r in ranks), name
        for r in ranks:
            for n, g in r["grads"].items():
                want = ref_grads[n]
                if ep > 1 and ".experts." in n:
                    L = E // ep
                    want = want[r["ep_rank"] * L : (r["ep_rank"] + 1) * L]
                # fp32 rounding: micro-batches sum in another order than the full batch
                torch.testing.assert_close(g, want, rtol=2e-4, atol=2e-7, msg=f"{name}: {n}")
                seen.add(n)
        assert seen == set(ref_grads), f"{name}: parameters missing {set(ref_grads) - seen}"
        main, mtp, balance = ranks[0]["stats"].tolist()
        assert main == pytest.approx(ref_parts.main, rel=1e-5), name
        assert mtp == pytest.approx(ref_parts.mtp, rel=1e-5), name
        assert balance == pytest.approx(ref_parts.balance, rel=1e-4), name
        ref_norm = sum(float(g.double().pow(2).sum()) for g in ref_grads.values()) ** 0.5
        assert all(r["norm"] == pytest.approx(ref_norm, rel=1e-4) for r in ranks), name
        # every assignment of every token of every MoE layer was counted once over the world
        loads = sum(r["loads"] for r in ranks)
        K = tiny().num_experts_per_tok
        assert loads[:-1].sum(1).tolist() == [B * S * K] * (loads.shape[0] - 1)
        assert loads[-1].sum() == B * (S - 1) * K  # the MTP block sees S-1 positions


def test_layout_and_arguments():
    assert split_layers(3, 1, 2).layers == ((0, 1), (2,))
    assert split_layers(3, 1, 4).layers == ((0,), (1,), (2,), ())
    assert split_layers(12, 1, 4).layers == ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9), (10, 11))
    assert split_layers(5, 0, 2).layers == ((0, 1, 2), (3, 4))
    with pytest.raises(ValueError, match="decoder layers"):
        split_layers(3, 1, 5)
    t = Topology(pp=2, dp=3, ep=2)
    assert [t.coords(r) for r in (0, 1, 2, 7, 11)] == [
        (0, 0, 0),
        (0, 0, 1),
        (0, 1, 0),
        (1, 0, 1),
        (1, 2, 1),
    ]
    assert all(t.rank(*t.coords(r)) == r for r in range(t.world))
    assert t.shard(7) == t.shard(1) == 1 and t.shards == 6
    with pytest.raises(ValueError, match="outside"):
        t.coords(12)


def test_weight_grad_split_equals_full_backward():
    """BI then W gives the same gradients as one full backward; BI alone leaves the deferred
    GEMMs' weights (linears, routed experts, head) without gradient and the rest with it."""
    from moeray.platform.model.transformer import Transformer

    def stage_and_loss():
        full = Transformer(tiny())
        full.reset_parameters(seed=SEED)
        stage = PipelineStage(full, split_layers(3, 1, 1), 0)
        enable_weight_grad_split(stage, stage.store)
        loss, _, _ = stage.forward_chunk(None, _tokens(), LOSS, 0.5)
        return stage, loss

    ref, loss = stage_and_loss()
    loss.backward()
    stage, loss = stage_and_loss()
    with stage.store.collect((0, 0, 0), defer=True):
        loss.backward()
    assert stage.model.layers["1"].mlp.experts.gate_proj.grad is None
    mlp_fn = stage.model.layers["1"].mlp.experts.mlp_fn
    assert isinstance(mlp_fn, ExpertsMLP) and mlp_fn.func is experts_mlp  # one node for all experts
    assert (
        stage.lm_head.weight.grad is None
        and stage.model.layers["0"].self_attn.o_proj.weight.grad is None
    )
    assert (
        stage.model.norm.weight.grad is not None
        and stage.model.embed_tokens.weight.grad is not None
    )
    assert stage.store.flush((0, 0, 0)) > 20
    for (n, p), (_, q) in zip(stage.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=n)


def test_pp2_schedules_match_single_process(tmp_path):
    ref_parts, ref_grads = _reference()
    cases = [
        ("1f1b", PipelineSpec(2, schedule="1f1b", microbatches=4), False),
        ("zb1p", PipelineSpec(2, schedule="zb1p", microbatches=4), False),
        ("dualpipe", PipelineSpec(2, schedule="dualpipe", microbatches=4), False),
        ("dualpipe-overlap", PipelineSpec(2, schedule="dualpipe", microbatches=8), True),
    ]
    results = _run(tmp_path, 2, cases)
    _check(results, ref_parts, ref_grads)
    assert results["dualpipe"][0]["kinds"] == ["B", "BI", "F", "F&B", "W"]
    assert results["1f1b"][0]["kinds"] == ["B", "F"]
    # every rank made the same groups in the same order: world, one group per p2p stream
    # (1F1B: act + grad; DualPipe: both per direction), the holder sets' sync groups (1F1B: the
    # embedding's {0, 1}; the others are held once, no group; DualPipe: everything on {0, 1})
    for name, n in (("1f1b", 5), ("zb1p", 5), ("dualpipe", 7)):
        made = [r["groups"] for r in results[name]]
        assert made[0] == made[1] and len(made[0]) == n, (name, made[0])
        assert made[0][0] == ("world", (0, 1)) and all(len(r) == 2 for _, r in made[0]), name


def test_pp4_dualpipe_and_pp2_ep2_match_single_process(tmp_path):
    ref_parts, ref_grads = _reference()
    results = _run(
        tmp_path, 4, [("pp4", PipelineSpec(4, schedule="dualpipe", microbatches=8), False)]
    )
    _check(results, ref_parts, ref_grads)
    results = _run(
        tmp_path,
        4,
        [("pp2ep2", PipelineSpec(2, ep=2, schedule="dualpipe", microbatches=4), True)],
    )
    _check(results, ref_parts, ref_grads, ep=2)
    made = [r["groups"] for r in results["pp2ep2"]]
    assert all(m == made[0] for m in made)
    # world, 2 pp ranks x 2 directions EP groups, 2 EP pipelines x 2 directions x (act, grad),
    # the replicated sync group over all 4 ranks and one expert sync group per EP rank
    assert [len(r) for _, r in made[0]] == [4] + [2] * 4 + [2] * 8 + [4, 2, 2]
    assert [r for n, r in made[0] if n.startswith("ep(")] == [(0, 1), (0, 1), (2, 3), (2, 3)]


def test_timeout_env_and_bench_flags(monkeypatch):
    from moeray.platform.train import bench

    assert dist_timeout_s({}) == DEFAULT_TIMEOUT_S == 600
    assert dist_timeout_s({TIMEOUT_ENV: " 42.5 "}) == 42.5
    for bad in ("0", "-3", "abc", "nan"):
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            dist_timeout_s({TIMEOUT_ENV: bad})
    parse = bench._parser().parse_args
    assert parse([]).overlap is None
    assert parse(["--no-overlap"]).overlap is False and parse(["--overlap"]).overlap is True
    assert parse([]).grouped_fp8 is None  # PipelineModel: grouped on CUDA, per expert on CPU
    assert (
        parse(["--no-grouped-fp8"]).grouped_fp8 is False
        and parse(["--grouped-fp8"]).grouped_fp8 is True
    )
    # a bad timeout stops the CLI before any worker starts
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    assert bench.main(["--steps", "5"]) == 2


def test_cuda_env_is_set_before_the_context(monkeypatch):
    env = {"CUDA_MODULE_LOADING": "LAZY"}  # what NVIDIA's containers export
    apply_cuda_env(env)
    assert env["CUDA_MODULE_LOADING"] == "EAGER" and int(env["CUDA_DEVICE_MAX_CONNECTIONS"]) == 32
    # with a CUDA context already made the settings would be ignored: refuse, naming them
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match="CUDA_DEVICE_MAX_CONNECTIONS"):
        apply_cuda_env({"CUDA_MODULE_LOADING": "LAZY"})
    apply_cuda_env(env)  # already in place: nothing to refuse
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync"


def test_serving_ranks_keep_the_caching_allocator():
    # serving ranks capture Triton kernels in decode graphs, which cudaMallocAsync breaks
    env = {"CUDA_MODULE_LOADING": "LAZY"}
    apply_cuda_env(env, GRAPHS_CUDA_ENV)
    assert env["CUDA_MODULE_LOADING"] == "EAGER" and "PYTORCH_CUDA_ALLOC_CONF" not in env
    assert GRAPHS_CUDA_ENV.items() < CUDA_ENV.items()


def test_cuda_worker_refuses_the_native_allocator(monkeypatch):
    # this process imported torch without the setting, so its allocator is the native one: a
    # worker started so would hang at its first mid-step cudaMalloc; it must say so instead
    for k in CUDA_ENV:
        monkeypatch.setenv(k, "")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    with pytest.raises(
        ValueError,
        match=r"PYTORCH_CUDA_ALLOC_CONF='backend:cudaMallocAsync'.*before torch is imported",
    ):
        init_distributed(0, 1, "file:///nonexistent", torch.device("cuda", 0))


def test_bench_spawns_cuda_workers_with_the_cuda_env(monkeypatch):
    from moeray.platform.train import bench

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    with bench._worker_env("cuda"):
        assert all(os.environ[k] == v for k, v in CUDA_ENV.items())
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    with bench._worker_env("cpu"):
        assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_bench_step_profiler_writes_rank0_tables(tmp_path):
    from moeray.platform.train import bench

    cfg = bench.BenchConfig(steps=4, warmup=1, profile_dir=str(tmp_path))
    a = torch.randn(64, 64)
    profiles: list = []
    with bench._step_profiler(cfg, 1, True, profiles):  # not rank 0: nothing
        a @ a
    with bench._step_profiler(cfg, 0, False, profiles):  # not the profiled step: nothing
        a @ a
    assert profiles == []
    with bench._step_profiler(cfg, 0, True, profiles):
        for _ in range(3):
            a @ a
    assert len(profiles) == 1 and list(tmp_path.iterdir()) == []  # the table comes later
    bench.write_profile(cfg, "dualpipe-fp8", 0, profiles[0])
    text = (tmp_path / "profile-dualpipe-fp8-rank0.txt").read_text()
    assert "## by count" in text and "aten::mm" in text
    assert bench._parser().parse_args(["--profile", "d"]).profile == "d"


@pytest.mark.parametrize("fp8", [False, True])
def test_experts_mlp_equals_the_per_expert_loop(fp8):
    """Experts.mlp_fn (one autograd node for all experts, deferrable dW) against the per-expert
    loop: outputs, input, routing-weight and expert-weight gradients; experts without rows."""
    import copy
    import functools

    import torch.nn.functional as F

    from moeray.platform import fp8 as f8
    from moeray.platform.model.moe import Experts

    torch.manual_seed(0)
    cfg = tiny()
    loop = Experts(cfg)
    for w in (loop.gate_proj, loop.up_proj, loop.down_proj):
        torch.nn.init.normal_(w, std=0.2)
    grouped = copy.deepcopy(loop)
    loop.linear = f8.fp8_linear if fp8 else F.linear
    store = WeightGradStore()
    grouped.mlp_fn = functools.partial(
        experts_mlp, store=store, fp8=fp8, cache=f8.WeightCache() if fp8 else None
    )
    T, K, E = 40, cfg.num_experts_per_tok, cfg.n_routed_experts
    ids = torch.stack(
        [torch.randperm(E - 3)[:K] for _ in range(T)]
    )  # the last 3 experts get no rows
    x = torch.randn(T, cfg.hidden_size)
    dy = torch.randn(T, cfg.hidden_size)
    weights = torch.rand(T, K)
    grads = []
    for module, defer in ((loop, False), (grouped, True)):
        xi, wi = x.clone().requires_grad_(), weights.clone().requires_grad_()
        with store.collect((0, 0, 0), defer=defer):
            y = module(xi, ids, wi)
            y.backward(dy)
        if defer:
            assert module.gate_proj.grad is None, "dW must wait for the W op"
            assert store.flush((0, 0, 0)) == 1
        grads.append(
            (
                y.detach(),
                xi.grad,
                wi.grad,
                module.gate_proj.grad,
                module.up_proj.grad,
                module.down_proj.grad,
            )
        )
    for name, a, b in zip(("y", "dx", "dweights", "dgate", "dup", "ddown"), *grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert grads[1][3][E - 3 :].abs().sum() == 0 and grads[1][3][: E - 3].abs().sum() > 0
    with pytest.raises(ValueError, match="rows"):
        experts_mlp(x, grouped.gate_proj, grouped.up_proj, grouped.down_proj, [1] * E)


def run_experts_mlp(
    rows, D, inter, *, grouped_fp8, defer, seed=0, kgrouped_wgrad=False, counts_tensor=False
):
    """experts_mlp (FP8) forward + backward on random inputs: (y, dx, dW1, dW3, dW2). The
    counts go as a list, or as a tensor with `counts_tensor`."""
    from moeray.platform import fp8 as f8

    g = torch.Generator().manual_seed(seed)
    E = len(rows)
    # bf16-exact inputs: on CUDA both paths round x and dy to bf16 before quantizing; the CPU
    # emulation of the per-expert path would not, and e4m3 rounding flips would show as ~3%
    x = torch.randn(sum(rows), D, generator=g).bfloat16().float().requires_grad_()
    ws = [
        torch.nn.Parameter(torch.randn(E, *shape, generator=g) * 0.2)
        for shape in ((inter, D), (inter, D), (D, inter))
    ]
    dy = torch.randn(sum(rows), D, generator=g).bfloat16().float()
    store = WeightGradStore()
    # bf16 autocast as in training: both paths round the GEMM outputs and the SwiGLU to bf16
    with store.collect((0, 0, 0), defer=defer), torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts_mlp(
            x,
            *ws,
            torch.tensor(rows) if counts_tensor else rows,
            store=store,
            fp8=True,
            cache=f8.WeightCache(),
            grouped_fp8=grouped_fp8,
            kgrouped_wgrad=kgrouped_wgrad,
        )
    y.backward(dy.to(y.dtype))
    store.flush((0, 0, 0))
    return y.detach().float(), x.grad, *(w.grad for w in ws)


def test_grouped_fp8_experts_match_the_per_expert_path(monkeypatch):
    """_GroupedFP8 (128-aligned layout, one quantization per tensor, grouped GEMMs; here the
    kernels' PyTorch references) against the per-expert FP8 emulation: the same output, and
    gradients equal up to the bf16 rounding of the grouped GEMMs' outputs (measured 0.17%); a wrong
    block, scale or transpose gives O(1). Experts without rows, deferred weight grads."""
    # the references, also when tests/kernels (collected first) turned the interpreter on for the
    # process: through the interpreted kernels the match is looser
    # (tests/kernels/test_fp8_grouped.py)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rows = [5, 0, 130, 17]
    want = run_experts_mlp(rows, 128, 160, grouped_fp8=False, defer=False)
    got = run_experts_mlp(rows, 128, 160, grouped_fp8=True, defer=True)
    # The same bf16 outputs but where the two paths' fp32 sums, ordered differently by the CPU's
    # GEMM kernels, round to neighbouring bf16 values: 1 of 19,456 differed, by one ulp, on a
    # Xeon without AVX-512; none on others. A wrong block, scale or transpose moves most by O(1).
    ulp = torch.finfo(torch.bfloat16).eps * want[0].abs().clamp(min=1e-3)
    off = (got[0] - want[0]).abs()
    assert bool((off <= ulp).all()) and int((off > 0).sum()) <= 0.001 * off.numel()
    for name, a, b in zip(("dx", "dW1", "dW3", "dW2"), got[1:], want[1:], strict=True):
        rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert rel < 5e-3, (name, rel)
    assert got[2][1].abs().sum() == 0 and got[4][1].abs().sum() == 0  # expert 1 has no rows
    with pytest.raises(ValueError, match="grouped_fp8"):
        experts_mlp(
            torch.randn(2, 8), *(torch.randn(1, 8, 8),) * 3, [2], fp8=False, grouped_fp8=True
        )


@pytest.mark.parametrize("defer", [False, True])
def test_grouped_fp8_kgrouped_experts_take_counts_as_a_tensor(monkeypatch, defer):
    """FP8 grouped experts with k-grouped weight gradients, given the counts as a tensor with
    the chooser forced (`GroupedExperts.device_layout`; on CUDA in production): the layout
    planned on the device (P 896 where the exact size is 512: 3 blocks of expert -1) gives the
    outputs and gradients of the list, bit for bit (the same GEMMs on the same rows; here the
    kernels' references). Experts without rows (between, last), one of exactly 256 rows; every
    float torch.empty full of NaN, so a tail row left unwritten and then read would show.
    Without kgrouped_wgrad the chooser says no and the counts are read back: the per-expert
    weight gradients slice on the host."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' references (see the test above)
    asked, planned = [], []

    def device_layout(x, *, fp8, kgrouped_wgrad, bf16_wgrad=False):
        asked.append((fp8, kgrouped_wgrad))
        return fp8 and kgrouped_wgrad  # what it says on CUDA

    plan = GroupedExperts._device_plan

    def spy(self, A, counts, align):
        planned.append(align)
        return plan(self, A, counts, align)

    empty = torch.empty

    def nan_empty(*shape, **kw):
        t = empty(*shape, **kw)
        return t.fill_(float("nan")) if t.dtype in (torch.float32, torch.bfloat16) else t

    monkeypatch.setattr(GroupedExperts, "device_layout", staticmethod(device_layout))
    monkeypatch.setattr(GroupedExperts, "_device_plan", spy)
    monkeypatch.setattr(torch, "empty", nan_empty)
    rows = [5, 0, 256, 17, 0]
    for kgrouped in (True, False):
        planned.clear()
        want = run_experts_mlp(
            rows, 128, 160, grouped_fp8=True, defer=defer, kgrouped_wgrad=kgrouped
        )
        assert planned == []
        got = run_experts_mlp(
            rows,
            128,
            160,
            grouped_fp8=True,
            defer=defer,
            kgrouped_wgrad=kgrouped,
            counts_tensor=True,
        )
        assert planned == ([128] if kgrouped else []) and asked[-1] == (True, kgrouped)
        for name, a, b in zip(("y", "dx", "dW1", "dW3", "dW2"), got, want, strict=True):
            assert torch.equal(a, b) and bool(torch.isfinite(a).all()), (kgrouped, name)
        assert all(got[i][e].abs().max() == 0 for i in (2, 3, 4) for e in (1, 4))  # no rows


def test_grouped_fp8_is_a_per_stage_switch(monkeypatch):
    from moeray.platform.fp8 import enable_fp8_training

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' references (see the test above)
    from moeray.platform.model.transformer import Transformer

    for grouped in (False, True):
        full = Transformer(tiny())
        stage = PipelineStage(full, split_layers(3, 1, 1), 0)
        enable_fp8_training(stage)
        enable_weight_grad_split(stage, stage.store, grouped_fp8=grouped)
        kw = stage.model.layers["1"].mlp.experts.mlp_fn.keywords
        assert kw["fp8"] and kw["grouped_fp8"] is grouped and kw["cache"] is not None
        loss, _, _ = stage.forward_chunk(None, _tokens(), LOSS, 0.5)
        loss.backward()  # the whole stage runs either way
        assert stage.model.layers["1"].mlp.experts.gate_proj.grad.abs().sum() > 0


def test_grouped_gemms_apply_to_bf16_on_cuda_and_anything_on_cpu():
    # the rule both the experts' forward and the executor's prewarm (which skips grouped experts)
    # use
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert GroupedExperts.available(cuda, False, torch.bfloat16)
    assert not GroupedExperts.available(cuda, False, torch.float32)
    assert not GroupedExperts.available(cuda, True, torch.bfloat16)
    assert GroupedExperts.available(cpu, False, torch.float32) and not GroupedExperts.available(
        cpu, True, None
    )


def test_grouped_expert_gemms_with_aligned_rows():
    """GroupedExperts' CUDA layout (each expert's rows start at a multiple of 16, zero rows
    between), run on CPU: the same products and weight gradients as the unpadded layout and as
    per-expert matmuls; experts without rows get exact zero gradients."""
    torch.manual_seed(0)
    rows = [5, 0, 17, 16, 1]
    E, K, N = len(rows), 24, 40
    x, dy = torch.randn(sum(rows), K), torch.randn(sum(rows), N)
    w = torch.randn(E, N, K)
    starts = [0, 5, 5, 22, 38]
    want_y = torch.cat(
        [x[s : s + n] @ w[e].t() for e, (s, n) in enumerate(zip(starts, rows, strict=True))]
    )
    want_dw = torch.stack(
        [dy[s : s + n].t() @ x[s : s + n] for s, n in zip(starts, rows, strict=True)]
    )
    for align, planned in ((1, "host"), (16, "host"), (1, "device"), (16, "device")):
        # "device": the counts as a tensor, the layout planned without reading them (P a bound:
        # 39 + 5 x 15 = 114 rows rounded down to 112, a multiple of 16)
        counts = rows if planned == "host" else torch.tensor(rows)
        grp = GroupedExperts(x, counts, align=align)
        exact = sum(rows) if align == 1 else 16 + 0 + 32 + 16 + 16
        assert grp.P == (exact if planned == "host" or align == 1 else 112)
        x_P, dy_P = grp.pad(x), grp.pad(dy)
        torch.testing.assert_close(grp.unpad(grp.mm(x_P, w.transpose(-2, -1))), want_y)
        dw = grp.wgrad(dy_P, x_P, torch.float32)
        torch.testing.assert_close(dw, want_dw)
        assert dw[1].abs().sum() == 0
        assert grp.offs.tolist() == ([5, 5, 22, 38, 39] if align == 1 else [16, 16, 48, 64, 80])
        if planned == "host":
            assert [e for e, _ in grp.padded_segments()] == [0, 2, 3, 4]
        else:
            with pytest.raises(ValueError, match="planned on the device"):
                grp.padded_segments()
        with pytest.raises(ValueError, match="straddle"):  # 128-row blocks, 16-row alignment
            grp.block_expert()
        if align == 16:  # the blocks past the last expert's end (the device plan's tail): -1
            tail = [] if planned == "host" else [-1, -1]
            assert grp.block_expert(16).tolist() == [0, 2, 2, 3, 4, *tail]
        if align > 1:  # the padding rows are zero and every expert starts aligned
            assert x_P.abs().sum(1).nonzero().flatten().tolist() == (
                list(range(0, 5)) + list(range(16, 33)) + list(range(48, 64)) + [64]
            )


def test_device_planned_block_experts_at_128_rows():
    """The FP8 grouped layout (align 128) planned on the device: P is the bound A + 127 E
    rounded down to a multiple of 128, never below the exact size (equal to it when every
    expert has one row past a multiple of 128), and `block_expert` is the host plan's followed
    by -1 for each block past the last expert's end: experts without rows (first, between,
    last) get no block, one of exactly 256 rows two."""
    g = torch.Generator().manual_seed(2)
    cases = [[0, 5, 128, 0, 256, 129, 0], [1, 1, 1, 129], [300], [0, 0, 1]]
    cases += [torch.randint(0, 300, (6,), generator=g).tolist() for _ in range(4)]
    for rows in cases:
        x = torch.randn(sum(rows), 8)
        host = GroupedExperts(x, rows, align=128)
        dev = GroupedExperts(x, torch.tensor(rows), align=128)
        E = len(rows)
        assert dev.P == (sum(rows) + 127 * E) // 128 * 128 >= host.P and dev.P % 128 == 0
        ids = dev.block_expert()
        assert ids.dtype == torch.int32 and ids.shape == (dev.P // 128,)
        want = host.block_expert().tolist() + [-1] * ((dev.P - host.P) // 128)
        assert ids.tolist() == want, rows
        assert dev.offs.tolist() == host.offs.tolist()
        x_P = dev.pad(x)  # the tail is zeros, every row back in place
        assert torch.equal(x_P[: host.P], host.pad(x)) and x_P[host.P :].abs().sum() == 0
        assert torch.equal(dev.unpad(x_P), x)
    assert GroupedExperts(torch.randn(4, 8), torch.tensor([1, 1, 1, 1]), align=128).P == 512
    rows = cases[0]  # 518 rows + 7 x 127 = 1407 -> P 1280, 4 blocks past the exact 768
    blocks = GroupedExperts(torch.randn(518, 8), torch.tensor(rows), align=128).block_expert()
    assert blocks.tolist() == [1, 2, 4, 4, 5, 5, -1, -1, -1, -1]


@pytest.mark.parametrize("device_layout", [False, True])
def test_experts_mlp_takes_counts_as_a_tensor(monkeypatch, device_layout):
    """Rows per expert as a tensor (what `Experts._routed` passes when every expert is local)
    give the outputs and gradients of the list: planned on the device where
    `GroupedExperts.device_layout` (forced here; CUDA with grouped_wgrad in production), read
    back to a list elsewhere. A wrong shape is refused with the expected one named."""
    monkeypatch.setattr(
        GroupedExperts, "device_layout", staticmethod(lambda x, **kw: device_layout)
    )
    g = torch.Generator().manual_seed(3)
    rows, D, inter = [7, 0, 19, 6], 32, 24
    x = torch.randn(sum(rows), D, generator=g)
    ws = [torch.randn(4, *s, generator=g) * 0.2 for s in ((inter, D), (inter, D), (D, inter))]
    dy = torch.randn(sum(rows), D, generator=g)
    got = []
    for counts in (rows, torch.tensor(rows)):
        xi = x.clone().requires_grad_()
        wi = [torch.nn.Parameter(w.clone()) for w in ws]
        y = experts_mlp(xi, *wi, counts)
        y.backward(dy)
        got.append((y.detach(), xi.grad, *(w.grad for w in wi)))
    for a, b in zip(*got, strict=True):
        torch.testing.assert_close(b, a)
    with pytest.raises(ValueError, match=r"expected \[4\]"):
        experts_mlp(x, *ws, torch.tensor(rows[:3]))


def test_experts_layout_is_the_one_experts_mlp_plans(monkeypatch):
    """`ExpertsMLP.layout` (where the model's permute writes the rows) is the device plan the
    grouped path with the same settings makes (the chooser forced: CUDA in production): 16-row
    alignment for BF16 (`GroupedExperts.default_align` forced to CUDA's), 128 for FP8 grouped;
    none for the per-expert paths, an unaligned layout (the CPU's BF16), no rows, or where
    `device_layout` says no (the real rule on the CPU). experts_mlp refuses x of the wrong row
    count for a layout, and a layout of another alignment than its path's."""
    rows, K = [5, 0, 128, 17, 0], 3
    counts, A = torch.tensor(rows), sum(rows)
    x_TD = torch.randn(A // K, 128)
    bf16, fp8 = {}, dict(fp8=True, grouped_fp8=True, kgrouped_wgrad=True)
    per_expert = dict(fp8=True, cache=f8_cache())
    for kw in (bf16, fp8, per_expert):  # the real device_layout: never on the CPU
        assert ExpertsMLP(experts_mlp, **kw).layout(x_TD, counts, A) is None
    asked = []

    def device_layout(x, **kw):
        asked.append(kw)
        return True

    monkeypatch.setattr(GroupedExperts, "device_layout", staticmethod(device_layout))
    assert ExpertsMLP(experts_mlp, **bf16).layout(x_TD, counts, A) is None  # CPU: align 1
    monkeypatch.setattr(GroupedExperts, "default_align", staticmethod(lambda device: 16))
    for kw, align in ((bf16, 16), (fp8, 128)):
        got = ExpertsMLP(experts_mlp, store=None, **kw).layout(x_TD, counts, A)
        want = GroupedExperts(torch.empty(A, 1), counts, align=align)
        assert isinstance(got, GroupedExperts) and got.align == align and got.P == want.P
        assert torch.equal(got.dst_A, want.dst_A) and torch.equal(got.offs, want.offs)
        assert got.P == (A + 5 * (align - 1)) // align * align
    assert asked[-1] == dict(fp8=True, kgrouped_wgrad=True, bf16_wgrad=False)
    assert ExpertsMLP(experts_mlp, **per_expert).layout(x_TD, counts, A) is None
    assert experts_layout(x_TD[:0], counts * 0, 0, **fp8) is None
    layout = experts_layout(x_TD, counts, A, **bf16)
    ws = [torch.randn(5, *s) for s in ((24, 128), (24, 128), (128, 24))]
    with pytest.raises(ValueError, match=r"x has 150 rows; its layout has P=224"):
        experts_mlp(torch.randn(A, 128), *ws, layout)
    with pytest.raises(ValueError, match="aligned to 16 rows; these experts run 128-aligned"):
        experts_mlp(torch.randn(layout.P, 128), *ws, layout, cache=f8_cache(), **fp8)


def f8_cache():
    from moeray.platform import fp8 as f8

    return f8.WeightCache()


def test_routed_experts_write_the_padded_layout_through_the_references(monkeypatch):
    """`Experts._routed` with an `ExpertsMLP` that asks for a padded layout (BF16 grouped, the
    CUDA choosers forced; the permute and combine as their PyTorch references, outside the
    interpreter) gives the output and gradients of the same experts as a plain partial (sorted
    rows, padded inside), bit for bit: the same ops on the same rows. The interpreted kernels:
    tests/kernels/test_moe_permute.py."""
    import functools

    from moeray.platform.model import moe
    from moeray.platform.model.moe import Experts
    from moeray.platform.parallel import grouped_experts as ge

    monkeypatch.setattr(moe, "use_fused_moe_combine", lambda *tensors: True)
    monkeypatch.setattr(GroupedExperts, "device_layout", staticmethod(lambda x, **kw: True))
    monkeypatch.setattr(GroupedExperts, "default_align", staticmethod(lambda device: 16))
    monkeypatch.setattr(ge, "use_grouped_wgrad", lambda device: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # grouped_wgrad's reference too
    permuted = []
    permute = moe.moe_permute

    def spy(x_TD, pos_TK, rows=None):
        permuted.append(rows)
        return permute(x_TD, pos_TK, rows)

    monkeypatch.setattr(moe, "moe_permute", spy)
    cfg = tiny()
    torch.manual_seed(0)
    experts = Experts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    E, K, T = cfg.n_routed_experts, 4, 21
    g = torch.Generator().manual_seed(7)
    ids = torch.stack([torch.randperm(E - 2, generator=g)[:K] for _ in range(T)])
    x = torch.randn(T, cfg.hidden_size, generator=g).bfloat16()  # bf16 autocast, as trained
    w = torch.rand(T, K, generator=g)
    a = torch.randn(T, cfg.hidden_size, generator=g).bfloat16()
    dout = torch.randn(T, cfg.hidden_size, generator=g).bfloat16()
    got = []
    for fn in (functools.partial, ExpertsMLP):
        experts.mlp_fn = fn(experts_mlp)
        experts.zero_grad(set_to_none=True)
        xi, wi, ai = (t.clone().requires_grad_() for t in (x, w, a))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = experts(xi, ids, wi, add_TD=ai)
        out.backward(dout)
        got.append((out, xi.grad, wi.grad, ai.grad, experts.gate_proj.grad, experts.down_proj.grad))
    # the sorted rows through PyTorch's gather (no permute), then the padded layout's P: the
    # bound A + E x 15 = 84 + 16 x 15 = 324 rows rounded down to a multiple of 16
    assert permuted == [320]
    monkeypatch.setenv("MOERAY_FUSED_MOE_PADFREE", "0")  # the A/B switch: no layout
    assert ExpertsMLP(experts_mlp).layout(x, torch.tensor([T * K] + [0] * (E - 1)), T * K) is None
    for name, p, q in zip(("out", "dx", "dw", "dadd", "dW1", "dW2"), *got, strict=True):
        if name == "dx":  # the gather's backward adds a token's K rows in bf16, the permute's
            # in fp32 with one rounding (tests/kernels/test_moe_permute.py says more)
            assert (p.float() - q.float()).abs().max() <= 2**-6 * q.float().abs().max()
        else:
            assert torch.equal(p, q) and p.abs().max() > 0, name
    assert got[1][4][E - 2 :].abs().max() == 0  # experts without rows


def test_routed_experts_pass_device_counts_only_when_all_are_local():
    """`Experts._routed` hands mlp_fn the counts as a device tensor when every routed expert is
    held here (no host sync), a list under expert parallelism (ids of other ranks sort last)."""
    from moeray.platform.model.moe import Experts

    cfg = tiny()
    experts = Experts(cfg)
    torch.nn.init.normal_(experts.gate_proj, std=0.02)
    torch.nn.init.normal_(experts.up_proj, std=0.02)
    torch.nn.init.normal_(experts.down_proj, std=0.02)
    seen = []

    def spy(x, w1, w3, w2, rows):
        seen.append(rows)
        n = experts.num_experts  # the weights this rank would hold
        return experts_mlp(x, w1[:n], w3[:n], w2[:n], rows)

    experts.mlp_fn = spy
    E, K, T = cfg.n_routed_experts, 2, 9
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, cfg.hidden_size, generator=g)
    ids = torch.randint(0, E, (T, K), generator=g)
    weights = torch.rand(T, K, generator=g)
    y_all = experts(x, ids, weights)
    assert (
        isinstance(seen[-1], torch.Tensor)
        and seen[-1].tolist() == torch.bincount(ids.flatten(), minlength=E).tolist()
    )
    experts.num_experts = E // 2  # this rank holds the first half (expert parallelism)
    y_half = experts(x, ids, weights, expert_offset=0)
    assert isinstance(seen[-1], list) and sum(seen[-1]) == int((ids < E // 2).sum())
    assert not torch.allclose(y_half, y_all)


@pytest.mark.parametrize("defer", [False, True])
def test_grouped_wgrad_path_equals_torch_over_two_micro_batches(monkeypatch, defer):
    """The BF16 grouped experts' weight gradients through `grouped_wgrad` (the chooser forced on;
    on CPU the kernel's PyTorch reference) against torch._grouped_mm + cast + autograd's add, over
    two micro-batches: the first returns fp32 dW, the second adds into w.grad itself (and returns
    None), deferred to the W op or not; outputs and input gradients do not depend on it."""
    from moeray.platform.parallel import grouped_experts as ge

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference (test above says why)
    calls: list[bool] = []

    def spy(dy_PN, x_PK, ends, *, accumulate_into=None):
        calls.append(accumulate_into is not None)
        return grouped_wgrad(dy_PN, x_PK, ends, accumulate_into=accumulate_into)

    grouped_wgrad = ge.grouped_wgrad
    monkeypatch.setattr(ge, "grouped_wgrad", spy)
    g = torch.Generator().manual_seed(5)
    rows, D, inter = [5, 0, 37, 17], 48, 40
    x = torch.randn(sum(rows), D, generator=g)
    ws = [
        torch.randn(len(rows), *s, generator=g) * 0.2 for s in ((inter, D), (inter, D), (D, inter))
    ]
    dys = [torch.randn(sum(rows), D, generator=g) for _ in range(2)]
    got = []
    for kernel in (False, True):
        monkeypatch.setattr(ge, "use_grouped_wgrad", lambda device, on=kernel: on)
        xi = x.clone().requires_grad_()
        wi = [torch.nn.Parameter(w.clone()) for w in ws]
        store = WeightGradStore()
        for mb, dy in enumerate(dys):
            with (
                store.collect((0, mb, 0), defer=defer),
                torch.autocast("cpu", dtype=torch.bfloat16),
            ):
                y = experts_mlp(xi, *wi, rows, store=store)
            y.backward(dy.to(y.dtype))
            store.flush((0, mb, 0))
        got.append((y.detach(), xi.grad, *(w.grad for w in wi)))
    assert calls == [False] * 3 + [True] * 3  # micro-batch 2 added in the GEMM's epilogue
    for name, a, b in zip(("y", "dx", "dW1", "dW3", "dW2"), *got, strict=True):
        if name.startswith("dW"):
            # the torch path rounds each micro-batch's dW to bf16 (2^-9 relative), the kernel
            # writes and adds fp32; a wrong expert or row range: O(1)
            assert b.dtype == torch.float32
            assert (b - a).abs().max() <= 2**-8 * a.abs().max(), name
            assert (b - a).abs().max() > 0, "the kernel path must not round dW to bf16"
        else:
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    assert all(got[1][i][1].abs().max() == 0 for i in (2, 3, 4))  # expert 1 has no rows


def test_grouped_wgrad_chooser(monkeypatch):
    """One place decides: CUDA only (CPU keeps torch._grouped_mm), one process, and
    MOERAY_FUSED_GROUPED_WGRAD=0 switches it off. `GroupedExperts.device_layout` (counts kept
    on the device) follows it for BF16, and says yes for FP8 with kgrouped_wgrad whatever that
    switch says; never on the CPU, never for FP8's per-expert weight gradients."""
    from moeray.platform.parallel.grouped_experts import use_grouped_wgrad

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    x_cuda = SimpleNamespace(is_cuda=True, device=cuda)  # all the rule reads of a CUDA x
    layout = GroupedExperts.device_layout
    monkeypatch.delenv("MOERAY_FUSED_GROUPED_WGRAD", raising=False)
    assert use_grouped_wgrad(cuda) and not use_grouped_wgrad(cpu)
    for switch in ("1", "0"):
        monkeypatch.setenv("MOERAY_FUSED_GROUPED_WGRAD", switch)
        assert layout(x_cuda, fp8=False, kgrouped_wgrad=False) is (switch == "1")
        assert layout(x_cuda, fp8=True, kgrouped_wgrad=True)
        assert not layout(x_cuda, fp8=True, kgrouped_wgrad=False)
        assert not any(
            layout(torch.zeros(1, 1), fp8=f, kgrouped_wgrad=kg)
            for f in (False, True)
            for kg in (False, True)
        )
    assert not use_grouped_wgrad(cuda)


def test_padded_rows_change_no_gemm():
    # the CUDA path pads the token dim of every split-linear GEMM to 128 rows (fp8.pad_rows)
    from moeray.platform.fp8 import pad_rows, padded_row_counts

    g = torch.Generator().manual_seed(0)
    x, dy, w = (
        torch.randn(130, 24, generator=g),
        torch.randn(130, 40, generator=g),
        torch.randn(40, 24, generator=g),
    )
    xp, dyp = pad_rows(x), pad_rows(dy)
    assert xp.shape == (256, 24) and pad_rows(xp) is xp and pad_rows(x[:0]).shape == (0, 24)
    assert torch.equal(xp[130:], torch.zeros(126, 24)) and torch.equal(xp[:130], x)
    torch.testing.assert_close((xp @ w.t())[:130], x @ w.t())
    torch.testing.assert_close((dyp @ w)[:130], dy @ w)
    torch.testing.assert_close(dyp.t() @ xp, dy.t() @ x)
    assert padded_row_counts(1) == [128] and padded_row_counts(300) == [128, 256, 384]
    with pytest.raises(ValueError, match="max_rows=0"):
        padded_row_counts(0)


def test_bench_train_summary_keeps_finished_runs_when_one_failed():
    from moeray.platform.train import bench

    cfg = bench.BenchConfig(steps=4, warmup=1)

    def run_numbers(step_s, losses):
        return {
            "step_time_s": step_s,
            "bubble_fraction": 0.1,
            "simulated_bubble_fraction": 0.05,
            "op_costs_s": {"F": 0.01},
            "losses": losses,
        }

    raw = {
        "matmul_flops_per_s": 1e12,
        "dualpipe-fp8": run_numbers(2.0, [7.0, 6.0, 5.0, 4.0]),
        "1f1b-fp8": run_numbers(3.0, [7.0, 6.0, 5.0, 4.0]),
    }
    out = bench.summarize(cfg, raw, {"dualpipe-bf16": "ProcessExitedException: hung"})
    assert out["failed_runs"] == {"dualpipe-bf16": "ProcessExitedException: hung"}
    assert out["step_time_s"] == 2.0 and out["step_time_s_1f1b"] == 3.0
    assert out["tokens_per_s"] == cfg.global_batch * cfg.seq_len / 2.0
    assert out["fp8_bf16_step_time_ratio"] is None and out["fp8_bf16_loss_rel_diff"] is None
    assert out["losses_bf16"] is None and out["bf16_final_loss"] is None
    raw["dualpipe-bf16"] = run_numbers(1.6, [7.0, 6.0, 5.0, 4.004])
    out = bench.summarize(cfg, raw, {})
    assert out["failed_runs"] == {} and out["fp8_bf16_step_time_ratio"] == pytest.approx(1.25)
    assert out["fp8_bf16_loss_rel_diff"] == pytest.approx(0.004 / 4.004)
    with pytest.raises(KeyError):  # no main run, no result
        bench.summarize(cfg, {"matmul_flops_per_s": 1e12}, {"dualpipe-fp8": "hung"})
