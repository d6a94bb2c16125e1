"""The MoE token permute and weighted combine around the routed experts' grouped GEMMs, as one
Triton launch each way: `moe_permute` (tokens to rows sorted by expert) and `moe_combine` (the
experts' rows back to tokens, weighted and summed), their PyTorch references `moe_permute_ref` and
`moe_combine_ref`, `moe_positions` (the rows of the assignments, from the sort), and the test
`moe_combine_applies` by which the model (`moeray.platform.model.moe.use_fused_moe_combine`)
chooses between them.

Legend: T tokens, K experts per token, A = T * K assignment rows sorted by expert, D width, P
rows of a padded layout (P >= A: each expert's rows start aligned, zero rows between and after).
pos_TK[t, k] is the row of assignment (t, k) among the sorted rows: the inverse of the sort
`order_A` (pos[order[a] // K, order[a] % K] = a), a permutation of range(A). On a padded layout
(`moe_positions(order, K, dst_A)`, dst_A the padded row of each sorted row) posP_TK names A
distinct rows of range(P) instead; the other P - A rows are zeros where the kernels write the P
side (the permute's output, the combine's dy) and are not read where they read it.

Math (sums in fp32 in registers, k = 0, 1, ..., K - 1 in that order, one rounding at the end):
  moe_permute  forward  x_AD[pos[t, k]] = x_TD[t]         (x_PD: the other rows 0)
               backward dx_TD[t] = sum_k dx_AD[pos[t, k]]                       (x's dtype)
  moe_combine  forward  out_TD[t] = sum_k w_TK[t, k] * y_AD[pos[t, k]] (+ add_TD[t])
               backward dy_AD[pos[t, k]] = w_TK[t, k] * g_TD[t]      (y's dtype; dy_PD: others 0)
                        dw_TK[t, k] = <g_TD[t], y_AD[pos[t, k]]>                 (w's dtype)
                        dadd_TD = g_TD
Every launch runs one program per token, which reads or writes its K rows whole: each row of the
A side is touched by exactly one program (pos is a permutation), so there are no atomics and the
results do not depend on scheduling. On a padded layout the P - A rows no program writes are
zeroed before the launch (one memset of the P side: the grouped GEMMs read every row of an
expert's padded range, and an unwritten NaN there would poison its sums).

Why: PyTorch does this as a gather (x_TD[token_of]), a gather of the weights, a cast of y to fp32,
an fp32 multiply, an fp32 index_add_ into zeros and a cast back, and autograd runs the reverse of
each (an index_select of the fp32 gradient, two multiplies, a sum, casts, and index_put's sort and
accumulate for dx). One-H200 BF16 training at Moonlight widths (T 4096, K 6, D 2048; 12 MoE layers
x 4 micro-batches a step) spent ~60-80 ms of a 548 ms step in these ops. At that shape the
kernels move, bf16, with A x D = 96 MiB and T x D = 16 MiB: forward the rows written by the
permute and read by the combine, x, the shared experts' output and out (250 MB); backward y read
and dy written by the combine's, dy's rows read by the permute's, g and dx (335 MB): ~0.6 GB a
layer and micro-batch, ~28 GB a step, ~6 ms at the H200's ~4.8 TB/s. The fp32 [A, D] products
PyTorch keeps for the backward (192 MiB a layer) are not made: the combine saves y (bf16).

Numerics: the forward sums are the references' bit for bit (the same fp32 products and adds in
the same order, FMA contraction off on the GPU, nearest-even rounding also under the interpreter
through `to_dtype_rn`); so is dy. dw sums D products in a different order than torch's sum (a
difference of about D x 2^-24 of sum |g y| at most). dx sums in k order, where autograd through
`moe_permute_ref` sums the same fp32 values in torch's order and through PyTorch's gather in row
order (a few fp32 roundings apart before the one rounding to x's dtype).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from moeray.kernels.common import check_shape, check_tensor, switched_off, to_dtype_rn, use_triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)
# D is walked in chunks of at most this many values: Moonlight's 2048 is one chunk (8 warps, 8
# values a thread for each of the K rows), V3's 7168 four.
MAX_BLOCK_D = 2048


def moe_positions(order_A: torch.Tensor, K: int, dst_A: torch.Tensor | None = None) -> torch.Tensor:
    """pos_TK (int64, on order's device): the row of each assignment (t, k) among the rows sorted
    by `order_A` (a permutation of range(T * K) over the flattened [T, K] assignments, e.g.
    argsort of their expert ids). With `dst_A` (int64 [T * K], distinct: the row of a padded
    layout where the a-th sorted row goes) posP_TK = dst_A[pos_TK], from the same one scatter.
    One scatter on the device, no host sync."""
    check_tensor(order_A, "order", dtypes=INDEX_DTYPES, ndim=1)
    if K < 1 or order_A.numel() % K:
        raise ValueError(f"order has {order_A.numel()} assignments, not a multiple of K={K}")
    if dst_A is None:
        rows_A = torch.arange(order_A.numel(), device=order_A.device)
    else:
        check_tensor(dst_A, "dst", dtypes=(torch.int64,), ndim=1, device=order_A.device)
        check_shape(dst_A, "dst", (order_A.numel(),))
        rows_A = dst_A
    pos_A = torch.empty_like(rows_A).scatter_(0, order_A.to(torch.int64), rows_A)
    return pos_A.view(-1, K)


def moe_permute_ref(
    x_TD: torch.Tensor, pos_TK: torch.Tensor, rows: int | None = None
) -> torch.Tensor:
    """x_AD [T * K, D] (x_PD [rows, D] with `rows`) with x_AD[pos[t, k]] = x_TD[t], in x's
    dtype, the rows pos does not name zeros. Under autograd the gradient of x is the fp32 sum
    over k of the rows' gradients (in torch's order), rounded once to x's dtype."""
    T, K = pos_TK.shape
    D = x_TD.shape[1]
    rows_TKD = x_TD.float()[:, None, :].expand(T, K, D).reshape(T * K, D)
    out = rows_TKD.new_zeros(T * K if rows is None else rows, D)
    x_AD = out.index_copy(0, pos_TK.flatten().to(torch.int64), rows_TKD)
    return x_AD.to(x_TD.dtype)


