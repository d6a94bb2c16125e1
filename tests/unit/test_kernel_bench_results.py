"""`moeray bench kernels`' flat `results` list (issue 4's JSON contract), built from recorded
runs."""

import json
from pathlib import Path

from moeray.kernels.bench import SECTIONS, flat_results
from moeray.kernels.bench.gemv import sweep_candidates
from moeray.kernels.bench.runner import ON_REQUEST, _parser
from moeray.kernels.gemv import _check_config

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
KEYS = {"kernel", "shape", "time_us", "ratio_to_ceiling", "baseline", "ratio_to_baseline"}


def _recorded_run() -> dict:
    """The H100 run of every section (scripts/device/kernels.sh), without the records it wrote."""
    run = json.loads((RESULTS / "kernels-nvidia-h100-80gb-hbm3.json").read_text())
    run.pop("results")
    return run


def _h200_run() -> dict:
    """An earlier H200 run (default sections then) plus the H100 follow-up's graph and prefill
    rows."""
    run = json.loads((RESULTS / "kernels-nvidia-h200.json").read_text())
    followup = json.loads((RESULTS / "kernels-nvidia-h100-80gb-hbm3-followup.json").read_text())
    run.update(mla_decode_graph=followup["mla_decode_graph"], mla_prefill=followup["mla_prefill"])
    return run


def test_the_recorded_records_are_what_flat_results_makes_of_the_sections():
    recorded = json.loads((RESULTS / "kernels-nvidia-h100-80gb-hbm3.json").read_text())
    assert recorded["results"] == flat_results(_recorded_run())
    # The fp8_gemv sections came after that run (their own run is checked below), decode_glue
    # (issue 19's decode kernels) after both, the bf16 gemv sections after those, then the
    # grouped weight-gradient GEMM, the training RMSNorm, the fused cross-entropy, AdamW, the
    # training RoPE, the MoE permute/combine, the training SwiGLU, MLA's per-head head_gemv, the
    # on-request sweeps (fp8_gemv's splits, fused MoE prefill tiles) and the one-launch MLA block.
    later = {"fp8_gemv", "fp8_gemv_sweep", "decode_glue", "gemv", "gemv_sweep", "head_gemv"}
    later |= {"grouped_wgrad", "grouped_wgrad_sweep", "norm_train", "fp8_kgrouped_sweep"}
    later |= {"cross_entropy", "adamw", "rope_train", "moe_permute_train", "swiglu_train"}
    later |= {"fp8_gemv_split_sweep", "fused_moe_prefill_sweep"}
    assert set(SECTIONS) - later <= recorded.keys()


def test_the_fp8_gemv_run_records_are_what_flat_results_makes_of_it():
    recorded = json.loads((RESULTS / "kernels-nvidia-h200-fp8-gemv.json").read_text())
    run = {k: v for k, v in recorded.items() if k != "results"}
    assert recorded["results"] == flat_results(run)
    assert {r["kernel"] for r in recorded["results"]} == {"fp8_gemv (CUDA graph)"}
    assert all(KEYS <= r.keys() for r in recorded["results"])


def test_every_section_row_becomes_records_with_the_issue_fields():
    run = _recorded_run()
    recs = flat_results(run)
    assert all(KEYS <= r.keys() for r in recs)
    assert {r["kernel"] for r in recs if r["kernel"].startswith("route")} == {
        "route_fused (CUDA graph)"
    }
    kernels = {r["kernel"] for r in recs}
    assert {
        "act_quant",
        "weight_quant",
        "fp8_gemm",
        "fp8_gemm_triton",
        "fused_moe_bf16",
        "fused_moe_fp8",
        "mla_decode",
        "mla_decode (CUDA graph)",
        "mla_prefill_triton",
    } <= kernels
    # fp8_gemm rows: 8 (M, N, K) x (auto + Triton) x 2 baselines, plus dgrad and wgrad.
    gemm = [r for r in recs if r["kernel"] in ("fp8_gemm", "fp8_gemm_triton")]
    assert len(gemm) == 32
    assert len([r for r in recs if r["kernel"] == "mla_decode"]) == len(run["mla_decode"])
    assert all(r["time_us"] > 0 for r in recs)


