"""FP8 (e4m3) block quantization, DeepSeek-V3 recipe: Triton kernels and their PyTorch references.

Legend: M tokens (rows of activations), N output features, K reduction features, KB = ceil(K/128),
NB = ceil(N/128), MB = ceil(M/128).

- act_quant:      x [..., K] -> e4m3 [..., K] and fp32 scale [..., KB]   (1x128 per-token groups)
- act_quant_t:    x [M, K]   -> e4m3 [K, M] and fp32 scale [K, MB]       (128x1 groups, transposed:
                                the weight-grad GEMM reduces over tokens)
- weight_quant:   w [N, K]   -> e4m3 [N, K] and fp32 scale_inv [NB, KB]  (128x128 blocks)
- weight_quant_t: weight_quant plus W^T: w [N, K] or [E, N, K] -> (q, scale_inv, q_t [K, N] or
                                [E, K, N] e4m3), one launch (the input-grad GEMM reads W^T K-major)
- weight_dequant: inverse of weight_quant, dequant = w_fp8 * scale_inv per block (checkpoint rule)

scale = amax / 448 per group, q = x / scale rounded to nearest-even e4m3; dequant = q * scale.
Every `*_ref` is plain PyTorch (CPU or GPU) and is the test oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    AMAX_FLOOR,
    FP8_BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    TL_AMAX_FLOOR,
    TL_FP8_MAX,
    cdiv,
    check_shape,
    check_tensor,
    interpreting,
    pdl_launch,
    pdl_wait,
    to_e4m3,
    use_triton,
)

FLOAT_IN = (torch.float32, torch.bfloat16, torch.float16)


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


def weight_quant_t_ref(
    w: torch.Tensor, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight_quant_ref of w [N, K], or of each expert of w [E, N, K], with q's (per-expert)
    transpose: (q [..., N, K], scale_inv [..., NB, KB], q_t [..., K, N] contiguous)."""
    if w.dim() == 2:
        q, s = weight_quant_ref(w, block)
        return q, s, q.t().contiguous()
    qs = [weight_quant_ref(w_NK, block) for w_NK in w]
    q_ENK = torch.stack([q for q, _ in qs])
    return q_ENK, torch.stack([s for _, s in qs]), q_ENK.transpose(1, 2).contiguous()


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
    PDL: tl.constexpr,
):
    pdl_wait(PDL)  # x is an activation
    quant_row_block(
        x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sk,
        tl.program_id(0), tl.program_id(1), BLOCK_M, GROUP, EXACT,
    )  # fmt: skip


@triton.jit
def quant_row_block(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    stride_sk,
    pid_m,
    g,
    BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
    EXACT: tl.constexpr,
):
    """One act_quant program: rows pid_m * BLOCK_M.. x the g-th GROUP-wide group of x [M, K] ->
    their e4m3 values in q and one scale per row in s (also run by kernels/moe_align.py's
    quantizing programs, so their bits are act_quant's)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = g * GROUP + tl.arange(0, GROUP)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    q, s = quant_rows(x.to(tl.float32), EXACT)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q, mask=mask)
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
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), TL_AMAX_FLOOR)
    s = amax / TL_FP8_MAX
    y = tl.math.div_rn(x, s[None, :])
    y = tl.minimum(tl.maximum(y, -TL_FP8_MAX), TL_FP8_MAX)
    tl.store(q_ptr + offs_k[None, :] * stride_qk + offs_m[:, None], to_e4m3(y, EXACT), mask=mask)
    tl.store(s_ptr + offs_k * stride_sk + g, s, mask=offs_k < K)


@triton.jit
def _quant_with_scale(w, s, EXACT: tl.constexpr):
    """fp32 values -> e4m3 at scale s: w / s rounded to nearest even, clamped to +-448."""
    y = tl.math.div_rn(w, s)
    return to_e4m3(tl.minimum(tl.maximum(y, -TL_FP8_MAX), TL_FP8_MAX), EXACT)


@triton.jit
def quant_rows(x, EXACT: tl.constexpr):
    """1x128 groups: a [rows, 128] tile (fp32, zeros outside the tensor) -> (e4m3 values, one
    scale per row). act_quant's math, also called by the kernels that quantize their own output
    (kernels/swiglu_train.py), so their bits are act_quant's."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), TL_AMAX_FLOOR)
    s = amax / TL_FP8_MAX
    return _quant_with_scale(x, s[:, None], EXACT), s


