"""MLA decode attention over a paged latent KV cache (absorbed queries), split-KV.

Legend: B sequences, H heads, S query tokens per sequence (1 for plain decode), D = R + P with
R = kv_lora_rank (512) latent dims and P = rope dims (64), T page size (64 tokens), NP pages in the
pool, MP max pages per sequence, NS KV splits.

kv_cache [NP, T, D]: each row is one token's latent (first R) and rope key (last P). With absorbed
queries, scores = q_nope . c_kv + q_rope . k_rope and the values are the latent c_kv itself, so the
output is [.., R] latent (the caller multiplies by W_UV and W_O), or, given W_UV (`w_out`), the
value output [.., V] (the caller multiplies by W_O).

Stage 1 (Triton): one program per (head block, sequence, split) walks its 1/NS share of the
sequence's own pages through the block table with an online softmax, writes a partial output and
its log-sum-exp. Stage 2 merges the splits (kernels/mla_merge.py); given W_UV it also applies
W_UV for up to MERGE_OUT_MAX_ROWS query tokens (MOERAY_FUSED_MLA_WUV=0: never), where otherwise
`head_gemv.head_matmul` does after it. On Hopper, stage 1 of 64-row head blocks is a tensor-core
(wgmma) kernel instead, warp-specialized (kernels/mla_decode_ws.py; the plain form
kernels/mla_decode_wgmma.py with MOERAY_FUSED_MLA_WS=0, this module's Triton kernel with
MOERAY_FUSED_MLA_WGMMA=0): the same partials, 1.9x the TFLOP/s at 128 heads.
Splitting the context lets a few long sequences fill all SMs (batch 1 with 32K context has 512
pages).

The multi-token variant (S > 1) serves MTP verification and chunked prefill on top of a cached
prefix: query i of a sequence with length L (which already includes the S new tokens in the cache)
sees cache positions 0 .. L - S + i.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    cdiv,
    check_tensor,
    interpreting,
    is_pow2,
    num_sms,
    pdl_launch,
    pdl_wait,
    switched_off,
    use_triton,
)
from moeray.kernels.head_gemv import head_matmul
from moeray.kernels.mla_decode_wgmma import mla_decode_wgmma_fits, mla_decode_wgmma_split
from moeray.kernels.mla_decode_ws import mla_decode_ws_split
from moeray.kernels.mla_launch import decode_launch, mla_subpage
from moeray.kernels.mla_merge import (
    MERGE_OUT_MAX_ROWS,
    check_w_out,
    merge_out_takes,
    mla_merge,
    mla_merge_out,
)

LOG2E = 1.4426950408889634


def mla_decode_ref(
    q_BSHD: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    kv_lora_rank: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 reference: q [B, S, H, D] -> (out [B, S, H, R] fp32, lse [B, S, H] natural log)."""
    b_, s_, h_, _ = q_BSHD.shape
    page = kv_cache.shape[1]
    out = torch.empty(b_, s_, h_, kv_lora_rank, dtype=torch.float32, device=q_BSHD.device)
    lse = torch.empty(b_, s_, h_, dtype=torch.float32, device=q_BSHD.device)
    for b in range(b_):
        n = int(seq_lens[b])
        pages = block_table[b, : cdiv(n, page)].long()
        kv = kv_cache[pages].reshape(-1, kv_cache.shape[-1])[:n].float()  # [n, D]
        scores = torch.einsum("shd,nd->shn", q_BSHD[b].float(), kv) * softmax_scale
        pos = torch.arange(n, device=kv.device)
        limit = n - s_ + torch.arange(s_, device=kv.device)  # last visible position per query
        scores = scores.masked_fill(pos[None, None, :] > limit[:, None, None], float("-inf"))
        lse[b] = torch.logsumexp(scores, dim=-1)
        out[b] = torch.softmax(scores, dim=-1) @ kv[:, :kv_lora_rank]
    return out, lse


