"""FP8 (e4m3) block quantization and block-scaled GEMMs, DeepSeek-V3 recipe.

Legend: M tokens (rows of activations), N output features, K reduction features, KB = ceil(K/128),
NB = ceil(N/128), MB = ceil(M/128).

- act_quant:     x [..., K]     -> e4m3 [..., K] and fp32 scale [..., KB]   (1x128 per-token groups)
- act_quant_t:   x [M, K]       -> e4m3 [K, M] and fp32 scale [K, MB]       (128x1 groups, transposed:
                                   the weight-grad GEMM reduces over tokens)
- weight_quant:  w [N, K]       -> e4m3 [N, K] and fp32 scale_inv [NB, KB]  (128x128 blocks)
- weight_dequant: inverse of weight_quant, dequant = w_fp8 * scale_inv per block (checkpoint rule)
- fp8_gemm:      a [M, K] e4m3 (scale [M, KB]) x b [N, K] e4m3 (scale [NB, KB] per 128x128 block, or
                 [N, KB] per 1x128 row group) -> [M, N] bf16, fp32 accumulation, like F.linear.
  Uses torch's native block-scaled `torch._scaled_mm` (cuBLASLt) where it works on this torch and GPU
  (probed once per device against the reference), else the Triton kernel here.
- fp8_linear_dgrad / fp8_linear_wgrad: the two backward GEMMs of y = x W^T, so all three GEMMs of a
  linear layer run in FP8.

scale = amax / 448 per group, q = x / scale rounded to nearest-even e4m3; dequant = q * scale.
Every `*_ref` is plain PyTorch (CPU or GPU) and is the test oracle.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    AMAX_FLOOR,
    FP8_DTYPE,
    FP8_MAX,
    cdiv,
    check_shape,
    check_tensor,
    interpreting,
    num_sms,
    to_e4m3,
    use_triton,
)

FLOAT_IN = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# References (plain PyTorch, fp32 math)
# ----------------------------------------------------------------------------------------------


def _quant_groups_ref(x_GB: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of x_GB (groups x group elements) with one scale per row."""
    x = x_GB.float()
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR)
    scale = amax / FP8_MAX
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.squeeze(-1)


