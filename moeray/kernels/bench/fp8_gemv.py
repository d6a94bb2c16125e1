"""Benchmark of fp8_gemv (weight-only FP8 GEMM for decode) at the Moonlight-16B-A3B and
DeepSeek-V3 decode linear shapes (bench/gemv.py DECODE_LINEARS), M = 1, 2, 4, 8, against the
split-K broadcast tiles fp8_gemv took before its full-K kernel (M <= 4; two launches), the
act_quant + fp8_gemm path FP8Linear takes for larger M, and bf16 F.linear (cuBLAS); and a tile
sweep of the broadcast kernel.

Each variant runs from a CUDA graph of back-to-back calls (the engine replays decode steps from
graphs, so host launch cost is not what a step pays), cycling over enough weight copies that
their bytes pass 256 MB: a decode step reads every layer's weights between two calls of one
layer, so the weight is never in the 50 MB L2 when its layer runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeray.kernels.bench.common import _copies, _cycling, _graph_ms
from moeray.kernels.bench.gemv import (
    DECODE_LINEARS,
    DECODE_ROWS,
    HBM_TBPS,
    print_sweep,
    run_sweep,
)
from moeray.kernels.common import cdiv, num_sms
from moeray.kernels.fp8.dispatch import fp8_gemm
from moeray.kernels.fp8.gemv import _gemv_config, fp8_gemv
from moeray.kernels.fp8.quant import act_quant, weight_dequant, weight_quant
from moeray.kernels.gemv import BCAST_MAX_ROWS, pow2_at_least


def previous_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """The broadcast tiles fp8_gemv used before its full-K kernel (M <= 4): 128-deep K steps,
    BLOCK_M x BLOCK_N = 64, K split until 4 programs per SM, then the reduce kernel."""
    bm = pow2_at_least(m)
    bn = 64 // bm
    split = max(1, min(cdiv(k, 128), cdiv(4 * num_sms(device), cdiv(n, bn))))
    return dict(
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=128,
        SPLIT_K=split,
        DOT=False,
        num_warps=8 if bm == 1 else 4,
        num_stages=4,
    )


def _row(ceil: dict, name: str, m: int, n: int, k: int, copies_fp8, copies_bf16) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    t_gemv = _graph_ms(_cycling(lambda w, s: fp8_gemv(x, w, s), copies_fp8))
    t_split = None
    if m <= BCAST_MAX_ROWS:
        old = previous_config(m, n, k, x.device)
        t_split = _graph_ms(_cycling(lambda w, s: fp8_gemv(x, w, s, config=old), copies_fp8))

    def quant_gemm(w, s):
        xq, xs = act_quant(x, scale_col_major=True)
        return fp8_gemm(xq, xs, w, s)

    t_gemm = _graph_ms(_cycling(quant_gemm, copies_fp8))
    t_bf16 = _graph_ms(_cycling(lambda w: F.linear(x, w), copies_bf16))
    w, s = copies_fp8[0]
    y = fp8_gemv(x, w, s).float()
    ref = F.linear(x.float(), copies_bf16[0][0].float())
    fp8_bytes = n * k + cdiv(n, 128) * cdiv(k, 128) * 4 + m * (k + n) * 2
    bf16_bytes = 2 * n * k + m * (k + n) * 2
    copy_bw = ceil["copy_TBps"] * 1e3  # GB/s
    gbs = fp8_bytes / t_gemv / 1e6
    return {
        "kernel": "fp8_gemv",
        "layer": name,
        "M": m,
        "N": n,
        "K": k,
        "gemv_us": round(t_gemv * 1e3, 2),
        "gemv_GBps": round(gbs, 1),
        "gemv_frac_copy_bw": round(gbs / copy_bw, 3),
        "gemv_frac_hbm": round(gbs / 1e3 / HBM_TBPS, 3),
        "splitk_us": round(t_split * 1e3, 2) if t_split else None,
        "speedup_vs_splitk": round(t_split / t_gemv, 3) if t_split else None,
        "quant_gemm_us": round(t_gemm * 1e3, 2),
        "quant_gemm_GBps": round(fp8_bytes / t_gemm / 1e6, 1),
        "bf16_linear_us": round(t_bf16 * 1e3, 2),
        "bf16_linear_GBps": round(bf16_bytes / t_bf16 / 1e6, 1),
        "bf16_frac_copy_bw": round(bf16_bytes / t_bf16 / 1e6 / copy_bw, 3),
        "speedup_vs_quant_gemm": round(t_gemm / t_gemv, 3),
        "speedup_vs_bf16": round(t_bf16 / t_gemv, 3),
        "config": _gemv_config(m, n, k, x.device),
        "rel_err_vs_bf16_dequant": round(((y - ref).norm() / ref.norm()).item(), 5),
    }


def _fp8_copies(n: int, k: int) -> list:
    q, s = weight_quant(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    return [(q, s)] + [(q.clone(), s.clone()) for _ in range(_copies(n * k) - 1)]


def bench_fp8_gemv(ceil: dict) -> list[dict]:
    rows = []
    for name, n, k in DECODE_LINEARS:
        fp8 = _fp8_copies(n, k)
        w = weight_dequant(*fp8[0])
        bf16 = [(w,)] + [(w.clone(),) for _ in range(_copies(2 * n * k) - 1)]
        for m in DECODE_ROWS:
            rows.append(_row(ceil, name, m, n, k, fp8, bf16))
        del fp8, bf16, w
        torch.cuda.empty_cache()
    return rows


def print_fp8_gemv(rows: list[dict]) -> None:
    print(
        f"\n{'fp8_gemv layer':22s} {'M':>2s} {'N':>6s} {'K':>5s} | {'gemv us':>7s} {'TB/s':>5s} "
        f"{'of 4.8':>6s} | {'split-K us':>10s} {'x':>5s} | {'quant+gemm':>10s} {'x':>5s} | "
        f"{'bf16 us':>7s} {'x':>5s} | err"
    )
    for r in rows:
        split = ""
        if r.get("splitk_us"):
            split = f"{r['splitk_us']:10.2f} {r['speedup_vs_splitk']:5.2f}"
        print(
            f"{r['layer']:22s} {r['M']:2d} {r['N']:6d} {r['K']:5d} | {r['gemv_us']:7.2f} "
            f"{r['gemv_GBps'] / 1e3:5.2f} {r.get('gemv_frac_hbm', 0):6.2f} | {split:16s} | "
            f"{r['quant_gemm_us']:10.2f} {r['speedup_vs_quant_gemm']:5.2f} | "
            f"{r['bf16_linear_us']:7.2f} {r['speedup_vs_bf16']:5.2f} | "
            f"{r['rel_err_vs_bf16_dequant']}"
        )


def sweep_fp8_gemv(budget_s: float = 50.0) -> list[dict]:
    """fp8_gemv's broadcast-tile sweep at bench/gemv.py's sweep layers, M = 1 and 4 (its DOT
    tiles for M > 4 are unchanged); `gemv.bcast_config` is tuned from here."""
    return run_sweep(
        "fp8_gemv",
        _fp8_copies,
        lambda x, w, s, cfg: fp8_gemv(x, w, s, config=cfg),
        _gemv_config,
        {"DOT": False},
        budget_s,
    )


def print_fp8_gemv_sweep(rows: list[dict]) -> None:
    print_sweep(rows)
