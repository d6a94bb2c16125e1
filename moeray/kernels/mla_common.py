"""The device functions MLA's decode kernels share: `_attend_pages`, one block of query rows'
online softmax over a range of a sequence's cached pages, and `_merge_split_rows`, the merge of
the split-KV partials (the split kernel and the merge folded into it, `mla_decode.py`).

Legend: rows (query heads x tokens) of BLOCK_H, R = kv_lora_rank latent dims (RB padded), P rope
dims (PB padded), PAGE tokens a page; scores and the log-sum-exp in base 2.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _merge_split_rows(o_rows, lse_rows, stride_os, num_splits, row_ok, col_ok, NS: tl.constexpr):
    """The splits' partials of a block of rows merged: (out [rows, R] fp32, natural-log lse
    [rows]). o_rows / lse_rows point at split 0; splits in order, each weighed by exp2(its lse -
    the rows' max), as the merge kernel does (the sums over splits run in split order here, in a
    tree there: the same values up to fp32 rounding)."""
    m = tl.full(lse_rows.shape, float("-inf"), dtype=tl.float32)
    for s in tl.static_range(NS):
        ok = row_ok & (tl.full(row_ok.shape, s, tl.int32) < num_splits)
        m = tl.maximum(m, tl.load(lse_rows + s, mask=ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_sum = tl.zeros(lse_rows.shape, dtype=tl.float32)
    acc = tl.zeros(o_rows.shape, dtype=tl.float32)
    for s in tl.static_range(NS):
        ok = row_ok & (tl.full(row_ok.shape, s, tl.int32) < num_splits)
        w = tl.exp2(tl.load(lse_rows + s, mask=ok, other=float("-inf")) - m_safe)
        w_sum += w
        o = tl.load(o_rows + s * stride_os, mask=ok[:, None] & col_ok[None, :], other=0.0)
        acc += o * w[:, None]
    out = acc / tl.where(w_sum > 0.0, w_sum, 1.0)[:, None]
    return out, (m_safe + tl.log2(w_sum)) / 1.4426950408889634


@triton.jit
def _attend_pages(
    q_nope,
    q_rope,
    kv_ptr,
    bt_row,
    t_start,
    t_end,
    limit,
    sm_scale_log2,
    stride_kvp,
    stride_kvt,
    BLOCK_H: tl.constexpr,
    R: tl.constexpr,
    P: tl.constexpr,
    RB: tl.constexpr,
    PB: tl.constexpr,
    PAGE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online softmax of a block of query rows (q_nope [BLOCK_H, RB], q_rope [BLOCK_H, PB]) over
    the cache positions [t_start, t_end) of one sequence (its block-table row `bt_row`), row i
    seeing positions <= limit[i]: (acc [BLOCK_H, RB] fp32, the running max m and sum l [BLOCK_H],
    base 2), acc not yet divided by l."""
    offs_r = tl.arange(0, RB)
    offs_p = tl.arange(0, PB)
    r_ok = offs_r < R
    p_ok = offs_p < P
    offs_t = tl.arange(0, PAGE)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, RB), dtype=tl.float32)
    for t0 in range(t_start, t_end, PAGE):
        page = tl.load(bt_row + t0 // PAGE).to(tl.int64)
        pos = t0 + offs_t
        t_ok = pos < t_end
        kv_base = kv_ptr + page * stride_kvp + offs_t[:, None] * stride_kvt
        c_kv = tl.load(
            kv_base + offs_r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0
        )  # [PAGE, RB]
        k_pe = tl.load(
            kv_base + R + offs_p[None, :], mask=t_ok[:, None] & p_ok[None, :], other=0.0
        )  # [PAGE, PB]
        if UPCAST:
            c_kv = c_kv.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
        s = tl.dot(q_nope, tl.trans(c_kv)) + tl.dot(q_rope, tl.trans(k_pe))
        s = s * sm_scale_log2
        s = tl.where(pos[None, :] <= limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with nothing visible yet keep m = -inf; subtract 0 instead to avoid -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv)
        m_i = m_new
    return acc, m_i, l_i
