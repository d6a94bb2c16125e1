"""Benchmark of head_gemv (MLA's absorbed per-head GEMMs at decode, moeray/kernels/head_gemv.py)
against torch.einsum (a batched cuBLAS GEMM) at the Moonlight-16B-A3B (16 heads) and DeepSeek-V3
(128 heads) widths, R = 1, 4, 16, 32, 64 rows: W_UK (q_nope [R, H, 128] -> q_lat [R, H, 512], the
weight [H, 128, 512] N-contiguous) and W_UV (o_lat [R, H, 512] -> o [R, H, 128], the weight the
K-contiguous transpose view of [H, 128, 512]), both views of one kv_b_proj weight as MLA reads them.
Past 16 rows also torch.bmm into [R, H, N] (`head_matmul`'s path there, MOERAY_FUSED_HEAD_BMM) and
head_gemv with one row tile of all R rows (`tile_r`: the weight read once, not once per 16-row
tile): at Moonlight FP8 batch 64 the two bmm calls a layer took ~13 us for ~4 MB of weights
(benchmarks/results/engine-nvidia-h100-80gb-hbm3-moonlight-fp8-hbmm.json).

Each variant runs from a CUDA graph of back-to-back calls (the engine replays decode steps from
graphs), cycling over enough weight copies that their bytes pass 256 MB (bench/common.py
`_copies`), so every call reads its weight from HBM (Moonlight's 2 MB views: 22 copies are
44 MB, under an H200's 50 MB L2, so both variants may find part of it there). TB/s counts the
weight, x and y bytes; `frac_hbm` is against the H200's 4.8 TB/s datasheet rate, `frac_copy`
against the device-to-device copy measured in the same run."""

from __future__ import annotations

import os
from unittest import mock

import torch

from moeray.kernels.bench.common import _copies, _cycling, _graph_ms, _rec
from moeray.kernels.head_gemv import head_config, head_gemv, head_matmul

HBM_TBPS = 4.8  # H200 datasheet
HEADS = (("moonlight", 16), ("v3", 128))
NOPE, LATENT, V = 128, 512, 128  # Moonlight and V3 alike
ROWS = (1, 4, 16, 32, 64)
MAX_TILE_R = 64  # the row tile of the `tile_r` variant: all R rows, up to 64


def _weight_views(h: int, which: str):
    """The W_UK or W_UV view [H, K, N] of a fresh kv_b_proj weight [H * (N + V), C]."""
    w_HKC = torch.randn(h * (NOPE + V), LATENT, device="cuda", dtype=torch.bfloat16)
    w_HKC = w_HKC.view(h, NOPE + V, LATENT)
    return w_HKC[:, :NOPE] if which == "w_uk" else w_HKC[:, NOPE:].transpose(1, 2)


def bench_head_gemv(ceil: dict) -> list[dict]:
    """head_gemv vs torch.einsum (cuBLAS), bf16, per model, weight and row count."""
    rows = []
    for model, h in HEADS:
        for which in ("w_uk", "w_uv"):
            w = _weight_views(h, which)
            _, k, n = w.shape
            nbytes_w = 2 * h * k * n
            copies = [(w,)] + [(_weight_views(h, which),) for _ in range(_copies(nbytes_w) - 1)]
            for r in ROWS:
                x = torch.randn(r, h, k, device="cuda", dtype=torch.bfloat16)
                t_ours = _graph_ms(_cycling(lambda w, x=x: head_gemv(x, w), copies))
                t_einsum = _graph_ms(
                    _cycling(lambda w, x=x: torch.einsum("rhk,hkn->rhn", x, w), copies)
                )
                y = head_gemv(x, w).float()
                ref = torch.einsum("rhk,hkn->rhn", x.float(), w.float())
                nbytes = nbytes_w + 2 * r * h * (k + n)
                tbps = nbytes / t_ours / 1e9
                extra = {}
                if r > 16:
                    extra = _wide_rows(x, copies, ref)
                rows.append(
                    {
                        "kernel": "head_gemv",
                        "model": model,
                        "weight": which,
                        "R": r,
                        "H": h,
                        "K": k,
                        "N": n,
                        "us": round(t_ours * 1e3, 2),
                        "TBps": round(tbps, 3),
                        "GBps": round(tbps * 1e3, 1),
                        "frac_hbm": round(tbps / HBM_TBPS, 3),
                        "frac_copy": round(tbps / ceil["copy_TBps"], 3),
                        "einsum_us": round(t_einsum * 1e3, 2),
                        "einsum_GBps": round(nbytes / t_einsum / 1e6, 1),
                        "speedup_vs_einsum": round(t_einsum / t_ours, 3),
                        "config": head_config(r, h, k, n, x.dtype, w.stride(2) == 1, x.device),
                        "rel_err_vs_fp32": round(((y - ref).norm() / ref.norm()).item(), 6),
                        **extra,
                    }
                )
            del w, copies
            torch.cuda.empty_cache()
    return rows


