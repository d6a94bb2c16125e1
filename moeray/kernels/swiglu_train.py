"""SwiGLU's elementwise half in training, forward and backward, each one Triton launch that can also
write the 1x128 FP8 quantization of what it computes: `swiglu_fwd`, `swiglu_bwd`, their PyTorch
references `swiglu_fwd_ref`, `swiglu_bwd_ref`, `swiglu_train_applies` (the tensors the kernels
take) and `use_fused_swiglu_train`, the test by which the routed experts' autograd node
(platform/parallel/experts_mlp.py) chooses between them (CUDA only).

Legend: P rows (the experts' padded layout), I features (the expert width), KB = ceil(I / 128)
quantization groups a row.

Math, in fp32, each line's result rounded to the inputs' dtype (as PyTorch's ops round it):
  forward   h  = silu(g) * u              silu(g) = g / (1 + exp(-g)), rounded before the product
  backward  dg = silu_backward(dh * u, g) = (dh * u) * s * (1 + g * (1 - s)), s = 1 / (1 + exp(-g)),
                                            dh * u rounded first
            du = dh * silu(g)             silu rounded first
With quant=True each output also comes as act_quant(out, scale_col_major=True) would give it: e4m3
[P, I] and fp32 scales [P, KB] as a view with strides (1, P), quantized from the rounded output
while it is in registers (one program is BLOCK_M rows x one 128-wide group: the group's amax is a
register reduction).

Why: at Moonlight-16B-A3B's training shape (P ~ 52,864 padded rows a MoE layer and micro-batch,
I = 1408, bf16: 149 MB a [P, I] tensor; 40 layer-micro-batches a step on one H200) PyTorch's
forward is silu and a multiply, 2 kernels and 5 tensor passes (g read, silu written, silu and u
read, h written), 3 passes here; its backward is dh * u, silu_backward, silu and dh * silu, 4
kernels and 11 passes, 5 here (dh, g, u read; dg, du written). FP8 training then ran act_quant over
h, dg and du: 3 more launches re-reading 447 MB, gone here. That is 1.2 GB less traffic a
layer-micro-batch in BF16 and 1.6 GB in FP8, ~0.3 and ~0.4 ms at the H200's 4.2 TB/s copy, ~11
and ~16 ms a step: estimates; `moeray bench kernels --only swiglu_train` measures them.

Numerics: the operations of PyTorch's CUDA kernels in their order (`swiglu_rn` and `neg_exp` in
kernels/common.py: libdevice's expf, IEEE divisions; `1 + g * (1 - s)` as one fma, what nvcc's
default contraction makes of silu_backward's expression). The GPU check of
tests/kernels/test_swiglu_train.py asserts that the outputs equal PyTorch's bit for bit; the
forward's operations are the inference kernel's (kernels/swiglu.py), measured bit-equal on the
H200. The quantization is act_quant's own jit function (`quant_rows`), so it equals act_quant of
the returned tensor bit for bit. Under the interpreter the exp is numpy's, which can differ from
torch's CPU exp by an ulp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moeray.kernels.common import (
    FP8_BLOCK,
    FP8_DTYPE,
    cdiv,
    check_tensor,
    interpreting,
    neg_exp,
    precise_exp,
    silu_rn,
    swiglu_rn,
    switched_off,
    to_dtype_rn,
    use_triton,
)
from moeray.kernels.fp8.quant import act_quant, quant_rows

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows per program, each program one 128-wide quantization group: act_quant's tile (16 x 128, 16
# values a thread at 4 warps); at Moonlight's P and I, 3,304 x 11 programs a launch. Not yet
# measured against others: the bench times block_m 8 to 64 (`fused_ms_by_block_m`).
BLOCK_M = 16
BLOCK_M_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128)

Quantized = tuple[torch.Tensor, torch.Tensor]  # (e4m3 [P, I], fp32 scales [P, KB], strides (1, P))


def swiglu_fwd_ref(
    g_PI: torch.Tensor, u_PI: torch.Tensor, *, quant: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = silu(g) * u by PyTorch's ops; with quant, (h, *act_quant(h, scale_col_major=True))."""
    h_PI = F.silu(g_PI) * u_PI
    if not quant:
        return h_PI
    return (h_PI, *act_quant(h_PI, scale_col_major=True))


