"""Fused MoE: all local experts in one launch per GEMM, SiLU-and-multiply fused into the first.

Legend: T tokens, H hidden (7168), I expert width (moe_intermediate_size, 2048), E local experts,
K top-k (8), TK = T * K assignments (token t's k-th choice is assignment t * K + k), BM rows per
block.

Two paths, chosen in one place, `fused_moe_gate_up`:
- `moe_gemv` (`moeray.kernels.moe_gemv`) for TK <= MOE_GEMV_MAX_ASSIGNMENTS (16: decode at 1-2
  tokens), and at 2 tokens of small experts whatever K (MTP's verification at batch 1;
  `moe_gemv.moe_gemv_applies`), when no `config` is passed, unless MOERAY_FUSED_MOE_GEMV=0. On an
  H200 at Moonlight's shape its decode graph runs 2.03 ms against the aligned path's 2.28 in FP8 at
  batch 1, 2.49 vs 2.60 in bf16 (benchmarks/results/engine-nvidia-h200-moonlight-*-b12*.json): no
  alignment, one program per (row block, assignment) over the full H or I on the CUDA cores, 3
  launches (gate/up, down, sum). With FP8 weights it is weight-only, like FP8Linear's decode
  `fp8_gemv`: x and h are not quantized to e4m3 (no act_quant launches), so its numbers differ from
  the aligned path's by that quantization (4.1-4.6% of the output's norm on random data).
- the aligned kernels below for everything else (prefill, larger decode batches, an explicit
  `config`, MOERAY_FUSED_MOE_GEMV=0): 4 launches with bf16 weights, 6 with FP8.

The aligned path:
1. moe_align (`moeray.kernels.moe_align`): sort assignments by expert and pad each expert's run
   to a multiple of BM, so every block of BM sorted rows belongs to one expert. Padding rows hold
   the sentinel TK. Experts that get no tokens get no blocks. Sizes are upper bounds (no host
   sync), so it can be graph-captured.
2. gate/up kernel: block (m, n) gathers its BM token rows of x, multiplies by w13[e] gate rows n and
   up rows I + n, and writes silu(gate) * up -> h [TK, I] (bf16), row = assignment id.
3. down kernel: block (m, n) multiplies h rows by w2[e] [H, I] columns n, scales by the routing
   weight and writes y_TKH; the K contributions of a token are summed afterwards in fp32
   (`moe_common.moe_sum`, shared with moe_gemv).

bf16 weights use bf16 MMAs. FP8 weights (e4m3, 128x128 block scale_inv as in the checkpoint)
quantize x and h per token in 1x128 groups and use fp8 MMAs with per-128-K promotion, as fp8_gemm.
The quantization is its own launch (act_quant), once per tensor: quantizing inside the GEMM kernels
instead, each of a row block's cdiv(N, BN) programs re-quantizing the same rows, ran Moonlight FP8
decode at half the speed on an H200 (196 vs 397 tok/s at batch 1; benchmarks/notes-engine.md).
Two exceptions quantize without that re-work: at decode batches x's quantization runs in extra
programs of moe_align's launch (ALIGN_QUANT, the default; `moe_align.moe_align_quant`), and, opt-in
(even or slower where timed), FP8 decode tiles of 128 columns hold whole 128-groups of h, so
gate/up writes h already quantized (QUANT_H; MOE_H128 picks those tiles, `moe_tiles.moe_config`).
Assignments whose expert id is outside [0, E) (tokens routed to experts on other ranks) add nothing.
With PDL (sm_90, `common.pdl_launch`) the three kernels wait for the previous kernel first thing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    FP8_BLOCK,
    FP8_DTYPE,
    TL_DTYPES,
    cdiv,
    check_tensor,
    interpreting,
    load_k_block,
    pdl_launch,
    pdl_wait,
    scaled_block_dot,
    switched_off,
    to_dtype_rn,
    use_triton,
)
from moeray.kernels.fp8.quant import act_quant, quant_rows
from moeray.kernels.moe_align import moe_align, moe_align_quant
from moeray.kernels.moe_common import (
    BF16_IN,
    MoEScales,
    check_moe_inputs,
    fused_moe_gate_up_ref,
    moe_act_dtype,
    moe_sum,
)
from moeray.kernels.moe_gemv import check_early_shared, moe_gemv_applies, run_moe_gemv
from moeray.kernels.moe_tiles import DECODE_BLOCK_M, down_config, mask_rows, moe_config


def fused_moe_ref(
    x_TH: torch.Tensor,
    w13_E2IH: torch.Tensor,
    w2_EHI: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    quantize_activations: bool = True,
) -> torch.Tensor:
    """Loop over experts: y_t = sum_k w_tk * W2_e (silu(W1_e x_t) * W3_e x_t), with w13 [E, 2I, H]
    (gate rows then up rows); `moe_common.fused_moe_gate_up_ref` on its two halves.

    With FP8 weights it dequantizes them and, with `quantize_activations` (the aligned FP8
    kernels), fake-quantizes x and h per token (1x128), the same numbers the FP8 kernel
    multiplies; False gives moe_gemv's weight-only numbers (x and h not quantized).
    """
    i = w13_E2IH.shape[1] // 2
    scales: MoEScales | None = None
    if w13_E2IH.dtype == FP8_DTYPE:
        if w13_scale is None or w2_scale is None:
            raise ValueError(
                "FP8 weights need w13_scale [E, 2I/128, H/128] and w2_scale [E, H/128, I/128]"
            )
        scales = (w13_scale[:, : i // 128], w13_scale[:, i // 128 :], w2_scale)
    return fused_moe_gate_up_ref(
        x_TH,
        w13_E2IH[:, :i],
        w13_E2IH[:, i:],
        w2_EHI,
        expert_ids_TK,
        weights_TK,
        scales=scales,
        compute_dtype=compute_dtype,
        quantize_activations=quantize_activations,
    )


@triton.jit
def load_rows_k_block(ptrs, offs_k, k_left, row_ok, EVEN_K: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A [rows, BLOCK_K] activation block; with MASK_ROWS the padding rows (not row_ok) are
    masked off, so they cost no memory traffic, else they read what their pointers say."""
    if MASK_ROWS:
        if EVEN_K:
            a = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(ptrs, mask=row_ok[:, None] & (offs_k[None, :] < k_left), other=0.0)
    else:
        a = load_k_block(ptrs, offs_k[None, :], k_left, EVEN_K)
    return a


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,
    wg_ptr,
    wu_ptr,
    h_ptr,
    sorted_ptr,
    bexp_ptr,
    xs_ptr,
    wsg_ptr,
    wsu_ptr,
    hs_ptr,
    num_valid,
    top_k,
    H,
    INTER,
    stride_xt,
    stride_wge,
    stride_wgn,
    stride_wue,
    stride_wun,
    stride_ht,
    stride_xst,
    stride_wsge,
    stride_wsgn,
    stride_wsue,
    stride_wsun,
    stride_hst,
    FP8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # H % BLOCK_K == 0: no K masks
    ROW_SCALE: tl.constexpr,  # FP8 with BLOCK_N | 128: one weight scale per tile and K block
    NUM_STAGES: tl.constexpr,  # the launch's num_stages, for the K loop's tl.range
    MASK_ROWS: tl.constexpr,  # padding rows' x loads masked off (moe_tiles.mask_rows)
    UPCAST: tl.constexpr,
    PDL: tl.constexpr,
    QUANT_H: tl.constexpr,  # h stored as act_quant stores it: e4m3 (h_ptr), 1x128 scales (hs_ptr)
    H_DTYPE: tl.constexpr,  # h's activation dtype (QUANT_H: what act_quant would have read)
    EXACT: tl.constexpr,  # act_quant's EXACT (the interpreter's rounding)
):
    # Gate and up weights come as two tensors (or two views of one [E, 2I, H] w13), so the model's
    # separate gate_proj / up_proj need no per-call concatenation.
    # PDL: the wait comes first, before the block's expert id (written by moe_align) picks the
    # weights; a weight prefetch before it would need that id. Also before the early return.
    pdl_wait(PDL)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(0)  # fastest: the n-blocks of one row block share its x rows in L2
    e = tl.load(bexp_ptr + pid_m)
    if e < 0:
        return
    ids = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = ids < num_valid
    # Padding rows read token 0 (never stored), so x's loads need no row mask unless MASK_ROWS;
    # nor do the weights' (columns past I read column 0): only a ragged last K block is masked.
    tok = tl.where(row_ok, ids // top_k, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < INTER
    offs_ng = tl.where(n_ok, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)
    e64 = e.to(tl.int64)
    x_ptrs = x_ptr + tok[:, None].to(tl.int64) * stride_xt + offs_k[None, :]
    wg_ptrs = (
        wg_ptr + e64 * stride_wge + offs_ng[None, :].to(tl.int64) * stride_wgn + offs_k[:, None]
    )
    wu_ptrs = (
        wu_ptr + e64 * stride_wue + offs_ng[None, :].to(tl.int64) * stride_wun + offs_k[:, None]
    )
    if ROW_SCALE:  # the tile's columns lie in one 128-row weight block
        sg_ptrs = wsg_ptr + e64 * stride_wsge + (pid_n * BLOCK_N // 128) * stride_wsgn
        su_ptrs = wsu_ptr + e64 * stride_wsue + (pid_n * BLOCK_N // 128) * stride_wsun
    else:
        sg_ptrs = wsg_ptr + e64 * stride_wsge + (offs_ng // 128) * stride_wsgn
        su_ptrs = wsu_ptr + e64 * stride_wsue + (offs_ng // 128) * stride_wsun
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in tl.range(0, tl.cdiv(H, BLOCK_K), num_stages=NUM_STAGES):
        k_left = H - kb * BLOCK_K
        a = load_rows_k_block(x_ptrs + kb * BLOCK_K, offs_k, k_left, row_ok, EVEN_K, MASK_ROWS)
        wg = load_k_block(wg_ptrs + kb * BLOCK_K, offs_k[:, None], k_left, EVEN_K)
        wu = load_k_block(wu_ptrs + kb * BLOCK_K, offs_k[:, None], k_left, EVEN_K)
        if FP8:
            k128 = kb * BLOCK_K // 128
            a_s = tl.load(xs_ptr + tok * stride_xst + k128)
            acc_g = scaled_block_dot(acc_g, a, wg, a_s, tl.load(sg_ptrs + k128), ROW_SCALE, UPCAST)
            acc_u = scaled_block_dot(acc_u, a, wu, a_s, tl.load(su_ptrs + k128), ROW_SCALE, UPCAST)
        elif UPCAST:
            acc_g = tl.dot(a.to(tl.float32), wg.to(tl.float32), acc_g)
            acc_u = tl.dot(a.to(tl.float32), wu.to(tl.float32), acc_u)
        else:
            acc_g = tl.dot(a, wg, acc_g)
            acc_u = tl.dot(a, wu, acc_u)
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, in fp32
    h_ptrs = h_ptr + ids[:, None].to(tl.int64) * stride_ht + offs_n[None, :]
    # to_dtype_rn: round to nearest as the GPU's cast does, also under the interpreter (whose
    # plain cast truncates to bf16), so CPU tests check the GPU's numbers
    if QUANT_H:
        # BLOCK_N = 128 columns, one 128-group of each row: act_quant's math on the h it would
        # read (rounded to the activation dtype first), so the bits are act_quant's
        h_act = to_dtype_rn(act, H_DTYPE)
        q, h_scale = quant_rows(h_act.to(tl.float32), EXACT)
        tl.store(h_ptrs, q, mask=row_ok[:, None])
        tl.store(hs_ptr + ids.to(tl.int64) * stride_hst + pid_n, h_scale, mask=row_ok)
    else:
        h_out = to_dtype_rn(act, h_ptr.dtype.element_ty)
        tl.store(h_ptrs, h_out, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_down_kernel(
    h_ptr,
    w_ptr,
    y_ptr,
    sorted_ptr,
    bexp_ptr,
    hs_ptr,
    ws_ptr,
    rw_ptr,
    num_valid,
    H,
    INTER,
    stride_ht,
    stride_we,
    stride_wn,
    stride_yt,
    stride_hst,
    stride_wse,
    stride_wsn,
    FP8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # INTER % BLOCK_K == 0
    ROW_SCALE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    UPCAST: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)  # first: the expert id that picks the weights is moe_align's output
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(0)
    e = tl.load(bexp_ptr + pid_m)
    if e < 0:
        return
    ids = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = ids < num_valid
    rows = tl.where(row_ok, ids, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_ng = tl.where(n_ok, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)
    e64 = e.to(tl.int64)
    # padding rows read row 0 (never stored) unless MASK_ROWS
    a_ptrs = h_ptr + rows[:, None] * stride_ht + offs_k[None, :]
    b_ptrs = w_ptr + e64 * stride_we + offs_ng[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    if ROW_SCALE:
        bs_ptrs = ws_ptr + e64 * stride_wse + (pid_n * BLOCK_N // 128) * stride_wsn
    else:
        bs_ptrs = ws_ptr + e64 * stride_wse + (offs_ng // 128) * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in tl.range(0, tl.cdiv(INTER, BLOCK_K), num_stages=NUM_STAGES):
        k_left = INTER - kb * BLOCK_K
        a = load_rows_k_block(a_ptrs + kb * BLOCK_K, offs_k, k_left, row_ok, EVEN_K, MASK_ROWS)
        b = load_k_block(b_ptrs + kb * BLOCK_K, offs_k[:, None], k_left, EVEN_K)
        if FP8:
            k128 = kb * BLOCK_K // 128
            a_s = tl.load(hs_ptr + rows * stride_hst + k128)
            acc = scaled_block_dot(acc, a, b, a_s, tl.load(bs_ptrs + k128), ROW_SCALE, UPCAST)
        elif UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b, acc)
    rw = tl.load(rw_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * rw[:, None]
    y_ptrs = y_ptr + rows[:, None] * stride_yt + offs_n[None, :]
    y_out = to_dtype_rn(acc, y_ptr.dtype.element_ty)  # (as the gate/up kernel's h)
    tl.store(y_ptrs, y_out, mask=row_ok[:, None] & n_ok[None, :])


# The FP8 aligned path quantizes x in moe_align's launch (`moe_align_quant`) up to this many
# tokens (MOERAY_FUSED_ALIGN_QUANT=0 keeps act_quant's own launch): decode batches, where the two
# launches are ~2-3 us each for a few KB; prefill keeps act_quant's own launch. On an H100,
# Moonlight FP8 (`bench engine --ab`, benchmarks/results/engine-nvidia-h100-80gb-hbm3-moonlight-
# fp8-{moelaunches,launches832}.json): decode graph 0.995x as long at batch 64 alone; with
# SHARED_SUM and NORM_ROUTER_WIDE 0.989x at 32 and 0.987x at 8 (0.978x at 64 with MOE_H128 on
# too, itself 0.998x alone); V3 widths at 64 even.
ALIGN_QUANT_MAX_TOKENS = 256


def fused_moe(
    x_TH: torch.Tensor,
    w13_E2IH: torch.Tensor,
    w2_EHI: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """y [T, H] = sum_k weights[t, k] * expert_{ids[t, k]}(x_t), all local experts at once.

    x [T, H] bf16; w13 [E, 2I, H] (gate rows then up rows) and w2 [E, H, I], bf16 or e4m3 with
    w13_scale [E, 2I/128, H/128] and w2_scale [E, H/128, I/128] (checkpoint scale_inv);
    expert_ids [T, K] int (ids outside [0, E) are skipped), weights [T, K] float.
    No host syncs (CUDA-graph capturable). `fused_moe_gate_up` on w13's halves (moe_gemv
    where `moe_gemv_applies`)."""
    check_tensor(w13_E2IH, "w13", dtypes=(*BF16_IN, FP8_DTYPE), ndim=3)
    e_count, two_i, h_w = w13_E2IH.shape
    if two_i % 2:
        raise ValueError(
            f"w13 has shape {tuple(w13_E2IH.shape)}; expected [E, 2I, H] (gate then up rows)"
        )
    i = two_i // 2
    w1_scale = w3_scale = None
    if w13_E2IH.dtype == FP8_DTYPE and w13_scale is not None:
        check_tensor(
            w13_scale, "w13_scale", dtypes=(torch.float32,), ndim=3, device=w13_E2IH.device
        )
        if i % 128 or tuple(w13_scale.shape) != (e_count, two_i // 128, -(-h_w // 128)):
            raise ValueError(
                f"w13_scale has shape {tuple(w13_scale.shape)}; expected "
                f"{(e_count, two_i // 128, -(-h_w // 128))} with I={i} a multiple of 128"
            )
        w1_scale, w3_scale = w13_scale[:, : i // 128], w13_scale[:, i // 128 :]
    return fused_moe_gate_up(
        x_TH,
        w13_E2IH[:, :i],
        w13_E2IH[:, i:],
        w2_EHI,
        expert_ids_TK,
        weights_TK,
        w1_scale=w1_scale,
        w3_scale=w3_scale,
        w2_scale=w2_scale,
        config=config,
    )


def fused_moe_gate_up(
    x_TH: torch.Tensor,
    w1_EIH: torch.Tensor,
    w3_EIH: torch.Tensor,
    w2_EHI: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    *,
    w1_scale: torch.Tensor | None = None,
    w3_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    config: dict | None = None,
    add_TH: torch.Tensor | None = None,
    early_shared: int = 0,
    add_ready: torch.cuda.Event | None = None,
) -> torch.Tensor:
    """`fused_moe` with the gate (w1 [E, I, H]) and up (w3 [E, I, H]) weights as two tensors, as the
    model stores them (`Experts.gate_proj` / `up_proj`); FP8 weights take w1_scale / w3_scale
    [E, I/128, H/128] and w2_scale [E, H/128, I/128]. Views are fine (last dim contiguous).
    `add_TH` [T, H] (x's dtype; the shared experts' output): added to the result in the final
    sum's launch, rounded as `fused_moe_gate_up(...) + add_TH` rounds (one launch fewer);
    `add_ready`: an event recorded after add_TH's producer on another stream, which the launch
    that reads add_TH waits for (the aligned path's sum: the GEMMs before it run meanwhile).
    `config`: the aligned kernels' tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages,
    optional MASK_ROWS; `moe_tiles.moe_config` picks them otherwise) and an optional "down" dict of
    BLOCK_N / num_warps / num_stages for the down launch alone.
    Up to MOE_GEMV_MAX_ASSIGNMENTS assignments (T * K; two tokens of small experts: the
    module docstring) with no `config` it runs `moe_gemv`
    (module docstring; FP8 there is weight-only), unless MOERAY_FUSED_MOE_GEMV=0; `early_shared`
    is moe_gemv's (its promise about the last ids and x; the aligned path has no use for it). On
    CPU tensors outside the interpreter: the chosen path's reference."""
    scales = check_moe_inputs(
        x_TH,
        w1_EIH,
        w3_EIH,
        w2_EHI,
        expert_ids_TK,
        weights_TK,
        w1_scale=w1_scale,
        w3_scale=w3_scale,
        w2_scale=w2_scale,
        add_TH=add_TH,
    )
    check_early_shared(early_shared, expert_ids_TK, w1_EIH.shape[0])
    t, h = x_TH.shape
    e_count, i, _ = w1_EIH.shape
    k = expert_ids_TK.shape[1]
    tk = t * k
    # The one choice between the two paths (module docstring): an explicit `config` is a tile
    # config of the aligned kernels, so it keeps them.
    if config is None and moe_gemv_applies(t, k, h, i):
        _wait(add_ready, x_TH)  # its down launch may read add_TH
        return run_moe_gemv(
            x_TH,
            w1_EIH,
            w3_EIH,
            w2_EHI,
            expert_ids_TK,
            weights_TK,
            scales,
            add_TH,
            None,
            early_shared,
        )
    if not use_triton(x_TH):
        _wait(add_ready, x_TH)
        return fused_moe_gate_up_ref(
            x_TH, w1_EIH, w3_EIH, w2_EHI, expert_ids_TK, weights_TK, scales=scales, add_TH=add_TH
        )
    for name, w in (("w1", w1_EIH), ("w3", w3_EIH), ("w2", w2_EHI)):
        if w.stride(-1) != 1:
            raise ValueError(
                f"{name} rows must be contiguous (stride(-1) == 1), got strides {w.stride()}"
            )
    fp8 = scales is not None
    cfg = dict(config or moe_config(tk, e_count, fp8, h))
    # the down launch's own columns, warps and stages ("down"; rows and K blocks are shared: both
    # launches walk the same aligned row blocks)
    down_cfg = down_config(cfg.pop("down", None))
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    mask_rows_on = bool(cfg.pop("MASK_ROWS", mask_rows(bm)))
    down_bn = down_cfg.pop("BLOCK_N", bn)
    down_cfg = {**cfg, **down_cfg}
    if fp8 and 128 % bk:
        raise ValueError(f"BLOCK_K={bk} must divide 128 for FP8 weights")
    x = x_TH if x_TH.stride(-1) == 1 else x_TH.contiguous()
    a_in = a_scale = x  # bf16: the scale pointer is unused
    if fp8 and t <= ALIGN_QUANT_MAX_TOKENS and not switched_off("ALIGN_QUANT"):
        # x's act_quant in the alignment's launch (its programs after the E aligning ones)
        sorted_ids, block_expert, a_in, a_scale = moe_align_quant(expert_ids_TK, e_count, bm, x)
    else:
        sorted_ids, block_expert = moe_align(expert_ids_TK, e_count, bm)
        if fp8:
            a_in, a_scale = act_quant(x)
    max_blocks = block_expert.numel()
    act_dtype = moe_act_dtype(x.dtype)
    # FP8 decode tiles of 128 columns: each gate/up program holds whole 128-groups of its h
    # rows, so it quantizes them itself (act_quant's bits) and the act_quant launch between the
    # two GEMMs goes away (prefill tiles keep act_quant: not measured there)
    quant_h = fp8 and bn == FP8_BLOCK and i % FP8_BLOCK == 0 and bm <= DECODE_BLOCK_M
    hbuf = torch.empty(tk, i, dtype=FP8_DTYPE if quant_h else act_dtype, device=x.device)
    # h's scales (QUANT_H; otherwise an unused pointer)
    hs = torch.empty(tk, i // FP8_BLOCK, dtype=torch.float32, device=x.device) if quant_h else hbuf
    upcast = interpreting()
    pdl = pdl_launch(x.device)
    if scales is not None:  # FP8
        # the kernels step over K blocks with stride 1
        s1, s3, s2 = (sc if sc.stride(-1) == 1 else sc.contiguous() for sc in scales)
    else:
        s1 = s3 = s2 = w1_EIH  # unused without FP8
    _moe_gate_up_kernel[(cdiv(i, bn), max_blocks)](
        a_in,
        w1_EIH,
        w3_EIH,
        hbuf,
        sorted_ids,
        block_expert,
        a_scale,
        s1,
        s3,
        hs,
        tk,
        k,
        h,
        i,
        a_in.stride(0),
        w1_EIH.stride(0),
        w1_EIH.stride(1),
        w3_EIH.stride(0),
        w3_EIH.stride(1),
        hbuf.stride(0),
        a_scale.stride(0),
        s1.stride(0),
        s1.stride(1),
        s3.stride(0),
        s3.stride(1),
        hs.stride(0),
        FP8=fp8,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        EVEN_K=h % bk == 0,
        ROW_SCALE=fp8 and 128 % bn == 0,
        NUM_STAGES=cfg["num_stages"],
        MASK_ROWS=mask_rows_on,
        UPCAST=upcast,
        PDL=pdl,
        QUANT_H=quant_h,
        H_DTYPE=TL_DTYPES[act_dtype],
        EXACT=upcast,
        launch_pdl=pdl,
        **cfg,
    )
    if quant_h:
        h_in, h_scale = hbuf, hs
    elif fp8:
        h_in, h_scale = act_quant(hbuf)
    else:
        h_in, h_scale = hbuf, hbuf
    y_tk = torch.empty(tk, h, dtype=act_dtype, device=x.device)
    rw = weights_TK.reshape(-1).contiguous()
    _moe_down_kernel[(cdiv(h, down_bn), max_blocks)](
        h_in,
        w2_EHI,
        y_tk,
        sorted_ids,
        block_expert,
        h_scale,
        s2,
        rw,
        tk,
        h,
        i,
        h_in.stride(0),
        w2_EHI.stride(0),
        w2_EHI.stride(1),
        y_tk.stride(0),
        h_scale.stride(0),
        s2.stride(0),
        s2.stride(1),
        FP8=fp8,
        BLOCK_M=bm,
        BLOCK_N=down_bn,
        BLOCK_K=bk,
        EVEN_K=i % bk == 0,
        ROW_SCALE=fp8 and 128 % down_bn == 0,
        NUM_STAGES=down_cfg["num_stages"],
        MASK_ROWS=mask_rows_on,
        UPCAST=upcast,
        PDL=pdl,
        launch_pdl=pdl,
        **down_cfg,
    )
    _wait(add_ready, x_TH)
    return moe_sum(y_tk, expert_ids_TK, e_count, x_TH.dtype, add_TH)


def _wait(event: torch.cuda.Event | None, x: torch.Tensor) -> None:
    """x's current stream waits for `event` (None: nothing to wait for)."""
    if event is not None:
        torch.cuda.current_stream(x.device).wait_event(event)
