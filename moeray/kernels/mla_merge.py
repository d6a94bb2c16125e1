"""The merge of `mla_decode`'s KV splits: the helpers that the split kernel's last program per
tile (with a workspace) and the merge kernel (without one, or past the size limit) share, so
both give the same bits.

Legend as in mla_decode.py: B sequences, R = kv_lora_rank, NS KV splits, PAGE tokens a page.
Partials: o [B, rows, NS, R] fp32 and lse [B, rows, NS] fp32 in log2 units, written only by the
splits that hold pages of their sequence (`_used_splits`); a row that sees none of a split's
pages (the first query rows of a multi-token call) has lse -inf there and weighs 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moeray.kernels.common import pdl_wait


@triton.jit
def _used_splits(seq_len, num_splits, PAGE: tl.constexpr):
    """(pages a split, splits holding pages) of a sequence of seq_len >= 1 tokens: the splits
    share the sequence's own pages, and the ones past them write nothing the merge reads."""
    pages = tl.cdiv(seq_len, PAGE)
    pages_per_split = tl.cdiv(pages, num_splits)
    return pages_per_split, tl.cdiv(pages, pages_per_split)


@triton.jit
def _merge_weights(lse_ptrs, n_used, lse_mask):
    """The LSE half of merging the first n_used split partials of a block of query rows: lse_ptrs
    [rows] at split 0, the splits 1 apart, log2 units. -> (max LSE with -inf as 0, the sum of the
    split weights, the merged natural-log LSE)."""
    m = tl.load(lse_ptrs, mask=lse_mask, other=float("-inf"), cache_modifier=".cg")
    for i in range(1, n_used):
        lse_i = tl.load(lse_ptrs + i, mask=lse_mask, other=float("-inf"), cache_modifier=".cg")
        m = tl.maximum(m, lse_i)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_sum = tl.zeros_like(m_safe)
    for i in range(0, n_used):
        lse_i = tl.load(lse_ptrs + i, mask=lse_mask, other=float("-inf"), cache_modifier=".cg")
        w_sum += tl.exp2(lse_i - m_safe)  # a row that sees none of a split's pages: weight 0
    has = w_sum > 0.0  # False only in the masked rows past the last head
    # natural-log LSE, for merging with other attention pieces (chunked prefill)
    lse = tl.where(
        has, (m_safe + tl.log2(tl.where(has, w_sum, 1.0))) / 1.4426950408889634, float("-inf")
    )
    return m_safe, w_sum, lse


@triton.jit
def _merge_cols(o_ptrs, lse_ptrs, stride_os, n_used, m_safe, w_sum, o_mask, lse_mask):
    """Columns o_ptrs [rows, C] (at split 0, the splits stride_os apart) of the merged output,
    fp32, from `_merge_weights`' m_safe and w_sum.

    A loop in split order 0..n_used-1 with an explicit fma, not a tl.sum over a [NS, ...] tile:
    a reduction's order follows the tile's layout (its shape and num_warps), which differ between
    the split kernel (8 warps at 64-row head blocks) and `_mla_merge_kernel`, and an fma leaves
    no mul + add for the compiler to contract in one kernel and not the other. Unrolled by 4: the
    independent loads are in flight together."""
    acc = tl.zeros(o_mask.shape, dtype=tl.float32)
    for i in tl.range(0, n_used, loop_unroll_factor=4):
        lse_i = tl.load(lse_ptrs + i, mask=lse_mask, other=float("-inf"), cache_modifier=".cg")
        w = tl.exp2(lse_i - m_safe)
        o_i = tl.load(o_ptrs + i * stride_os, mask=o_mask, other=0.0, cache_modifier=".cg")
        acc = tl.fma(o_i, w[:, None], acc)
    return acc / tl.where(w_sum > 0.0, w_sum, 1.0)[:, None]


@triton.jit
def _mla_merge_kernel(
    o_ptr,
    lse_ptr,
    len_ptr,
    out_ptr,
    lse_out_ptr,
    num_splits,
    stride_ob,
    stride_or,
    stride_os,
    stride_lb,
    stride_lr,
    stride_outb,
    stride_outr,
    stride_lob,
    R: tl.constexpr,
    PAGE: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)  # every read here is the split kernel's output or the lengths
    r = tl.program_id(0)  # rows (S x H: 524,288 for a 4K chunk at 128 heads) exceed grid y's 65,535
    b = tl.program_id(1)
    _, n_used = _used_splits(tl.load(len_ptr + b), num_splits, PAGE)
    rows = r + tl.arange(0, 1)  # a block of one row, as the merge helpers take row blocks
    row_ok = rows == r  # always: the one row
    lse_rows = lse_ptr + b * stride_lb + rows * stride_lr
    m_safe, w_sum, lse = _merge_weights(lse_rows, n_used, row_ok)
    offs_r = tl.arange(0, R)
    out = _merge_cols(
        o_ptr + b * stride_ob + rows[:, None] * stride_or + offs_r[None, :],
        lse_rows,
        stride_os,
        n_used,
        m_safe,
        w_sum,
        row_ok[:, None] & (offs_r < R)[None, :],
        row_ok,
    )
    out_ptrs = out_ptr + b * stride_outb + rows[:, None] * stride_outr + offs_r[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_out_ptr + b * stride_lob + rows, lse)