def act_quant_ref(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    *lead, k = x.shape
    kb = cdiv(k, block)
    xp = torch.nn.functional.pad(x.float(), (0, kb * block - k)).reshape(-1, kb, block)
    q, s = _quant_groups_ref(xp)
    q = q.reshape(-1, kb * block)[:, :k].reshape(*lead, k)
    return q, s.reshape(*lead, kb)


def act_quant_t_ref(x_MK: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = act_quant_ref(x_MK.t(), block)
    return q.contiguous(), s.contiguous()


def weight_quant_ref(w_NK: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w_NK.shape
    nb, kb = cdiv(n, block), cdiv(k, block)
    wp = torch.nn.functional.pad(w_NK.float(), (0, kb * block - k, 0, nb * block - n))
    tiles = wp.reshape(nb, block, kb, block).permute(0, 2, 1, 3).reshape(nb, kb, block * block)
    q, s = _quant_groups_ref(tiles)
    q = q.reshape(nb, kb, block, block).permute(0, 2, 1, 3).reshape(nb * block, kb * block)
    return q[:n, :k].contiguous(), s


def weight_dequant_ref(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, out_dtype=torch.bfloat16
) -> torch.Tensor:
    n, k = w_fp8.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return (w_fp8.float() * s).to(out_dtype)


def dequant_rows_ref(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """fp32 values of 1x128-quantized rows: q [R, K], scale [R, KB]."""
    k = q.shape[-1]
    return q.float() * scale.float().repeat_interleave(block, -1)[..., :k]


def fp8_gemm_ref(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale)^T in fp32, b_scale per 128x128 block or per 1x128 row group."""
    a = dequant_rows_ref(a_fp8, a_scale)
    n = b_fp8.shape[0]
    if b_scale.shape[0] == n and n > cdiv(n, 128):
        b = dequant_rows_ref(b_fp8, b_scale)
    else:
        b = weight_dequant_ref(b_fp8, b_scale, out_dtype=torch.float32)
    return (a @ b.t()).to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Quantization kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _act_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    stride_sk,
    BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
    EXACT: tl.constexpr,
):
    # One program: BLOCK_M rows x one 128-wide group -> BLOCK_M scales.
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = g * GROUP + tl.arange(0, GROUP)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12)
    s = amax / 448.0
    y = tl.math.div_rn(x, s[:, None])
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], to_e4m3(y, EXACT), mask=mask)
    tl.store(s_ptr + offs_m * stride_sm + g * stride_sk, s, mask=offs_m < M)


@triton.jit
def _act_quant_t_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    stride_qk,
    stride_sk,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    EXACT: tl.constexpr,
):
    # One program: a 128-token group x BLOCK_K channels; amax over tokens; writes q transposed.
    g = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = g * GROUP + tl.arange(0, GROUP)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
    s = amax / 448.0
    y = tl.math.div_rn(x, s[None, :])
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    tl.store(q_ptr + offs_k[None, :] * stride_qk + offs_m[:, None], to_e4m3(y, EXACT), mask=mask)
    tl.store(s_ptr + offs_k * stride_sk + g, s, mask=offs_k < K)


@triton.jit
def _weight_quant_kernel(
    w_ptr,
    q_ptr,
    s_ptr,
    N,
    K,
    stride_wn,
    stride_qn,
    stride_sn,
    BLOCK: tl.constexpr,
    EXACT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0.0)
    w = w.to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), 1e-12)
    s = amax / 448.0
    y = tl.math.div_rn(w, s)
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    tl.store(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :], to_e4m3(y, EXACT), mask=mask)
    tl.store(s_ptr + pid_n * stride_sn + pid_k, s)


@triton.jit
def _weight_dequant_kernel(
    q_ptr,
    s_ptr,
    w_ptr,
    N,
    K,
    stride_qn,
    stride_wn,
    stride_sn,
    BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    q = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :], mask=mask, other=0.0)
    s = tl.load(s_ptr + pid_n * stride_sn + pid_k)
    w = q.to(tl.float32) * s
    tl.store(
        w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
        w.to(w_ptr.dtype.element_ty),
        mask=mask,
    )


def _check_block(block: int) -> None:
    if block != 128:
        raise ValueError(
            f"block={block}: only 128 is supported (DeepSeek-V3 1x128 / 128x128 tiles)"
        )


def act_quant(
    x: torch.Tensor, block: int = 128, *, scale_col_major: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 1x128 e4m3 quantization: x [..., K] -> (q [..., K] e4m3, scale [..., KB] fp32).

    scale_col_major=True (2-D x only) returns the scale as an [M, KB] view with strides (1, M), the
    layout cuBLASLt's block-scaled GEMM reads, so fp8_gemm needs no transposing copy.
    """
    _check_block(block)
    check_tensor(x, "x", dtypes=FLOAT_IN)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if scale_col_major and x.dim() != 2:
        raise ValueError(f"scale_col_major needs a 2-D x, got shape {tuple(x.shape)}")
    if not use_triton(x):
        q, s = act_quant_ref(x, block)
        return q, (s.t().contiguous().t() if scale_col_major else s)
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    kb = cdiv(k, block)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    if scale_col_major:
        s = torch.empty((kb, m), dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty((m, kb), dtype=torch.float32, device=x.device)
    block_m = 16
    grid = (cdiv(m, block_m), kb)
    _act_quant_kernel[grid](
        x2,
        q,
        s,
        m,
        k,
        x2.stride(0),
        q.stride(0),
        s.stride(0),
        s.stride(1),
        BLOCK_M=block_m,
        GROUP=block,
        EXACT=interpreting(),
        num_warps=4,
    )
    if scale_col_major:
        return q, s
    return q.reshape(*lead, k), s.reshape(*lead, kb)


def act_quant_t(x_MK: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """128x1 quantization of activations for the weight-grad GEMM, transposed.

    x [M, K] -> (q [K, M] e4m3, scale [K, MB] fp32): each channel gets one scale per 128 tokens.
    """
    _check_block(block)
    check_tensor(x_MK, "x", dtypes=FLOAT_IN, ndim=2)
    if not use_triton(x_MK):
        return act_quant_t_ref(x_MK, block)
    x = x_MK if x_MK.stride(-1) == 1 else x_MK.contiguous()
    m, k = x.shape
    mb = cdiv(m, block)
    q = torch.empty((k, m), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((k, mb), dtype=torch.float32, device=x.device)
    block_k = 64
    _act_quant_t_kernel[(mb, cdiv(k, block_k))](
        x,
        q,
        s,
        m,
        k,
        x.stride(0),
        q.stride(0),
        s.stride(0),
        BLOCK_K=block_k,
        GROUP=block,
        EXACT=interpreting(),
        num_warps=4,
    )
    return q, s


def weight_quant(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 block quantization: w [N, K] -> (q [N, K] e4m3, scale_inv [NB, KB] fp32)."""
    _check_block(block)
    check_tensor(w, "w", dtypes=FLOAT_IN, ndim=2)
    if not use_triton(w):
        return weight_quant_ref(w, block)
    w = w if w.stride(-1) == 1 else w.contiguous()
    n, k = w.shape
    q = torch.empty((n, k), dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((cdiv(n, block), cdiv(k, block)), dtype=torch.float32, device=w.device)
    _weight_quant_kernel[s.shape](
        w,
        q,
        s,
        n,
        k,
        w.stride(0),
        q.stride(0),
        s.stride(0),
        BLOCK=block,
        EXACT=interpreting(),
        num_warps=8,
    )
    return q, s


def weight_dequant(
    w_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: int = 128,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """w_fp8 [N, K] e4m3 * scale_inv [NB, KB] (one per 128x128 block) -> [N, K] out_dtype."""
    _check_block(block)
    check_tensor(w_fp8, "w_fp8", dtypes=(FP8_DTYPE,), ndim=2)
    check_tensor(scale_inv, "scale_inv", dtypes=(torch.float32,), ndim=2, device=w_fp8.device)
    n, k = w_fp8.shape
    check_shape(scale_inv, "scale_inv", (cdiv(n, block), cdiv(k, block)))
    if out_dtype not in FLOAT_IN:
        raise ValueError(f"out_dtype={out_dtype}; accepted: {FLOAT_IN}")
    if not use_triton(w_fp8):
        return weight_dequant_ref(w_fp8, scale_inv, block, out_dtype)
    q = w_fp8 if w_fp8.stride(-1) == 1 else w_fp8.contiguous()
    s = scale_inv.contiguous()
    w = torch.empty((n, k), dtype=out_dtype, device=q.device)
    _weight_dequant_kernel[s.shape](
        q, s, w, n, k, q.stride(0), w.stride(0), s.stride(0), BLOCK=block, num_warps=8
    )
    return w


# ----------------------------------------------------------------------------------------------
# Block-scaled GEMM
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_k_block(ptrs, offs_k, k_left, EVEN_K: tl.constexpr):
    # offs_k is broadcast along the K axis of ptrs; a ragged last K block reads zeros past K.
    if EVEN_K:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=offs_k < k_left, other=0.0)
    return x


@triton.jit
def _scaled_block_dot(acc, a, b, a_s, b_s, ROW_SCALE: tl.constexpr, UPCAST: tl.constexpr):
    # Promote one 128-deep K block into the fp32 accumulator with both scales (DeepSeek-V3 recipe).
    if UPCAST:  # the CPU interpreter has no fp8 matmul of its own: same math in fp32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if ROW_SCALE:
        # b_s is one scalar for the whole tile (128x128 weight blocks, BLOCK_N <= 128): fold it into
        # the row scale first, so the promotion is one FMA per accumulator element instead of a
        # multiply plus an FMA (H200 sweep: 0.555x -> 0.699x of _scaled_mm at 4096x2112x7168).
        out = acc + tl.dot(a, b) * (a_s * b_s)[:, None]
    else:  # per-column b scales (1x128 row groups of the weight-grad GEMM, or BLOCK_N > 128)
        out = acc + tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    return out


@triton.jit
def _store_tile(c_ptr, acc, offs_m, offs_n, M, N, stride_cm, stride_cn):
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(
        c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N)
    )


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    # Grouped launch order: GROUP_M row tiles share each column tile of b while it sits in L2.
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % group) % size_m, (tile % group) // size_m


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    as_ptr,
    bs_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_asm,
    stride_ask,
    stride_bsn,
    stride_bsk,
    expert_ptr,
    stride_be,
    stride_bse,  # GROUPED only: the expert of each 128-row block of a
    B_SCALE_DIV: tl.constexpr,  # 128: b scale per 128x128 block; 1: per 1x128 row group
    ROW_SCALE: tl.constexpr,  # B_SCALE_DIV == 128 and BLOCK_N <= 128: one b scale per tile and K block
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_M: tl.constexpr,  # the BLOCK_M rows as two BLOCK_M/2-row dots, each its own accumulator
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    GROUPED: tl.constexpr,  # b [E, N, K]: rows of a in 128-row blocks, each block one expert's
    NUM_STAGES: tl.constexpr,  # the launch's num_stages, for the K loop's tl.range
):
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    if GROUPED:  # BLOCK_M divides 128, so the whole tile is one expert's
        e = tl.load(expert_ptr + (pid_m * BLOCK_M) // 128).to(tl.int64)
        b_ptr += e * stride_be
        bs_ptr += e * stride_bse

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrap out-of-range rows/cols onto valid ones so loads need no row mask; stores are masked.
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n % N)[None, :] * stride_bn
    if ROW_SCALE:
        bs_ptrs = bs_ptr + (pid_n * BLOCK_N // 128) * stride_bsn  # the tile's 128-column block
    else:
        bs_ptrs = bs_ptr + ((offs_n % N) // B_SCALE_DIV) * stride_bsn
    num_kb = tl.cdiv(K, BLOCK_K)
    if SPLIT_M:
        # One warpgroup, two 64-row dots sharing each b tile: b is read once per 128 rows and the
        # grid has half the CTAs of 64-row tiles (wins at large K / large N; see _split_m_wins).
        HALF: tl.constexpr = BLOCK_M // 2
        offs_m0 = pid_m * BLOCK_M + tl.arange(0, HALF)
        offs_m1 = offs_m0 + HALF
        a0_ptrs = a_ptr + (offs_m0 % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
        a1_ptrs = a_ptr + (offs_m1 % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
        as0_ptrs = as_ptr + (offs_m0 % M) * stride_asm
        as1_ptrs = as_ptr + (offs_m1 % M) * stride_asm
        acc0 = tl.zeros((HALF, BLOCK_N), dtype=tl.float32)
        acc1 = tl.zeros((HALF, BLOCK_N), dtype=tl.float32)
        for kb in tl.range(0, num_kb, num_stages=NUM_STAGES):
            k_left = K - kb * BLOCK_K
            b = _load_k_block(b_ptrs + kb * BLOCK_K * stride_bk, offs_k[:, None], k_left, EVEN_K)
            b_s = tl.load(bs_ptrs + kb * stride_bsk)
            a0 = _load_k_block(a0_ptrs + kb * BLOCK_K * stride_ak, offs_k[None, :], k_left, EVEN_K)
            a1 = _load_k_block(a1_ptrs + kb * BLOCK_K * stride_ak, offs_k[None, :], k_left, EVEN_K)
            a0_s = tl.load(as0_ptrs + kb * stride_ask)
            a1_s = tl.load(as1_ptrs + kb * stride_ask)
            acc0 = _scaled_block_dot(acc0, a0, b, a0_s, b_s, ROW_SCALE, UPCAST)
            acc1 = _scaled_block_dot(acc1, a1, b, a1_s, b_s, ROW_SCALE, UPCAST)
        _store_tile(c_ptr, acc0, offs_m0, offs_n, M, N, stride_cm, stride_cn)
        _store_tile(c_ptr, acc1, offs_m1, offs_n, M, N, stride_cm, stride_cn)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
        as_ptrs = as_ptr + (offs_m % M) * stride_asm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # tl.range with the stage count, not `range` under the launch's num_stages: same pipeline,
        # but Triton 3.6 then fits the tile in 167 registers/thread instead of 177, and 3 CTAs of
        # 128 threads fit an SM only at <= 168 (ptxas -v, sm_90). With 2 CTAs per SM this tile ran
        # 0.61x of _scaled_mm at 4096x2112x7168 on an H200 (the sweep kernel at 167 registers: 0.78x).
        for kb in tl.range(0, num_kb, num_stages=NUM_STAGES):
            k_left = K - kb * BLOCK_K
            a = _load_k_block(a_ptrs + kb * BLOCK_K * stride_ak, offs_k[None, :], k_left, EVEN_K)
            b = _load_k_block(b_ptrs + kb * BLOCK_K * stride_bk, offs_k[:, None], k_left, EVEN_K)
            a_s = tl.load(as_ptrs + kb * stride_ask)
            b_s = tl.load(bs_ptrs + kb * stride_bsk)
            acc = _scaled_block_dot(acc, a, b, a_s, b_s, ROW_SCALE, UPCAST)
        _store_tile(c_ptr, acc, offs_m, offs_n, M, N, stride_cm, stride_cn)


# CTAs per SM each M >= 128 tile shape fits on sm_90 (228 KB shared memory per SM), 3 stages of
# a and b fp8 tiles: 64x128 -> 3 x (64 + 128) x 128 B = 72 KB -> 3 CTAs; split-M 128x128 ->
# 3 x (128 + 128) x 128 B = 96 KB -> 2 CTAs. Registers must allow it too: 3 x 128 threads need
# <= 168 per thread (64x128 compiles to 167 on Triton 3.6), 2 x 128 allow 256 (split-M: 255).
# tests/gpu/test_fp8_gemm_variants_gpu.py checks both counts against the compiled kernels.
_CTAS_PER_SM_64 = 3
_CTAS_PER_SM_SPLIT = 2


def _launch_fill(m: int, n: int, block_m: int, ctas_per_sm: int, num_sms: int) -> tuple[int, int]:
    """Useful fraction of the launched work as (num, den): rows of m among the padded rows, times
    tiles among the CTA slots of all waves (a last wave that is mostly empty wastes the GPU)."""
    tiles_m = cdiv(m, block_m)
    tiles = tiles_m * cdiv(n, 128)
    slots = num_sms * ctas_per_sm
    return m * tiles, tiles_m * block_m * cdiv(tiles, slots) * slots


def _split_m_wins(m: int, n: int, num_sms: int) -> bool:
    """Split-M 128x128 (2 CTAs/SM) instead of 64x128 (3 CTAs/SM) where its launch fills the GPU at
    least as well. H200 sweep (scripts/fp8_gemm_sweep.py, 132 SMs, M=4096, one run), ratio to
    _scaled_mm for 64x128 / split-M: N2112K7168 0.777 / 0.675, N24576K1536 0.676 / 0.717,
    N7168K16384 0.760 / 0.825, N4096K7168 0.688 / 0.688. This rule's fills (64x128 vs split):
    0.92 vs 0.69 -> 64x128; 0.97 vs 0.97 -> split; 0.91 vs 0.97 -> split; 0.86 vs 0.97 -> split
    (measured a tie): the faster or an equal variant at all four. Shapes away from M=4096 are
    extrapolated by the model, not measured. Integer cross-multiplication: no float ties."""
    n64, d64 = _launch_fill(m, n, 64, _CTAS_PER_SM_64, num_sms)
    ns, ds = _launch_fill(m, n, 128, _CTAS_PER_SM_SPLIT, num_sms)
    return ns * d64 >= n64 * ds


def _gemm_config(m: int, n: int, device: torch.device) -> dict:
    """Tile shapes by problem size (see _split_m_wins and benchmarks/notes-kernels.md)."""
    if interpreting():
        return dict(
            BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=4, SPLIT_M=False, num_warps=4, num_stages=1
        )
    # At M=64 (H100 sweep, benchmarks/results/kernels-*-sweep.json): narrow 32-column tiles spread the
    # weight read over more SMs (79 vs 72 TFLOP/s); not re-measured with the one-FMA promotion.
    if m <= 64:
        return dict(
            BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, SPLIT_M=False, num_warps=4, num_stages=6
        )
    # H200 sweep, M=4096, ratio to _scaled_mm (one run): the old 64x128/4 warps/4 stages with
    # mul + FMA per K block 0.555 0.564 0.614 0.549 at N2112K7168 / N24576K1536 / N7168K16384 /
    # N4096K7168; the same tile with one FMA 0.699 0.643 0.715 0.673; one FMA and 3 stages (72 KB
    # smem -> 3 CTAs/SM, each hiding the others' wait for their wgmma before scaling) 0.777 0.676
    # 0.760 0.688; 5 stages 0.551 0.486 0.627 0.535; 128x128 with 8 warps 0.624 0.601 0.745 0.607.
    # 4 warps everywhere: one warpgroup per CTA, more CTAs per SM.
    if m >= 128 and _split_m_wins(m, n, num_sms(device)):
        return dict(
            BLOCK_M=128,
            BLOCK_N=128,
            BLOCK_K=128,
            GROUP_M=8,
            SPLIT_M=True,
            num_warps=4,
            num_stages=3,
        )
    return dict(
        BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, SPLIT_M=False, num_warps=4, num_stages=3
    )


def _b_scale_div(b_fp8: torch.Tensor, b_scale: torch.Tensor, kb: int) -> int:
    n = b_fp8.shape[0]
    if tuple(b_scale.shape) == (cdiv(n, 128), kb):
        return 128
    if tuple(b_scale.shape) == (n, kb):
        return 1
    raise ValueError(
        f"b_scale has shape {tuple(b_scale.shape)}; accepted: ({cdiv(n, 128)}, {kb}) for 128x128 "
        f"blocks or ({n}, {kb}) for 1x128 row groups of b [{n}, {b_fp8.shape[1]}]"
    )


def _check_gemm_inputs(a_fp8, a_scale, b_fp8, b_scale) -> int:
    check_tensor(a_fp8, "a_fp8", dtypes=(FP8_DTYPE,), ndim=2)
    check_tensor(b_fp8, "b_fp8", dtypes=(FP8_DTYPE,), ndim=2, device=a_fp8.device)
    check_tensor(a_scale, "a_scale", dtypes=(torch.float32,), ndim=2, device=a_fp8.device)
    check_tensor(b_scale, "b_scale", dtypes=(torch.float32,), ndim=2, device=a_fp8.device)
    m, k = a_fp8.shape
    if b_fp8.shape[1] != k:
        raise ValueError(
            f"b_fp8 [N, K] has K={b_fp8.shape[1]}, a_fp8 [M, K] has K={k}: they must match"
        )
    kb = cdiv(k, 128)
    check_shape(a_scale, "a_scale", (m, kb))
    return _b_scale_div(b_fp8, b_scale, kb)


def fp8_gemm_triton(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    config: dict | None = None,
) -> torch.Tensor:
    """The Triton block-scaled GEMM (any strides for a, b and both scales)."""
    return _fp8_gemm_launch(a_fp8, a_scale, b_fp8, b_scale, out_dtype, config)[0]


_CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}
_CONFIG_OPTIONAL = {"SPLIT_M", "maxnreg"}


def _fp8_gemm_launch(a_fp8, a_scale, b_fp8, b_scale, out_dtype=torch.bfloat16, config=None):
    """fp8_gemm_triton's launch; also returns the compiled kernel (None under the interpreter or
    for an empty output), whose registers and shared memory `ctas_per_sm` turns into occupancy."""
    div = _check_gemm_inputs(a_fp8, a_scale, b_fp8, b_scale)
    m, k = a_fp8.shape
    n = b_fp8.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a_fp8.device)
    if m == 0 or n == 0:
        return c, None
    if config is not None and (
        _CONFIG_KEYS - config.keys() or config.keys() - _CONFIG_KEYS - _CONFIG_OPTIONAL
    ):
        raise ValueError(
            f"config keys {sorted(config)}: need {sorted(_CONFIG_KEYS)}, "
            f"optionally {sorted(_CONFIG_OPTIONAL)}"
        )
    # Configs without SPLIT_M (bench.py's sweep list) run unsplit tiles.
    cfg = {"SPLIT_M": False, **(config or _gemm_config(m, n, a_fp8.device))}
    if cfg["BLOCK_K"] != 128:
        raise ValueError(f"BLOCK_K={cfg['BLOCK_K']}: must be 128, the scale group size along K")
    if div == 128 and cfg["BLOCK_N"] % 128 and 128 % cfg["BLOCK_N"]:
        raise ValueError(f"BLOCK_N={cfg['BLOCK_N']} must divide or be a multiple of 128")
    if cfg["SPLIT_M"] and cfg["BLOCK_M"] < 32:
        raise ValueError(
            f"SPLIT_M needs BLOCK_M >= 32 (two dots of >= 16 rows), got {cfg['BLOCK_M']}"
        )
    grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]),)
    compiled = _fp8_gemm_kernel[grid](
        a_fp8,
        b_fp8,
        c,
        a_scale,
        b_scale,
        m,
        n,
        k,
        a_fp8.stride(0),
        a_fp8.stride(1),
        b_fp8.stride(0),
        b_fp8.stride(1),
        c.stride(0),
        c.stride(1),
        a_scale.stride(0),
        a_scale.stride(1),
        b_scale.stride(0),
        b_scale.stride(1),
        a_scale,
        0,
        0,
        B_SCALE_DIV=div,
        ROW_SCALE=(div == 128 and cfg["BLOCK_N"] <= 128),
        EVEN_K=(k % cfg["BLOCK_K"] == 0),
        UPCAST=interpreting(),
        GROUPED=False,
        NUM_STAGES=cfg["num_stages"],
        **cfg,
    )
    return c, (None if interpreting() else compiled)


def ctas_per_sm(compiled, regs_per_sm: int = 65536, smem_per_sm: int = 228 * 1024) -> dict:
    """How many CTAs of a compiled Triton kernel fit one sm_90 SM: registers are granted per warp
    in units of 256 (8 per thread), and each CTA also reserves 1 KB of shared memory."""
    warps = compiled.metadata.num_warps
    regs = compiled.n_regs
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = regs_per_sm // (per_warp * warps)
    by_smem = smem_per_sm // (compiled.metadata.shared + 1024)
    return {
        "regs": regs,
        "spills": compiled.n_spills,
        "shared": compiled.metadata.shared,
        "ctas_by_regs": by_regs,
        "ctas_by_smem": by_smem,
        "ctas_per_sm": min(by_regs, by_smem),
    }


# One tile config for every grouped GEMM, whatever its row count: `_gemm_config` picks by M, and
# in training the total rows change every step, so a by-M choice would compile a new variant
# mid-step (the multi-GPU hang of benchmarks/notes-train.md). 64x128, 3 stages, 4 warps is the
# sweep's best 64-row tile (notes-kernels.md).
_GROUPED_CONFIG = dict(
    BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, SPLIT_M=False, num_warps=4, num_stages=3
)


def fp8_gemm_grouped(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    block_expert: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """m-grouped block-scaled GEMM (DeepGEMM's contiguous layout): a [P, K] holds the rows of all
    experts, each expert's starting at a multiple of 128 (zero rows between), and rows
    [128 i, 128 (i + 1)) are multiplied by expert block_expert[i]'s b:
        c[rows of block i] = a[rows] @ b[block_expert[i]]^T        b [E, N, K], any strides
    a_scale [P, K/128] (1x128 groups), b_scale [E, N/128, K/128] (128x128 blocks), block_expert
    int32 [P / 128]. One launch for all experts, where per-expert GEMMs launch E."""
    check_tensor(a_fp8, "a_fp8", dtypes=(FP8_DTYPE,), ndim=2)
    check_tensor(b_fp8, "b_fp8", dtypes=(FP8_DTYPE,), ndim=3, device=a_fp8.device)
    check_tensor(a_scale, "a_scale", dtypes=(torch.float32,), ndim=2, device=a_fp8.device)
    check_tensor(b_scale, "b_scale", dtypes=(torch.float32,), ndim=3, device=a_fp8.device)
    check_tensor(block_expert, "block_expert", dtypes=(torch.int32,), ndim=1, device=a_fp8.device)
    p, k = a_fp8.shape
    e, n = b_fp8.shape[:2]
    if p % 128 or block_expert.shape[0] != p // 128:
        raise ValueError(
            f"a_fp8 has {p} rows: expected a multiple of 128 with one block_expert entry "
            f"per 128 rows, got {block_expert.shape[0]} entries"
        )
    if b_fp8.shape[2] != k:
        raise ValueError(
            f"b_fp8 [E, N, K] has K={b_fp8.shape[2]}, a_fp8 [P, K] has K={k}: they must match"
        )
    kb = cdiv(k, 128)
    check_shape(a_scale, "a_scale", (p, kb))
    check_shape(b_scale, "b_scale", (e, cdiv(n, 128), kb))
    if not use_triton(a_fp8):
        return fp8_gemm_grouped_ref(a_fp8, a_scale, b_fp8, b_scale, block_expert, out_dtype)
    c = torch.empty((p, n), dtype=out_dtype, device=a_fp8.device)
    if p == 0 or n == 0:
        return c
    cfg = _gemm_config(p, n, a_fp8.device) if interpreting() else _GROUPED_CONFIG
    grid = (cdiv(p, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]),)
    _fp8_gemm_kernel[grid](
        a_fp8,
        b_fp8,
        c,
        a_scale,
        b_scale,
        p,
        n,
        k,
        a_fp8.stride(0),
        a_fp8.stride(1),
        b_fp8.stride(1),
        b_fp8.stride(2),
        c.stride(0),
        c.stride(1),
        a_scale.stride(0),
        a_scale.stride(1),
        b_scale.stride(1),
        b_scale.stride(2),
        block_expert,
        b_fp8.stride(0),
        b_scale.stride(0),
        B_SCALE_DIV=128,
        ROW_SCALE=cfg["BLOCK_N"] <= 128,
        EVEN_K=(k % cfg["BLOCK_K"] == 0),
        UPCAST=interpreting(),
        GROUPED=True,
        NUM_STAGES=cfg["num_stages"],
        **cfg,
    )
    return c


def fp8_gemm_grouped_ref(a_fp8, a_scale, b_fp8, b_scale, block_expert, out_dtype=torch.bfloat16):
    """fp8_gemm_grouped in PyTorch: fp8_gemm_ref per 128-row block."""
    c = torch.empty((a_fp8.shape[0], b_fp8.shape[1]), dtype=out_dtype, device=a_fp8.device)
    for i, e in enumerate(block_expert.tolist()):
        rows = slice(128 * i, 128 * (i + 1))
        c[rows] = fp8_gemm_ref(a_fp8[rows], a_scale[rows], b_fp8[e], b_scale[e], out_dtype)
    return c


# The token count P changes every training step, and Triton specializes integer arguments on
# divisibility by 16 (and on == 1): P / 128 (the scales' row stride) would pick a new variant, and
# compile and load it mid-step, whenever its divisibility changes. A module load may wait for the
# whole GPU, which hung the 4x H200 train bench in its first step (benchmarks/notes-train.md).
@triton.jit(do_not_specialize=["stride_am", "stride_bn", "stride_asm", "stride_bsn"])
def _fp8_gemm_kgrouped_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    as_ptr,
    bs_ptr,
    ends_ptr,
    M,
    N,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_ce,
    stride_cm,
    stride_cn,
    stride_asm,
    stride_ask,
    stride_bsn,
    stride_bsk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # c[e] = a[:, tokens of e] @ b[:, tokens of e]^T: the weight gradients of all experts, each
    # reducing over its own 128-aligned token range [ends[e - 1], ends[e]) of the shared K axis.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    e = tl.program_id(0) // (num_m * num_n)
    pid_m, pid_n = _tile_coords(tl.program_id(0) % (num_m * num_n), num_m, num_n, GROUP_M)
    k_start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
    k_end = tl.load(ends_ptr + e)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n % N)[None, :] * stride_bn
    as_ptrs = as_ptr + (offs_m % M) * stride_asm
    bs_ptrs = bs_ptr + (offs_n % N) * stride_bsn  # b's scales are per 1x128 row group
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in tl.range(
        k_start // BLOCK_K, k_end // BLOCK_K, num_stages=NUM_STAGES
    ):  # an empty range: zeros
        a = tl.load(a_ptrs + kb * BLOCK_K * stride_ak)
        b = tl.load(b_ptrs + kb * BLOCK_K * stride_bk)
        a_s = tl.load(as_ptrs + kb * stride_ask)
        b_s = tl.load(bs_ptrs + kb * stride_bsk)
        acc = _scaled_block_dot(acc, a, b, a_s, b_s, False, UPCAST)
    _store_tile(c_ptr + e.to(tl.int64) * stride_ce, acc, offs_m, offs_n, M, N, stride_cm, stride_cn)


_KGROUPED_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)


def fp8_gemm_kgrouped(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    ends: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """k-grouped block-scaled GEMM, the weight gradients of all experts in one launch (DeepGEMM's
    k-grouped layout): a [M, P] and b [N, P] are two 128x1-quantized (act_quant_t) tensors over
    the tokens of all experts, expert e's tokens the columns [ends[e - 1], ends[e]) (0 for e = 0):
        c[e] = a[:, tokens of e] @ b[:, tokens of e]^T        -> c [E, M, N]
    a_scale [M, P/128], b_scale [N, P/128]; ends int32 [E], nondecreasing multiples of 128, at
    most P (the device reads them, so they are checked here only when they are on the CPU). An
    expert without tokens gets exact zeros. Not yet in the training path: wired into the grouped
    FP8 experts, the 4x H200 train bench hung in step 1 four times (benchmarks/notes-train.md)."""
    check_tensor(a_fp8, "a_fp8", dtypes=(FP8_DTYPE,), ndim=2)
    check_tensor(b_fp8, "b_fp8", dtypes=(FP8_DTYPE,), ndim=2, device=a_fp8.device)
    check_tensor(a_scale, "a_scale", dtypes=(torch.float32,), ndim=2, device=a_fp8.device)
    check_tensor(b_scale, "b_scale", dtypes=(torch.float32,), ndim=2, device=a_fp8.device)
    check_tensor(ends, "ends", dtypes=(torch.int32,), ndim=1, device=a_fp8.device)
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"out_dtype={out_dtype}; accepted: torch.bfloat16, torch.float32")
    (m, p), n = a_fp8.shape, b_fp8.shape[0]
    if b_fp8.shape[1] != p or p % 128:
        raise ValueError(
            f"a_fp8 [M, P] {tuple(a_fp8.shape)} and b_fp8 [N, P] {tuple(b_fp8.shape)}: "
            f"P must match and be a multiple of 128"
        )
    check_shape(a_scale, "a_scale", (m, p // 128))
    check_shape(b_scale, "b_scale", (n, p // 128))
    if not ends.is_cuda:
        e_list = ends.tolist()
        if any(x % 128 or x > p for x in e_list) or any(y < x for x, y in zip(e_list, e_list[1:])):
            raise ValueError(f"ends={e_list}: expected nondecreasing multiples of 128 up to P={p}")
    if not use_triton(a_fp8):
        return fp8_gemm_kgrouped_ref(a_fp8, a_scale, b_fp8, b_scale, ends, out_dtype)
    if p == 0:  # no tokens at all: every expert's gradient is zero (and no stride-0 variant)
        return torch.zeros((ends.shape[0], m, n), dtype=out_dtype, device=a_fp8.device)
    c = torch.empty((ends.shape[0], m, n), dtype=out_dtype, device=a_fp8.device)
    if c.numel() == 0:
        return c
    cfg = dict(
        _KGROUPED_CONFIG, **(dict(BLOCK_M=16, BLOCK_N=32, num_stages=1) if interpreting() else {})
    )
    grid = (ends.shape[0] * cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]),)
    _fp8_gemm_kgrouped_kernel[grid](
        a_fp8,
        b_fp8,
        c,
        a_scale,
        b_scale,
        ends,
        m,
        n,
        a_fp8.stride(0),
        a_fp8.stride(1),
        b_fp8.stride(0),
        b_fp8.stride(1),
        c.stride(0),
        c.stride(1),
        c.stride(2),
        a_scale.stride(0),
        a_scale.stride(1),
        b_scale.stride(0),
        b_scale.stride(1),
        UPCAST=interpreting(),
        NUM_STAGES=cfg["num_stages"],
        **cfg,
    )
    return c


def fp8_gemm_kgrouped_ref(a_fp8, a_scale, b_fp8, b_scale, ends, out_dtype=torch.bfloat16):
    """fp8_gemm_kgrouped in PyTorch: fp8_gemm_ref per expert on its token columns."""
    c = torch.zeros(
        (ends.shape[0], a_fp8.shape[0], b_fp8.shape[0]), dtype=out_dtype, device=a_fp8.device
    )
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            t, tb = slice(start, end), slice(start // 128, end // 128)
            c[e] = fp8_gemm_ref(a_fp8[:, t], a_scale[:, tb], b_fp8[:, t], b_scale[:, tb], out_dtype)
        start = end
    return c


def _scaled_mm_call(a, a_scale_cm, b, b_scale, b_layout: str):
    """torch._scaled_mm with 1x128 a-scales and b-scales in the layout `b_layout` names."""
    if b_layout == "t_view":  # (KB, NB or N) view of the row-major (NB or N, KB) tensor
        sb = b_scale.t()
    else:  # "t_contig": the same values, contiguous
        sb = b_scale.t().contiguous()
    return torch._scaled_mm(a, b.t(), scale_a=a_scale_cm, scale_b=sb, out_dtype=torch.bfloat16)


@functools.lru_cache(maxsize=8)
def native_blockscaled_layout(device_index: int, per_row_b: bool) -> str | None:
    """Probe once per device: which b-scale layout torch._scaled_mm accepts and computes right.

    Returns "t_view" or "t_contig", or None where this torch/GPU has no block-scaled _scaled_mm
    (torch < 2.9, cuBLASLt < 12.9, not sm_90). The probe compares against fp8_gemm_ref, so a layout
    that runs but reads scales wrongly is rejected.
    """
    if not hasattr(torch, "_scaled_mm"):
        return None
    dev = torch.device("cuda", device_index)
    if torch.cuda.get_device_capability(dev)[0] != 9:
        return None  # cuBLASLt's 1x128/128x128 float32 block scaling is a Hopper (sm_90) mode
    g = torch.Generator(device=dev).manual_seed(0)
    m, n, k = 256, 384, 512
    a, sa = act_quant(torch.randn(m, k, device=dev, generator=g), scale_col_major=True)
    w = torch.randn(n, k, device=dev, generator=g)
    # Scales that vary strongly per block, so a layout mix-up cannot pass by accident.
    w = (
        w
        * torch.rand(
            n // 128 if not per_row_b else n, 1, device=dev, generator=g
        ).repeat_interleave(128 if not per_row_b else 1, 0)
        * 10
    )
    if per_row_b:
        b, sb = act_quant(w)
    else:
        b, sb = weight_quant(w)
    ref = fp8_gemm_ref(a, sa, b, sb).float()
    for layout in ("t_view", "t_contig"):
        try:
            out = _scaled_mm_call(a, sa, b, sb, layout).float()
        except (RuntimeError, NotImplementedError):
            continue
        if (out - ref).norm() / ref.norm() < 1e-2:
            return layout
    return None


def native_shape_ok(m: int, n: int, k: int, b_scale_div: int) -> bool:
    """Whether torch._scaled_mm (cuBLASLt) can compute a [M, K] x b [N, K]^T right, from the shape.

    cuBLASLt needs 16-byte aligned leading dims (N % 16, 1x128 a-scale columns of M floats: M % 4)
    and whole 128-wide K groups. 128x128 b-scales: cuBLASLt reads them with a leading dimension of
    round_up(KB, 4) (cuBLAS docs, "scaling factors layouts"; pytorch PR #166752), while torch's
    _scaled_mm accepts only the unpadded [NB, KB] layout (stride(0) == KB in ScaledBlas.cpp
    is_blockwise_128x128_scaling) and passes it through unchecked. So for KB % 4 != 0 and NB > 1
    no accepted layout is read right: K = 384 (KB = 3, small()'s q_lora_rank) reads block row nb
    at 4 * nb, the wrong scales, and the last rows past the end of the 3 * NB scales (stale
    allocator memory: any value, inf/NaN included). Those shapes go to Triton. 1x128 b-scales
    (the weight-grad GEMM) have no padding rule. The probe (K = 512, KB = 4) cannot see this.
    """
    if m <= 0 or m % 4 or n % 16 or k % 128:
        return False
    kb = k // 128
    return b_scale_div == 1 or kb % 4 == 0 or cdiv(n, 128) == 1


def fp8_gemm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-scaled e4m3 GEMM: a [M, K] x b [N, K]^T -> [M, N] bf16 with fp32 accumulation.

    a_scale [M, KB]: 1x128 groups (any strides; strides (1, M) from act_quant(scale_col_major=True)
    avoid a copy on the native path). b_scale [NB, KB] per 128x128 block (weights) or [N, KB] per
    1x128 row group (the weight-grad GEMM). backend: "auto" (native when the probe accepts it and the
    shape suits cuBLASLt, else Triton), "native", "triton", or "ref".
    """
    if backend not in ("auto", "native", "triton", "ref"):
        raise ValueError(f"backend={backend!r}; accepted: auto, native, triton, ref")
    div = _check_gemm_inputs(a_fp8, a_scale, b_fp8, b_scale)
    if backend == "ref" or (backend == "auto" and not use_triton(a_fp8)):
        return fp8_gemm_ref(a_fp8, a_scale, b_fp8, b_scale)
    m, k = a_fp8.shape
    n = b_fp8.shape[0]
    if backend in ("auto", "native") and a_fp8.is_cuda:
        shape_ok = native_shape_ok(m, n, k, div)
        layout = native_blockscaled_layout(a_fp8.device.index or 0, div == 1) if shape_ok else None
        if layout is not None:
            a = a_fp8 if a_fp8.stride(1) == 1 else a_fp8.contiguous()
            b = b_fp8 if b_fp8.stride(1) == 1 else b_fp8.contiguous()
            sa = a_scale if a_scale.stride(0) == 1 else a_scale.t().contiguous().t()
            return _scaled_mm_call(a, sa, b, b_scale.contiguous(), layout)
        if backend == "native":
            raise ValueError(
                f"backend='native': torch._scaled_mm block scaling is unavailable for M={m}, N={n}, "
                f"K={k} on this torch/GPU (needs sm_90, cuBLASLt >= 12.9, K % 128 == 0, N % 16 == 0, M % 4 == 0, "
                f"M > 0, and for 128x128 b-scales K/128 % 4 == 0 or N <= 128; see native_shape_ok)"
            )
    return fp8_gemm_triton(a_fp8, a_scale, b_fp8, b_scale)


def fp8_linear_forward(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T with x quantized 1x128 on the fly and W in 128x128 blocks."""
    xq, xs = act_quant(x, scale_col_major=x.dim() == 2)
    return fp8_gemm(xq, xs, w_fp8, w_scale, backend=backend)


def fp8_linear_dgrad(
    dy: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    w_t_fp8: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Input grad dx [M, K] = dy [M, N] @ W [N, K], dy quantized 1x128 along N.

    W's 128x128 blocks transpose exactly, so W^T reuses the same scales (transposed). Pass w_t_fp8
    (W^T contiguous, [K, N]) to skip the transposing copy of the weight.
    """
    check_tensor(dy, "dy", dtypes=FLOAT_IN, ndim=2)
    check_tensor(w_fp8, "w_fp8", dtypes=(FP8_DTYPE,), ndim=2)
    if dy.shape[1] != w_fp8.shape[0]:
        raise ValueError(f"dy [M, N] has N={dy.shape[1]} but w_fp8 [N, K] has N={w_fp8.shape[0]}")
    dyq, dys = act_quant(dy, scale_col_major=True)
    if w_t_fp8 is None:
        w_t_fp8 = w_fp8.t() if backend == "triton" else w_fp8.t().contiguous()
    return fp8_gemm(dyq, dys, w_t_fp8, w_scale.t().contiguous(), backend=backend)


def fp8_linear_wgrad(dy: torch.Tensor, x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Weight grad dW [N, K] = dy^T [N, M] @ x [M, K], both re-tiled to 128x1 (groups of 128 tokens)."""
    check_tensor(dy, "dy", dtypes=FLOAT_IN, ndim=2)
    check_tensor(x, "x", dtypes=FLOAT_IN, ndim=2)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy has {dy.shape[0]} tokens but x has {x.shape[0]}: they must match")
    dyt, dyt_s = act_quant_t(dy)  # [N, M], [N, MB]
    xt, xt_s = act_quant_t(x)  # [K, M], [K, MB]
    return fp8_gemm(dyt, dyt_s, xt, xt_s, backend=backend)
