"""`moeray bench kernels`: time every kernel on the GPU against ceilings measured in the same run.

Writes benchmarks/results/kernels-<device>.json: per kernel and shape the median time (CUDA events,
triton.testing.do_bench), achieved TB/s or TFLOP/s, the fraction of the measured ceiling
(device-to-device copy bandwidth, bf16 and fp8 matmul rates) and the ratio to the baseline: each
section's detailed rows under its name, and all of them as uniform records under `results`
(`flat_results`: kernel, shape, time_us, ratio_to_ceiling, baseline, ratio_to_baseline, and for
issue 4's targets `target` / `meets_target`).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import triton

from moeray.kernels.bench.adamw import bench_adamw, print_adamw
from moeray.kernels.bench.common import ceilings
from moeray.kernels.bench.cross_entropy import bench_cross_entropy, print_cross_entropy
from moeray.kernels.bench.decode import bench_decode_glue
from moeray.kernels.bench.fp8 import (
    bench_fp8_gemm,
    bench_fp8_gemm_grouped,
    bench_quant,
    sweep_fp8_gemm,
)
from moeray.kernels.bench.fp8_gemv import (
    bench_fp8_gemv,
    print_fp8_gemv,
    print_fp8_gemv_split_sweep,
    print_fp8_gemv_sweep,
    sweep_fp8_gemv,
    sweep_fp8_gemv_splits,
)
from moeray.kernels.bench.fp8_kgrouped import print_fp8_kgrouped_sweep, sweep_fp8_kgrouped
from moeray.kernels.bench.gate import bench_moe_gate
from moeray.kernels.bench.gemv import bench_gemv, print_gemv, print_sweep, sweep_gemv
from moeray.kernels.bench.grouped_wgrad import (
    bench_grouped_wgrad,
    print_grouped_wgrad,
    print_grouped_wgrad_sweep,
    sweep_grouped_wgrad,
)
from moeray.kernels.bench.head_gemv import bench_head_gemv, print_head_gemv
from moeray.kernels.bench.mla import (
    bench_mla_decode,
    bench_mla_decode_graph,
    bench_mla_prefill,
    sweep_mla_decode,
)
from moeray.kernels.bench.moe import (
    bench_moe,
    print_fused_moe_prefill_sweep,
    sweep_fused_moe,
    sweep_fused_moe_prefill,
)
from moeray.kernels.bench.moe_permute import (
    bench_moe_permute_train,
    print_moe_permute_train,
)
from moeray.kernels.bench.norm import bench_norm_train, print_norm_train
from moeray.kernels.bench.records import flat_results
from moeray.kernels.bench.rope import bench_rope_train, print_rope_train
from moeray.kernels.bench.swiglu_train import bench_swiglu_train, print_swiglu_train
from moeray.results import device_slug, write_result


def sweep() -> dict:
    """Time candidate block configs; the heuristics in fp8/gemm.py, moe.py and mla_decode.py come
    from here."""
    return {
        "fp8_gemm_triton": sweep_fp8_gemm(),
        "fused_moe": sweep_fused_moe(),
        "mla_decode": sweep_mla_decode(),
    }


def _print_sweep(sw: dict) -> None:
    def best(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, dict]:
        groups: dict[tuple, dict] = {}
        for r in rows:
            if isinstance(r["ms"], float):
                g = tuple(r[k] for k in keys)
                if g not in groups or r["ms"] < groups[g]["ms"]:
                    groups[g] = r
        return groups

    for g, r in best(sw["fp8_gemm_triton"], ("M", "N", "K")).items():
        print(
            "sweep best fp8_gemm_triton",
            g,
            {k: r[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "ms", "TFLOPs")},
        )
    for g, r in best(sw["fused_moe"], ("phase", "weights")).items():
        print(
            "sweep best fused_moe",
            g,
            {k: r[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "ms")},
        )
    for g, r in best(sw["mla_decode"], ("heads", "batch", "context")).items():
        print(
            "sweep best mla_decode",
            g,
            {k: r[k] for k in ("block_h", "num_warps", "num_stages", "num_splits", "ms", "TBps")},
        )


def _print_table(result: dict) -> None:
    c = result["ceilings"]
    for r in result.get("router", []):
        print(
            f"router {r['shape']:5s} E={r['E']:3d} T={r['tokens']:5d}: in a graph "
            f"{r['torch_graph_us']:7.1f} us torch -> {r['fused_graph_us']:6.1f} us fused "
            f"(x{r['graph_speedup']}), eager {r['torch_ms']:.4f} -> "
            f"{r['fused_ms']:.4f} ms; ids== {r['ids_equal']} counts== {r['counts_equal']} "
            f"scores bit== {r['scores_bit_equal']} w diff {r['weights_max_abs_diff']:.1e}"
        )
        if r.get("fused_graph_us_by_block_t"):
            sweep = " ".join(f"{k}:{v}" for k, v in r["fused_graph_us_by_block_t"].items())
            print(f"router {r['shape']:5s} T={r['tokens']:5d} graph us by rows a program: {sweep}")
    for r in result.get("decode_glue", []):
        print(
            f"decode glue {r['kernel']:12s} T={r['tokens']:4d}: in a graph "
            f"{r['torch_graph_us']:7.1f} us torch -> {r['fused_graph_us']:6.1f} us fused "
            f"(x{r['graph_speedup']}), "
            f"bit== {r['bit_equal']}"
        )
    print_norm_train(result.get("norm_train", []))
    print_rope_train(result.get("rope_train", []))
    print_moe_permute_train(result.get("moe_permute_train", []))
    print_swiglu_train(result.get("swiglu_train", []))
    print_cross_entropy(result.get("cross_entropy", []))
    print_adamw(result.get("adamw", []))
    for r in result.get("mla_decode_graph", []):
        print(
            f"{r['kernel']} graph H={r['heads']:3d} B={r['batch']:3d} ctx={r['context']:5d} "
            f"table={r.get('table_pages', '-')!s:4s} "
            f"splits={r['num_splits']!s:4s} stages={r['num_stages']} bh={r['block_h']}: graph "
            f"{r['graph_ms']:.4f} ms ({r['graph_frac_copy_bw']:.2f} of copy, "
            f"{r['graph_TFLOPs']} TFLOP/s), "
            f"eager {r['eager_ms']:.4f} ms ({r['eager_frac_copy_bw']:.2f}), "
            f"err {r['rel_err_first4']}"
        )
    for r in result.get("mla_prefill", {}).get("rows", []):
        tf = r["TFLOPs"]
        print(
            f"mla_prefill H={r['heads']:3d} {r['layout']:7s}: fastest {r['fastest']} | "
            + ", ".join(f"{k} {v}" for k, v in sorted(tf.items(), key=lambda kv: -kv[1]))
            + " TFLOP/s"
            + f" | err {r['rel_err_vs_triton']}"
        )
    print(
        f"\nceilings: copy {c['copy_TBps']} TB/s, bf16 {c['bf16_matmul_TFLOPs']} TFLOP/s, fp8 "
        f"{c['fp8_matmul_TFLOPs']} TFLOP/s"
    )
    for r in result.get("quant", []):
        print(
            f"{r['kernel']:28s} {r['shape']:16s} {r['ms']:8.4f} ms {r['TBps']:6.3f} TB/s "
            f"({r['frac_copy_bw']:.2f} of copy)"
            + (
                f" | {r['baseline']} {r['ref_ms']:.4f} ms {r['ref_TBps']:.3f} TB/s, "
                f"x{r['speedup_vs_ref']}"
                if "baseline" in r
                else ""
            )
        )
    for r in result.get("fp8_gemm", []):
        if "N" in r and r["kernel"] == "fp8_gemm":
            print(
                f"fp8_gemm M={r['M']:5d} N={r['N']:5d} K={r['K']:5d}: {r['TFLOPs']:7.1f} TFLOP/s "
                f"(x{r.get('ratio_vs_scaled_mm', float('nan'))} scaled_mm, "
                f"x{r['speedup_vs_bf16']} bf16); triton {r['triton_TFLOPs']:7.1f} "
                f"(x{r.get('triton_ratio_vs_scaled_mm', float('nan'))} scaled_mm, "
                f"x{r['triton_speedup_vs_bf16']} bf16)"
            )
        else:
            print(f"{r['kernel']}: {r['TFLOPs']} TFLOP/s, x{r['speedup_vs_bf16']} bf16")
    if "fp8_gemv" in result:
        print_fp8_gemv(result["fp8_gemv"])
    if "fp8_gemv_sweep" in result:
        print_fp8_gemv_sweep(result["fp8_gemv_sweep"])
    if "fp8_gemv_split_sweep" in result:
        print_fp8_gemv_split_sweep(result["fp8_gemv_split_sweep"])
    if "gemv" in result:
        print_gemv(result["gemv"])
    if "gemv_sweep" in result:
        print_sweep(result["gemv_sweep"])
    print_head_gemv(result.get("head_gemv", []))
    if "grouped_wgrad" in result:
        print_grouped_wgrad(result["grouped_wgrad"])
    if "grouped_wgrad_sweep" in result:
        print_grouped_wgrad_sweep(result["grouped_wgrad_sweep"])
    if "fp8_kgrouped_sweep" in result:
        print_fp8_kgrouped_sweep(result["fp8_kgrouped_sweep"])
    for r in result.get("fp8_gemm_grouped", []):
        print(
            f"{r['kernel']:17s} {r['shape']:19s} {r['experts']:2d} x {r['rows_per_expert']:4d} "
            f"rows, N={r['N']:5d} K={r['K']:5d}: {r['ms']:.4f} ms ({r['TFLOPs']} TFLOP/s), "
            f"per-expert loop {r['per_expert_loop_ms']:.4f} ms "
            f"(x{r['speedup_vs_loop']}), err {r['rel_err_vs_loop']}"
        )
    if "fused_moe_prefill_sweep" in result:
        print_fused_moe_prefill_sweep(result["fused_moe_prefill_sweep"])
    for r in result.get("fused_moe", []):
        print(
            f"{r['kernel']:16s} {r['phase']:7s} T={r['tokens']:5d} E={r['experts']:3d}: "
            f"{r['ms']:8.3f} ms, "
            f"loop {r['loop_ms']:8.3f} ms (kernels alone {r.get('loop_gpu_ms')}), "
            f"x{r['speedup_vs_loop']} loop (x{r.get('speedup_vs_loop_gpu')} its kernels), "
            f"{r['frac_of_floor']:.2f} of {r['floor_is']} floor, "
            f"err {r['rel_err_vs_ref_first64']}"
        )
    for r in result.get("mla_decode", []):
        print(
            f"mla_decode H={r['heads']:3d} B={r['batch']:3d} ctx={r['context']:5d}: "
            f"{r['ms']:8.4f} ms "
            f"{r['TBps']:6.3f} TB/s ({r['frac_copy_bw']:.2f} of copy) {r['TFLOPs']:6.1f} TFLOP/s"
            + (f", x{r['speedup_vs_ref']} ref" if "speedup_vs_ref" in r else "")
        )


SECTIONS = (
    "quant",
    "fp8_gemm",
    "fp8_gemv",
    "fp8_gemv_sweep",
    "fp8_gemv_split_sweep",
    "gemv",
    "gemv_sweep",
    "head_gemv",
    "grouped_wgrad",
    "grouped_wgrad_sweep",
    "fp8_kgrouped_sweep",
    "fp8_gemm_grouped",
    "fused_moe",
    "fused_moe_prefill_sweep",
    "mla_decode",
    "mla_decode_graph",
    "mla_prefill",
    "router",
    "decode_glue",
    "norm_train",
    "rope_train",
    "moe_permute_train",
    "swiglu_train",
    "cross_entropy",
    "adamw",
)
# Sections run only when named in --only: fp8_gemv's ~540 timed tile x split-K configs, the
# fused MoE's prefill tiles (minutes each).
ON_REQUEST = ("fp8_gemv_split_sweep", "fused_moe_prefill_sweep")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeray bench kernels", description=__doc__)
    p.add_argument(
        "--only",
        default=",".join(s for s in SECTIONS if s not in ON_REQUEST),
        help=f"comma list of: {', '.join(SECTIONS)} (default: all but {', '.join(ON_REQUEST)})",
    )
    p.add_argument("--quick", action="store_true", help="fewer MLA shapes")
    p.add_argument("--sweep", action="store_true", help="also time candidate block configs")
    p.add_argument(
        "--gemv-sweep-s",
        type=float,
        default=50.0,
        help="seconds gemv_sweep may take (the heuristic's tile first)",
    )
    p.add_argument(
        "--split-sweep-layers",
        default=None,
        help="comma list of the layers fp8_gemv_split_sweep times (default: Moonlight's four, "
        "V3's q_a and kv_a; any of fp8_gemv.MOONLIGHT_LINEARS and V3_LINEARS)",
    )
    p.add_argument("--moe-hidden", type=int, default=7168)
    p.add_argument("--moe-inter", type=int, default=2048)
    p.add_argument("--moe-experts", type=int, default=64)
    p.add_argument("--tag", default="", help="results file kernels-<device>[-<tag>].json")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "moeray bench kernels: needs a CUDA GPU (run it on the device machine)", file=sys.stderr
        )
        return 2
    want = set(args.only.split(","))
    bad = want - set(SECTIONS)
    if bad:
        raise ValueError(f"--only got {sorted(bad)}; accepted: {', '.join(SECTIONS)}")
    result: dict = {"torch": torch.__version__}
    result["triton"] = triton.__version__
    result["ceilings"] = ceilings()
    print("ceilings", result["ceilings"], flush=True)
    sections = [
        ("quant", lambda: bench_quant(result["ceilings"])),
        ("fp8_gemm", lambda: bench_fp8_gemm(result["ceilings"])),
        ("fp8_gemv", lambda: bench_fp8_gemv(result["ceilings"])),
        ("fp8_gemv_sweep", sweep_fp8_gemv),
        ("fp8_gemv_split_sweep", lambda: sweep_fp8_gemv_splits(args.split_sweep_layers)),
        ("gemv", lambda: bench_gemv(result["ceilings"])),
        ("gemv_sweep", lambda: sweep_gemv(args.gemv_sweep_s)),
        ("head_gemv", lambda: bench_head_gemv(result["ceilings"])),
        ("grouped_wgrad", lambda: bench_grouped_wgrad(result["ceilings"])),
        ("grouped_wgrad_sweep", sweep_grouped_wgrad),
        ("fp8_kgrouped_sweep", sweep_fp8_kgrouped),
        ("fp8_gemm_grouped", lambda: bench_fp8_gemm_grouped(result["ceilings"])),
        (
            "fused_moe",
            lambda: bench_moe(
                result["ceilings"], args.moe_hidden, args.moe_inter, args.moe_experts
            ),
        ),
        (
            "fused_moe_prefill_sweep",
            lambda: sweep_fused_moe_prefill(args.moe_hidden, args.moe_inter, args.moe_experts),
        ),
        ("mla_decode", lambda: bench_mla_decode(result["ceilings"], args.quick)),
        ("mla_decode_graph", lambda: bench_mla_decode_graph(result["ceilings"])),
        ("mla_prefill", lambda: bench_mla_prefill(result["ceilings"], args.quick)),
        ("router", bench_moe_gate),
        ("decode_glue", bench_decode_glue),
        ("norm_train", lambda: bench_norm_train(result["ceilings"])),
        ("rope_train", lambda: bench_rope_train(result["ceilings"])),
        ("moe_permute_train", lambda: bench_moe_permute_train(result["ceilings"])),
        ("swiglu_train", lambda: bench_swiglu_train(result["ceilings"])),
        ("cross_entropy", lambda: bench_cross_entropy(result["ceilings"])),
        ("adamw", lambda: bench_adamw(result["ceilings"])),
    ]
    for name, fn in sections:
        if name not in want:
            continue
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # keep the other sections' numbers; record what broke
            result[name + "_error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"{name} failed: {result[name + '_error']}", flush=True)
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", flush=True)
        torch.cuda.empty_cache()
    if args.sweep:
        t0 = time.perf_counter()
        result["sweep"] = sweep()
        print(f"[sweep: {time.perf_counter() - t0:.1f} s]", flush=True)
    result["results"] = flat_results(result)
    path = write_result(f"kernels-{device_slug()}" + (f"-{args.tag}" if args.tag else ""), result)
    _print_table(result)
    print("\nissue 4 targets (stated for an H100):")
    for rec in result["results"]:
        if "target" in rec:
            ((field, minimum),) = rec["target"].items()
            print(
                f"  {'met ' if rec['meets_target'] else 'MISS'} {rec['kernel']:24s} "
                f"{rec['shape']:40s} "
                f"{field} {rec[field]} >= {minimum} (baseline {rec['baseline']})"
            )
    if args.sweep:
        _print_sweep(result["sweep"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