@triton.jit
def _quant_block(w, EXACT: tl.constexpr):
    """One 128x128 block (fp32, zeros outside the matrix) -> (e4m3 values, its scale)."""
    amax = tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), TL_AMAX_FLOOR)
    s = amax / TL_FP8_MAX
    return _quant_with_scale(w, s, EXACT), s


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
    q, s = _quant_block(w.to(tl.float32), EXACT)
    tl.store(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :], q, mask=mask)
    tl.store(s_ptr + pid_n * stride_sn + pid_k, s)


@triton.jit
def _weight_quant_t_kernel(
    w_ptr,
    q_ptr,
    s_ptr,
    qt_ptr,
    N,
    K,
    stride_we,
    stride_wn,
    stride_qe,
    stride_qn,
    stride_se,
    stride_sn,
    stride_qte,
    stride_qtk,
    BLOCK: tl.constexpr,
    EXACT: tl.constexpr,
):
    # One program: block (pid_n, pid_k) of expert e. q is [E, N, K] and q_t [E, K, N], unit
    # stride along their rows (row strides K and N, or wider where they are slices of the
    # outputs of a concatenated weight: StackedWeight of gate and up). W^T costs a re-read of the
    # block (from L2) and one more 1-byte store per element, where a separate strided copy
    # re-read and re-wrote every byte: 42.6 ms a step for `float8_copy_kernel` at Moonlight
    # widths.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)  # e * E-stride passes 2^31 at V3 scale (256 x 2048 x 7168)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask_nk = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(
        w_ptr + e * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :],
        mask=mask_nk,
        other=0.0,
    )
    q_nk, s = _quant_block(w.to(tl.float32), EXACT)
    tl.store(
        q_ptr + e * stride_qe + offs_n[:, None] * stride_qn + offs_k[None, :], q_nk, mask=mask_nk
    )
    # W^T's tile: the same block read again transposed (from L2: this program just read it) and
    # quantized with the same scale, elementwise, so its bits equal q's. Not tl.trans of the
    # e4m3 tile: compiled for an fp32 input on the H200 (Triton 3.6) that wrote wrong values
    # (bf16 inputs were right); the reload needs no register transpose at all.
    mask_kn = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    w_kn = tl.load(
        w_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None],
        mask=mask_kn,
        other=0.0,
    ).to(tl.float32)
    tl.store(
        qt_ptr + e * stride_qte + offs_k[:, None] * stride_qtk + offs_n[None, :],
        _quant_with_scale(w_kn, s, EXACT),
        mask=mask_kn,
    )
    tl.store(s_ptr + e * stride_se + pid_n * stride_sn + pid_k, s)


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
    if block != FP8_BLOCK:
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
    pdl = pdl_launch(x.device)
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
        PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
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


# Grid axis 2 (the experts) takes at most 65,535 programs on CUDA.
MAX_GRID_Z = 65535


