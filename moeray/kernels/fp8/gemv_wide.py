"""fp8_gemv's wide step at one row: where it applies (`wide_applies`: by default where the whole K
is one step, K <= 2,048; everywhere with MOERAY_FUSED_FP8_GEMV_WIDE=1), its tile and split rule
(`wide_config`) and the jit helpers that fp8/gemv.py's kernel runs when its K_BLOCKS > 1.

Legend: BN weight rows a program, KBS = K_BLOCKS 128-column blocks a step, K reduction.

A program computes y [BN] = sum over its split's blocks b of s_b * (x_b . w_{n,b}) (x_b: the
block's 128 x values, s_b its 128x128 block scale, applied to x as `_bcast_part` does), reading
[BN, KBS, 128] e4m3 weights and KBS scales per step; with PDL the first step, the whole split
when it is one step, is read before the wait.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moeray.kernels.common import cdiv, pdl_wait, switched_off, switched_on
from moeray.kernels.gemv import pow2_at_least

# The wide step at M = 1 (fp8/gemv.py's `_gemv_config`, `wide_applies`): 4 weight rows x up to
# 16 K blocks (8 KB of e4m3) a program, read whole before the PDL wait, where the default tile
# reads 8 rows x one block (1 KB) before it and the rest after. Why: at Moonlight's batch 1
# fp8_gemv took ~5.9 us a call for ~1.2 us of bytes (56 calls a step, the engine profile in
# benchmarks/results/engine-nvidia-h200-moonlight-fp8-ab2.json), while a chain of GEMVs whose
# programs each read 4 rows x full K before the wait ran an 8.4 MB bf16 weight in 3.38 us
# (results/pdl-probe-nvidia-h200.json). In the engine at batch 1 on an H100, applied at every K
# (MOERAY_FUSED_FP8_GEMV_WIDE=1), the decode graph ran ~4% faster at Moonlight FP8 (every
# projection's K is 2,048: one step) and ~3% slower at V3 widths (K up to 16,384: split-K tiles)
# against the run's own rebuilt engine (results/engine-nvidia-h100-80gb-hbm3-*-b1ab*.json); hence
# the default only where K is one step (MOERAY_FUSED_FP8_GEMV_ONE_STEP=0 turns that off).
WIDE_ROWS = 4
# Under the interpreter (numpy per program) 32 rows a program: the same code path in 8x fewer
# programs, as `_tile_shape`'s wider interpreter tiles (CPU tests decode tiny FP8 models with it).
INTERPRET_WIDE_ROWS = 32
_WIDE_MAX_BLOCKS = 16


def wide_applies(kb: int) -> bool:
    """Whether fp8_gemv at one row of float x takes the wide step over kb K blocks: where the
    whole K is one step (kb <= 16, K <= 2,048: Moonlight's projections, V3's q_b) unless
    MOERAY_FUSED_FP8_GEMV_ONE_STEP=0, and at every K with MOERAY_FUSED_FP8_GEMV_WIDE=1."""
    if switched_on("FP8_GEMV_WIDE"):
        return True
    return kb <= _WIDE_MAX_BLOCKS and not switched_off("FP8_GEMV_ONE_STEP")


def wide_config(n: int, kb: int, sms: int, rows: int = WIDE_ROWS) -> dict:
    """The wide step's tiles at M = 1 for N outputs and kb K blocks: `rows` (4) rows a program
    (fp8/gemv.py passes INTERPRET_WIDE_ROWS under Triton's CPU interpreter), K split
    so that each split is one step of at most 16 blocks and, where the tiles are fewer than the
    SMs, further (as gemv's rule; the probe's tiles were 512 programs of one step at N = 2048):
    Moonlight's q + kv_a (N = 3648, 16 blocks) 912 programs and o_proj (2048) 512, each one step;
    V3's q_a (1536 x 56 blocks) 384 tiles x 4 splits of 14 blocks."""
    tiles = cdiv(n, rows)
    split = max(cdiv(kb, _WIDE_MAX_BLOCKS), min(kb, cdiv(sms, tiles)))
    return dict(
        BLOCK_M=1,
        BLOCK_N=rows,
        SPLIT_K=split,
        DOT=False,
        K_BLOCKS=pow2_at_least(cdiv(kb, split)),
        num_warps=4,
        num_stages=2,
    )


@triton.jit
def _wide_load(w_ptr, s_ptrs, rows, kb0, kb_hi, K, stride_wn, stride_wk, stride_sk,
               K_BLOCKS: tl.constexpr, EVEN_K: tl.constexpr):  # fmt: skip
    """The wide step at K block kb0: weight tile [BN, K_BLOCKS, 128] (e4m3) and its K_BLOCKS block
    scales; blocks at or past kb_hi (and columns past K) read as 0."""
    blk = kb0 + tl.arange(0, K_BLOCKS)
    blk_ok = blk < kb_hi
    cols = blk[:, None] * 128 + tl.arange(0, 128)[None, :]
    ok = blk_ok[:, None] if EVEN_K else blk_ok[:, None] & (cols < K)
    w = tl.load(
        w_ptr + rows[:, None, None] * stride_wn + cols[None, :, :] * stride_wk,
        mask=ok[None, :, :],
        other=0.0,
    )
    s = tl.load(s_ptrs + blk * stride_sk, mask=blk_ok, other=0.0)
    return w, s


@triton.jit
def _wide_part(x_row_ptr, stride_xk, w, s, kb0, kb_hi, K, K_BLOCKS: tl.constexpr,
               EVEN_K: tl.constexpr):  # fmt: skip
    """[BN, K_BLOCKS]: each weight row's product with x over each of the step's blocks, fp32, the
    block scale applied to x's 128 values (as `_bcast_part`)."""
    blk = kb0 + tl.arange(0, K_BLOCKS)
    blk_ok = blk < kb_hi
    cols = blk[:, None] * 128 + tl.arange(0, 128)[None, :]
    ok = blk_ok[:, None] if EVEN_K else blk_ok[:, None] & (cols < K)
    x = tl.load(x_row_ptr + cols * stride_xk, mask=ok, other=0.0).to(tl.float32) * s[:, None]
    return tl.sum(w.to(tl.float32) * x[None, :, :], axis=2)


@triton.jit
def wide_rows(
    x_row_ptr, w_ptr, s_ptrs, rows, kb_lo, kb_hi, K, stride_xk, stride_wn, stride_wk, stride_sk,
    BLOCK_N: tl.constexpr, K_BLOCKS: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """y [BN] of one x row over K blocks kb_lo .. kb_hi - 1 in steps of K_BLOCKS blocks (the wide
    step: `wide_applies`, `wide_config`). With PDL the first step's weights and scales
    (the whole split when it is one step) are read before the wait, x after it."""
    acc = tl.zeros((BLOCK_N, K_BLOCKS), dtype=tl.float32)
    kb_start = kb_lo
    if PDL:
        w, s = _wide_load(w_ptr, s_ptrs, rows, kb_lo, kb_hi, K, stride_wn, stride_wk, stride_sk,
                          K_BLOCKS, EVEN_K)  # fmt: skip
        pdl_wait(PDL)
        acc += _wide_part(x_row_ptr, stride_xk, w, s, kb_lo, kb_hi, K, K_BLOCKS, EVEN_K)
        kb_start = kb_lo + K_BLOCKS
    for kb0 in tl.range(kb_start, kb_hi, K_BLOCKS):
        w, s = _wide_load(w_ptr, s_ptrs, rows, kb0, kb_hi, K, stride_wn, stride_wk, stride_sk,
                          K_BLOCKS, EVEN_K)  # fmt: skip
        acc += _wide_part(x_row_ptr, stride_xk, w, s, kb0, kb_hi, K, K_BLOCKS, EVEN_K)
    return tl.sum(acc, axis=1)