def moe_combine_ref(
    y_AD: torch.Tensor,
    w_TK: torch.Tensor,
    pos_TK: torch.Tensor,
    add_TD: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """out_TD = sum over k (in order, fp32) of w[:, k] * y[pos[:, k]], plus add_TD, rounded once to
    out_dtype (y's dtype by default)."""
    acc_TD = None
    for k in range(w_TK.shape[1]):
        term_TD = w_TK[:, k, None].float() * y_AD[pos_TK[:, k]].float()
        acc_TD = term_TD if acc_TD is None else acc_TD + term_TD
    assert acc_TD is not None  # K >= 1 (the wrappers check)
    if add_TD is not None:
        acc_TD = acc_TD + add_TD.float()
    return acc_TD.to(out_dtype or y_AD.dtype)


@triton.jit
def _permute_kernel(
    x_ptr,
    pos_ptr,
    xa_ptr,
    D,
    stride_x,
    stride_xa,
    K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Token t's row copied to its K sorted rows."""
    t = tl.program_id(0).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        ok = offs < D
        x = tl.load(x_ptr + t * stride_x + offs, mask=ok)
        for k in tl.static_range(K):
            row = tl.load(pos_ptr + t * K + k).to(tl.int64)
            tl.store(xa_ptr + row * stride_xa + offs, x, mask=ok)


@triton.jit
def _gather_sum_kernel(
    ya_ptr,
    w_ptr,
    pos_ptr,
    add_ptr,
    out_ptr,
    D,
    stride_ya,
    stride_add,
    stride_out,
    K: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_ADD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t] = sum_k (w[t, k] *) ya[pos[t, k]] (+ add[t]) in fp32, k in order, rounded once: the
    combine's forward (HAS_W) and the permute's backward (no weights)."""
    t = tl.program_id(0).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        ok = offs < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(pos_ptr + t * K + k).to(tl.int64)
            y = tl.load(ya_ptr + row * stride_ya + offs, mask=ok, other=0.0).to(tl.float32)
            if HAS_W:
                y = tl.load(w_ptr + t * K + k).to(tl.float32) * y
            # k = 0 adds to zeros: exact, so the sum is the reference's term_0 + term_1 + ...
            acc = acc + y
        if HAS_ADD:
            acc = acc + tl.load(add_ptr + t * stride_add + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(
            out_ptr + t * stride_out + offs, to_dtype_rn(acc, out_ptr.dtype.element_ty), mask=ok
        )


@triton.jit
def _combine_bwd_kernel(
    g_ptr,
    ya_ptr,
    w_ptr,
    pos_ptr,
    dya_ptr,
    dw_ptr,
    D,
    stride_g,
    stride_ya,
    stride_dya,
    K: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Token t: dya[pos[t, k]] = w[t, k] * g[t] in dya's dtype, and dw[t, k] = <g[t], ya[pos[t, k]]>
    summed in fp32 over the D chunks, written in dw's dtype."""
    t = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, KP)
    dw = tl.zeros([KP], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        ok = offs < D
        g = tl.load(g_ptr + t * stride_g + offs, mask=ok, other=0.0).to(tl.float32)
        for k in tl.static_range(K):
            row = tl.load(pos_ptr + t * K + k).to(tl.int64)
            w = tl.load(w_ptr + t * K + k).to(tl.float32)
            y = tl.load(ya_ptr + row * stride_ya + offs, mask=ok, other=0.0).to(tl.float32)
            dw = tl.where(offs_k == k, dw + tl.sum(g * y, axis=0), dw)
            dy = to_dtype_rn(w * g, dya_ptr.dtype.element_ty)
            tl.store(dya_ptr + row * stride_dya + offs, dy, mask=ok)
    tl.store(dw_ptr + t * K + offs_k, to_dtype_rn(dw, dw_ptr.dtype.element_ty), mask=offs_k < K)


def _block_d(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps): 8 bf16 values a thread (16-byte accesses) where D allows."""
    block = min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D)
    return block, max(1, min(8, block // 256))


def _side(rows: int, A: int, D: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [rows, D] side the kernels write A rows of: uninitialised when they write every row,
    zeros when rows > A (a padded layout's rows that no token owns)."""
    new = torch.empty if rows == A else torch.zeros
    return new((rows, D), dtype=dtype, device=like.device)


def _permute_launch(x_TD: torch.Tensor, pos_TK: torch.Tensor, rows: int) -> torch.Tensor:
    T, K = pos_TK.shape
    D = x_TD.shape[1]
    x_PD = _side(rows, T * K, D, x_TD, x_TD.dtype)  # P = rows: A unless a padded layout
    if T and D:
        block, warps = _block_d(D)
        _permute_kernel[(T,)](
            x_TD, pos_TK, x_PD, D, x_TD.stride(0), x_PD.stride(0), K=K, BLOCK_D=block,
            num_warps=warps,
        )  # fmt: skip
    return x_PD


def _gather_sum_launch(
    y_AD: torch.Tensor,
    w_TK: torch.Tensor | None,
    pos_TK: torch.Tensor,
    add_TD: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    T, K = pos_TK.shape
    D = y_AD.shape[1]
    out_TD = torch.empty((T, D), dtype=out_dtype, device=y_AD.device)
    if T and D:
        block, warps = _block_d(D)
        add = out_TD if add_TD is None else add_TD
        _gather_sum_kernel[(T,)](
            y_AD,
            pos_TK if w_TK is None else w_TK,
            pos_TK,
            add,
            out_TD,
            D,
            y_AD.stride(0),
            add.stride(0),
            out_TD.stride(0),
            K=K,
            HAS_W=w_TK is not None,
            HAS_ADD=add_TD is not None,
            BLOCK_D=block,
            num_warps=warps,
            enable_fp_fusion=False,  # w * y + acc rounds the product, as the reference does
        )
    return out_TD


def _combine_bwd_launch(
    g_TD: torch.Tensor, y_AD: torch.Tensor, w_TK: torch.Tensor, pos_TK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    T, K = pos_TK.shape
    D = y_AD.shape[1]
    dy_AD = _side(y_AD.shape[0], T * K, D, y_AD, y_AD.dtype)
    dw_TK = torch.empty((T, K), dtype=w_TK.dtype, device=w_TK.device)
    if T:
        block, warps = _block_d(D)
        _combine_bwd_kernel[(T,)](
            g_TD,
            y_AD,
            w_TK,
            pos_TK,
            dy_AD,
            dw_TK,
            D,
            g_TD.stride(0),
            y_AD.stride(0),
            dy_AD.stride(0),
            K=K,
            KP=triton.next_power_of_2(K),
            BLOCK_D=block,
            num_warps=warps,
        )
    return dy_AD, dw_TK


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A [rows, D] tensor with unit stride over D (a copy only where it has none)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _MoePermuteFunction(torch.autograd.Function):
    """`moe_permute` under autograd: saves pos only; the backward is one gather-sum launch (of
    the rows pos names: a padded layout's other rows are not read)."""

    @staticmethod
    def forward(ctx: Any, x_TD: torch.Tensor, pos_TK: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(pos_TK)
        ctx.x_dtype = x_TD.dtype
        ctx.set_materialize_grads(False)
        return _permute_launch(x_TD, pos_TK, rows)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dx_AD: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None]:
        if dx_AD is None:
            return None, None, None
        (pos_TK,) = ctx.saved_tensors
        return _gather_sum_launch(_rows(dx_AD), None, pos_TK, None, ctx.x_dtype), None, None


class _MoeCombineFunction(torch.autograd.Function):
    """`moe_combine` under autograd: saves y, w and pos (y in its own dtype: 96 MiB bf16 at
    Moonlight's training shape, where PyTorch's multiply keeps an fp32 copy of twice that); the
    backward is one launch writing dy (into zeros where y has rows pos does not name) and dw,
    and add's gradient is the incoming one."""

    @staticmethod
    def forward(
        ctx: Any,
        y_AD: torch.Tensor,
        w_TK: torch.Tensor,
        pos_TK: torch.Tensor,
        add_TD: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        ctx.save_for_backward(y_AD, w_TK, pos_TK)
        ctx.add_dtype = None if add_TD is None else add_TD.dtype
        ctx.set_materialize_grads(False)
        return _gather_sum_launch(y_AD, w_TK, pos_TK, add_TD, out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_TD: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if g_TD is None:
            return None, None, None, None, None
        y_AD, w_TK, pos_TK = ctx.saved_tensors
        dy_AD = dw_TK = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dy_AD, dw_TK = _combine_bwd_launch(_rows(g_TD), y_AD, w_TK, pos_TK)
        dadd_TD = None
        if ctx.add_dtype is not None and ctx.needs_input_grad[3]:
            dadd_TD = g_TD.to(ctx.add_dtype)
        return dy_AD, dw_TK, None, dadd_TD, None


def _check_pos(pos_TK: torch.Tensor, T: int, device: torch.device) -> int:
    """K of a [T, K] int32/int64 pos on `device` (ValueError naming what is wrong)."""
    check_tensor(pos_TK, "pos", dtypes=INDEX_DTYPES, ndim=2, device=device)
    if pos_TK.shape[0] != T or pos_TK.shape[1] < 1:
        raise ValueError(f"pos has shape {tuple(pos_TK.shape)}, expected [T={T}, K >= 1]")
    return pos_TK.shape[1]


def moe_permute(x_TD: torch.Tensor, pos_TK: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """`moe_permute_ref` in one launch: x_AD [T * K, D] in x's dtype, x_AD[pos[t, k]] = x[t]. pos
    must be a permutation of range(T * K) (`moe_positions`; not checked: reading it would make the
    host wait). `rows` (>= T * K): the output's row count, a padded layout's P, pos then naming
    T * K distinct rows of range(P) (`moe_positions` with dst_A) and the other rows zeros (one
    memset before the launch). When autograd records for x, its backward is one launch summing
    each token's K rows in fp32 (no atomics). On CPU without the interpreter it is
    `moe_permute_ref`."""
    check_tensor(x_TD, "x", dtypes=DTYPES, ndim=2)
    K = _check_pos(pos_TK, x_TD.shape[0], x_TD.device)
    A = x_TD.shape[0] * K
    if rows is None:
        rows = A
    elif rows < A:
        raise ValueError(f"rows={rows} for pos {tuple(pos_TK.shape)}: at least {A}")
    if not use_triton(x_TD):
        return moe_permute_ref(x_TD, pos_TK, rows)
    x_TD, pos_TK = _rows(x_TD), pos_TK.contiguous()
    if torch.is_grad_enabled() and x_TD.requires_grad:
        out: torch.Tensor = _MoePermuteFunction.apply(x_TD, pos_TK, rows)
        return out
    return _permute_launch(x_TD, pos_TK, rows)


def moe_combine(
    y_AD: torch.Tensor,
    w_TK: torch.Tensor,
    pos_TK: torch.Tensor,
    add_TD: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`moe_combine_ref` in one launch: out_TD [T, D] in out_dtype (y's dtype by default) =
    sum_k w[t, k] * y[pos[t, k]] + add[t], summed in fp32, rounded once. y [T * K, D], w [T, K]
    and add [T, D] each fp32/bf16/fp16; pos a permutation of range(T * K) (`moe_positions`; not
    checked: reading it would make the host wait). y may have more rows (y_PD, a padded layout):
    pos then names T * K distinct rows of them, the others are not read and get zero gradient.
    When autograd records, the backward is one launch giving y and w their gradients (no
    atomics); add's is the incoming gradient. On CPU without the interpreter it is
    `moe_combine_ref`."""
    check_tensor(y_AD, "y", dtypes=DTYPES, ndim=2)
    dev = y_AD.device
    check_tensor(w_TK, "w", dtypes=DTYPES, ndim=2, device=dev)
    T, D = w_TK.shape[0], y_AD.shape[1]
    K = _check_pos(pos_TK, T, dev)
    check_shape(w_TK, "w", (T, K))
    if y_AD.shape[0] < T * K:
        raise ValueError(
            f"y has {y_AD.shape[0]} rows; pos {tuple(pos_TK.shape)} needs at least {T * K}"
        )
    if add_TD is not None:
        check_tensor(add_TD, "add", dtypes=DTYPES, ndim=2, device=dev)
        check_shape(add_TD, "add", (T, D))
    if out_dtype is not None and out_dtype not in DTYPES:
        raise ValueError(f"out_dtype {out_dtype}; accepted: {', '.join(map(str, DTYPES))}")
    out_dtype = out_dtype or y_AD.dtype
    if not use_triton(y_AD):
        return moe_combine_ref(y_AD, w_TK, pos_TK, add_TD, out_dtype)
    y_AD, w_TK, pos_TK = _rows(y_AD), w_TK.contiguous(), pos_TK.contiguous()
    add_TD = None if add_TD is None else _rows(add_TD)
    inputs = (y_AD, w_TK) if add_TD is None else (y_AD, w_TK, add_TD)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        out: torch.Tensor = _MoeCombineFunction.apply(y_AD, w_TK, pos_TK, add_TD, out_dtype)
        return out
    return _gather_sum_launch(y_AD, w_TK, pos_TK, add_TD, out_dtype)


def moe_combine_applies(
    x_TD: torch.Tensor, w_TK: torch.Tensor, add_TD: torch.Tensor | None = None
) -> bool:
    """Whether the model's permute and combine take tokens x [T, D], their weights w [T, K] and
    the shared experts' output add [T, D] as they are: each fp32/bf16/fp16, on CUDA (or under the
    interpreter). MOERAY_FUSED_MOE_COMBINE=0 keeps PyTorch: an A/B switch for the training
    bench."""
    if switched_off("MOE_COMBINE"):
        return False
    tensors = [x_TD, w_TK] + ([] if add_TD is None else [add_TD])
    if any(t.dim() != 2 or t.dtype not in DTYPES for t in tensors):
        return False
    if w_TK.shape[0] != x_TD.shape[0] or (add_TD is not None and add_TD.shape != x_TD.shape):
        return False
    return use_triton(*tensors)