def weight_quant_t(
    w: torch.Tensor,
    block: int = 128,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight_quant and W^T from one launch, for the forward and input-grad GEMMs of training.

    w [N, K] -> (q [N, K] e4m3, scale_inv [NB, KB] fp32, q_t [K, N] e4m3 contiguous); a stacked
    w [E, N, K] (one weight per expert) -> (q [E, N, K], scale_inv [E, NB, KB], q_t [E, K, N]),
    each expert quantized on its own (blocks never straddle two experts, any N). q_t equals
    q.t().contiguous() (per expert) bit for bit; W^T's scales are scale_inv transposed (a 128x128
    block transposes into one block), left to the caller.

    `out` (stacked w only): (q, scale_inv, q_t) to write into and return, of those shapes and
    dtypes with unit stride along their rows, e.g. slices of the outputs of a weight concatenated
    from several along N (the Triton path; the reference path copies into them).
    """
    _check_block(block)
    check_tensor(w, "w", dtypes=FLOAT_IN)
    if w.dim() not in (2, 3) or 0 in w.shape:
        raise ValueError(f"w must be a non-empty [N, K] or [E, N, K], got shape {tuple(w.shape)}")
    if out is not None and w.dim() != 3:
        raise ValueError(f"out needs a stacked w [E, N, K], got shape {tuple(w.shape)}")
    if not use_triton(w):
        got = weight_quant_t_ref(w, block)
        if out is None:
            return got
        e, n, k = w.shape
        dst = _check_quant_t_out(out, e, n, k, block, w.device)
        for d, g in zip(dst, got, strict=True):
            d.copy_(g)
        return dst
    w_ENK = w if w.dim() == 3 else w.unsqueeze(0)
    if w_ENK.stride(-1) != 1:
        w_ENK = w_ENK.contiguous()
    e, n, k = w_ENK.shape
    if e > MAX_GRID_Z:
        raise ValueError(f"w has E={e} experts: one launch takes at most {MAX_GRID_Z}")
    if n * max(k, w_ENK.stride(1)) >= 2**31:
        raise ValueError(
            f"w has N={n}, K={k}, row stride {w_ENK.stride(1)}: offsets within one matrix are "
            "int32, so N * max(K, row stride) must be < 2^31"
        )
    if out is not None:
        q, s, q_t = _check_quant_t_out(out, e, n, k, block, w.device)
    else:
        q = torch.empty((e, n, k), dtype=FP8_DTYPE, device=w.device)
        q_t = torch.empty((e, k, n), dtype=FP8_DTYPE, device=w.device)
        s = torch.empty((e, cdiv(n, block), cdiv(k, block)), dtype=torch.float32, device=w.device)
    _weight_quant_t_kernel[(s.shape[1], s.shape[2], e)](
        w_ENK,
        q,
        s,
        q_t,
        n,
        k,
        w_ENK.stride(0),
        w_ENK.stride(1),
        q.stride(0),
        q.stride(1),
        s.stride(0),
        s.stride(1),
        q_t.stride(0),
        q_t.stride(1),
        BLOCK=block,
        EXACT=interpreting(),
        # 16 warps (32 fp32 values a thread per load): 0.362 ms for Moonlight's stacked gate
        # weight [64, 1408, 2048] against 0.418 with 8 and 0.555 with 4, a device copy of the
        # fp32 weight 0.352 (H200, scripts/grouped_gemm_probe.py --only wquant; bits equal).
        num_warps=16,
    )
    if w.dim() == 2:
        return q[0], s[0], q_t[0]
    return q, s, q_t


def _check_quant_t_out(out, e: int, n: int, k: int, block: int, device: torch.device):
    """weight_quant_t's `out` checked: (q [E, N, K] e4m3, scale_inv [E, NB, KB] fp32,
    q_t [E, K, N] e4m3) on w's device, each with unit stride along its rows."""
    shapes = ((e, n, k), (e, cdiv(n, block), cdiv(k, block)), (e, k, n))
    names, dtypes = ("q", "scale_inv", "q_t"), (FP8_DTYPE, torch.float32, FP8_DTYPE)
    if not isinstance(out, tuple | list) or len(out) != 3:
        raise ValueError(f"out must be (q, scale_inv, q_t), got {type(out).__name__}")
    for t, name, shape, dtype in zip(out, names, shapes, dtypes, strict=True):
        check_tensor(t, f"out {name}", dtypes=(dtype,), ndim=3, device=device)
        check_shape(t, f"out {name}", shape)
        if t.stride(2) != 1 and t.shape[2] > 1:
            raise ValueError(f"out {name} has strides {t.stride()}: its rows must be unit-stride")
    return tuple(out)


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