@triton.jit
def _walk_split(
    q_nope, q_rope, kv_ptr, bt_row_ptr, stride_kvp, stride_kvt, t_loop, t_end, limit, m_i, l_i,
    acc, sm_scale_log2, offs_r, offs_p, r_ok, p_ok, R: tl.constexpr, PAGE: tl.constexpr,
    CHUNK: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The split's cache positions t_loop .. t_end - 1 in steps of CHUNK tokens (a page or a part
    of one; t_loop a multiple of CHUNK), each folded into the online softmax."""
    offs_t = tl.arange(0, CHUNK)
    for t0 in range(t_loop, t_end, CHUNK):
        page = tl.load(bt_row_ptr + t0 // PAGE).to(tl.int64)
        pos = t0 + offs_t
        t_ok = pos < t_end
        kv_base = kv_ptr + page * stride_kvp + (t0 % PAGE + offs_t)[:, None] * stride_kvt
        c_kv = tl.load(
            kv_base + offs_r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0
        )  # [CHUNK, RB]
        k_pe = tl.load(
            kv_base + R + offs_p[None, :], mask=t_ok[:, None] & p_ok[None, :], other=0.0
        )  # [CHUNK, PB]
        m_i, l_i, acc = _attend_page(
            q_nope, q_rope, c_kv, k_pe, pos, limit, m_i, l_i, acc, sm_scale_log2, UPCAST
        )
    return m_i, l_i, acc


@triton.jit
def _attend_page(q_nope, q_rope, c_kv, k_pe, pos, limit, m_i, l_i, acc, sm_scale_log2,
                 UPCAST: tl.constexpr):  # fmt: skip
    """One cache page's step of the online softmax: scores of the [BLOCK_H] query rows against
    the page's [PAGE] rows (positions past each row's `limit` masked), then the running max m_i,
    sum l_i and latent output acc [BLOCK_H, RB] updated."""
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
    return m_new, l_i, acc


@triton.jit
def _mla_decode_split_kernel(
    q_ptr,
    kv_ptr,
    bt_ptr,
    len_ptr,
    o_ptr,
    lse_ptr,
    sm_scale_log2,
    ROWS,
    NUM_HEADS,
    Q_LEN,
    num_splits,
    stride_qb,
    stride_qr,
    stride_kvp,
    stride_kvt,
    stride_btb,
    stride_ob,
    stride_or,
    stride_os,
    stride_lb,
    stride_lr,
    BLOCK_H: tl.constexpr,
    R: tl.constexpr,
    P: tl.constexpr,
    RB: tl.constexpr,
    PB: tl.constexpr,
    PAGE: tl.constexpr,
    SUBPAGE: tl.constexpr,  # half-page units where a sequence has fewer pages than splits
    UPCAST: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_h = tl.program_id(0)  # fastest: head blocks of one (sequence, split) reuse its pages in L2
    b = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < ROWS
    # RB, PB: R and P padded to >= 16 (tl.dot's minimum on GPUs; tiny()'s rope dim is 8).
    offs_r = tl.arange(0, RB)
    offs_p = tl.arange(0, PB)
    r_ok = offs_r < R
    p_ok = offs_p < P
    pdl_wait(PDL)  # every read here is the step's query, cache or lengths
    seq_len = tl.load(len_ptr + b)
    # The splits share this sequence's own pages, not the block table's width: at batch 1 with
    # 160 cached tokens (3 pages) and 16 splits sized for a 64-page table, one program walked all
    # 3 pages while 15 found nothing; now 3 programs take one page each (with SUBPAGE, as the
    # sequence has fewer pages than splits, 5 programs half a page each).
    if SUBPAGE:
        half = tl.cdiv(seq_len, PAGE) < num_splits
        unit = tl.where(half, PAGE // 2, PAGE)
    else:
        half = False
        unit = PAGE
    per_split = tl.cdiv(tl.cdiv(seq_len, unit), num_splits) * unit
    t_start = split * per_split
    t_end = tl.minimum(seq_len, t_start + per_split)
    limit = seq_len - Q_LEN + rows // NUM_HEADS  # last cache position each row may attend to
    q_base = q_ptr + b * stride_qb + rows[:, None] * stride_qr
    q_nope = tl.load(q_base + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    q_rope = tl.load(q_base + R + offs_p[None, :], mask=row_ok[:, None] & p_ok[None, :], other=0.0)
    if UPCAST:
        q_nope = q_nope.to(tl.float32)
        q_rope = q_rope.to(tl.float32)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, RB), dtype=tl.float32)
    walk = (q_nope, q_rope, kv_ptr, bt_ptr + b * stride_btb, stride_kvp, stride_kvt, t_start, t_end)
    # The half-page walk only under SUBPAGE (pages of 32+ tokens): at 16-token pages its 8-token
    # chunks are below tl.dot's K >= 16, and Triton checks a branch's shapes before it folds it.
    if SUBPAGE and half:
        m_i, l_i, acc = _walk_split(*walk, limit, m_i, l_i, acc, sm_scale_log2, offs_r, offs_p,
                                    r_ok, p_ok, R, PAGE, PAGE // 2, UPCAST)  # fmt: skip
    else:
        m_i, l_i, acc = _walk_split(*walk, limit, m_i, l_i, acc, sm_scale_log2, offs_r, offs_p,
                                    r_ok, p_ok, R, PAGE, PAGE, UPCAST)  # fmt: skip

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(
        o_ptr + b * stride_ob + rows[:, None] * stride_or + split * stride_os + offs_r[None, :],
        out,
        mask=row_ok[:, None] & r_ok[None, :],
    )
    tl.store(lse_ptr + b * stride_lb + rows * stride_lr + split, lse, mask=row_ok)


def _check_inputs(q, kv_cache, block_table, seq_lens, kv_lora_rank, nd_q):
    check_tensor(q, "q", dtypes=(torch.bfloat16, torch.float16, torch.float32), ndim=nd_q)
    check_tensor(kv_cache, "kv_cache", dtypes=(q.dtype,), ndim=3, device=q.device)
    check_tensor(
        block_table, "block_table", dtypes=(torch.int32, torch.int64), ndim=2, device=q.device
    )
    check_tensor(seq_lens, "seq_lens", dtypes=(torch.int32, torch.int64), ndim=1, device=q.device)
    if kv_cache.stride(-1) != 1:
        raise ValueError(f"kv_cache rows must be contiguous, got strides {kv_cache.stride()}")
    d = kv_cache.shape[-1]
    if q.shape[-1] != d:
        raise ValueError(f"q has head dim {q.shape[-1]} but kv_cache rows have {d} (latent + rope)")
    rope = d - kv_lora_rank
    if not (is_pow2(kv_lora_rank) and is_pow2(rope)):
        raise ValueError(
            f"kv_lora_rank={kv_lora_rank} and rope dim {rope} (= {d} - kv_lora_rank) must be "
            "powers of 2 (DeepSeek-V3: 512 + 64)"
        )
    page = kv_cache.shape[1]
    if not is_pow2(page) or page < 16:
        raise ValueError(
            f"kv_cache page size {page} must be a power of 2 >= 16 (DeepSeek-V3 uses 64)"
        )
    b = q.shape[0]
    if block_table.shape[0] != b or seq_lens.shape[0] != b:
        raise ValueError(
            f"batch mismatch: q has {b} sequences, block_table {block_table.shape[0]}, "
            f"seq_lens {seq_lens.shape[0]}"
        )


def _mla_decode_rows(
    q_BRD: torch.Tensor,  # [B, S*H, D], row = s * H + h
    kv_cache,
    block_table,
    seq_lens,
    softmax_scale,
    kv_lora_rank,
    num_heads,
    q_len,
    num_splits,
    block_h,
    num_warps=None,
    num_stages=None,
    w_out=None,
    fresh_w=False,
):
    """`mla_decode_multi` over checked inputs -> (out, lse [B, rows], applied): out is w_out's
    product [B, rows, V] where `applied` (the merge kernel folded it in), else the latent
    [B, rows, R]."""
    b, rows, d = q_BRD.shape
    page = kv_cache.shape[1]
    max_pages = block_table.shape[1]
    wgmma = not switched_off("MLA_WGMMA")
    wide = block_h is None and wgmma and not switched_off("MLA_WIDE")
    wide = wide and mla_decode_wgmma_fits(q_BRD, kv_cache, kv_lora_rank, 64)  # (mla_launch.py)
    if block_h is None and interpreting():
        block_h = 16  # numpy per program: small tiles keep CPU tests fast
    block_h, num_warps, num_splits = decode_launch(
        b, rows, max_pages, num_sms(q_BRD.device), block_h, num_warps, num_splits, wide
    )
    head_blocks = cdiv(rows, block_h)
    num_splits = cdiv(max_pages, cdiv(max_pages, num_splits))  # none that no length could use
    o = torch.empty(b, rows, num_splits, kv_lora_rank, dtype=torch.float32, device=q_BRD.device)
    lse = torch.empty(b, rows, num_splits, dtype=torch.float32, device=q_BRD.device)
    upcast = interpreting()
    ns_pow2 = triton.next_power_of_2(num_splits)
    pdl = pdl_launch(q_BRD.device)
    # Hopper's wgmma for 64-row head blocks, warp-specialized (the same partials, merged below):
    # 480 TFLOP/s against this kernel's 244 at 128 heads, batch 64, 4K on an H100 (benchmarks/
    # notes-kernels.md; the engine at V3 widths: notes-engine.md).
    # (`wide` checked the 64-row fit already)
    fits = (wide and block_h == 64) or mla_decode_wgmma_fits(q_BRD, kv_cache, kv_lora_rank, block_h)
    if wgmma and fits:
        args = (q_BRD, kv_cache, block_table, seq_lens, o, lse, softmax_scale * LOG2E, num_heads)
        if switched_off("MLA_WS"):
            mla_decode_wgmma_split(*args, q_len, num_splits, num_stages)
        else:  # 2 stages of 64 tokens; num_stages is the other kernels'
            mla_decode_ws_split(*args, q_len, num_splits)
    else:
        _mla_decode_split_kernel[(head_blocks, b, num_splits)](
            q_BRD,
            kv_cache,
            block_table,
            seq_lens,
            o,
            lse,
            softmax_scale * LOG2E,
            rows,
            num_heads,
            q_len,
            num_splits,
            q_BRD.stride(0),
            q_BRD.stride(1),
            kv_cache.stride(0),
            kv_cache.stride(1),
            block_table.stride(0),
            *o.stride()[:3],
            *lse.stride()[:2],
            BLOCK_H=block_h,
            R=kv_lora_rank,
            P=d - kv_lora_rank,
            RB=max(16, kv_lora_rank),
            PB=max(16, d - kv_lora_rank),
            PAGE=page,
            SUBPAGE=mla_subpage(page),
            UPCAST=upcast,
            PDL=pdl,
            num_warps=num_warps,
            num_stages=num_stages or 2,
            launch_pdl=pdl,
        )
    # W_UV in the merge launch (kernels/mla_merge.py; MOERAY_FUSED_MLA_WUV=0 keeps the GEMM): for
    # few query tokens, where the separate per-head GEMM is a launch of its own (H200, Moonlight
    # batch 1: 3.5 us of cuBLAS for 2 MB of W_UV, ~0.4 us of bytes).
    few = b * q_len <= MERGE_OUT_MAX_ROWS
    fold_w = few and not switched_off("MLA_WUV")
    if fold_w and w_out is not None and merge_out_takes(w_out.shape[-1]):
        out, lse_out = mla_merge_out(o, lse, w_out, q_BRD.dtype, num_splits, ns_pow2, fresh_w)
        return out, lse_out, True
    out = torch.empty(b, rows, kv_lora_rank, dtype=q_BRD.dtype, device=q_BRD.device)
    lse_out = torch.empty(b, rows, dtype=torch.float32, device=q_BRD.device)
    mla_merge(o, lse, out, lse_out, num_splits, ns_pow2)
    return out, lse_out, False


def mla_decode_multi(
    q_BSHD: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    kv_lora_rank: int = 512,
    *,
    num_splits: int | None = None,
    block_h: int | None = None,
    return_lse: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
    w_out: torch.Tensor | None = None,
    fresh_w: bool = False,
):
    """Several query tokens per sequence: q [B, S, H, D] -> out [B, S, H, R] (and lse [B, S, H]).

    seq_lens counts the cached tokens including the S new ones; query s sees positions
    0 .. seq_len - S + s. Sequences need seq_len >= S.

    `w_out`: MLA's W_UV as [H, R, V] in q's dtype (any strides: the model passes kv_b_proj's
    weight viewed [H, N + V, R], sliced [:, N:] and transposed). out is then the value output
    o_v [B, S, H, V] = o_lat W_UV[h] per head: computed by the merge kernel (one launch,
    `mla_merge.mla_merge_out`) where MOERAY_FUSED_MLA_WUV is not "0", B * S <=
    MERGE_OUT_MAX_ROWS and V is a power of two >= 16; else by `head_gemv.head_matmul(o_lat,
    w_out, fresh_w=fresh_w)`, the model's own unfused product. Fused, the latent is rounded to
    q's dtype as the unfused path stores it and the product sums in fp32: within one rounding of
    the unfused output. `fresh_w`: w_out was just made (a cast or dequantized copy): no kernel
    reads it before its PDL wait.
    """
    _check_inputs(q_BSHD, kv_cache, block_table, seq_lens, kv_lora_rank, 4)
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale={softmax_scale} must be a positive finite number")
    if block_h is not None and (not is_pow2(block_h) or block_h < 16):
        raise ValueError(f"block_h={block_h} must be a power of 2 >= 16")
    b, s, h, d = q_BSHD.shape
    if w_out is not None:
        check_w_out(w_out, h, kv_lora_rank, q_BSHD.dtype, q_BSHD.device)
    if not use_triton(q_BSHD):
        out, lse = mla_decode_ref(
            q_BSHD, kv_cache, block_table, seq_lens, softmax_scale, kv_lora_rank
        )
        out = out.to(q_BSHD.dtype)
        if w_out is not None:
            out = head_matmul(out, w_out, fresh_w=fresh_w)
        return (out, lse) if return_lse else out
    q = q_BSHD.reshape(b, s * h, d)
    if q.stride(-1) != 1:
        q = q.contiguous()
    out, lse, applied = _mla_decode_rows(
        q,
        kv_cache,
        block_table,
        seq_lens,
        softmax_scale,
        kv_lora_rank,
        h,
        s,
        num_splits,
        block_h,
        num_warps,
        num_stages,
        w_out,
        fresh_w,
    )
    out = out.view(b, s, h, out.shape[-1])
    if w_out is not None and not applied:
        out = head_matmul(out, w_out, fresh_w=fresh_w)
    return (out, lse.view(b, s, h)) if return_lse else out


def mla_decode(
    q_BHD: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    kv_lora_rank: int = 512,
    *,
    num_splits: int | None = None,
    block_h: int | None = None,
    return_lse: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
    w_out: torch.Tensor | None = None,
    fresh_w: bool = False,
):
    """One new token per sequence: q [B, H, 576] absorbed queries -> [B, H, 512] latent output
    ([B, H, V] with w_out).

    kv_cache [pages, 64, 576] (bf16), block_table [B, max_pages] int32 (page ids), seq_lens [B]
    int32 (>= 1, including the current token). num_splits / block_h override the automatic choice;
    `w_out` and `fresh_w` as in mla_decode_multi.
    """
    check_tensor(q_BHD, "q", ndim=3)
    res = mla_decode_multi(
        q_BHD.unsqueeze(1),
        kv_cache,
        block_table,
        seq_lens,
        softmax_scale,
        kv_lora_rank,
        num_splits=num_splits,
        block_h=block_h,
        return_lse=return_lse,
        num_warps=num_warps,
        num_stages=num_stages,
        w_out=w_out,
        fresh_w=fresh_w,
    )
    if return_lse:
        return res[0].squeeze(1), res[1].squeeze(1)
    return res.squeeze(1)
