"""Benchmarks of the FP8 kernels: block quantization (and the training weights' quantization with
W^T in one launch against quantization plus a transposing copy), the block-scaled GEMM (auto
backend and Triton against torch._scaled_mm and bf16 matmul), its backward GEMMs, the m-grouped
GEMM, and the Triton GEMM's tile-config sweep."""

from __future__ import annotations

import functools

import torch

from moeray.kernels.bench.common import _bench, _try
from moeray.kernels.fp8.dispatch import (
    fp8_gemm,
    fp8_linear_dgrad,
    fp8_linear_wgrad,
    native_blockscaled_layout,
)
from moeray.kernels.fp8.gemm import _fp8_gemm_launch, _gemm_config, ctas_per_sm, fp8_gemm_triton
from moeray.kernels.fp8.grouped import fp8_gemm_grouped
from moeray.kernels.fp8.quant import (
    act_quant,
    act_quant_ref,
    act_quant_t,
    act_quant_t_ref,
    weight_dequant,
    weight_dequant_ref,
    weight_quant,
    weight_quant_ref,
    weight_quant_t,
)


def bench_quant(ceil: dict) -> list[dict]:
    rows = []
    x = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(7168, 2048, device="cuda", dtype=torch.bfloat16)
    wq, ws = weight_quant(w)
    # Baseline: the PyTorch reference each kernel is tested against (eager elementwise ops and
    # reductions; no library fuses block quantization).
    cases = [
        (
            "act_quant",
            "4096x7168 bf16",
            lambda: act_quant(x),
            lambda: act_quant_ref(x),
            x.numel() * 3 + x.numel() // 128 * 4,
        ),
        (
            "act_quant_colmajor_scale",
            "4096x7168 bf16",
            lambda: act_quant(x, scale_col_major=True),
            lambda: act_quant_ref(x),
            x.numel() * 3 + x.numel() // 128 * 4,
        ),
        (
            "act_quant_t",
            "4096x7168 bf16",
            lambda: act_quant_t(x),
            lambda: act_quant_t_ref(x),
            x.numel() * 3 + x.numel() // 128 * 4,
        ),
        (
            "weight_quant",
            "7168x2048 bf16",
            lambda: weight_quant(w),
            lambda: weight_quant_ref(w),
            w.numel() * 3,
        ),
        (
            "weight_dequant",
            "7168x2048 e4m3",
            lambda: weight_dequant(wq, ws),
            lambda: weight_dequant_ref(wq, ws),
            w.numel() * 3,
        ),
    ]
    for name, shape, fn, ref, nbytes in cases:
        ms, ref_ms = _bench(fn), _bench(ref)
        tbs = nbytes / ms / 1e9
        rows.append(
            {
                "kernel": name,
                "shape": shape,
                "ms": round(ms, 4),
                "TBps": round(tbs, 3),
                "frac_copy_bw": round(tbs / ceil["copy_TBps"], 3),
                "ref_ms": round(ref_ms, 4),
                "speedup_vs_ref": round(ref_ms / ms, 2),
            }
        )
    rows += [_weight_quant_t_row(ceil, *shape) for shape in MOONLIGHT_EXPERT_WEIGHTS]
    return rows


# Moonlight's routed experts stacked as StackedWeight quantizes them, fp32 master weights:
# gate/up [64, 1408, 2048] and down [64, 2048, 1408] (64 experts, hidden 2048, expert width 1408).
MOONLIGHT_EXPERT_WEIGHTS = ((64, 1408, 2048), (64, 2048, 1408))


