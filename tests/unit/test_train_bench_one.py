"""`moeray bench train --pp 1` (train/bench_one.py): the one-device run end to end on CPU and the
result's fields, the model FLOPs per token against a count of the model's own weights, the
`--layers auto` memory plan, the launch counter, the whole model with grouped experts against the
per-expert loop, and where AdamW's implementation is chosen."""

import json
import math
import re
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

from moeray.platform.config import moonlight_16b_a3b, tiny
from moeray.platform.fp8 import enable_fp8_training
from moeray.platform.model.moe import Experts
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.experts_mlp import enable_grouped_experts
from moeray.platform.train import bench, bench_one, bench_run
from moeray.platform.train import step as tstep
from moeray.platform.train.bench_common import BenchConfig, train_flops_per_token

GIB = 1 << 30


def test_one_device_bench_runs_bf16_then_fp8_and_writes_its_result(tmp_path, capsys):
    args = ["--pp", "1", "--steps", "4", "--warmup", "1", "--seq-len", "16", "--layers", "auto"]
    args += ["--microbatches", "2", "--micro-batch-size", "1", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    res = json.loads((tmp_path / "train-1gpu-cpu.json").read_text())
    assert res["device"].startswith("cpu") and res["date"] and "command" in res
    assert res["layers"] == tiny().num_hidden_layers and res["layers_plan"] is None  # CPU: no plan
    assert res["tokens_per_step"] == 2 * 16
    assert res["train_flops_per_token"] == train_flops_per_token(tiny(), 16)
    assert res["matmul_flops_per_s_measured"] > 0 and res["peak_bf16_flops_per_s_datasheet"] is None
    assert set(res["runs"]) == {"bf16", "fp8"} and res["failed_runs"] == {}  # CPU: no k-grouped
    for name, r in res["runs"].items():
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0, name
        assert 0 < r["mfu_measured"] < 1 and r["mfu_datasheet"] is None, name
        assert len(r["losses"]) == 4 and all(math.isfinite(x) for x in r["losses"]), name
        # the same weights and batches: both start near log V
        assert r["losses"][0] == pytest.approx(math.log(tiny().vocab_size), rel=0.05), name
        # nothing to count on the CPU: the step is not profiled
        assert r["gpu_kernels_per_step"] is None and r["peak_memory_bytes"] is None, name
        assert r["optimizer"] == "AdamW(fused=False, moments=float32)", name
    bf16, fp8 = res["runs"]["bf16"], res["runs"]["fp8"]
    ratio = fp8["step_time_s"] / bf16["step_time_s"]
    assert res["fp8_bf16_step_time_ratio"] == pytest.approx(ratio) == fp8["step_time_vs_bf16"]
    assert res["fp8_faster"] == (res["fp8_bf16_step_time_ratio"] < 1)
    assert res["fastest_fp8_run"] == "fp8" and res["fastest_fp8_step_time_ratio"] == ratio
    assert len(bf16["peak_memory_bytes_per_step"] or []) == 0  # CPU: no device memory
    gap = abs(fp8["final_loss"] - bf16["final_loss"]) / bf16["final_loss"]
    assert res["fp8_bf16_loss_rel_diff"] == pytest.approx(gap) and gap < 2.5e-3
    out = capsys.readouterr().out
    assert "bf16: step 4/4" in out and "fp8_bf16_step_time_ratio" in out


def test_a_failed_kgrouped_run_keeps_the_others_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # grouped FP8 on CPU: the kernels' references
    real = bench_one.one_run
    saved = []

    def one_run(cfg, model_cfg, spec, tokens, device, profile=True):
        if spec.kgrouped:
            raise RuntimeError("kernel exploded")
        return real(cfg, model_cfg, spec, tokens, device, profile)

    monkeypatch.setattr(bench_one, "one_run", one_run)
    real_write = bench_one.write_result

    def write_result(name, numbers, directory=None):
        saved.append(sorted(numbers["runs"]))
        return real_write(name, numbers, directory=directory)

    monkeypatch.setattr(bench_one, "write_result", write_result)
    args = ["--pp", "1", "--steps", "3", "--warmup", "1", "--seq-len", "8", "--microbatches", "1"]
    args += ["--kgrouped-wgrad", "--grouped-fp8", "--out", str(tmp_path)]
    assert bench.main(args) == 1
    res = json.loads((tmp_path / "train-1gpu-cpu.json").read_text())
    assert res["failed_runs"] == {"fp8-kgrouped": "RuntimeError: kernel exploded"}
    assert set(res["runs"]) == {"bf16", "fp8"} and res["fp8_bf16_loss_rel_diff"] is not None
    # written after each finished run, then once more at the end
    assert saved == [["bf16"], ["bf16", "fp8"], ["bf16", "fp8"]]
    assert "fp8-kgrouped" in capsys.readouterr().err


def test_runs_picks_a_subset_and_bf16_wgrad_trains(tmp_path, monkeypatch):
    """`--runs` makes the named runs only; fp8-bf16wgrad (FP8 grouped experts, their weight
    gradients from bf16 operands) trains to BF16's loss. A run that does not apply here (the
    CPU without --kgrouped-wgrad) is refused with what is available."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # grouped FP8 on CPU: the kernels' references
    args = ["--pp", "1", "--steps", "3", "--warmup", "1", "--seq-len", "8", "--microbatches", "2"]
    args += ["--grouped-fp8", "--out", str(tmp_path)]
    assert bench.main([*args, "--runs", "bf16,fp8-bf16wgrad"]) == 0
    res = json.loads((tmp_path / "train-1gpu-cpu.json").read_text())
    assert set(res["runs"]) == {"bf16", "fp8-bf16wgrad"} and res["failed_runs"] == {}
    assert res["runs"]["fp8-bf16wgrad"]["loss_rel_diff_vs_bf16"] < 2.5e-3
    assert res["fastest_fp8_run"] == "fp8-bf16wgrad"
    # on CUDA a name with -graphs is the same run replayed from CUDA graphs, in the order asked
    cfg = BenchConfig(device="cuda", pp=1, runs="bf16,fp8-bf16wgrad-graphs,bf16-graphs")
    specs = bench_run.run_specs(cfg, torch.device("cuda"))
    assert [(s.name, s.graphs, s.bf16_wgrad) for s in specs] == [
        ("bf16", False, False),
        ("fp8-bf16wgrad-graphs", True, True),
        ("bf16-graphs", True, False),
    ]
    cfg = BenchConfig(pp=1, runs="bf16,fp8-kgrouped", kgrouped_wgrad=False)
    with pytest.raises(ValueError, match=r"fp8-kgrouped not available here.*available: bf16, fp8"):
        bench_run.run_specs(cfg, torch.device("cpu"))


def test_seeds_train_each_run_from_each_seed_and_compare_seed_by_seed(tmp_path):
    """`--seeds 2`: each run trains from seeds 3 and 4 (other weights and batches: other losses),
    the step time is the seeds' mean, and the loss differences are |mean| of the signed per-seed
    ones, each seed against BF16's from the same seed."""
    args = ["--pp", "1", "--steps", "3", "--warmup", "1", "--seq-len", "8", "--microbatches", "1"]
    args += ["--seeds", "2", "--seed", "3", "--runs", "bf16,fp8", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    res = json.loads((tmp_path / "train-1gpu-cpu.json").read_text())
    assert res["seeds"] == [3, 4]
    bf16, fp8 = res["runs"]["bf16"], res["runs"]["fp8"]
    for r in (bf16, fp8):
        by_seed = r["losses_by_seed"]
        assert list(by_seed) == ["3", "4"] and all(len(v) == 3 for v in by_seed.values())
        assert by_seed["3"] == r["losses"] and by_seed["3"][0] != by_seed["4"][0]
        times = list(r["step_time_s_by_seed"].values())
        assert r["step_time_s"] == pytest.approx(sum(times) / 2)
    signed = {
        s: (sum(fp8["losses_by_seed"][s][-3:]) - sum(bf16["losses_by_seed"][s][-3:]))
        / sum(bf16["losses_by_seed"][s][-3:])
        for s in ("3", "4")
    }
    assert fp8["loss_rel_diff_vs_bf16_mean_last3_by_seed"] == pytest.approx(signed)
    assert fp8["loss_rel_diff_vs_bf16_mean_last3"] == pytest.approx(abs(sum(signed.values()) / 2))
    final = [(fp8["losses_by_seed"][s][-1] / bf16["losses_by_seed"][s][-1] - 1) for s in signed]
    assert fp8["loss_rel_diff_vs_bf16"] == pytest.approx(abs(sum(final) / 2))
    assert res["fastest_fp8_loss_rel_diff_mean_last3"] == fp8["loss_rel_diff_vs_bf16_mean_last3"]


def test_fp8_runs_with_their_own_scopes_share_one_bf16_run(tmp_path):
    """`--runs bf16,fp8,fp8@experts`: two FP8 runs of other scopes (other losses), each compared
    with the one BF16 run and its scope recorded; a scope on a BF16 run or an unknown one is
    refused with the accepted ones named."""
    args = ["--pp", "1", "--steps", "3", "--warmup", "1", "--seq-len", "8", "--microbatches", "1"]
    args += ["--runs", "bf16,fp8,fp8@experts", "--fp8-scope", "all", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    runs = json.loads((tmp_path / "train-1gpu-cpu.json").read_text())["runs"]
    assert list(runs) == ["bf16", "fp8", "fp8@experts"]
    assert [runs[n].get("fp8_scope") for n in runs] == [None, "all", "experts"]
    assert runs["fp8@experts"]["vs_run"] == runs["fp8"]["vs_run"] == "bf16"
    assert runs["fp8@experts"]["losses"] != runs["fp8"]["losses"]
    cfg = BenchConfig(device="cuda", pp=1, runs="bf16-graphs,fp8-bf16wgrad-graphs@mlp")
    (spec,) = bench_run.run_specs(cfg, torch.device("cuda"))[1:]
    assert (spec.name, spec.scope, spec.graphs, spec.bf16_wgrad) == (
        "fp8-bf16wgrad-graphs@mlp",
        "mlp",
        True,
        True,
    )
    assert bench_one.base_run(spec.name, {"bf16": 0, "bf16-graphs": 0}) == "bf16-graphs"
    for bad in ("bf16,fp8@attention", "bf16@mlp,fp8"):
        with pytest.raises(ValueError, match=r"a scope .* FP8 run .* all, all-but-o-proj, mlp"):
            BenchConfig(pp=1, runs=bad)


def test_each_run_is_compared_with_bf16_on_its_own_host_path():
    got = dict.fromkeys(["bf16", "bf16-graphs", "fp8", "fp8-bf16wgrad-graphs"])
    assert bench_one.base_run("fp8", got) == "bf16"
    assert bench_one.base_run("fp8-bf16wgrad-graphs", got) == "bf16-graphs"
    assert bench_one.base_run("bf16-graphs", got) == "bf16"
    assert bench_one.base_run("bf16", got) is None
    only_graphed = dict.fromkeys(["bf16-graphs", "fp8"])
    assert bench_one.base_run("fp8", only_graphed) == "bf16-graphs"
    assert bench_one.tail_steps(4) == 4 and bench_one.tail_steps(30) == 5
    assert bench_one.tail_steps(120) == 12


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--pp", "2", "--layers", "auto"], r"layers='auto' needs one device"),
        (["--pp", "1", "--layers", "two"], r"layers='two': expected a number"),
        (["--pp", "1", "--layers", "1"], r"layers=1: tiny has 1 dense first layer"),
        (["--pp", "1", "--model", "nowhere.json"], r"model='nowhere.json' is neither a preset"),
        (["--pp", "1", "--moments-dtype", "fp8"], r"moments_dtype='fp8': expected one of"),
        (["--pp", "1", "--runs", "fp8"], r"runs='fp8': expected .* including bf16"),
        (["--pp", "1", "--runs", "bf16,fp9"], r"runs='bf16,fp9': expected .*fp8-bf16wgrad"),
        (["--pp", "2", "--runs", "bf16"], r"runs='bf16': .*on one device"),
        (["--pp", "1", "--runs", "bf16,bf16-graphs"], r"runs='bf16,bf16-graphs': .*CUDA only"),
        (["--pp", "1", "--runs", "bf16,fp8-graphs"], r"fp8-graphs cannot be captured.*on the host"),
        (["--pp", "1", "--seeds", "0"], r"seeds=0: expected >= 1"),
        (["--pp", "2", "--seeds", "2"], r"seeds=2: .*1 unless on one device"),
    ],
)
def test_one_device_bench_refuses_bad_flags(flags, match, capsys):
    assert bench.main(flags) == 2
    assert re.search(match, capsys.readouterr().err)


def test_layers_and_hf_config_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(moonlight_16b_a3b().to_hf()))
    cfg = BenchConfig(model=str(path), pp=1, layers="5")
    assert cfg.model_config().num_hidden_layers == 5
    assert cfg.model_config().hidden_size == 2048 and cfg.model_config(3).num_hidden_layers == 3