def test_ratios_come_from_the_row_they_describe():
    run = _recorded_run()
    recs = {(r["kernel"], r["shape"], r["baseline"]): r for r in flat_results(run)}
    row = next(r for r in run["fp8_gemm"] if (r.get("M"), r.get("N")) == (4096, 2112))
    tri = recs[("fp8_gemm_triton", "M4096 N2112 K7168", "torch._scaled_mm block-scaled")]
    assert tri["ratio_to_baseline"] == row["triton_ratio_vs_scaled_mm"]
    assert tri["time_us"] == round(row["triton_ms"] * 1e3, 2)
    assert tri["ratio_to_ceiling"] == round(
        row["triton_TFLOPs"] / run["ceilings"]["fp8_matmul_TFLOPs"], 3
    )
    moe = next(
        r for r in run["fused_moe"] if r["kernel"] == "fused_moe_fp8" and r["phase"] == "decode"
    )
    rec = next(
        r
        for r in recs.values()
        if r["kernel"] == "fused_moe_fp8" and r["shape"].startswith("decode")
    )
    assert (rec["ratio_to_baseline"], rec["ratio_to_ceiling"]) == (
        moe["speedup_vs_loop"],
        moe["frac_of_floor"],
    )


def test_targets_are_judged_against_the_issue_thresholds():
    recs = flat_results(_recorded_run())
    targeted = [r for r in recs if "target" in r]
    # 4 shapes x (fp8_gemm vs _scaled_mm, vs bf16, Triton vs _scaled_mm) + 4 fused MoE + 1 MLA
    # decode.
    assert len(targeted) == 17
    assert all(r["meets_target"] for r in targeted)  # this H100 run met every target
    mla = next(r for r in targeted if r["kernel"] == "mla_decode (CUDA graph)")
    assert mla["shape"].startswith("H16 B64 ctx4096 splits=auto") and mla["target"] == {
        "ratio_to_ceiling": 0.7
    }
    # The H200 run before the register fix: the Triton GEMM at N2112 K7168 was 0.608x of _scaled_mm.
    old = [r for r in flat_results(_h200_run()) if "target" in r]
    missed = [
        (r["kernel"], r["shape"], r["ratio_to_baseline"]) for r in old if not r["meets_target"]
    ]
    assert missed == [("fp8_gemm_triton", "M4096 N2112 K7168", 0.608)]


def test_a_missing_number_fails_its_target():
    run = {
        "ceilings": {"copy_TBps": 3.0, "bf16_matmul_TFLOPs": 700.0, "fp8_matmul_TFLOPs": 1200.0},
        "fp8_gemm": [
            {
                "kernel": "fp8_gemm",
                "M": 4096,
                "N": 2112,
                "K": 7168,
                "ms": 0.12,
                "TFLOPs": 1000.0,
                "speedup_vs_bf16": 1.5,
                "triton_ms": 0.2,
                "triton_TFLOPs": 600.0,
                "triton_speedup_vs_bf16": 0.9,
            }
        ],
    }  # no native block-scaled _scaled_mm here
    recs = flat_results(run)
    assert [r["baseline"] for r in recs] == ["torch.matmul bf16", "torch.matmul bf16"]
    assert recs[0]["meets_target"] is True and "target" not in recs[1]


def test_the_default_run_covers_every_section():
    # every section but the long sweeps run only when named
    assert set(ON_REQUEST) < set(SECTIONS)
    assert _parser().parse_args([]).only.split(",") == [s for s in SECTIONS if s not in ON_REQUEST]


def test_gemv_rows_become_records():
    cfg = {"BLOCK_N": 4, "BLOCK_K": 2048, "SPLIT_K": 1}
    gemv_row = {"layer": "moonlight q_proj", "M": 1, "N": 3072, "K": 2048, "gemv_us": 3.0}
    gemv_row.update(gemv_frac_copy=0.8, speedup_vs_cublas=2.1, config=cfg)
    fp8_row = {"layer": "v3 kv_a", "M": 1, "N": 576, "K": 7168, "gemv_us": 2.5}
    fp8_row.update(gemv_frac_copy_bw=0.4, speedup_vs_quant_gemm=9.0, speedup_vs_bf16=2.0)
    recs = flat_results({"ceilings": {}, "gemv": [gemv_row], "fp8_gemv": [fp8_row]})
    assert all(KEYS <= r.keys() for r in recs)
    by_baseline = {(r["kernel"], r["baseline"]): r["ratio_to_baseline"] for r in recs}
    assert by_baseline[("gemv (CUDA graph)", "F.linear bf16 (CUDA graph)")] == 2.1
    assert by_baseline[("fp8_gemv (CUDA graph)", "F.linear bf16 (CUDA graph)")] == 2.0
    assert len(recs) == 3


def test_head_gemv_rows_become_records():
    row = {"model": "moonlight", "weight": "w_uv", "R": 1, "H": 16, "K": 512, "N": 128}
    row.update(us=0.8, frac_copy=0.6, speedup_vs_einsum=4.2)
    (rec,) = flat_results({"ceilings": {}, "head_gemv": [row]})
    assert KEYS <= rec.keys()
    assert rec["kernel"] == "head_gemv (CUDA graph)"
    assert rec["shape"] == "moonlight w_uv R1 H16 K512 N128"
    assert rec["time_us"] == 0.8 and rec["ratio_to_baseline"] == 4.2
    assert rec["baseline"] == "torch.einsum bf16 (CUDA graph)"


