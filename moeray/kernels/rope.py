"""Rotary embedding on interleaved pairs (DeepSeek-V3's layout) as one Triton launch forward and
one backward: `rope`, its PyTorch reference `rope_ref`, and the test `rope_applies` by which the
model's `apply_rope` (`moeray.platform.model.rope`) chooses between them.

Legend: B batch, S positions, H heads, R rope dims, R2 = R/2 pairs; HP, R2P padded to powers of 2.

Why: in PyTorch the rotation is ~9 kernels (to fp32, four multiplies, a subtract, an add, a stack,
back to the input dtype) and MLA runs it twice per layer, on the queries' rope part and on the
shared rope key: ~18 of a Moonlight decode layer's ~130 kernels (issue 19's step profile:
MulFunctor<float> 217 and add<float> 108 calls per step). One program per (b, s) rotates all H
heads here, reading the strided rope slice in place.

Why, training: autograd through the reference is ~9 kernels forward and ~10 backward per
rotation (one-GPU Moonlight training, 4-layer H200 profile: `aten::mul` under MulBackward0 alone
110 kernels, 2.6 ms a step). When autograd records, `rope` runs `_RopeFunction`: the same
forward launch, saving only cos and sin (as the reference's multiplies do), and a backward of one
launch of the same kernel rotating the incoming gradient by the inverse angle (NEG_SIN: sin
negated in registers). For y0 = x0 c - x1 s, y1 = x0 s + x1 c the gradient is
dx0 = dy0 c + dy1 s, dx1 = -dy0 s + dy1 c, which the kernel computes as dy0 c - dy1 (-s) and
dy0 (-s) + dy1 c: negating a product is exact, so these are the bits autograd through the
reference computes (its fp32 products, one add each, one rounding to x's dtype).

Numerics equal the reference bit for bit: the same fp32 products, a separate subtract/add (the
launch turns off FMA contraction, which would round once instead of twice), one rounding to the
input dtype (nearest even, also under the interpreter through `to_dtype_rn`).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from moeray.kernels.common import check_tensor, switched_off, to_dtype_rn, use_triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One (b, s) row of H x R values lives in registers: 128 heads x 64 dims (V3) is 8192 values.
MAX_HR = 16384


def rope_ref(x_BSHR: torch.Tensor, cos_BSR2: torch.Tensor, sin_BSR2: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1), (x2, x3), ... of the last dim in fp32, by cos/sin
    [B, S, R2] (fp32) shared across the H heads; the result in x's dtype."""
    xf = x_BSHR.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos_BSR2[:, :, None, :], sin_BSR2[:, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out.to(x_BSHR.dtype)


@triton.jit
def _rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    y_ptr,
    S,
    H,
    R2,
    stride_xb,
    stride_xs,
    stride_xh,
    stride_cb,
    stride_cs,
    stride_sb,
    stride_ss,
    HP: tl.constexpr,
    R2P: tl.constexpr,
    NEG_SIN: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // S).to(tl.int64)
    s = (row % S).to(tl.int64)
    offs_h = tl.arange(0, HP)
    offs_j = tl.arange(0, R2P)
    ok_j = offs_j < R2
    ok = (offs_h[:, None] < H) & ok_j[None, :]
    c = tl.load(cos_ptr + b * stride_cb + s * stride_cs + offs_j, mask=ok_j, other=0.0)
    sn = tl.load(sin_ptr + b * stride_sb + s * stride_ss + offs_j, mask=ok_j, other=0.0)
    if NEG_SIN:  # the inverse rotation (the backward): exact, so products keep their bits
        sn = -sn
    x_row = x_ptr + b * stride_xb + s * stride_xs + offs_h[:, None] * stride_xh
    x0 = tl.load(x_row + 2 * offs_j[None, :], mask=ok, other=0.0)
    x1 = tl.load(x_row + 2 * offs_j[None, :] + 1, mask=ok, other=0.0)
    x0 = x0.to(tl.float32)
    x1 = x1.to(tl.float32)
    y0 = x0 * c[None, :] - x1 * sn[None, :]
    y1 = x0 * sn[None, :] + x1 * c[None, :]
    y_row = y_ptr + row.to(tl.int64) * H * 2 * R2 + offs_h[:, None] * 2 * R2 + 2 * offs_j[None, :]
    tl.store(y_row, to_dtype_rn(y0, y_ptr.dtype.element_ty), mask=ok)
    tl.store(y_row + 1, to_dtype_rn(y1, y_ptr.dtype.element_ty), mask=ok)


def rope_applies(x_BSHR: torch.Tensor, cos_BSR2: torch.Tensor, sin_BSR2: torch.Tensor) -> bool:
    """Whether `rope` runs its kernels on these tensors as they are (the model's dispatch test): x
    [B, S, H, R] fp32/bf16/fp16 with unit stride over R, cos/sin fp32 [B, S, R/2] with unit stride
    and no gradient recorded for them, H x R <= MAX_HR, on CUDA (or under the interpreter); x with
    or without a gradient. MOERAY_FUSED_ROPE=0 in the environment keeps PyTorch instead: an A/B
    switch for the engine and training benches."""
    if switched_off("ROPE"):
        return False
    if x_BSHR.dim() != 4 or x_BSHR.dtype not in DTYPES or x_BSHR.stride(-1) != 1:
        return False
    B, S, H, R = x_BSHR.shape
    for t in (cos_BSR2, sin_BSR2):
        if t.dtype != torch.float32 or tuple(t.shape) != (B, S, R // 2) or t.stride(-1) != 1:
            return False
    if _angles_record_grad(cos_BSR2, sin_BSR2):
        return False
    return R % 2 == 0 and H * R <= MAX_HR and use_triton(x_BSHR, cos_BSR2, sin_BSR2)


def _angles_record_grad(cos_BSR2: torch.Tensor, sin_BSR2: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (cos_BSR2.requires_grad or sin_BSR2.requires_grad)


def _rope_launch(
    x_BSHR: torch.Tensor, cos_BSR2: torch.Tensor, sin_BSR2: torch.Tensor, neg_sin: bool
) -> torch.Tensor:
    """One launch: x rotated by the angles (by their inverse with neg_sin), a new contiguous
    [B, S, H, R] tensor in x's dtype; x read in place when it has unit stride over R."""
    B, S, H, R = x_BSHR.shape
    x = x_BSHR if x_BSHR.stride(-1) == 1 else x_BSHR.contiguous()
    cos = cos_BSR2 if cos_BSR2.stride(-1) == 1 else cos_BSR2.contiguous()
    sin = sin_BSR2 if sin_BSR2.stride(-1) == 1 else sin_BSR2.contiguous()
    y = torch.empty((B, S, H, R), dtype=x.dtype, device=x.device)
    if B * S and R:
        _rope_kernel[(B * S,)](
            x,
            cos,
            sin,
            y,
            S,
            H,
            R // 2,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            cos.stride(0),
            cos.stride(1),
            sin.stride(0),
            sin.stride(1),
            HP=triton.next_power_of_2(H),
            R2P=triton.next_power_of_2(R // 2),
            NEG_SIN=neg_sin,
            num_warps=4 if H * R >= 2048 else 1,
            enable_fp_fusion=False,  # x0*c - x1*s rounds each product, as PyTorch's kernels do
        )
    return y


class _RopeFunction(torch.autograd.Function):
    """`rope` under autograd: forward(x, cos, sin) -> the rotated x; saves cos and sin only (fp32
    [B, S, R/2]: 0.5 MiB each at S=4096, R=64, shared by both rotations of a layer); the
    backward rotates dy back in one launch. cos and sin get no gradient (`rope` sends angles that
    record one to the reference)."""

    @staticmethod
    def forward(
        ctx: Any, x_BSHR: torch.Tensor, cos_BSR2: torch.Tensor, sin_BSR2: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(cos_BSR2, sin_BSR2)
        # an unused output's gradient arrives as None, not as a tensor of zeros
        ctx.set_materialize_grads(False)
        return _rope_launch(x_BSHR, cos_BSR2, sin_BSR2, neg_sin=False)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy_BSHR: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None]:
        if dy_BSHR is None:
            return None, None, None
        cos_BSR2, sin_BSR2 = ctx.saved_tensors
        return _rope_launch(dy_BSHR, cos_BSR2, sin_BSR2, neg_sin=True), None, None


def rope(x_BSHR: torch.Tensor, cos_BSR2: torch.Tensor, sin_BSR2: torch.Tensor) -> torch.Tensor:
    """`rope_ref` in one launch: a new contiguous [B, S, H, R] tensor in x's dtype. x may be a
    strided view (a slice of a wider projection) with unit stride over R. When autograd records
    for x (grad mode on, x requiring grad) it runs `_RopeFunction`, whose backward is one launch
    giving the reference's gradient bit for bit; cos/sin that record a gradient themselves go to
    `rope_ref` (the kernel gives them none). Without autograd no host sync (CUDA graphs). On CPU
    without the interpreter it is `rope_ref`."""
    check_tensor(x_BSHR, "x", dtypes=DTYPES, ndim=4)
    check_tensor(cos_BSR2, "cos", dtypes=(torch.float32,), ndim=3, device=x_BSHR.device)
    check_tensor(sin_BSR2, "sin", dtypes=(torch.float32,), ndim=3, device=x_BSHR.device)
    B, S, H, R = x_BSHR.shape
    if R % 2 or tuple(cos_BSR2.shape) != (B, S, R // 2) or sin_BSR2.shape != cos_BSR2.shape:
        raise ValueError(
            f"x {tuple(x_BSHR.shape)} needs an even R and cos/sin [B, S, R/2] = "
            f"{(B, S, R // 2)}, got {tuple(cos_BSR2.shape)} and {tuple(sin_BSR2.shape)}"
        )
    if H * R > MAX_HR:
        raise ValueError(f"x has H x R = {H * R} values per position; the kernel takes {MAX_HR}")
    if not use_triton(x_BSHR) or _angles_record_grad(cos_BSR2, sin_BSR2):
        return rope_ref(x_BSHR, cos_BSR2, sin_BSR2)
    if torch.is_grad_enabled() and x_BSHR.requires_grad:
        out: torch.Tensor = _RopeFunction.apply(x_BSHR, cos_BSR2, sin_BSR2)
        return out
    return _rope_launch(x_BSHR, cos_BSR2, sin_BSR2, neg_sin=False)
