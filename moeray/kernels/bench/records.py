"""The uniform records of a `moeray bench kernels` result: every section's rows as kernel, shape,
time_us, ratio_to_ceiling, baseline, ratio_to_baseline (and issue 4's `target` / `meets_target`),
stored under `results` in benchmarks/results/kernels-<device>.json."""

from __future__ import annotations

from moeray.kernels.bench.adamw import adamw_records
from moeray.kernels.bench.common import _rec
from moeray.kernels.bench.head_gemv import head_gemv_records
from moeray.kernels.bench.moe_permute import moe_permute_records
from moeray.kernels.bench.swiglu_train import swiglu_records


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
        ) + (f" block_h={r['block_h']}" if "block_h" in r else "")
        # 128 heads are compute-bound: against the run's bf16 matmul rate (rows since the
        # wgmma kernels carry TFLOP/s); 16 heads against copy bandwidth
        if "graph_TFLOPs" in r and r["heads"] >= 64:
            ratio = round(r["graph_TFLOPs"] / result["ceilings"]["bf16_matmul_TFLOPs"], 3)
            ceiling = "bf16 matmul rate"
        else:
            ratio, ceiling = r["graph_frac_copy_bw"], "copy bandwidth"
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
                f"{r.get('kernel', 'mla_decode')} (CUDA graph)",
                shape,
                r["graph_ms"],
                ratio,
                ceiling,
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
