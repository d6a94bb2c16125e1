"""`moeray bench engine` at real shapes: random models built on the device (bf16 and FP8 as
`load_model(keep_fp8=True)` holds them), the decode roofline, the step profile, and the bench end
to end on CPU through the same code path as the GPU runs (shrunk shapes)."""

import argparse
import json
import tempfile

import pytest
import torch

from moeray.platform.checkpoint import load_model, save_model
from moeray.platform.config import moonlight_16b_a3b, preset
from moeray.platform.engine import bench
from moeray.platform.engine.bench import table
from moeray.platform.engine.bench.model import random_model
from moeray.platform.engine.bench.mtp import cycle_speedup, mtp_speedup, parted_at
from moeray.platform.engine.bench.profile import (
    CATEGORIES,
    HOST_PHASES,
    categorize,
    exclusive_us,
    summarize,
)
from moeray.platform.engine.bench.roofline import StepBytes, decode_roofline, step_bytes
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.model.quant import FP8Linear
from moeray.platform.model.transformer import Transformer, greedy_generate

FP8 = torch.float8_e4m3fn


def _fp8_layout(model):
    """(FP8Linear module names, e4m3 tensor names): what runs through the FP8 paths."""
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, FP8Linear))
    tensors = sorted(k for k, t in model.state_dict().items() if t.dtype == FP8)
    return linears, tensors


def test_random_fp8_model_has_the_layout_of_a_loaded_fp8_checkpoint(tmp_path):
    cfg = preset("tiny")
    built = random_model(cfg, "cpu", torch.float32, fp8=True)
    # The official path: save with fp8=True, load_model(keep_fp8=True), as serve --weights fp8
    save_model(random_model(cfg, "cpu", torch.float32), cfg, tmp_path, fp8=True)
    _, loaded = load_model(tmp_path, keep_fp8=True)
    assert _fp8_layout(built) == _fp8_layout(loaded)
    linears, tensors = _fp8_layout(built)
    assert "model.layers.0.self_attn.kv_b_proj" in linears
    assert "model.layers.1.mlp.experts.gate_proj" in tensors
    assert "mtp.0.block.mlp.experts.down_proj" in tensors  # MTP's block is FP8 too
    assert not isinstance(built.lm_head, FP8Linear)
    sd = built.state_dict()
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert sd["model.layers.1.mlp.experts.up_proj_scale_inv"].shape == (16, 1, 1)
    assert all(torch.isfinite(t.float()).all() for t in sd.values())


def test_fp8_model_decodes_like_its_dequantized_weights(tmp_path):
    """The FP8 model (FP8Linear, FP8 experts, the cached kv_b dequantization of the absorbed
    path) against the same weights dequantized by load_model: same greedy tokens, close logits.
    Odd widths (not multiples of 128) give partial scale blocks."""
    cfg = preset("tiny").replace(hidden_size=72, moe_intermediate_size=40, q_lora_rank=None)
    fp8_model = random_model(cfg, "cpu", torch.float32, fp8=True, seed=3)
    save_model(fp8_model, cfg, tmp_path)  # stores the e4m3 tensors and scales as they are
    _, deq_model = load_model(tmp_path, keep_fp8=False)
    assert not _fp8_layout(deq_model)[1]
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fp8_model(ids).logits, deq_model(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy_generate(fp8_model, ids, 8), greedy_generate(deq_model, ids, 8))


def test_cycle_speedup_is_the_geometric_chain_over_the_cycle():
    """1 + a + .. + a^K tokens a cycle at the plain step / cycle time ratio: the thirty-first
    session's H100 cycle of 3 drafts (1.37 ms against plain's 0.59) at acceptance 1 is 4 x 0.59 /
    1.37; at 0.78 the chain's 1 + 0.78 + 0.6084 + 0.474552 tokens; bad values are named."""
    assert cycle_speedup(1.0, 3, 0.59, 1.37) == pytest.approx(4 * 0.59 / 1.37)
    assert cycle_speedup(0.78, 3, 0.59, 1.37) == pytest.approx(2.862952 * 0.59 / 1.37)
    assert cycle_speedup(0.0, 2, 1.0, 2.0) == pytest.approx(0.5)
    for bad in ((1.2, 1, 1.0, 1.0), (0.5, 0, 1.0, 1.0), (0.5, 1, 0.0, 1.0)):
        with pytest.raises(ValueError, match=f"acceptance {bad[0]}"):
            cycle_speedup(*bad)