def test_flops_per_token_equals_a_count_of_the_models_own_weights():
    """6 x (every matmul weight a token passes through: routed experts at K of E, the head once
    for the main model and once per MTP depth, no embedding; norm weights are in the formula's
    parameter count too) + 3 x causal attention, counted here from tiny's modules."""
    cfg = tiny()
    K, E, S = cfg.num_experts_per_tok, cfg.n_routed_experts, 37
    model = Transformer(cfg)
    n = 0.0
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight":
            continue
        routed = name.rsplit(".", 1)[0].endswith("experts") and p.dim() == 3
        n += p.numel() * (K / E if routed else 1)
    n += cfg.num_nextn_predict_layers * model.lm_head.weight.numel()  # MTP reuses the head
    # by hand for tiny: 3 layers + 1 MTP block, 4 heads, d_qk = 16 + 8, d_v = 16, keys (S + 1) / 2
    # on average, 2 FLOPs a product, QK^T and PV: 4 * 4 * (24 + 16) * (S + 1) forward
    attn = 4 * 4 * (24 + 16) * (S + 1)
    assert n == 274_496 + 64 * 1024  # the count itself, written out: a change of tiny shows here
    assert train_flops_per_token(cfg, S) == 6 * n + 3 * attn


def test_fit_layers_picks_the_most_that_fit_for_moonlight():
    cfg = BenchConfig(model="moonlight_16b_a3b", pp=1, seq_len=4096, micro_batch_size=1)
    m = moonlight_16b_a3b()
    plan = bench_one.fit_layers(cfg, m, 140 * GIB)  # an H200's memory
    assert 2 <= plan.layers < m.num_hidden_layers and plan.dense == 1
    assert plan.fixed + (plan.layers - 1) * plan.per_moe_layer <= plan.budget
    assert plan.fixed + plan.layers * plan.per_moe_layer > plan.budget  # one more would not fit
    # a MoE layer holds ~585M parameters: 16 B each in fp32 state, at least that in the plan
    assert plan.per_moe_layer > 585e6 * 16 and plan.state_bytes_per_param == 16
    assert f"{plan.layers} layers" in plan.reason() and "GiB" in plan.reason()
    bf16 = bench_one.fit_layers(replace(cfg, moments_dtype="bfloat16"), m, 140 * GIB)
    assert bf16.layers > plan.layers and bf16.state_bytes_per_param == 12
    assert bench_one.fit_layers(cfg, m, 4000 * GIB).layers == m.num_hidden_layers  # capped
    with pytest.raises(ValueError, match=r"does not fit 10.0 GiB.*--moments-dtype bfloat16"):
        bench_one.fit_layers(cfg, m, 10 * GIB)


