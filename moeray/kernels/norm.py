"""RMSNorm, optionally with the residual add before it, as one Triton launch forward and one (plus
a small sum) backward: `rms_norm`, its PyTorch reference `rms_norm_ref`, and the test
`rms_norm_applies` by which the model's RMSNorm (`moeray.platform.model.norm`) chooses between
them.

Legend: T rows (tokens), D features, P backward programs.

Why, inference: in PyTorch a decoder layer's "h = x + attn(x); norm(h)" is ~8 kernels (add,
float, pow, mean, add eps, rsqrt, mul, cast, mul by the weight), each a few microseconds at decode
batch sizes for a few KB of data; the step profile of issue 19 counted ~1,300 elementwise, copy
and index kernels per Moonlight decode step. Here one program per row reads x (and the residual)
once, writes the sum and the normed row: 1 launch instead of ~8, 2 with a separate add.

Why, training: autograd through the reference is 7 aten ops forward and ~15 backward per norm
with the residual add at fp32 (6 and ~14 without; 8 and ~16 for a bf16 latent with an fp32
weight; counted with a dispatch mode on CPU), 3-4 norms a layer, and keeps fp32 [T, D]
intermediates (the squares, the normalized row) for the backward. When autograd records,
`rms_norm` runs `_RMSNormFunction`: the forward kernel also writes 1/rms per row (fp32 [T]) and
keeps only h, 1/rms and the weight; the backward is one launch that writes dh (both the x and the
residual gradient) and per-program weight-gradient partial sums [P, D] in fp32, which one `sum`
reduces. Backward math, in fp32:
  n = h * rstd; y = weight * n.to(h.dtype)
  dweight = sum over rows of dy * n.to(h.dtype)
  dn = dy * weight; dh = rstd * (dn - n * mean(dn * n)) + the incoming gradient of h
and dx = dresidual = dh (each rounded to its input's dtype).

The forward kernel takes programmatic dependent launch on sm_90 (`common.pdl_launch`): it waits
for the previous kernel before its first load.

Numerics follow DeepSeek-V3's RMSNorm (model/norm.py): the sum in the promoted dtype of x and the
residual (computed in fp32, rounded once), the mean of squares in fp32, the normed row rounded to
h's dtype and then multiplied by the weight, rounded to the promoted dtype of weight and h (fp32
for a bf16 row and an fp32 weight, as the reference's type promotion gives). The fp32 sum of
squares runs in a different order than PyTorch's, so a result can differ by one rounding step of
the output dtype; gradients are computed in fp32 where the reference rounds its bf16
intermediates, so they differ from it by about one rounding step of the gradient's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    cdiv,
    check_shape,
    check_tensor,
    num_sms,
    pdl_launch,
    pdl_wait,
    switched_off,
    switched_on,
    to_dtype_rn,
    use_triton,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One row lives in registers: 16384 fp32 values at 8 warps is 64 per thread; V3's 7168 is the
# widest model row.
MAX_D = 16384
# Backward programs per SM: each program loops over a contiguous block of rows and keeps its own
# fp32 weight-gradient row, so P = 2 x 132 on an H200 gives a [264, D] partial (2.1 MB at D=2048,
# 7.6 MB at 7168) against ~134 MB (D=2048, T=4096, fp32) the backward itself reads and writes.
BWD_PROGRAMS_PER_SM = 2


def rms_norm_ref(
    x_TD: torch.Tensor,
    weight_D: torch.Tensor,
    eps: float,
    residual_TD: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * normalize(h), h) with h = x + residual (x without one); any leading shape."""
    h = x_TD if residual_TD is None else x_TD + residual_TD
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight_D * y.to(h.dtype), h


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    h_ptr,
    rstd_ptr,
    D,
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    STORE_RSTD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
    W_EARLY: tl.constexpr,  # the weight before the PDL wait (`_forward` says when)
):
    # PDL: the wait comes first, unless W_EARLY: the weight (4 KB at D = 2048) is the model's own
    # parameter, which no kernel of the step writes; otherwise it may be `_forward`'s .contiguous()
    # copy, which the kernel just before writes, and is read after the reduction.
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    if W_EARLY:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        h = to_dtype_rn(x.to(tl.float32) + r.to(tl.float32), h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + offs, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    mean_sq = tl.sum(hf * hf, axis=0) / D
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    if STORE_RSTD:
        tl.store(rstd_ptr + row, rstd)
    normed = to_dtype_rn(hf * rstd, h.dtype)
    if not W_EARLY:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = to_dtype_rn(normed.to(tl.float32) * w.to(tl.float32), y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + offs, y, mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    h_ptr,
    rstd_ptr,
    w_ptr,
    dy_ptr,
    dh_in_ptr,
    dx_ptr,
    dr_ptr,
    dw_part_ptr,
    T,
    D,
    rows_per_program,
    stride_h,
    stride_dy,
    stride_dh_in,
    stride_dx,
    stride_dr,
    HAS_DH_IN: tl.constexpr,
    HAS_DR: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows [pid * rows_per_program, +rows_per_program) of dh = rstd * (dn - n * mean(dn * n))
    (+ the incoming gradient of h), stored as dx (and as dr in the residual's dtype when HAS_DR);
    this program's sum of dy * n.to(h.dtype) over its rows to dw_part[pid]."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, T)
    for row in range(start, end):
        h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + row)
        n = h.to(tl.float32) * rstd
        # the forward's rounding of the normed row, recomputed bit for bit from the same h, rstd
        normed = to_dtype_rn(n, h.dtype).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + offs, mask=mask, other=0.0).to(tl.float32)
        dw += dy * normed
        dn = dy * w
        dh = rstd * (dn - n * (tl.sum(dn * n, axis=0) / D))
        if HAS_DH_IN:
            dh_in = tl.load(dh_in_ptr + row * stride_dh_in + offs, mask=mask, other=0.0)
            dh += dh_in.to(tl.float32)
        tl.store(
            dx_ptr + row * stride_dx + offs, to_dtype_rn(dh, dx_ptr.dtype.element_ty), mask=mask
        )
        if HAS_DR:
            tl.store(
                dr_ptr + row * stride_dr + offs,
                to_dtype_rn(dh, dr_ptr.dtype.element_ty),
                mask=mask,
            )
    tl.store(dw_part_ptr + pid.to(tl.int64) * D + offs, dw, mask=mask)


def rms_norm_applies(
    x_TD: torch.Tensor, weight_D: torch.Tensor, residual_TD: torch.Tensor | None = None
) -> bool:
    """Whether `rms_norm` takes these tensors as they are (the model's dispatch test): x, weight
    and residual each fp32/bf16/fp16 (dtypes may differ: under bf16 autocast a bf16 row meets an
    fp32 weight or residual), unit stride over features, D <= MAX_D, on CUDA (or under the
    interpreter); with or without autograd recording.
    MOERAY_FUSED_NORM=0 in the environment keeps PyTorch instead: an A/B switch for the engine
    bench, and a way out if a new Triton miscompiles the kernels."""
    if switched_off("NORM"):
        return False
    D = x_TD.shape[-1]
    tensors = [x_TD, weight_D] + ([] if residual_TD is None else [residual_TD])
    if any(t.dtype not in DTYPES or t.stride(-1) != 1 for t in tensors):
        return False
    if not 1 <= D <= MAX_D or weight_D.shape != (D,):
        return False
    if residual_TD is not None and residual_TD.shape != x_TD.shape:
        return False
    return use_triton(*tensors)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] as [T, D] without a copy when the leading dims merge (a slice of a wider row
    keeps its row stride) and features have unit stride, else a contiguous copy."""
    try:
        rows = t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1]).contiguous()
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _forward(
    x_TD: torch.Tensor,
    weight_D: torch.Tensor,
    eps: float,
    residual_TD: torch.Tensor | None,
    store_rstd: bool,
    fresh_w: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One launch: (y, h (x itself without a residual), both x's shape; rstd [T] fp32 or None).
    `fresh_w`: the weight may have been written by the launch right before (`w_early`)."""
    x2 = _rows(x_TD)
    r2 = x2 if residual_TD is None else _rows(residual_TD)
    h_dtype = x_TD.dtype if residual_TD is None else torch.promote_types(x_TD.dtype, r2.dtype)
    T, D = x2.shape
    out_dtype = torch.promote_types(weight_D.dtype, h_dtype)
    y = torch.empty(x_TD.shape, dtype=out_dtype, device=x2.device)
    h = x_TD if residual_TD is None else torch.empty(x_TD.shape, dtype=h_dtype, device=x2.device)
    y2 = y.view(T, D)
    h2 = y2 if residual_TD is None else h.view(T, D)
    rstd = torch.empty(T, dtype=torch.float32, device=x2.device) if store_rstd else None
    if T:
        block = triton.next_power_of_2(D)
        pdl = pdl_launch(x2.device)
        w = weight_D.contiguous()
        _rms_norm_kernel[(T,)](
            x2,
            r2,
            w,
            y2,
            h2,
            y2 if rstd is None else rstd,
            D,
            x2.stride(0),
            r2.stride(0),
            y2.stride(0),
            h2.stride(0),
            eps,
            HAS_RESIDUAL=residual_TD is not None,
            STORE_RSTD=store_rstd,
            BLOCK_D=block,
            PDL=pdl,
            W_EARLY=w_early(w, weight_D, fresh_w),
            num_warps=8 if block >= 4096 else 4 if block >= 512 else 1,
            launch_pdl=pdl,
        )
    return y, h, rstd