def test_step_bytes_counts_what_the_config_counts():
    cfg = preset("tiny")
    model = random_model(cfg, "cpu", torch.float32)
    step = step_bytes(model, kv_dtype_bytes=4)
    D, V, E = cfg.hidden_size, cfg.vocab_size, cfg.n_routed_experts
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    routed = n_moe * E * 3 * D * cfg.moe_intermediate_size
    bias = n_moe * E * 4  # e_score_correction_bias, fp32, not a parameter
    assert step.fixed == 4 * (cfg.num_parameters() - V * D - routed) + bias
    assert step.expert == (4 * 3 * D * cfg.moe_intermediate_size,) * n_moe
    assert step.kv_per_token == cfg.num_hidden_layers * (cfg.kv_lora_rank + 8) * 4
    # FP8: one byte per expert weight plus fp32 scales; kv_b_proj counted as its dequantized copy
    fp8 = step_bytes(random_model(cfg, "cpu", torch.float32, fp8=True), kv_dtype_bytes=4)
    inter = cfg.moe_intermediate_size
    assert fp8.expert == (3 * D * inter + 3 * 4,) * n_moe  # 64 x 32 matrices: one block each
    assert fp8.fixed < step.fixed


def test_distinct_experts_match_uniform_routing():
    E, K = 64, 6
    step = StepBytes(fixed=0, expert=(1,), num_experts=E, top_k=K, kv_per_token=0)
    assert step.distinct_experts(1) == pytest.approx(K)
    g = torch.Generator().manual_seed(0)
    for B in (1, 8, 64):
        trials = [
            len({int(e) for _ in range(B) for e in torch.randperm(E, generator=g)[:K]})
            for _ in range(200)
        ]
        assert sum(trials) / len(trials) == pytest.approx(step.distinct_experts(B), rel=0.03)


def test_decode_roofline_moonlight_batch_one():
    """Moonlight at batch 1: 6 of 64 experts per MoE layer, ~2.6e9 active weights less the
    embedding, ~1.1 ms at 4.8 TB/s in bf16 (issue 19: 7.8 ms measured = 14%)."""
    cfg = moonlight_16b_a3b()
    E, inter, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    n_moe = cfg.num_hidden_layers - 1
    fixed = 2 * (cfg.num_parameters() - cfg.vocab_size * D - n_moe * E * 3 * D * inter)
    step = StepBytes(fixed, (2 * 3 * D * inter,) * n_moe, E, cfg.num_experts_per_tok, 2 * 27 * 576)
    r = decode_roofline(step, cfg, 1, 144, {"datasheet": 4.8e12}, 989e12)
    assert r["distinct_experts_per_layer"] == pytest.approx(6)
    active = 2 * (cfg.num_parameters(activated=True) - cfg.vocab_size * D)
    assert r["weight_bytes"] == pytest.approx(active)
    assert 1.0 < r["step_us"]["datasheet"] / 1e3 < 1.2
    r64 = decode_roofline(step, cfg, 64, 144, {"datasheet": 4.8e12}, 989e12)
    assert 63 < r64["distinct_experts_per_layer"] < 64