def test_fit_layers_counts_the_fused_cross_entropy_logits_on_cuda(monkeypatch):
    """CUDA runs take the fused cross-entropy (2 B a token and vocab entry a head, the grad over
    the bf16 logits) instead of PyTorch's 16: 14 x 4096 x 163,840 x (1 + MTP depths) bytes less
    fixed, ~9.4 GB a head (Moonlight has no MTP depth); MOERAY_FUSED_CROSS_ENTROPY=0 restores it."""
    m = moonlight_16b_a3b()
    cpu = BenchConfig(model="moonlight_16b_a3b", pp=1, seq_len=4096, micro_batch_size=1)
    cuda = replace(cpu, device="cuda")
    plan_cpu, plan_cuda = (bench_one.fit_layers(c, m, 140 * GIB) for c in (cpu, cuda))
    heads = 1 + m.num_nextn_predict_layers
    assert plan_cpu.fixed - plan_cuda.fixed == 4096 * m.vocab_size * 14 * heads
    assert plan_cuda.layers >= plan_cpu.layers
    monkeypatch.setenv("MOERAY_FUSED_CROSS_ENTROPY", "0")
    assert bench_one.fit_layers(cuda, m, 140 * GIB) == plan_cpu


def test_profile_counter():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.randn(8, 8) @ torch.randn(8, 8)
    got = bench_run._count_profile(prof)
    assert set(got.values()) == {None}  # nothing ran on a GPU

    def ev(name, cuda, us=0.0):
        span = types.SimpleNamespace(elapsed_us=lambda: us)
        kind = DeviceType.CUDA if cuda else DeviceType.CPU
        return types.SimpleNamespace(name=name, device_type=kind, time_range=span)

    events = [ev("sm90_gemm", True, 30.0), ev("Memcpy HtoD", True, 5.0), ev("quant", True, 2.0)]
    events += [ev("sm90_gemm", True, 10.0), ev("cudaLaunchKernel", False), ev("aten::mm", False)]
    events += [ev("cuLaunchKernelEx", False)]
    got = bench_run._count_profile(types.SimpleNamespace(events=lambda: events))
    assert got["gpu_kernels"] == 3 and got["copies"] == 1 and got["launch_calls"] == 2
    assert got["gpu_time_s"] == pytest.approx(42e-6)  # kernels only, not the copy
    assert got["top"] == [["sm90_gemm", 2, pytest.approx(40e-6)], ["quant", 1, pytest.approx(2e-6)]]


