"""Cross-entropy over a vocabulary with its gradient computed in the forward, Liger-Kernel style:
`cross_entropy`, its PyTorch reference `cross_entropy_ref`, and the test `cross_entropy_applies`
by which the training loss (`moeray.platform.loss`) chooses between them.

Legend: T rows (tokens), V vocabulary entries, BLOCK_V entries a loop iteration reads.

Why: the reference runs on an fp32 copy of the logits. At Moonlight widths (V = 163,840, 4,096
tokens a micro-batch) the bf16 logits are 1.34 GB; the fp32 copy (2.7 GB), log_softmax's fp32
output saved for the backward (2.7 GB), the backward's fp32 gradient (2.7 GB), NLL's filled
gradient buffer (2.7 GB) and the cast back to bf16 add ~8 GB of peak memory and, profiled on an
H200, ~13 ms of GPU time a micro-batch (log_softmax forward 5.2 ms, backward 5.4 ms, fill 1.1 ms,
the casts). Here one program per row reads the row twice (an online max and sum of exp over
BLOCK_V blocks, then softmax - onehot) and writes the gradient once, in the logits' dtype: ~4 GB
of traffic instead of ~20 GB, ~1 ms at H200 bandwidth, and no fp32 [T, V] tensor at all. With
`inplace=True` the gradient overwrites the logits (an activation nobody reads after the loss), so
the loss keeps 2 B (bf16) per token per vocab entry until the backward instead of ~16.

Math, in fp32 per row t with target y_t (n = rows whose target is not ignore_index):
  m = max_v x[v]; d = sum_v exp(x[v] - m) (online over blocks); lse = m + log(d)
  loss_t = lse - x[y_t]; loss = sum_t loss_t / n
  grad[t, v] = (exp(x[v] - lse) - [v == y_t]) / n, rounded to the logits' dtype (nearest even)
Ignored rows have loss 0 and a zero gradient. n = 0 gives loss nan (0/0), as the reference.
The backward only scales the saved gradient by the incoming scalar gradient, in place, and skips
the multiply on the device when that scalar is 1.0 (the main loss; no host sync).

A target outside [0, V) that is not ignore_index cannot be checked without a host sync (the
reference asserts on the device): its row's loss is nan (so the mean is nan, visibly) and its
gradient is softmax / n without the onehot; no out-of-bounds read.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.graph import increment_version

from moeray.kernels.common import check_tensor, switched_off, to_dtype_rn, use_triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Entries of a row one loop iteration holds: 4096 fp32 values at 8 warps is 16 a thread, so
# several programs share an SM and hide each other's loads; V = 163,840 is 40 iterations a pass.
BLOCK_V = 4096
NUM_WARPS = 8
# The backward's scale: one program per SCALE_BLOCK entries of a row.
SCALE_BLOCK = 4096


def cross_entropy_ref(
    logits_TV: torch.Tensor, target_T: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy over the rows whose target is not ignore_index, on fp32 logits."""
    return F.cross_entropy(logits_TV.float(), target_T, ignore_index=ignore_index)


