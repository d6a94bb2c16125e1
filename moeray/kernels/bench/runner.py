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

from moeray.kernels.bench.adamw import adamw_records, bench_adamw, print_adamw
from moeray.kernels.bench.common import _rec, ceilings
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
    print_fp8_gemv_sweep,
    sweep_fp8_gemv,
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
from moeray.kernels.bench.head_gemv import bench_head_gemv, head_gemv_records, print_head_gemv
from moeray.kernels.bench.mla import (
    bench_mla_decode,
    bench_mla_decode_graph,
    bench_mla_prefill,
    sweep_mla_decode,
)
from moeray.kernels.bench.moe import bench_moe, sweep_fused_moe
from moeray.kernels.bench.moe_permute import (
    bench_moe_permute_train,
    moe_permute_records,
    print_moe_permute_train,
)
from moeray.kernels.bench.norm import bench_norm_train, print_norm_train
from moeray.kernels.bench.rope import bench_rope_train, print_rope_train
from moeray.kernels.bench.swiglu_train import bench_swiglu_train, print_swiglu_train, swiglu_records
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
            f"mla_decode graph H={r['heads']:3d} B={r['batch']:3d} ctx={r['context']:5d} "
            f"splits={r['num_splits']!s:4s} stages={r['num_stages']}: graph "
            f"{r['graph_ms']:.4f} ms ({r['graph_frac_copy_bw']:.2f} of copy), "
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
    for r in result.get("fused_moe", []):
        print(
            f"{r['kernel']:16s} {r['phase']:7s} T={r['tokens']:5d}: {r['ms']:8.3f} ms, "
            f"loop {r['loop_ms']:8.3f} ms, "
            f"x{r['speedup_vs_loop']} loop, {r['frac_of_floor']:.2f} of {r['floor_is']} floor, "
            f"err {r['rel_err_vs_ref_first64']}"
        )
    for r in result.get("mla_decode", []):
        print(
            f"mla_decode H={r['heads']:3d} B={r['batch']:3d} ctx={r['context']:5d}: "
            f"{r['ms']:8.4f} ms "
            f"{r['TBps']:6.3f} TB/s ({r['frac_copy_bw']:.2f} of copy) {r['TFLOPs']:6.1f} TFLOP/s"
            + (f", x{r['speedup_vs_ref']} ref" if "speedup_vs_ref" in r else "")
        )