def _weight_quant_t_row(ceil: dict, e: int, n: int, k: int) -> dict:
    """weight_quant_t (q, scales and W^T per expert from one launch) against what it replaces:
    weight_quant of [E * N, K] then W^T by a transposing copy. TB/s counts the bytes each moves
    per element: fused 4 (fp32 read) + 1 (q) + 1 (q_t); separate 4 + 1, then 1 + 1 (the copy
    reads q back). frac_copy_bw is against the device-to-device copy of the same run (HBM)."""
    w = torch.randn(e, n, k, device="cuda")

    def separate():
        q, _ = weight_quant(w.view(e * n, k))
        return q.view(e, n, k).transpose(1, 2).contiguous()

    ms, ref_ms = _bench(lambda: weight_quant_t(w)), _bench(separate)
    scale_bytes = e * -(-n // 128) * -(-k // 128) * 4
    tbs = (w.numel() * 6 + scale_bytes) / ms / 1e9
    ref_tbs = (w.numel() * 7 + scale_bytes) / ref_ms / 1e9
    return {
        "kernel": "weight_quant_t",
        "shape": f"{e}x{n}x{k} fp32",
        "ms": round(ms, 4),
        "TBps": round(tbs, 3),
        "frac_copy_bw": round(tbs / ceil["copy_TBps"], 3),
        "baseline": "weight_quant + transposing copy",
        "ref_ms": round(ref_ms, 4),
        "ref_TBps": round(ref_tbs, 3),
        "ref_frac_copy_bw": round(ref_tbs / ceil["copy_TBps"], 3),
        "speedup_vs_ref": round(ref_ms / ms, 2),
    }


def _fp8_gemm_row(ceil: dict, layout: str | None, m: int, w, wq, ws) -> dict:
    """fp8_gemm (auto backend) and the Triton GEMM at [m, K] x W [N, K]^T against bf16 matmul and,
    where this GPU has it, the native block-scaled torch._scaled_mm."""
    n, k = w.shape
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    xq, xs = act_quant(x, scale_col_major=True)
    flops = 2 * m * n * k
    r = {"kernel": "fp8_gemm", "M": m, "N": n, "K": k, "native_layout": layout}
    t_auto = _bench(lambda: fp8_gemm(xq, xs, wq, ws))
    t_tri = _bench(lambda: fp8_gemm_triton(xq, xs, wq, ws))
    t_bf16 = _bench(lambda: x @ w.t())
    r.update(ms=round(t_auto, 4), triton_ms=round(t_tri, 4), bf16_matmul_ms=round(t_bf16, 4))
    if layout is not None:
        sb = ws.t() if layout == "t_view" else ws.t().contiguous()
        t_sm = _bench(
            lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=sb, out_dtype=torch.bfloat16)
        )
        r["scaled_mm_ms"] = round(t_sm, 4)
        r["ratio_vs_scaled_mm"] = round(t_sm / t_auto, 3)
        r["triton_ratio_vs_scaled_mm"] = round(t_sm / t_tri, 3)
    r["TFLOPs"] = round(flops / t_auto / 1e9, 1)
    r["triton_TFLOPs"] = round(flops / t_tri / 1e9, 1)
    r["triton_config"] = _gemm_config(m, n, xq.device)
    r["triton_occupancy"] = ctas_per_sm(_fp8_gemm_launch(xq, xs, wq, ws)[1])
    r["frac_fp8_peak"] = round(flops / t_auto / 1e9 / ceil["fp8_matmul_TFLOPs"], 3)
    r["speedup_vs_bf16"] = round(t_bf16 / t_auto, 3)
    r["triton_speedup_vs_bf16"] = round(t_bf16 / t_tri, 3)
    return r