def _loss_and_grads(model, tokens, fp8_autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fp8_autocast):
        parts = tstep.compute_loss(model, tokens, tstep.LossConfig())
    parts.total.backward()
    return parts.main, {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("fp8", [False, True])
def test_whole_model_with_grouped_experts_equals_the_per_expert_loop(fp8):
    """The one-device bench's model (experts through `experts_mlp`, CPU: grouped GEMMs for BF16,
    the per-expert FP8 emulation for FP8) against the model's own per-expert loop: the same loss
    and gradients at odd shapes (3 sequences of 11 tokens: expert row counts of every parity,
    some experts empty)."""
    cfg = tiny()
    tokens = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    got = []
    for grouped in (False, True):
        model = Transformer(cfg)
        model.reset_parameters(seed=0)
        if fp8:
            enable_fp8_training(model)
        if grouped:
            assert enable_grouped_experts(model, grouped_fp8=False) == 3  # 2 MoE layers + MTP
        experts = [m for m in model.modules() if isinstance(m, Experts)]
        assert all((m.mlp_fn is not None) == grouped for m in experts)
        got.append(_loss_and_grads(model, tokens, fp8_autocast=fp8))
    assert got[1][1].keys() == got[0][1].keys()
    if not fp8:  # fp32: the same products in the same order
        assert got[1][0] == pytest.approx(got[0][0], rel=1e-6)
        for name, want in got[0][1].items():
            torch.testing.assert_close(got[1][1][name], want, rtol=1e-4, atol=1e-6, msg=name)
        return
    # FP8 under bf16 autocast: the activations are bf16 (model/autocast.py) and the two paths
    # round them at different points (the loop casts each expert's output, experts_mlp all rows
    # at once), so an e4m3 quantization (3 mantissa bits, steps of 6-12%) can land on the other
    # side of a step: up to 7% of a gradient's largest entry measured on CPU. A wrong expert,
    # row or scale: O(1).
    assert got[1][0] == pytest.approx(got[0][0], rel=1e-3)
    for name, want in got[0][1].items():
        err = (got[1][1][name] - want).abs().max() / want.abs().max()
        assert err < 0.15, (name, float(err))


def test_grouped_experts_switch_keeps_fp8_and_its_cache():
    model = Transformer(tiny())
    enable_fp8_training(model)
    enable_grouped_experts(model, grouped_fp8=True)
    kw = next(m for m in model.modules() if isinstance(m, Experts)).mlp_fn.keywords
    assert kw["fp8"] and kw["grouped_fp8"] and kw["cache"] is not None
    plain = Transformer(tiny())
    enable_grouped_experts(plain, grouped_fp8=True)  # BF16 experts: no FP8 kernel
    kw = next(m for m in plain.modules() if isinstance(m, Experts)).mlp_fn.keywords
    assert not kw["fp8"] and not kw["grouped_fp8"] and kw["cache"] is not None  # bf16 casts
    assert next(m for m in plain.modules() if isinstance(m, Experts)).linear is F.linear


def test_weight_cache_keeps_a_cast_until_the_weight_changes():
    from moeray.platform.fp8 import WeightCache

    cache, w = WeightCache(), torch.nn.Parameter(torch.randn(3, 4, 5))
    a = cache.cast(w, torch.bfloat16)
    assert a.dtype == torch.bfloat16 and torch.equal(a, w.detach().bfloat16())
    assert cache.cast(w, torch.bfloat16) is a  # no new cast while w is unchanged
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones_like(w)
    opt.step()  # an in-place update moves w's version counter
    b = cache.cast(w, torch.bfloat16)
    assert b is not a and torch.equal(b, w.detach().bfloat16()) and not torch.equal(a, b)


def test_adamw_is_fused_on_cuda_only():
    cpu = [torch.nn.Parameter(torch.zeros(2))]
    assert tstep.adamw_impl(cpu) == {} and tstep.adamw_impl([]) == {}
    assert tstep.adamw_impl([types.SimpleNamespace(is_cuda=True)] * 2) == {"fused": True}
    assert tstep.adamw_impl([types.SimpleNamespace(is_cuda=True), cpu[0]]) == {}
    opt = tstep.build_optimizer(torch.nn.Linear(2, 2), tstep.OptimConfig())
    assert not opt.defaults.get("fused")


def test_kgrouped_weight_grads_equal_the_per_expert_gemms(monkeypatch):
    """The grouped FP8 experts' weight gradients from one k-grouped GEMM per projection against one
    GEMM per expert (here the kernels' PyTorch references: the same products per expert), with
    ragged and empty experts, over two micro-batches (the second k-grouped GEMM adds into the
    gradient itself); outputs and input gradients do not depend on it."""
    from moeray.platform import fp8 as f8
    from moeray.platform.parallel.experts_mlp import experts_mlp

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the references (test_pipeline.py says why)
    g = torch.Generator().manual_seed(4)
    rows, D, inter = [5, 0, 130, 17], 128, 160
    x = torch.randn(sum(rows), D, generator=g).bfloat16().float()
    ws = [
        torch.randn(len(rows), *s, generator=g) * 0.2 for s in ((inter, D), (inter, D), (D, inter))
    ]
    dys = [torch.randn(sum(rows), D, generator=g).bfloat16() for _ in range(2)]
    got = []
    modes = ({}, {"kgrouped_wgrad": True}, {"bf16_wgrad": True})
    for mode in modes:
        xi = x.clone().requires_grad_()
        wi = [torch.nn.Parameter(w.clone()) for w in ws]
        cache = f8.WeightCache()
        for dy in dys:  # two micro-batches: the second adds into the first's gradients
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = experts_mlp(xi, *wi, rows, fp8=True, cache=cache, grouped_fp8=True, **mode)
            y.backward(dy.to(y.dtype))
        got.append((y.detach(), xi.grad, *(w.grad for w in wi)))
    for mode, other in zip(modes[1:], got[1:], strict=True):
        for name, a, b in zip(("y", "dx", "dW1", "dW3", "dW2"), got[0], other, strict=True):
            if name.startswith("dW") and "kgrouped_wgrad" in mode:
                # the per-expert GEMMs round each micro-batch's dW to bf16 (2^-9 relative), the
                # k-grouped one writes and accumulates fp32; a wrong expert or token block: O(1)
                assert (b - a).abs().max() <= 2**-8 * a.abs().max(), name
            elif name.startswith("dW"):
                # from the bf16 operands: the per-expert FP8 GEMMs' 128x1 e4m3 quantization of
                # both operands (3 mantissa bits) is what differs, measured 3.3% of the norm
                # here; a wrong expert or token block: O(1)
                rel = ((b - a).norm() / a.norm()).item()
                assert rel < 0.06, (mode, name, rel)
            else:
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=f"{mode} {name}")
        assert all(other[i][1].abs().max() == 0 for i in (2, 3, 4))  # expert 1 has no rows
        assert other[2].abs().sum() > 0
    for mode in modes[1:]:
        with pytest.raises(ValueError, match="need grouped_fp8"):
            experts_mlp(x, *ws, rows, fp8=True, cache=f8.WeightCache(), **mode)
    with pytest.raises(ValueError, match="exclude each other"):
        experts_mlp(
            x, *ws, rows, fp8=True, cache=f8.WeightCache(), grouped_fp8=True, **modes[1], **modes[2]
        )