@triton.jit
def _cross_entropy_fwd_kernel(
    x_ptr,
    target_ptr,
    n_valid_ptr,
    loss_ptr,
    grad_ptr,
    V,
    stride_x,
    stride_g,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row `program_id`: loss_t to loss[row] (0 when ignored) and, with WRITE_GRAD, the row of
    (softmax - onehot) / n to grad (which may be x itself: each block is read before it is
    written, and no other program touches the row)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_x
    g_row = grad_ptr + row * stride_g
    target = tl.load(target_ptr + row)
    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            zero = tl.zeros([BLOCK], dtype=tl.float32).to(grad_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK):
                tl.store(g_row + start + offs, zero, mask=start + offs < V)
    else:
        m = -float("inf")
        d = 0.0
        for start in range(0, V, BLOCK):
            mask = start + offs < V
            x = tl.load(x_row + start + offs, mask=mask, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        in_range = (target >= 0) & (target < V)
        x_target = tl.load(x_row + target, mask=in_range, other=float("nan")).to(tl.float32)
        tl.store(loss_ptr + row, lse - x_target)
        if WRITE_GRAD:
            inv_n = 1.0 / tl.load(n_valid_ptr).to(tl.float32)
            for start in range(0, V, BLOCK):
                mask = start + offs < V
                x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp(x - lse)
                g = tl.where(start + offs == target, p - 1.0, p) * inv_n
                tl.store(g_row + start + offs, to_dtype_rn(g, grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(g_ptr, scale_ptr, V, stride_g, BLOCK: tl.constexpr):
    """grad[row, block] *= scale (an fp32 scalar on the device); nothing when scale is 1.0."""
    scale = tl.load(scale_ptr)
    if scale != 1.0:
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < V
        ptrs = g_ptr + row * stride_g + offs
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, to_dtype_rn(g * scale, g_ptr.dtype.element_ty), mask=mask)


def cross_entropy_applies(logits_TV: torch.Tensor, target_T: torch.Tensor) -> bool:
    """Whether `cross_entropy` takes these tensors as they are (the training loss's dispatch
    test): logits [T, V] fp32/bf16/fp16 with unit stride over V, target [T] int64, on CUDA (or
    under the interpreter). MOERAY_FUSED_CROSS_ENTROPY=0 in the environment keeps PyTorch
    instead: an A/B switch for the benches, and a way out if a new Triton miscompiles the
    kernel."""
    if switched_off("CROSS_ENTROPY"):
        return False
    if logits_TV.dim() != 2 or logits_TV.dtype not in DTYPES or logits_TV.stride(-1) != 1:
        return False
    if target_T.dtype != torch.int64 or tuple(target_T.shape) != (logits_TV.shape[0],):
        return False
    return logits_TV.shape[1] >= 1 and use_triton(logits_TV, target_T)


def _forward(
    logits_TV: torch.Tensor,
    target_T: torch.Tensor,
    ignore_index: int,
    grad_TV: torch.Tensor | None,
    block: int = BLOCK_V,
) -> torch.Tensor:
    """One launch and a sum: the mean loss (fp32 scalar); with grad_TV, the gradient written
    into it (it may be logits_TV itself). No host sync."""
    T, V = logits_TV.shape
    target = target_T.contiguous()
    n_valid = (target != ignore_index).sum()
    loss_T = torch.empty(T, dtype=torch.float32, device=logits_TV.device)
    if T:
        g = logits_TV if grad_TV is None else grad_TV
        _cross_entropy_fwd_kernel[(T,)](
            logits_TV,
            target,
            n_valid,
            loss_T,
            g,
            V,
            logits_TV.stride(0),
            g.stride(0),
            ignore_index,
            WRITE_GRAD=grad_TV is not None,
            BLOCK=min(block, triton.next_power_of_2(V)),
            num_warps=NUM_WARPS,
        )
    # the reference's order: the sum of the row losses, then one division by n
    return loss_T.sum() / n_valid


class _CrossEntropyFunction(torch.autograd.Function):
    """`cross_entropy` under autograd: forward(logits, target, ignore_index, inplace, block) ->
    loss; the gradient is computed in the forward and saved (in the logits' own memory with
    inplace), the backward scales it by the incoming scalar gradient in place."""

    @staticmethod
    def forward(
        ctx: Any,
        logits_TV: torch.Tensor,
        target_T: torch.Tensor,
        ignore_index: int,
        inplace: bool,
        block: int,
    ) -> torch.Tensor:
        grad_TV = logits_TV if inplace else torch.empty_like(logits_TV)
        loss = _forward(logits_TV, target_T, ignore_index, grad_TV, block)
        if inplace:
            # Triton writes behind autograd's back: move the version counter so a backward that
            # saved these logits (none does in the training step: the head GEMM saves its input
            # and weight) fails loudly instead of reading the gradient as logits
            increment_version(logits_TV)
        ctx.save_for_backward(grad_TV)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_TV,) = ctx.saved_tensors
        T, V = grad_TV.shape
        if T:
            scale = grad_out.detach().to(torch.float32).reshape(1)
            _scale_kernel[(T, triton.cdiv(V, SCALE_BLOCK))](
                grad_TV,
                scale,
                V,
                grad_TV.stride(0),
                BLOCK=min(SCALE_BLOCK, triton.next_power_of_2(V)),
                num_warps=4,
            )
        return grad_TV, None, None, None, None


def cross_entropy(
    logits_TV: torch.Tensor,
    target_T: torch.Tensor,
    ignore_index: int = -100,
    *,
    inplace: bool = False,
    block: int = BLOCK_V,
) -> torch.Tensor:
    """`cross_entropy_ref` in one launch (plus a sum): the mean loss, an fp32 scalar, over the
    rows whose target is not ignore_index. logits [T, V] fp32/bf16/fp16 with unit stride over V,
    any V >= 1; target [T] int64 (targets outside [0, V) are not checked: module docstring).
    When autograd records (grad mode on, logits requiring grad) it runs `_CrossEntropyFunction`:
    the forward also writes the gradient, in the logits' dtype, into a new tensor, or with
    `inplace=True` over the logits themselves (their values are lost: only for logits nobody
    reads after the loss); the backward scales it. Without autograd only the loss, and the logits
    are left alone. No host sync either way. On CPU without the interpreter it is
    `cross_entropy_ref`. `block`: entries a loop iteration reads (a power of two; tests use small
    ones to cross block edges at small V)."""
    check_tensor(logits_TV, "logits", dtypes=DTYPES, ndim=2)
    check_tensor(target_T, "target", dtypes=(torch.int64,), ndim=1, device=logits_TV.device)
    T, V = logits_TV.shape
    if tuple(target_T.shape) != (T,):
        raise ValueError(f"target has shape {tuple(target_T.shape)}, expected ({T},): one a row")
    if V < 1:
        raise ValueError(f"logits have V={V} entries a row; at least 1 is needed")
    if logits_TV.stride(-1) != 1:
        raise ValueError(
            f"logits have stride {logits_TV.stride(-1)} over V; the kernel needs unit stride"
        )
    if block < 16 or block & (block - 1):
        raise ValueError(f"block={block} must be a power of two >= 16")
    if not use_triton(logits_TV, target_T):
        return cross_entropy_ref(logits_TV, target_T, ignore_index)
    if torch.is_grad_enabled() and logits_TV.requires_grad:
        out: torch.Tensor = _CrossEntropyFunction.apply(
            logits_TV, target_T, ignore_index, inplace, block
        )
        return out
    return _forward(logits_TV, target_T, ignore_index, None, block)