def _bmm(x_RHK: torch.Tensor, w_HKN: torch.Tensor) -> torch.Tensor:
    """head_matmul's default past 16 rows at inference (MOERAY_FUSED_HEAD_BMM: one bmm into
    [R, H, N]), HEAD_TILE off whatever the environment says."""
    with torch.inference_mode(), mock.patch.dict(os.environ, {"MOERAY_FUSED_HEAD_TILE": "0"}):
        return head_matmul(x_RHK, w_HKN)


def _wide_rows(x_RHK: torch.Tensor, copies: list, ref: torch.Tensor) -> dict:
    """bmm, and head_gemv with one row tile (up to MAX_TILE_R rows) at its fastest BLOCK_N of
    16 / 32 / 64, at the same shape: us, that tile against bmm, its error against fp32."""
    r, h, k = x_RHK.shape
    w = copies[0][0]
    n = w.shape[2]
    base = head_config(r, h, k, n, x_RHK.dtype, w.stride(2) == 1, x_RHK.device)
    best: tuple[float, dict] | None = None
    for block_n in (16, 32, 64):
        cfg = {**base, "BLOCK_R": min(MAX_TILE_R, 1 << (r - 1).bit_length()), "BLOCK_N": block_n}
        t = _graph_ms(_cycling(lambda w, x=x_RHK, c=cfg: head_gemv(x, w, config=c), copies))
        if best is None or t < best[0]:
            best = (t, cfg)
    assert best is not None
    t_tile, cfg = best
    t_bmm = _graph_ms(_cycling(lambda w, x=x_RHK: _bmm(x, w), copies))
    y = head_gemv(x_RHK, w, config=cfg).float()
    return {
        "bmm_us": round(t_bmm * 1e3, 2),
        "tile_r_us": round(t_tile * 1e3, 2),
        "tile_r_config": cfg,
        "tile_r_speedup_vs_bmm": round(t_bmm / t_tile, 3),
        "tile_r_rel_err_vs_fp32": round(((y - ref).norm() / ref.norm()).item(), 6),
    }


def print_head_gemv(rows: list[dict]) -> None:
    if not rows:
        return
    print(
        f"\n{'head_gemv':15s} {'R':>2s} {'H':>3s} {'K':>3s} {'N':>3s} | {'us':>6s} {'GB/s':>6s} "
        f"{'of 4.8':>6s} | {'einsum us':>9s} {'GB/s':>6s} | {'x':>5s} | BR BN BK dot"
    )
    for r in rows:
        c = r["config"]
        print(
            f"{r['model'] + ' ' + r['weight']:15s} {r['R']:2d} {r['H']:3d} {r['K']:3d} "
            f"{r['N']:3d} | {r['us']:6.2f} {r['GBps']:6.0f} {r['frac_hbm']:6.2f} | "
            f"{r['einsum_us']:9.2f} {r['einsum_GBps']:6.0f} | {r['speedup_vs_einsum']:5.2f} | "
            f"{c['BLOCK_R']} {c['BLOCK_N']} {c['BLOCK_K']} {c['DOT']}"
        )
        if "bmm_us" in r:
            t = r["tile_r_config"]
            print(
                f"{'':15s} bmm {r['bmm_us']:.2f} us, one {t['BLOCK_R']}-row tile (BN "
                f"{t['BLOCK_N']}) {r['tile_r_us']:.2f} us: x{r['tile_r_speedup_vs_bmm']:.2f}"
            )


def head_gemv_records(rows: list[dict]) -> list[dict]:
    """The flat `results` records (runner.flat_results): against the copy bandwidth and the
    einsum, both from CUDA graphs."""
    return [
        _rec(
            "head_gemv (CUDA graph)",
            f"{r['model']} {r['weight']} R{r['R']} H{r['H']} K{r['K']} N{r['N']}",
            r["us"] / 1e3,
            r["frac_copy"],
            "copy bandwidth",
            "torch.einsum bf16 (CUDA graph)",
            r["speedup_vs_einsum"],
        )
        for r in rows
    ]