def test_fp8_scope_experts_leaves_the_other_linears_in_bf16():
    """`enable_fp8_training(scope="experts")`: only the routed experts run FP8 (the attention and
    MLP projections stay nn.Linear); "all" converts those too, "mlp" all but the attention
    projections, "all-but-o-proj" all but MLA's o_proj; an unknown scope is refused with
    the accepted ones named, in the library, the bench's config and the job's."""
    from moeray.platform.fp8 import FP8TrainLinear
    from moeray.platform.train.job_config import TrainJobConfig

    experts_only, everything = Transformer(tiny()), Transformer(tiny())
    got = enable_fp8_training(experts_only, "experts")
    assert got and all(name.endswith(".experts") for name in got)
    assert not any(isinstance(m, FP8TrainLinear) for m in experts_only.modules())
    assert all(m.linear is not F.linear for m in experts_only.modules() if isinstance(m, Experts))
    got_all = enable_fp8_training(everything, "all")
    assert set(got) < set(got_all)
    assert any(isinstance(m, FP8TrainLinear) for m in everything.modules())
    mlps = Transformer(tiny())
    got_mlp = enable_fp8_training(mlps, "mlp")  # all but MLA's projections
    assert set(got) < set(got_mlp) < set(got_all)
    assert set(got_all) - set(got_mlp) == {n for n in got_all if ".self_attn." in n}
    no_o = enable_fp8_training(Transformer(tiny()), "all-but-o-proj")
    assert set(got_all) - set(no_o) == {n for n in got_all if n.endswith(".o_proj")} != set()
    with pytest.raises(
        ValueError, match="'attention': expected one of all, all-but-o-proj, mlp, experts"
    ):
        enable_fp8_training(Transformer(tiny()), "attention")
    with pytest.raises(ValueError, match="fp8_scope='x'"):
        BenchConfig(fp8_scope="x")
    with pytest.raises(ValueError, match="fp8_scope='x'"):
        TrainJobConfig.from_dict({"fp8_scope": "x"})
    assert TrainJobConfig.from_dict({"fp8": True, "fp8_scope": "experts"}).fp8_scope == "experts"