def test_cross_entropy_rows_become_records():
    row = {
        "kernel": "moonlight",
        "tokens": 4096,
        "V": 163840,
        "fused_inplace_fwd_bwd_ms": 1.25,
        "fused_inplace_frac_of_floor": 0.5,
        "speedup_fused_inplace": 8.0,
    }
    (rec,) = flat_results({"ceilings": {}, "cross_entropy": [row]})
    assert KEYS <= rec.keys()
    assert rec["kernel"] == "cross_entropy fwd+bwd (autograd, in place)"
    assert rec["shape"] == "moonlight T4096 V163840 bf16"
    assert rec["time_us"] == 1250.0 and rec["ratio_to_baseline"] == 8.0


def test_rope_train_rows_become_records():
    row = {"kernel": "q_pe", "B": 1, "S": 4096, "H": 16, "R": 64, "dtype": "bfloat16"}
    row.update(fused_fwd_bwd_ms=0.025, frac_copy_bw=0.4, speedup_fwd_bwd=6.0)
    (rec,) = flat_results({"ceilings": {}, "rope_train": [row]})
    assert KEYS <= rec.keys()
    assert rec["kernel"] == "rope fwd+bwd (autograd)"
    assert rec["shape"] == "q_pe B1 S4096 H16 R64 bfloat16"
    assert rec["time_us"] == 25.0 and rec["ratio_to_baseline"] == 6.0


def test_moe_permute_train_rows_become_records():
    row = {"kernel": "combine", "T": 4096, "K": 6, "D": 2048, "E": 64, "dtype": "bfloat16"}
    row.update(fused_fwd_bwd_ms=0.1, frac_copy_bw=0.7, speedup_fwd_bwd=9.0)
    (rec,) = flat_results({"ceilings": {}, "moe_permute_train": [row]})
    assert KEYS <= rec.keys()
    assert rec["kernel"] == "moe_combine fwd+bwd (autograd)"
    assert rec["shape"] == "T4096 K6 D2048 E64 bfloat16"
    assert rec["time_us"] == 100.0 and rec["ratio_to_baseline"] == 9.0


def test_swiglu_train_rows_become_records():
    row = {"kernel": "bwd_quant", "P": 52864, "I": 1408, "dtype": "bfloat16"}
    row.update(fused_ms=0.2, frac_copy_bw=0.8, speedup=3.5, baseline="PyTorch's ops + act_quant")
    (rec,) = flat_results({"ceilings": {}, "swiglu_train": [row]})
    assert KEYS <= rec.keys()
    assert rec["kernel"] == "swiglu_train bwd_quant"
    assert rec["shape"] == "P52864 I1408 bfloat16"
    assert rec["time_us"] == 200.0 and rec["ratio_to_baseline"] == 3.5
    assert rec["ratio_to_ceiling"] == 0.8 and rec["baseline"] == "PyTorch's ops + act_quant"


def test_gemv_sweep_candidates_are_valid_tiles_with_small_warp_splits():
    """Every candidate around a Moonlight q + kv_a heuristic tile passes gemv's config check, the
    heuristic's comes first, and 1- and 2-warp tiles with split-K 2 and 4 are among them."""
    base = dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=2048, SPLIT_K=1, num_warps=4, num_stages=3)
    cands = sweep_candidates(base, 1, 3648, 132)
    for c in cands:
        _check_config(c)
    assert cands[0] == base and len(cands) == len({tuple(sorted(c.items())) for c in cands})
    small = {(c["num_warps"], c["SPLIT_K"]) for c in cands if c["num_warps"] < 4}
    assert small == {(1, 2), (1, 4), (2, 2), (2, 4)}


def test_mla_decode_graph_rows_at_128_heads_against_the_matmul_rate():
    """The wgmma kernels' rows keep their kernel's name; 128-head rows (compute-bound) are read
    against the run's bf16 matmul rate, 16-head ones against copy bandwidth."""
    run = json.loads((RESULTS / "kernels-nvidia-h100-80gb-hbm3-mla-ws.json").read_text())
    recs = [r for r in flat_results(run) if r["kernel"].startswith("mla_decode")]
    ws = [r for r in recs if r["kernel"] == "mla_decode_wgmma_ws (CUDA graph)"]
    assert len(ws) == 1 and ws[0]["ceiling"] == "bf16 matmul rate"
    assert ws[0]["ratio_to_ceiling"] == round(472.2 / run["ceilings"]["bf16_matmul_TFLOPs"], 3)
    assert {r["ceiling"] for r in recs if r["shape"].startswith("H16 ")} == {"copy bandwidth"}