def swiglu_bwd_ref(
    dh_PI: torch.Tensor,
    g_PI: torch.Tensor,
    u_PI: torch.Tensor,
    *,
    quant: bool = False,
    cat: bool = False,
):
    """(dg, du) of h = silu(g) * u by PyTorch's ops; with quant also act_quant(scale_col_major=True)
    of each: (dg, du, (dgq, dgs), (duq, dus)). cat: [dg, du] as one [P, 2I] tensor, with quant
    (dgu, act_quant(dgu, scale_col_major=True))."""
    dg_PI = torch.ops.aten.silu_backward(dh_PI * u_PI, g_PI)
    du_PI = dh_PI * F.silu(g_PI)
    if cat:
        dgu_P2I = torch.cat([dg_PI, du_PI], 1)
        return (dgu_P2I, act_quant(dgu_P2I, scale_col_major=True)) if quant else dgu_P2I
    if not quant:
        return dg_PI, du_PI
    return (
        dg_PI,
        du_PI,
        act_quant(dg_PI, scale_col_major=True),
        act_quant(du_PI, scale_col_major=True),
    )


@triton.jit
def _tile(P, width, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    """This program's rows (int64: P x I can pass 2^31 at DeepSeek-V3's scale, 2^20 rows of
    I 2048), columns and mask."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * GROUP + tl.arange(0, GROUP)
    return rows, cols, (rows[:, None] < P) & (cols[None, :] < width)


@triton.jit
def _store_quant(x, q_ptr, s_ptr, rows, cols, mask, P, stride_o, stride_sk, EXACT: tl.constexpr):
    """act_quant of this tile of x (zeros outside the tensor, so the amax is the group's): e4m3 at
    [rows, cols] of a [P, I] with row stride stride_o, the scales at [rows, group] of a [P, KB]
    view with strides (1, stride_sk)."""
    q, s = quant_rows(x.to(tl.float32), EXACT)
    tl.store(q_ptr + rows[:, None] * stride_o + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows + tl.program_id(1).to(tl.int64) * stride_sk, s, mask=rows < P)


@triton.jit
def _swiglu_fwd_kernel(
    g_ptr,
    u_ptr,
    h_ptr,
    q_ptr,
    s_ptr,
    P,
    width,
    stride_g,
    stride_u,
    stride_sk,
    BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
    QUANT: tl.constexpr,
    PRECISE: tl.constexpr,
    EXACT: tl.constexpr,
):
    rows, cols, mask = _tile(P, width, BLOCK_M, GROUP)
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
    u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0)
    h = swiglu_rn(g, u, PRECISE)  # 0 where masked: silu(0) * 0
    tl.store(h_ptr + rows[:, None] * width + cols[None, :], h, mask=mask)
    if QUANT:
        _store_quant(h, q_ptr, s_ptr, rows, cols, mask, P, width, stride_sk, EXACT)


@triton.jit
def _swiglu_bwd_kernel(
    dh_ptr,
    g_ptr,
    u_ptr,
    dg_ptr,
    du_ptr,
    dgq_ptr,
    dgs_ptr,
    duq_ptr,
    dus_ptr,
    P,
    width,
    stride_dh,
    stride_g,
    stride_u,
    stride_o,  # the outputs' row stride: I, or 2I with dg and du side by side (`cat`)
    stride_sk,
    BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
    QUANT: tl.constexpr,
    PRECISE: tl.constexpr,
    EXACT: tl.constexpr,
):
    rows, cols, mask = _tile(P, width, BLOCK_M, GROUP)
    dh = tl.load(dh_ptr + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0)
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
    u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0)
    gf = g.to(tl.float32)
    e = neg_exp(gf, PRECISE)
    # dg: PyTorch's `dh * u` rounded, then CUDA's silu_backward dy * s * (1 + x * (1 - s)) left
    # to right, its inner multiply-add one fma as nvcc contracts it (0 where masked)
    dhu = to_dtype_rn(dh.to(tl.float32) * u.to(tl.float32), g.dtype).to(tl.float32)
    s = tl.math.div_rn(tl.full(gf.shape, 1.0, tl.float32), 1.0 + e)
    dg = to_dtype_rn(dhu * s * tl.fma(gf, 1.0 - s, 1.0), g.dtype)
    du = to_dtype_rn(dh.to(tl.float32) * silu_rn(gf, e, g.dtype).to(tl.float32), g.dtype)
    out = rows[:, None] * stride_o + cols[None, :]
    tl.store(dg_ptr + out, dg, mask=mask)
    tl.store(du_ptr + out, du, mask=mask)
    if QUANT:
        _store_quant(dg, dgq_ptr, dgs_ptr, rows, cols, mask, P, stride_o, stride_sk, EXACT)
        _store_quant(du, duq_ptr, dus_ptr, rows, cols, mask, P, stride_o, stride_sk, EXACT)


def swiglu_train_applies(*tensors: torch.Tensor) -> bool:
    """Whether `swiglu_fwd` / `swiglu_bwd` take these (g and u; dh, g and u) as they are: [P, I]
    of one shape and dtype (fp32/bf16/fp16), I >= 1, unit stride along I, on CUDA (or under the
    interpreter). MOERAY_FUSED_SWIGLU_TRAIN=0 keeps PyTorch's ops and act_quant: the A/B switch
    of the training bench."""
    if switched_off("SWIGLU_TRAIN"):
        return False
    first = tensors[0]
    if first.dtype not in DTYPES or first.dim() != 2 or first.shape[1] == 0:
        return False
    if any(t.dtype != first.dtype or t.shape != first.shape or not _unit_inner(t) for t in tensors):
        return False
    return use_triton(*tensors)


def use_fused_swiglu_train(*tensors: torch.Tensor) -> bool:
    """The grouped experts' choice (platform/parallel/experts_common.py `swiglu_fwd`, `swiglu_bwd`):
    CUDA tensors that `swiglu_train_applies` takes. Not the CPU interpreter, which tests choose
    by hand: for the length of a launch it patches triton.language and keeps the grid index in
    one global builder, and the pipeline executor runs stages in threads (under `pytest tests`,
    where tests/kernels turns the interpreter on for the whole process, tests/unit's pipeline
    runs failed so)."""
    return tensors[0].is_cuda and swiglu_train_applies(*tensors)


def _unit_inner(t: torch.Tensor) -> bool:
    return t.shape[-1] <= 1 or t.stride(-1) == 1


def _check(**tensors: torch.Tensor) -> tuple[int, int]:
    """ValueError naming the bad input and what is accepted; else (P, I)."""
    (name0, first), *rest = tensors.items()
    check_tensor(first, name0, dtypes=DTYPES, ndim=2)
    for name, t in rest:
        check_tensor(t, name, device=first.device)
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, {name0} {first.dtype}: one dtype")
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, {name0} {tuple(first.shape)}: one [P, I] shape"
            )
    P, width = first.shape
    if width == 0:
        raise ValueError(f"{name0} has shape {tuple(first.shape)}: I must be >= 1")
    for name, t in tensors.items():
        if not _unit_inner(t):
            raise ValueError(
                f"{name} has strides {t.stride()}: the kernels need unit stride along I (any row "
                "stride: the halves of a [P, 2I] tensor are fine)"
            )
    return P, width


def _check_block_m(block_m: int) -> None:
    if block_m not in BLOCK_M_CHOICES:
        raise ValueError(f"block_m={block_m}; accepted: {', '.join(map(str, BLOCK_M_CHOICES))}")


def _warps(block_m: int) -> int:
    """Warps for block_m x 128 values: 16 values a thread from 4 to 32 rows (act_quant's 4 warps
    at 16), at most 8 warps (32 values a thread at 64 rows, 64 at 128)."""
    return max(1, min(8, block_m // 4))


def _quant_out(P: int, width: int, device: torch.device) -> Quantized:
    """Outputs laid out as act_quant(scale_col_major=True) lays out its own."""
    q = torch.empty((P, width), dtype=FP8_DTYPE, device=device)
    s = torch.empty((cdiv(width, FP8_BLOCK), P), dtype=torch.float32, device=device).t()
    return q, s


def swiglu_fwd(
    g_PI: torch.Tensor, u_PI: torch.Tensor, *, quant: bool = False, block_m: int = BLOCK_M
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`swiglu_fwd_ref` in one launch: h [P, I] (new, contiguous, g's dtype), or with quant
    (h, hq, hs) where (hq, hs) is act_quant(h, scale_col_major=True) bit for bit. g and u: [P, I]
    of one dtype, unit stride along I, any row stride. block_m: rows a program (the bench's
    sweep; the bits do not depend on it). No autograd (the experts' autograd node calls it); no
    host sync. On CPU without the interpreter it is `swiglu_fwd_ref`."""
    P, width = _check(g=g_PI, u=u_PI)
    _check_block_m(block_m)
    if not use_triton(g_PI):
        return swiglu_fwd_ref(g_PI, u_PI, quant=quant)
    h = torch.empty((P, width), dtype=g_PI.dtype, device=g_PI.device)
    q, s = _quant_out(P, width, g_PI.device) if quant else (h, h)
    if P:
        _swiglu_fwd_kernel[(cdiv(P, block_m), cdiv(width, FP8_BLOCK))](
            g_PI,
            u_PI,
            h,
            q,
            s,
            P,
            width,
            g_PI.stride(0),
            u_PI.stride(0),
            s.stride(1),
            BLOCK_M=block_m,
            GROUP=FP8_BLOCK,
            QUANT=quant,
            PRECISE=precise_exp(),
            EXACT=interpreting(),
            num_warps=_warps(block_m),
        )
    return (h, q, s) if quant else h


def swiglu_bwd(
    dh_PI: torch.Tensor,
    g_PI: torch.Tensor,
    u_PI: torch.Tensor,
    *,
    quant: bool = False,
    cat: bool = False,
    block_m: int = BLOCK_M,
):
    """`swiglu_bwd_ref` in one launch: (dg, du), new contiguous [P, I] in g's dtype, or with quant
    (dg, du, (dgq, dgs), (duq, dus)), each pair act_quant(scale_col_major=True) of the returned
    tensor bit for bit. dh, g and u: [P, I] of one dtype, unit stride along I, any row stride.

    cat: dg and du written side by side into one new [P, 2I] tensor (the input-grad GEMM of gate
    and up concatenated into one weight), returned as that tensor, or with quant as (dgu, (q, s)),
    q [P, 2I] e4m3 and s [P, 2 KB] (strides (1, P)): act_quant of dgu bit for bit, which needs I
    to be a multiple of 128 (no group straddles dg and du). block_m as `swiglu_fwd`. No
    autograd; no host sync. On CPU without the interpreter it is `swiglu_bwd_ref`."""
    P, width = _check(dh=dh_PI, g=g_PI, u=u_PI)
    _check_block_m(block_m)
    if cat and quant and width % FP8_BLOCK:
        raise ValueError(
            f"cat with quant needs I a multiple of {FP8_BLOCK} (a 1x128 group of [dg, du] would "
            f"straddle the two), got I={width}"
        )
    if not use_triton(g_PI):
        return swiglu_bwd_ref(dh_PI, g_PI, u_PI, quant=quant, cat=cat)
    if cat:
        dgu = torch.empty((P, 2 * width), dtype=g_PI.dtype, device=g_PI.device)
        dg, du = dgu[:, :width], dgu[:, width:]
        q, s = _quant_out(P, 2 * width, g_PI.device) if quant else (dgu, dgu)
        kb = cdiv(width, FP8_BLOCK)
        dgq, dgs, duq, dus = q[:, :width], s[:, :kb], q[:, width:], s[:, kb:]
    else:
        dg = torch.empty((P, width), dtype=g_PI.dtype, device=g_PI.device)
        du = torch.empty_like(dg)
        dgq, dgs = _quant_out(P, width, g_PI.device) if quant else (dg, dg)
        duq, dus = _quant_out(P, width, g_PI.device) if quant else (du, du)
    if P:
        _swiglu_bwd_kernel[(cdiv(P, block_m), cdiv(width, FP8_BLOCK))](
            dh_PI,
            g_PI,
            u_PI,
            dg,
            du,
            dgq,
            dgs,
            duq,
            dus,
            P,
            width,
            dh_PI.stride(0),
            g_PI.stride(0),
            u_PI.stride(0),
            dg.stride(0),
            dgs.stride(1),
            BLOCK_M=block_m,
            GROUP=FP8_BLOCK,
            QUANT=quant,
            PRECISE=precise_exp(),
            EXACT=interpreting(),
            num_warps=_warps(block_m),
        )
    if cat:
        return (dgu, (q, s)) if quant else dgu
    return (dg, du, (dgq, dgs), (duq, dus)) if quant else (dg, du)