def test_graphed_runs_are_compared_with_graphed_bf16():
    """A `-graphs` run's ratios are against `bf16-graphs` where that ran (the same host path),
    else against `bf16`; the fastest FP8 run is picked on those ratios."""
    cfg = BenchConfig(pp=1)
    model_cfg = cfg.model_config()

    def r(step: float, loss: float) -> dict:
        return {"step_time_s": step, "losses": [loss] * 5, "losses_by_seed": {0: [loss] * 5}}

    got = {
        "bf16": r(1.0, 10.0),
        "bf16-graphs": r(0.8, 10.0),
        "fp8-bf16wgrad": r(0.9, 10.01),
        "fp8-bf16wgrad-graphs": r(0.72, 10.02),
    }
    res = bench_one.summarize(cfg, model_cfg, got, {}, 1e12, None, [])
    runs = res["runs"]
    assert runs["bf16-graphs"]["vs_run"] == "bf16"
    assert runs["fp8-bf16wgrad"]["vs_run"] == "bf16"
    assert runs["fp8-bf16wgrad-graphs"]["vs_run"] == "bf16-graphs"
    assert runs["fp8-bf16wgrad-graphs"]["step_time_vs_bf16"] == pytest.approx(0.9)
    assert runs["fp8-bf16wgrad-graphs"]["loss_rel_diff_vs_bf16"] == pytest.approx(0.002)
    assert res["fastest_fp8_run"] == "fp8-bf16wgrad-graphs"
    del got["bf16-graphs"]
    res = bench_one.summarize(cfg, model_cfg, got, {}, 1e12, None, [])
    assert res["runs"]["fp8-bf16wgrad-graphs"]["vs_run"] == "bf16"
    assert res["runs"]["fp8-bf16wgrad-graphs"]["step_time_vs_bf16"] == pytest.approx(0.72)