def bench_fp8_gemm(ceil: dict) -> list[dict]:
    rows = []
    layout = native_blockscaled_layout(0, False)
    for n, k in [(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        wq, ws = weight_quant(w)
        for m in (64, 4096):
            rows.append(_fp8_gemm_row(ceil, layout, m, w, wq, ws))
        del w, wq, ws
    # The backward GEMMs of a 4096-token linear 7168 -> 2048 (dgrad: dy @ W; wgrad: dy^T @ x).
    m, n, k = 4096, 2048, 7168
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    wq, ws = weight_quant(w)
    wtq = wq.t().contiguous()
    for name, fn, ref in [
        (
            "fp8_linear_dgrad (quant dy + GEMM)",
            lambda: fp8_linear_dgrad(dy, wq, ws, w_t_fp8=wtq),
            lambda: dy @ w,
        ),
        (
            "fp8_linear_wgrad (quant dy, x 128x1 + GEMM)",
            lambda: fp8_linear_wgrad(dy, x),
            lambda: dy.t() @ x,
        ),
    ]:
        t, tb = _bench(fn), _bench(ref)
        rows.append(
            {
                "kernel": name,
                "M": m,
                "N": n,
                "K": k,
                "ms": round(t, 4),
                "bf16_matmul_ms": round(tb, 4),
                "TFLOPs": round(2 * m * n * k / t / 1e9, 1),
                "speedup_vs_bf16": round(tb / t, 3),
            }
        )
    return rows


def _fp8_gemm_grouped_row(ceil: dict, name: str, e: int, per: int, proj: str, n: int, k: int):
    """One projection of `e` experts with `per` rows each: the grouped GEMM against one `fp8_gemm`
    per expert."""
    w = torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16)
    qs = [weight_quant(w[j]) for j in range(e)]
    b, b_s = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    x = torch.randn(e * per, k, device="cuda", dtype=torch.bfloat16)
    a, a_s = act_quant(x, scale_col_major=True)
    blocks = torch.arange(e, device="cuda", dtype=torch.int32).repeat_interleave(per // 128)
    segs = [slice(j * per, (j + 1) * per) for j in range(e)]
    a_s_segs = [a_s[sl].t().contiguous().t() for sl in segs]  # each expert's column-major scales

    def per_expert():
        return [
            fp8_gemm(a[sl], s_, b[j], b_s[j])
            for j, (sl, s_) in enumerate(zip(segs, a_s_segs, strict=True))
        ]

    grouped = _bench(lambda: fp8_gemm_grouped(a, a_s, b, b_s, blocks))
    loop = _bench(per_expert)
    out = fp8_gemm_grouped(a, a_s, b, b_s, blocks).float()
    ref = torch.cat(per_expert()).float()
    flops = 2 * e * per * n * k
    return {
        "kernel": "fp8_gemm_grouped",
        "shape": f"{name} {proj}",
        "experts": e,
        "rows_per_expert": per,
        "N": n,
        "K": k,
        "ms": round(grouped, 4),
        "per_expert_loop_ms": round(loop, 4),
        "speedup_vs_loop": round(loop / grouped, 2),
        "TFLOPs": round(flops / grouped / 1e9, 1),
        "frac_fp8_peak": round(flops / grouped / 1e9 / ceil["fp8_matmul_TFLOPs"], 3),
        "rel_err_vs_loop": round(((out - ref).norm() / ref.norm()).item(), 5),
    }


def bench_fp8_gemm_grouped(ceil: dict) -> list[dict]:
    """The m-grouped FP8 GEMM (one launch for all experts) against one `fp8_gemm` per expert, at
    training shapes: small()'s 32 local experts (EP = 2) x 512 rows, and V3's 8 local experts
    (EP = 32) x 1024 rows; gate/up (N = I) and down (N = D) projections."""
    rows = []
    for name, e, per, d, i in (("small", 32, 512, 1024, 288), ("v3", 8, 1024, 7168, 2048)):
        for proj, n, k in (("gate_up", i, d), ("down", d, i)):
            rows.append(_fp8_gemm_grouped_row(ceil, name, e, per, proj, n, k))
    return rows


def sweep_fp8_gemm() -> list[dict]:
    """Time candidate tile configs of the Triton GEMM (`_gemm_config` comes from here)."""
    out = []
    gemm_cfgs = [
        (128, 128, 8, 4, 8),
        (128, 128, 4, 4, 8),
        (128, 256, 8, 3, 8),
        (64, 128, 4, 4, 8),
        (128, 64, 4, 5, 8),
        (64, 256, 4, 3, 8),
        (64, 64, 4, 6, 1),
        (64, 32, 4, 6, 1),
        (64, 128, 4, 5, 1),
        (64, 256, 8, 3, 1),
    ]
    for m, n, k in [(4096, 4096, 7168), (4096, 2112, 7168), (64, 4096, 7168), (64, 24576, 1536)]:
        xq, xs = act_quant(torch.randn(m, k, device="cuda"), scale_col_major=True)
        wq, ws = weight_quant(torch.randn(n, k, device="cuda"))
        for bm, bn, nw, ns, gm in gemm_cfgs:
            if (m == 64) != (gm == 1):
                continue
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=gm, num_warps=nw, num_stages=ns)
            t = _try(functools.partial(fp8_gemm_triton, xq, xs, wq, ws, config=cfg))
            out.append(
                {
                    "M": m,
                    "N": n,
                    "K": k,
                    **cfg,
                    "ms": t,
                    "TFLOPs": round(2 * m * n * k / t / 1e9, 1) if isinstance(t, float) else None,
                }
            )
    return out
