"""RMSNorm, optionally with the residual add before it, as one Triton launch: `rms_norm`, its
PyTorch reference `rms_norm_ref`, and the test `rms_norm_applies` by which the model's RMSNorm
(`moeray.platform.model.norm`) chooses between them.

Legend: T rows (tokens), D features.

Why: in PyTorch a decoder layer's "h = x + attn(x); norm(h)" is ~8 kernels (add, float, pow, mean,
add eps, rsqrt, mul, cast, mul by the weight), each a few microseconds at decode batch sizes for a
few KB of data; the step profile of issue 19 counted ~1,300 elementwise, copy and index kernels per
Moonlight decode step. Here one program per row reads x (and the residual) once, writes the sum and
the normed row: 1 launch instead of ~8, 2 with a separate add.

Numerics follow DeepSeek-V3's RMSNorm (model/norm.py): the sum in the input dtype (computed in
fp32, rounded once), the mean of squares in fp32, the normed row rounded to the input dtype and
then multiplied by the weight (rounded again). The fp32 sum of squares runs in a different order
than PyTorch's, so a result can differ by one rounding step of the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import check_shape, check_tensor, switched_off, to_dtype_rn, use_triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One row lives in registers: 16384 fp32 values at 8 warps is 64 per thread; V3's 7168 is the
# widest model row.
MAX_D = 16384


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
    D,
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        h = to_dtype_rn(x.to(tl.float32) + r.to(tl.float32), x.dtype)
        tl.store(h_ptr + row * stride_h + offs, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    mean_sq = tl.sum(hf * hf, axis=0) / D
    normed = to_dtype_rn(hf * (1.0 / tl.sqrt(mean_sq + eps)), x.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = to_dtype_rn(normed.to(tl.float32) * w.to(tl.float32), x.dtype)
    tl.store(y_ptr + row * stride_y + offs, y, mask=mask)


def rms_norm_applies(
    x_TD: torch.Tensor, weight_D: torch.Tensor, residual_TD: torch.Tensor | None = None
) -> bool:
    """Whether `rms_norm` takes these tensors as they are (the model's dispatch test): one dtype,
    unit stride over features, D <= MAX_D, on CUDA (or under the interpreter).
    MOERAY_FUSED_NORM=0 in the environment keeps PyTorch instead: an A/B switch for the engine
    bench, and a way out if a new Triton miscompiles the kernel."""
    if switched_off("NORM"):
        return False
    D = x_TD.shape[-1]
    tensors = [x_TD, weight_D] + ([] if residual_TD is None else [residual_TD])
    if any(t.dtype != x_TD.dtype or t.stride(-1) != 1 for t in tensors):
        return False
    if x_TD.dtype not in DTYPES or not 1 <= D <= MAX_D or weight_D.shape != (D,):
        return False
    if residual_TD is not None and residual_TD.shape != x_TD.shape:
        return False
    return use_triton(*tensors)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] as [T, D] without a copy when the leading dims merge (a slice of a wider row
    keeps its row stride), else a contiguous copy."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1]).contiguous()


def rms_norm(
    x_TD: torch.Tensor,
    weight_D: torch.Tensor,
    eps: float,
    residual_TD: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm_ref` in one launch: (normed, h) with h = x + residual, or h = x (the input itself,
    no copy) without a residual. x [..., D] fp32/bf16/fp16 with unit stride over D, weight [D] and
    residual like x in the same dtype. No gradient (inference); no host sync (CUDA graphs). On
    CPU without the interpreter it is `rms_norm_ref`."""
    check_tensor(x_TD, "x", dtypes=DTYPES)
    check_tensor(weight_D, "weight", dtypes=(x_TD.dtype,), ndim=1, device=x_TD.device)
    D = x_TD.shape[-1]
    check_shape(weight_D, "weight", (D,))
    if residual_TD is not None:
        check_tensor(residual_TD, "residual", dtypes=(x_TD.dtype,), device=x_TD.device)
        check_shape(residual_TD, "residual", tuple(x_TD.shape))
    if not 1 <= D <= MAX_D:
        raise ValueError(f"x has {D} features; the fused RMSNorm supports 1..{MAX_D}")
    if not use_triton(x_TD):
        return rms_norm_ref(x_TD, weight_D, eps, residual_TD)
    x2 = _rows(x_TD)
    r2 = x2 if residual_TD is None else _rows(residual_TD)
    if x2.stride(-1) != 1 or r2.stride(-1) != 1:
        x2, r2 = x2.contiguous(), r2.contiguous()
    T = x2.shape[0]
    y = torch.empty((T, D), dtype=x_TD.dtype, device=x_TD.device)
    h = y if residual_TD is None else torch.empty_like(y)
    if T:
        block = triton.next_power_of_2(D)
        _rms_norm_kernel[(T,)](
            x2,
            r2,
            weight_D.contiguous(),
            y,
            h,
            D,
            x2.stride(0),
            r2.stride(0),
            y.stride(0),
            h.stride(0),
            eps,
            HAS_RESIDUAL=residual_TD is not None,
            BLOCK_D=block,
            num_warps=8 if block >= 4096 else 4 if block >= 512 else 1,
        )
    shape = x_TD.shape
    return y.view(shape), (x_TD if residual_TD is None else h.view(shape))