def test_step_bytes_at_real_shapes_on_meta():
    """The full Moonlight shape on the meta device (shapes only): the model-based count equals the
    config's active parameters at batch 1; FP8 experts take 1 byte a weight plus a fp32 scale per
    128x128 block; the head stays bf16 as in the official checkpoint."""
    cfg = moonlight_16b_a3b().replace(num_nextn_predict_layers=0)
    D, V, E = cfg.hidden_size, cfg.vocab_size, cfg.n_routed_experts
    bf16 = step_bytes(random_model(cfg, "meta", torch.bfloat16), kv_dtype_bytes=2)
    n_moe = cfg.num_hidden_layers - 1
    active = cfg.num_parameters(activated=True) - V * D
    assert bf16.weight_bytes(1) == pytest.approx(2 * active + n_moe * E * 4)
    fp8 = step_bytes(random_model(cfg, "meta", torch.bfloat16, fp8=True), kv_dtype_bytes=2)
    I = cfg.moe_intermediate_size  # noqa: E741 (the legend's expert width)
    assert fp8.expert[0] == 3 * D * I + 3 * (D // 128) * (I // 128) * 4
    assert fp8.fixed > 2 * V * D  # the bf16 head
    assert 0.5 < fp8.weight_bytes(1) / bf16.weight_bytes(1) < 0.6


def test_categorize_and_summarize():
    assert categorize("_moe_gate_kernel") == "router"
    assert categorize("_moe_gate_up_kernel") == "moe"
    assert categorize("_mla_decode_split_kernel") == "attention"
    assert categorize("_act_quant_kernel") == "quant"
    assert categorize("_fp8_gemm_kernel") == "gemm"
    assert categorize("nvjet_tst_64x8_64x16_4x1_v_bz_TNT") == "gemm"
    assert (
        categorize("void at::native::vectorized_elementwise_kernel<4, ...>") == "norm/elementwise"
    )
    assert categorize("Memcpy DtoD (Device -> Device)") == "copy/index"
    assert categorize("void at::native::index_elementwise_kernel") == "copy/index"
    assert categorize("cub::DeviceRadixSortOnesweepKernel") == "moe"
    assert categorize("something_new") == "other"
    s = summarize(
        [("_fp8_gemm_kernel", 10.0), ("_fp8_gemm_kernel", 20.0), ("x", 5.0)], steps=2, source="t"
    )
    assert s["kernels_per_step"] == 1.5
    assert s["device_ms_per_step"] == pytest.approx(0.0175)
    assert s["by_category"]["gemm"] == {"kernels_per_step": 1.0, "ms_per_step": 0.015}
    assert s["top"][0]["name"] == "_fp8_gemm_kernel"
    assert "busy_ms_per_step" not in s


def test_exclusive_time_counts_pdl_overlap_once():
    """A kernel launched early (PDL) that waits for its predecessor: its duration covers the
    predecessor's tail, its exclusive time only what follows; a gap between kernels is nobody's;
    the exclusive times sum to the union of the intervals, and names rank by them."""
    # a: 0-10; b launched at 4 (waits), ends 14; c: 20-23; d inside a (fully covered)
    intervals = [(4.0, 14.0), (0.0, 10.0), (20.0, 23.0), (2.0, 5.0)]
    assert exclusive_us(intervals) == [4.0, 10.0, 3.0, 0.0]
    assert exclusive_us([]) == []
    events = [("wait_kernel", 10.0, 4.0), ("big_kernel", 10.0, 10.0), ("x", 3.0, 3.0)]
    s = summarize(events * 2, steps=2, source="t")
    assert s["device_ms_per_step"] == pytest.approx(0.023)
    assert s["busy_ms_per_step"] == pytest.approx(0.017)
    assert [t["name"] for t in s["top"]][:2] == ["big_kernel", "wait_kernel"]
    assert s["top"][1]["us_per_step"] == 10.0 and s["top"][1]["exclusive_us_per_step"] == 4.0
    other = s["by_category"]["other"]
    assert other["ms_per_step"] == pytest.approx(0.023)
    assert other["exclusive_ms_per_step"] == pytest.approx(0.017)


def _run(tmp_path, *args):
    assert bench.main([*args, "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("engine-*.json")
    return path, json.loads(path.read_text())


def _check_decode_record(r, batches, profile_steps):
    for B in map(str, batches):
        assert r["decode_tokens_per_s"][B] > 0
        roof = r["roofline"][B]
        assert 0 < roof["distinct_experts_per_layer"] <= r["model"]["num_hidden_layers"] * 64
        assert roof["tokens_per_s"]["measured"] > 0
        assert r["roofline_fraction_measured_bandwidth"][B] == pytest.approx(
            r["decode_tokens_per_s"][B] / roof["tokens_per_s"]["measured"]
        )
        prof = r["decode_profile"][B]
        assert prof["steps"] == profile_steps and prof["kernels_per_step"] > 10
        assert set(prof["by_category"]) <= set(CATEGORIES)
        assert "gemm" in prof["by_category"]
        assert sum(c["kernels_per_step"] for c in prof["by_category"].values()) == pytest.approx(
            prof["kernels_per_step"]
        )


def test_bench_tiny_bf16_end_to_end(tmp_path):
    common = ["--mtp-train-steps", "0", "--prompt-len", "12", "--decode-tokens", "3"]
    path, r = _run(
        tmp_path,
        "--preset",
        "tiny",
        *common,
        "--batch-sizes",
        "1,3",
        "--profile-steps",
        "2",
        "--skip",
        "prefill",
        "--tag",
        "tiny-bf16",
        "--ab",
        "argmax,NORM",
    )
    assert path.name.endswith("-tiny-bf16.json")
    assert r["model"]["weights"] == "bf16" and r["mtp_skipped"].startswith("--mtp-train-steps 0")
    assert r["hf_skipped"] is None and set(r["hf_generate_tokens_per_s"]) == {"1", "3"}
    _check_decode_record(r, (1, 3), 2)
    assert r["decode_graph_ms"] == {} == r["roofline_fraction_graph"]  # no graphs on CPU
    assert set(r["decode_step_ms_median"]) == {"1", "3"}
    assert all(v > 0 for v in r["decode_step_ms_median"].values())
    assert set(r["decode_step_outliers_ms"]) == {"1", "3"}
    for B in ("1", "3"):  # host time by phase: all there, each within the step
        phases = r["decode_host_phases_ms"][B]
        assert tuple(phases) == HOST_PHASES
        assert all(0 <= v <= phases["step"] for v in phases.values()), phases
        assert phases["inputs and launch"] > 0  # the eager forward on CPU
    # batch 1 against the published figures, each on its own basis
    peers = {p["peer"]: p for p in r["vs_peers_batch1"]}
    vllm, gpt_fast = peers["vLLM DeepSeek-V2-Lite H100"], peers["gpt-fast Mixtral 8x7B"]
    assert vllm["roofline_fraction"] == r["roofline_fraction"]["1"]
    assert vllm["ratio"] == pytest.approx(r["roofline_fraction"]["1"] / 0.23, rel=1e-3)
    assert gpt_fast["roofline_fraction"] == r["roofline_fraction_measured_bandwidth"]["1"]
    assert gpt_fast["ratio"] == pytest.approx(gpt_fast["roofline_fraction"] / 0.74, rel=1e-3)
    lines = table.render([path]).splitlines()
    assert len(lines) == 3 and lines[1].startswith("tiny-bf16") and lines[2].split()[2] == "3"
    # --ab: each switch flipped alone on the same prompts, then as run again (bench/ab.py)
    ab = r["engine"]["ab"]
    assert list(ab) == ["ARGMAX", "NORM", "as_run_again"]
    assert ab["ARGMAX"]["env"] == {"MOERAY_FUSED_ARGMAX": "1"}
    assert ab["NORM"]["env"] == {"MOERAY_FUSED_NORM": "0"}
    assert r["engine"]["fast_path_env"]["MOERAY_FUSED_ARGMAX"] == "0"  # the main run's
    assert r["engine"]["fp8_as_bf16_gib"] == 0.0  # bf16 weights on CPU: no copies
    assert r["engine"]["engine_build_s"] > 0 and r["engine"]["graphs"] == {}  # no graphs on CPU
    for row in ab.values():
        assert set(row["decode_tokens_per_s"]) == {"1", "3"}
        assert all(v > 0 for v in row["tokens_per_s_vs_main"].values())
        # CPU runs the references whatever the switches: the same greedy tokens
        assert row["tokens_equal_to_main"] == {"1": 1.0, "3": 1.0}


def test_bench_async_scheduling(tmp_path):
    """--async-scheduling (and --no-async-sampled, sampled at --temperature) reach the engine and
    the result says so; decode and host phases are measured as without it. --arrivals: six
    requests of 6-20 tokens arriving every other step call, without async scheduling, and with
    async_scheduling_prefill off (a drain per admission) and on (the run ends with one), the same
    tokens."""
    _, r = _run(
        tmp_path,
        "--preset", "tiny", "--mtp-train-steps", "0", "--prompt-len", "12",
        "--decode-tokens", "6", "--batch-sizes", "1,2", "--skip", "prefill,hf",
        "--async-scheduling", "--no-async-sampled", "--temperature", "0.8",
        "--arrivals", "6", "--arrival-every", "2", "--arrival-prompt-lens", "6,20",
    )  # fmt: skip
    arr = r["engine"]["arrivals"]
    assert 6 <= arr["prompt_lens"][0] <= arr["prompt_lens"][1] <= 20
    assert (arr["requests"], arr["every"], arr["outputs_equal"]) == (6, 2, 1.0)
    assert arr["on_equals_sync"] == 1.0 and arr["on_vs_sync"] > 0
    assert arr["on"]["async_drains"] <= 1 < arr["off"]["async_drains"], arr
    # without async scheduling, one step a call: as many calls as the run launched ahead
    assert arr["sync"]["async_drains"] == 0 and arr["sync"]["step_calls"] <= arr["on"]["step_calls"]
    # ... each one prefill chunk (12-token prompts, one per arrival) or decode-only, timed apart
    steps = arr["sync"]["mixed_steps"] + arr["sync"]["decode_steps"]
    assert arr["sync"]["mixed_steps"] == 6 and steps == arr["sync"]["step_calls"], arr["sync"]
    assert arr["sync"]["mixed_step_ms"] > 0 and arr["sync"]["decode_step_ms"] > 0
    assert "mixed_step_ms" not in arr["on"]
    # the eager references of prefill-chunk graphs (none on CPU: the same steps as sync)
    assert arr["prefill_graph_tokens"] == 256
    assert arr["eager"]["mixed_steps"] == arr["absorbed"]["mixed_steps"] == 6
    assert arr["sync_equals_eager"] == arr["sync_equals_absorbed"] == 1.0
    assert arr["sync_vs_eager"] > 0
    # ... and of several same-length chunks a graph: one chunk a graph (`single`)
    assert arr["prefill_graph_seqs"] == 8 and arr["sync_equals_single"] == 1.0
    assert arr["single"]["mixed_steps"] == 6 and arr["sync_vs_single"] > 0
    assert all(arr[k]["build_s"] > 0 for k in ("sync", "off", "on", "eager", "absorbed", "single"))
    assert arr["on"]["tokens_per_s"] > 0 and arr["on_vs_off"] > 0
    assert r["engine"]["async_scheduling"] is True
    assert r["engine"]["async_scheduling_sampled"] is False and r["engine"]["temperature"] == 0.8
    assert all(r["decode_tokens_per_s"][b] > 0 for b in ("1", "2"))
    assert tuple(r["decode_host_phases_ms"]["2"]) == HOST_PHASES


def test_arrivals_in_bursts(tmp_path):
    """--arrival-burst 2: four 12-token requests arrive two at a time, every third step call;
    each pair is prefilled in one step (batch 2), so two steps carry prompt tokens."""
    _, r = _run(
        tmp_path,
        "--preset", "tiny", "--mtp-train-steps", "0", "--prompt-len", "12",
        "--decode-tokens", "4", "--batch-sizes", "2", "--skip", "prefill,hf,router-ab",
        "--profile-steps", "0", "--arrivals", "4", "--arrival-every", "3",
        "--arrival-burst", "2", "--arrival-graph-tokens", "0",
    )  # fmt: skip
    arr = r["engine"]["arrivals"]
    assert (arr["requests"], arr["every"], arr["burst"]) == (4, 3, 2)
    assert arr["sync"]["mixed_steps"] == 2, arr["sync"]
    assert arr["on_equals_sync"] == 1.0


def test_arrivals_checks_its_arguments_before_building_an_engine():
    """--arrivals' A/B names a bad step count or warm-up prompts of other lengths (the warm run
    must meet the timed run's shapes) before it builds any engine."""
    from moeray.platform.engine.bench.arrivals import arrivals_ab

    def make_engine(**settings):
        raise AssertionError("no engine may be built for bad arguments")

    prompts = [[1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="arrival every 0"):
        arrivals_ab(make_engine, prompts, [[7, 8, 9], [1, 1]], 4, 0)
    with pytest.raises(ValueError, match="arrival burst 0"):
        arrivals_ab(make_engine, prompts, [[7, 8, 9], [1, 1]], 4, 2, burst=0)
    with pytest.raises(ValueError, match="warm_prompts must have the lengths"):
        arrivals_ab(make_engine, prompts, [[7, 8], [1, 1]], 4, 2)


def test_bench_moonlight_shape_fp8_end_to_end(tmp_path):
    """Moonlight's config.json (no query LoRA, one expert group, 2 shared experts, top-6 of 64)
    with the widths shrunk for CPU, cut to 2 layers (1 dense + 1 MoE) by --layers."""
    cfg = moonlight_16b_a3b().replace(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_attention_heads=2,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
    )
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(cfg.to_hf()))
    out = tmp_path / "out"
    _, r = _run(
        out,
        "--config",
        str(cfg_path),
        "--layers",
        "2",
        "--weights",
        "fp8",
        "--mtp-train-steps",
        "0",
        "--prompt-len",
        "12",
        "--decode-tokens",
        "3",
        "--batch-sizes",
        "2",
        "--profile-steps",
        "2",
        "--skip",
        "prefill",
    )
    assert r["model"]["num_hidden_layers"] == 2 and r["model"]["first_k_dense_replace"] == 1
    assert r["model"]["weights"] == "fp8" and r["hf_skipped"].startswith("fp8 weights")
    _check_decode_record(r, (2,), 2)
    # FP8 halves the routed expert bytes against fp32 activations' 4 bytes, roughly
    step = r["roofline"]["2"]
    assert step["routed_expert_bytes"] < step["distinct_experts_per_layer"] * 3 * 128 * 64 * 1.1


def test_layer_cut_keeps_dense_layers_first():
    def cut(*args):
        return bench._model_config(bench.parse_args(["--mtp-train-steps", "0", *args]))

    v3 = cut("--preset", "deepseek_v3", "--layers", "4")
    assert (v3.num_hidden_layers, v3.first_k_dense_replace) == (4, 3)  # V3's own 3 dense
    assert v3.num_nextn_predict_layers == 0  # no MTP for speed runs
    one = cut("--preset", "deepseek_v3", "--layers", "4", "--dense-layers", "1")
    assert [one.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    assert cut("--preset", "moonlight_16b_a3b").num_hidden_layers == 27
    with pytest.raises(ValueError, match="--dense-layers 5 > 4 layers"):
        cut("--preset", "tiny", "--layers", "4", "--dense-layers", "5")


def test_bench_rejects_bad_arguments(capsys):
    for args, words in (
        (["--preset", "nope"], "unknown preset"),
        (["--preset", "tiny", "--config", "x.json"], "both given"),
        (["--config", tempfile.gettempdir() + "/no-such-dir"], "no config.json"),
        (["--skip", "decode"], "accepted sections"),
        (["--layers", "0"], "--layers 0"),
        (["--dense-layers", "-1"], "--dense-layers -1"),
        (["--weights", "int4"], "invalid choice"),
        (["--ab", "NORM,FOLD"], "'FOLD': not a switch"),
        (["--arrival-every", "0"], "--arrival-every 0"),
        (["--arrival-burst", "0"], "--arrival-burst 0"),
        (["--arrivals", "-1"], "--arrivals -1"),
        (["--arrival-prompt-lens", "20,6"], "--arrival-prompt-lens '20,6'"),
        (["--arrival-prompt-lens", "x"], "expected LO,HI"),
        (["--arrival-graph-tokens", "100"], "--arrival-graph-tokens=100: accepted 0"),
        (["--mtp-drafts", "2,5"], "--mtp-drafts '2,5': expected comma-separated integers from 2"),
        (["--mtp-drafts", "x"], "--mtp-drafts 'x'"),
    ):
        with pytest.raises(SystemExit):
            bench.main(args)
        assert words in capsys.readouterr().err


def test_step_outliers_name_the_slow_steps():
    """Steps over 1.5x the median, with their index in the timed loop; none of an even loop."""
    secs = [0.010, 0.011, 0.010, 0.030, 0.010, 0.016, 0.017]  # median 11 ms: bound 16.5 ms
    assert bench.step_outliers(secs) == [[3, 30.0], [6, 17.0]]
    assert bench.step_outliers([0.01] * 5) == [] == bench.step_outliers([])


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_decode_times_the_whole_batch_decoding(async_scheduling):
    """Prompts that take four prefill steps start decoding the first ones early: every timed
    step still decodes the whole batch (none ended early, which also drains async scheduling),
    and each request's first n+1 tokens come back, equal with and without async scheduling."""
    cfg = preset("tiny").replace(num_nextn_predict_layers=0, eos_token_id=None)
    model = random_model(cfg, torch.device("cpu"), torch.float32, fp8=False)
    B, P, n = 8, 64, 5
    engine = Engine(
        model,
        EngineConfig(
            page_size=16, num_pages=80, max_num_seqs=B, max_num_batched_tokens=128,
            enable_prefix_caching=False, async_scheduling=async_scheduling, max_model_len=128,
        ),
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (P,), generator=g).tolist() for _ in range(B)]
    schedule, sizes = engine.scheduler.schedule, []

    def record():
        out = schedule()
        sizes.append(sum(s.is_decode for s in out.scheduled))
        return out

    engine.scheduler.schedule = record
    seconds: list[float] = []
    drains: list[int] = []
    rate, outs = bench.engine_decode(engine, prompts, n, seconds, drains=drains)
    assert rate > 0 and len(seconds) >= n
    assert drains == ([0] if async_scheduling else [])  # no timed step drained the overlap
    assert [len(o) for o in outs] == [n + 1] * B
    assert sizes.count(B) >= n  # the timed steps: all B requests decode
    assert not engine.has_unfinished()  # aborted past the window
    ref = [greedy_generate(model, torch.tensor([p]), n + 1)[0, P:].tolist() for p in prompts]
    assert outs == ref


def test_mtp_section_times_greedy_and_sampled_arms():
    """`bench engine`'s MTP section on CPU (a tiny model trained on the cycle it decodes): greedy
    MTP arms, synchronous and under async scheduling, emit plain greedy's tokens; with a
    temperature the sampled arms run too, and the two MTP arms' sampled tokens are equal (the
    same uniforms in the same order), steps launched ahead; `--mtp-drafts 3` adds a greedy arm of
    three drafts a step, its tokens plain greedy's too, and the sampled pair at three drafts."""
    cfg = preset("tiny").replace(num_hidden_layers=2, vocab_size=256, eos_token_id=None)
    model = Transformer(cfg)
    model.reset_parameters(seed=3)
    cycle = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:48]
    bench.train_on_cycle(model, cycle, 30, torch.device("cpu"), seq_len=48, batch=8, lr=3e-3)
    ecfg = dict(page_size=16, num_pages=64, max_num_batched_tokens=64, max_model_len=128)
    a = argparse.Namespace(decode_tokens=10, prompt_len=12, temperature=1.5, mtp_drafts=[3])
    r = mtp_speedup(model, cycle, ecfg, a, torch.Generator().manual_seed(1), 1)
    row = r["1"]
    assert row["outputs_identical"] and row["async_spec"]["outputs_identical"]
    assert row["async_spec"]["overlapped_steps"] > 0 and row["acceptance"] > 0
    assert row["async_spec"]["spec_graph_steps"] == 0  # on CPU: no graphs, every step two forwards
    three = row["drafts"]["3"]
    assert three["outputs_identical"] and three["mean_accepted_length"] > 2.0, three
    assert len(three["acceptance_by_position"]) == 3 and three["acceptance_by_position"][2] > 0
    assert three["spec_graph_steps"] == 0 and three["overlapped_steps"] is None  # CPU: synchronous
    s = row["sampled"]
    assert s["temperature"] == 1.5 and s["async_spec_outputs_equal_sync"], s
    assert s["async_spec_overlapped_steps"] > 0 and s["async_spec_graph_steps"] == 0  # CPU
    assert s["acceptance"] == s["async_spec_acceptance"] and 0 < s["acceptance"] < 1, s
    assert all(s[k] > 0 for k in ("tokens_per_s", "async_spec_tokens_per_s"))
    s3 = s["drafts"]["3"]  # the sampled pair at three drafts: ahead and synchronous agree
    assert s3["async_spec_outputs_equal_sync"] and s3["async_spec_overlapped_steps"] > 0, s3
    assert s3["acceptance"] == s3["async_spec_acceptance"] and 0 < s3["acceptance"] < 1, s3


def test_parted_at_names_where_each_sequence_leaves_the_plain_one():
    plain = [[5, 6, 7, 8], [1, 2, 3], [9, 9]]
    spec = [[5, 6, 0, 8], [1, 2, 3], [9, 9, 4]]
    assert parted_at(plain, spec) == [2, None, 2]
    assert parted_at([[1]], [[2]]) == [0]
    with pytest.raises(ValueError):
        parted_at(plain, spec[:2])  # one list per sequence on both sides