def w_early(w_D: torch.Tensor, weight_D: torch.Tensor, fresh_w: bool) -> bool:
    """Whether the forward kernel reads its weight before its PDL wait: with
    MOERAY_FUSED_NORM_W_EARLY=1 (opt-in: even in the engine on an H100), when the caller says
    its weight is not `fresh_w` (made for this call, as a cast) and the kernel gets that tensor
    itself (no .contiguous() copy): then no kernel of the step writes it. Why: a decode step runs
    2 norms a layer (55 at Moonlight), each one program that reads its weight only after its
    reduction: one more memory round trip after the wait, on the step's chain of launches."""
    return switched_on("NORM_W_EARLY") and not fresh_w and w_D is weight_D


def _backward(
    h_TD: torch.Tensor,
    rstd_T: torch.Tensor,
    weight_D: torch.Tensor,
    dy_TD: torch.Tensor,
    dh_in_TD: torch.Tensor | None,
    dx_dtype: torch.dtype,
    dr_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One launch and one sum: (dx [T, D], dr [T, D] in dr_dtype or None, dweight [D])."""
    T, D = h_TD.shape
    dev = h_TD.device
    dx = torch.empty((T, D), dtype=dx_dtype, device=dev)
    dr = torch.empty((T, D), dtype=dr_dtype, device=dev) if dr_dtype is not None else None
    rows_per_program = max(1, cdiv(T, BWD_PROGRAMS_PER_SM * num_sms(dev)))
    programs = cdiv(T, rows_per_program)
    dw_part = torch.empty((programs, D), dtype=torch.float32, device=dev)
    if T:
        block = triton.next_power_of_2(D)
        dh_in = dy_TD if dh_in_TD is None else dh_in_TD
        _rms_norm_bwd_kernel[(programs,)](
            h_TD,
            rstd_T,
            weight_D.contiguous(),
            dy_TD,
            dh_in,
            dx,
            dx if dr is None else dr,
            dw_part,
            T,
            D,
            rows_per_program,
            h_TD.stride(0),
            dy_TD.stride(0),
            dh_in.stride(0),
            dx.stride(0),
            dx.stride(0) if dr is None else dr.stride(0),
            HAS_DH_IN=dh_in_TD is not None,
            HAS_DR=dr is not None,
            BLOCK_D=block,
            # 16 warps at V3's 7168 (block 8192): 16 fp32 values a thread for each of h, dy, n,
            # dn, dw instead of 32
            num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4 if block >= 512 else 1,
        )
    return dx, dr, dw_part.sum(0).to(weight_D.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """`rms_norm` under autograd: forward(x, weight, residual or None, eps) -> y, or (y, h) with a
    residual (both receive gradients); saves h, rstd and the weight."""

    @staticmethod
    def forward(
        ctx: Any,
        x_TD: torch.Tensor,
        weight_D: torch.Tensor,
        residual_TD: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y, h, rstd = _forward(x_TD, weight_D, eps, residual_TD, store_rstd=True)
        ctx.save_for_backward(h, rstd, weight_D)
        ctx.x_dtype, ctx.y_dtype = x_TD.dtype, y.dtype
        ctx.r_dtype = None if residual_TD is None else residual_TD.dtype
        # an unused output's gradient arrives as None, not as a tensor of zeros (one memset less:
        # the final norm's h has no consumer)
        ctx.set_materialize_grads(False)
        return y if residual_TD is None else (y, h)

    @staticmethod
    def backward(
        ctx: Any, dy: torch.Tensor | None, dh_in: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, ...]:
        h, rstd, weight_D = ctx.saved_tensors
        h_TD = _rows(h)
        dy_TD = torch.zeros_like(h_TD, dtype=ctx.y_dtype) if dy is None else _rows(dy)
        dh_in_TD = None if dh_in is None else _rows(dh_in)
        separate_dr = ctx.r_dtype is not None and ctx.r_dtype != ctx.x_dtype
        dx, dr, dw = _backward(
            h_TD, rstd, weight_D, dy_TD, dh_in_TD, ctx.x_dtype, ctx.r_dtype if separate_dr else None
        )
        dx = dx.view(h.shape)
        if ctx.r_dtype is None:
            return dx, dw, None, None
        # one tensor for both inputs when their dtypes agree, as autograd's own add backward does
        return dx, dw, dx if dr is None else dr.view(h.shape), None


def rms_norm(
    x_TD: torch.Tensor,
    weight_D: torch.Tensor,
    eps: float,
    residual_TD: torch.Tensor | None = None,
    *,
    fresh_w: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm_ref` in one launch: (normed, h) with h = x + residual, or h = x (the input itself,
    no copy) without a residual. x [..., D] with unit stride over D, weight [D] and residual like
    x, each fp32/bf16/fp16 (h takes the promoted dtype of x and residual, normed that of weight
    and h, as in the reference). When autograd records (grad mode on and an input requiring grad)
    it runs `_RMSNormFunction`: the same forward plus 1/rms per row saved, and a fused backward
    giving x, residual and weight their gradients (both outputs may receive gradients). Without
    autograd no host sync (CUDA graphs). On CPU without the interpreter it is `rms_norm_ref`.
    `fresh_w`: the weight was made for this call (a cast): never read before the PDL wait."""
    check_tensor(x_TD, "x", dtypes=DTYPES)
    check_tensor(weight_D, "weight", dtypes=DTYPES, ndim=1, device=x_TD.device)
    D = x_TD.shape[-1]
    check_shape(weight_D, "weight", (D,))
    tensors = [x_TD, weight_D]
    if residual_TD is not None:
        check_tensor(residual_TD, "residual", dtypes=DTYPES, device=x_TD.device)
        check_shape(residual_TD, "residual", tuple(x_TD.shape))
        tensors.append(residual_TD)
    if not 1 <= D <= MAX_D:
        raise ValueError(f"x has {D} features; the fused RMSNorm supports 1..{MAX_D}")
    if not use_triton(x_TD):
        return rms_norm_ref(x_TD, weight_D, eps, residual_TD)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out = _RMSNormFunction.apply(x_TD, weight_D, residual_TD, eps)
        return (out, x_TD) if residual_TD is None else out
    y, h, _ = _forward(x_TD, weight_D, eps, residual_TD, store_rstd=False, fresh_w=fresh_w)
    return y, h