def flat_results(result: dict) -> list[dict]:
    """Every section's rows as one list of records: kernel, shape, time_us, ratio_to_ceiling (to the
    ceiling named in `ceiling`, measured in the same run) and ratio_to_baseline (to the method named
    in `baseline`); higher is better for both ratios. Rows the issue sets a target for carry it."""
    out: list[dict] = []
    c = result["ceilings"]
    for r in result.get("quant", []):
        out.append(
            _rec(
                r["kernel"],
                r["shape"],
                r["ms"],
                r["frac_copy_bw"],
                "copy bandwidth",
                r.get("baseline", "PyTorch reference (eager)"),
                r.get("speedup_vs_ref"),
            )
        )
    for r in result.get("fp8_gemm", []):
        shape = f"M{r['M']} N{r['N']} K{r['K']}"
        if r["kernel"] != "fp8_gemm":  # the backward GEMMs
            out.append(
                _rec(
                    r["kernel"],
                    shape,
                    r["ms"],
                    round(r["TFLOPs"] / c["fp8_matmul_TFLOPs"], 3),
                    "fp8 matmul rate",
                    "torch.matmul bf16",
                    r["speedup_vs_bf16"],
                )
            )
            continue
        big = r["M"] == 4096
        for kernel, ms, tf, sm_ratio, bf16_ratio, sm_target, bf16_target in (
            (
                "fp8_gemm",
                r["ms"],
                r["TFLOPs"],
                r.get("ratio_vs_scaled_mm"),
                r["speedup_vs_bf16"],
                0.95,
                1.3,
            ),
            (
                "fp8_gemm_triton",
                r["triton_ms"],
                r["triton_TFLOPs"],
                r.get("triton_ratio_vs_scaled_mm"),
                r["triton_speedup_vs_bf16"],
                0.7,
                None,
            ),
        ):
            ratio_c = round(tf / c["fp8_matmul_TFLOPs"], 3)
            if sm_ratio is not None:
                out.append(
                    _rec(
                        kernel,
                        shape,
                        ms,
                        ratio_c,
                        "fp8 matmul rate",
                        "torch._scaled_mm block-scaled",
                        sm_ratio,
                        {"ratio_to_baseline": sm_target} if big else None,
                    )
                )
            out.append(
                _rec(
                    kernel,
                    shape,
                    ms,
                    ratio_c,
                    "fp8 matmul rate",
                    "torch.matmul bf16",
                    bf16_ratio,
                    {"ratio_to_baseline": bf16_target} if big and bf16_target else None,
                )
            )
    for r in result.get("fp8_gemv", []):
        for baseline, ratio in (
            ("act_quant + fp8_gemm (CUDA graph)", r["speedup_vs_quant_gemm"]),
            ("F.linear bf16 (CUDA graph)", r["speedup_vs_bf16"]),
        ):
            out.append(
                _rec(
                    "fp8_gemv (CUDA graph)",
                    f"{r['layer']} M{r['M']} N{r['N']} K{r['K']}",
                    r["gemv_us"] / 1e3,
                    r["gemv_frac_copy_bw"],
                    "copy bandwidth",
                    baseline,
                    ratio,
                )
            )
    for r in result.get("gemv", []):
        out.append(
            _rec(
                "gemv (CUDA graph)",
                f"{r['layer']} M{r['M']} N{r['N']} K{r['K']}",
                r["gemv_us"] / 1e3,
                r["gemv_frac_copy"],
                "copy bandwidth",
                "F.linear bf16 (CUDA graph)",
                r["speedup_vs_cublas"],
            )
        )
    out.extend(head_gemv_records(result.get("head_gemv", [])))
    for r in result.get("grouped_wgrad", []):
        shape = f"{r['shape']}: E{r['experts']} N{r['N']} K{r['K']} P{r['rows']}"
        for mode, baseline in (
            ("accumulate", "torch._grouped_mm + .to(fp32) + grad.add_"),
            ("fresh", "torch._grouped_mm + .to(fp32)"),
        ):
            out.append(
                _rec(
                    f"grouped_wgrad ({mode})",
                    shape,
                    r[f"{mode}_ms"],
                    r[f"{mode}_frac_of_floor"],
                    "max(bf16 matmul rate, copy bandwidth) floor",
                    baseline,
                    r[f"speedup_{mode}"],
                )
            )
    for r in result.get("fp8_gemm_grouped", []):
        out.append(
            _rec(
                r["kernel"],
                f"{r['shape']}: {r['experts']} x {r['rows_per_expert']} rows, N{r['N']} K{r['K']}",
                r["ms"],
                r["frac_fp8_peak"],
                "fp8 matmul rate",
                "fp8_gemm per expert",
                r["speedup_vs_loop"],
            )
        )
    for r in result.get("fused_moe", []):
        target = {"ratio_to_baseline": 5.0 if r["phase"] == "decode" else 2.0}
        out.append(
            _rec(
                r["kernel"],
                f"{r['phase']} T{r['tokens']}, top-{r['top_k']} of {r['experts']}, "
                f"{r['hidden']}/{r['inter']}",
                r["ms"],
                r["frac_of_floor"],
                f"{r['floor_is']} floor",
                "per-expert PyTorch loop (bf16)",
                r["speedup_vs_loop"],
                target,
            )
        )
    for r in result.get("mla_decode", []):
        out.append(
            _rec(
                "mla_decode",
                f"H{r['heads']} B{r['batch']} ctx{r['context']}",
                r["ms"],
                r["frac_copy_bw"],
                "copy bandwidth",
                "mla_decode_ref (PyTorch)" if "speedup_vs_ref" in r else None,
                r.get("speedup_vs_ref"),
            )
        )
    for r in result.get("mla_decode_graph", []):
        shape = (
            f"H{r['heads']} B{r['batch']} ctx{r['context']} splits={r['num_splits']} "
            f"stages={r['num_stages']}"
        )
        graph_target = None
        if (r["heads"], r["batch"], r["context"], r["num_splits"], r["num_stages"]) == (
            16,
            64,
            4096,
            "auto",
            2,
        ):
            graph_target = {"ratio_to_ceiling": 0.7}  # the engine's decode steps replay CUDA graphs
        out.append(
            _rec(
                "mla_decode (CUDA graph)",
                shape,
                r["graph_ms"],
                r["graph_frac_copy_bw"],
                "copy bandwidth",
                "the same calls eager (do_bench)",
                round(r["eager_ms"] / r["graph_ms"], 3),
                graph_target,
            )
        )
    for r in result.get("mla_prefill", {}).get("rows", []):
        ms = {
            k: v
            for k, v in r["ms"].items()
            if isinstance(v, float) and not k.startswith("triton_cfg")
        }
        if "triton" not in ms:
            continue
        others = {k: v for k, v in ms.items() if k != "triton"}
        best = min(others, key=others.__getitem__) if others else None
        out.append(
            _rec(
                "mla_prefill_triton",
                f"H{r['heads']} {r['layout']}",
                ms["triton"],
                r["frac_bf16_peak"].get("triton"),
                "bf16 matmul rate",
                f"fastest torch method ({best})" if best else None,
                round(others[best] / ms["triton"], 3) if best else None,
            )
        )
    for r in result.get("norm_train", []):
        out.append(
            _rec(
                "rms_norm fwd+bwd (autograd)",
                f"{r['kernel']} T{r['tokens']} D{r['D']}",
                r["fused_fwd_bwd_ms"],
                r["frac_copy_bw"],
                "copy bandwidth",
                "autograd through rms_norm_ref",
                r["speedup_fwd_bwd"],
            )
        )
    for r in result.get("rope_train", []):
        out.append(
            _rec(
                "rope fwd+bwd (autograd)",
                f"{r['kernel']} B{r['B']} S{r['S']} H{r['H']} R{r['R']} {r['dtype']}",
                r["fused_fwd_bwd_ms"],
                r["frac_copy_bw"],
                "copy bandwidth",
                "autograd through rope_ref",
                r["speedup_fwd_bwd"],
            )
        )
    out.extend(moe_permute_records(result.get("moe_permute_train", [])))
    out.extend(swiglu_records(result.get("swiglu_train", [])))
    for r in result.get("cross_entropy", []):
        out.append(
            _rec(
                "cross_entropy fwd+bwd (autograd, in place)",
                f"{r['kernel']} T{r['tokens']} V{r['V']} bf16",
                r["fused_inplace_fwd_bwd_ms"],
                r["fused_inplace_frac_of_floor"],
                "bf16 logits read once + grad written once at copy bandwidth",
                "autograd through F.cross_entropy on fp32 logits",
                r["speedup_fused_inplace"],
            )
        )
    out.extend(adamw_records(result.get("adamw", [])))
    for r in result.get("router", []):
        out.append(
            _rec(
                "route_fused (CUDA graph)",
                f"{r['shape']} E{r['E']} T{r['tokens']}",
                r["fused_graph_us"] / 1e3,
                None,
                None,
                "PyTorch route (CUDA graph)",
                r["graph_speedup"],
            )
        )
    return out


SECTIONS = (
    "quant",
    "fp8_gemm",
    "fp8_gemv",
    "fp8_gemv_sweep",
    "gemv",
    "gemv_sweep",
    "head_gemv",
    "grouped_wgrad",
    "grouped_wgrad_sweep",
    "fp8_kgrouped_sweep",
    "fp8_gemm_grouped",
    "fused_moe",
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeray bench kernels", description=__doc__)
    p.add_argument(
        "--only", default=",".join(SECTIONS), help="comma list of: " + ", ".join(SECTIONS)
    )
    p.add_argument("--quick", action="store_true", help="fewer MLA shapes")
    p.add_argument("--sweep", action="store_true", help="also time candidate block configs")
    p.add_argument(
        "--gemv-sweep-s",
        type=float,
        default=50.0,
        help="seconds gemv_sweep may take (the heuristic's tile first)",
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
