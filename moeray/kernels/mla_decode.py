"""MLA decode attention over a paged latent KV cache (absorbed queries), split-KV.

Legend: B sequences, H heads, S query tokens per sequence (1 for plain decode), D = R + P with
R = kv_lora_rank (512) latent dims and P = rope dims (64), T page size (64 tokens), NP pages in the
pool, MP max pages per sequence, NS KV splits.

kv_cache [NP, T, D]: each row is one token's latent (first R) and rope key (last P). With absorbed
queries, scores = q_nope . c_kv + q_rope . k_rope and the values are the latent c_kv itself, so the
output is [.., R] latent (the caller multiplies by W_UV and W_O).

Stage 1 (Triton): one program per (head block, sequence, split) walks its 1/NS share of the
sequence's own pages through the block table with an online softmax, writes a partial output and
its log-sum-exp. Splitting the context lets a few long sequences fill all SMs (batch 1 with 32K
context has 512 pages).

Stage 2 merges the partials of each tile (head block, sequence; a tile's rows are its query
rows s * H + h, so the query tokens of the multi-token variant are inside it): each split
weighted by exp(lse - max lse), in split order, over the splits that hold pages of the sequence
(the others store nothing). It runs in one of two places, with the same helpers
(`mla_merge.py`) and the same bits:
- with a caller-owned `workspace` of int32 tile counters (`mla_decode_workspace`), in the split
  kernel itself: each program stores its partial and increments its tile's counter (acq_rel);
  the program that sees NS-1 is the tile's last, merges the partials, writes the output and sets
  the counter back to 0, so the counters are zero after every call and need no memset. Only
  while a tile's partials stay under _MERGE_MAX_BYTES (one program reads them all);
- otherwise in a second kernel (`_mla_merge_kernel`, one program per query row).
All allocations depend on the shapes only and there is no host sync: both are CUDA-graph safe.

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
    use_triton,
)
from moeray.kernels.mla_merge import _merge_cols, _merge_weights, _mla_merge_kernel, _used_splits

LOG2E = 1.4426950408889634
# The smallest head block (`block_h`): a workspace sized with it fits any block choice.
_MIN_BLOCK_H = 16
# With a workspace, a tile's last program merges only while the tile's partials (splits x head
# block rows x R x 4 bytes) stay under this: one CTA reads them all, at roughly 100 GB/s from L2
# (an estimate, not measured: 64 B a clock at 1.98 GHz is 127 GB/s), so 256 KB take ~2.5 us,
# about the merge launch saved. Moonlight at batch 1 (16 heads, 32 KB a split) merges in the
# split kernel up to 8 splits; 32K-token tables (128 splits, 4 MB) keep the merge kernel.
_MERGE_MAX_BYTES = 256 << 10
# Output columns the merging program handles at a time: 8 KB of partials a split (2048 fp32)
# at any head block, 4 splits in flight (`_merge_cols`' unroll), registers well under the
# split loop's (128 fp32 a thread for a 64 x 512 accumulator over 8 warps).
_MERGE_TILE = 2048


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
def _mla_decode_split_kernel(
    q_ptr,
    kv_ptr,
    bt_ptr,
    len_ptr,
    o_ptr,
    lse_ptr,
    out_ptr,
    lse_out_ptr,
    lock_ptr,
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
    stride_outb,
    stride_outr,
    stride_lob,
    BLOCK_H: tl.constexpr,
    R: tl.constexpr,
    P: tl.constexpr,
    RB: tl.constexpr,
    PB: tl.constexpr,
    PAGE: tl.constexpr,
    UPCAST: tl.constexpr,
    # True: the tile's last program merges the partials into out / lse_out, counting arrivals in
    # lock_ptr (one int32 a tile, zero on entry and on exit), MERGE_COLS output columns at a
    # time; False: out, lse_out and lock_ptr are not touched (`_mla_merge_kernel` merges).
    MERGE: tl.constexpr,
    MERGE_COLS: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)  # every read here is the step's query, cache or lengths; the counters come later
    pid_h = tl.program_id(0)  # fastest: head blocks of one (sequence, split) reuse its pages in L2
    b = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < ROWS
    seq_len = tl.load(len_ptr + b)
    limit = seq_len - Q_LEN + rows // NUM_HEADS  # last cache position each row may attend to

    # RB, PB: R and P padded to >= 16 (tl.dot's minimum on GPUs; tiny()'s rope dim is 8).
    offs_r = tl.arange(0, RB)
    offs_p = tl.arange(0, PB)
    r_ok = offs_r < R
    p_ok = offs_p < P
    offs_t = tl.arange(0, PAGE)
    q_base = q_ptr + b * stride_qb + rows[:, None] * stride_qr
    q_nope = tl.load(q_base + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    q_rope = tl.load(q_base + R + offs_p[None, :], mask=row_ok[:, None] & p_ok[None, :], other=0.0)
    if UPCAST:
        q_nope = q_nope.to(tl.float32)
        q_rope = q_rope.to(tl.float32)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, RB), dtype=tl.float32)

    # The splits share this sequence's own pages, not the block table's width: at batch 1 with
    # 160 cached tokens (3 pages) and 16 splits sized for a 64-page table, one program walked all
    # 3 pages while 15 found nothing; now 3 programs take one page each.
    pages_per_split, n_used = _used_splits(seq_len, num_splits, PAGE)
    t_start = split * pages_per_split * PAGE
    t_end = tl.minimum(seq_len, t_start + pages_per_split * PAGE)
    for t0 in range(t_start, t_end, PAGE):
        page = tl.load(bt_ptr + b * stride_btb + t0 // PAGE).to(tl.int64)
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

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    o_rows = o_ptr + b * stride_ob + rows[:, None] * stride_or
    lse_rows = lse_ptr + b * stride_lb + rows * stride_lr
    if split < n_used:  # an empty split's partial (0, lse -inf) is never read
        o_mask = row_ok[:, None] & r_ok[None, :]
        tl.store(o_rows + split * stride_os + offs_r[None, :], out, mask=o_mask)
        tl.store(lse_rows + split, lse, mask=row_ok)
    if MERGE:
        # As fp8_gemv's serial split-K: every thread's partial store must happen before the
        # increment (a scalar atomic runs on one thread, and its release orders only what that
        # thread has seen), so the CTA barrier comes first. acq_rel at GPU scope: the release
        # publishes this partial to the other SMs; the acquire (then the barrier that hands the
        # result to the whole CTA) makes the last program see the NS-1 partials released before
        # its increment; the merge reads them with ".cg" (L2, not this SM's L1).
        tl.debug_barrier()
        lock = lock_ptr + b * tl.num_programs(0) + pid_h
        arrived = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            m_safe, w_sum, lse_nat = _merge_weights(lse_rows, n_used, row_ok)
            tl.store(lse_out_ptr + b * stride_lob + rows, lse_nat, mask=row_ok)
            out_rows = out_ptr + b * stride_outb + rows[:, None] * stride_outr
            for c0 in range(0, RB, MERGE_COLS):
                cols = c0 + tl.arange(0, MERGE_COLS)
                mask = row_ok[:, None] & (cols < R)[None, :]
                merged = _merge_cols(
                    o_rows + cols[None, :], lse_rows, stride_os, n_used, m_safe, w_sum, mask, row_ok
                )
                tl.store(out_rows + cols[None, :], merged.to(out_ptr.dtype.element_ty), mask=mask)
            # No program of this launch touches the counter again: back to 0 for the next call.
            tl.store(lock, 0)


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


def mla_decode_workspace_size(batch: int, rows: int) -> int:
    """Tile counters a call of `batch` sequences with `rows` = S x H query rows each may need:
    one per (head block, sequence), at the smallest head block (16 rows)."""
    return batch * cdiv(rows, _MIN_BLOCK_H)


def mla_decode_workspace(
    max_batch: int, max_rows: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Zeroed int32 tile counters for the `workspace` of mla_decode / mla_decode_multi: enough for
    any call with up to `max_batch` sequences of up to `max_rows` = S x H query rows each.
    256 sequences x 2 tokens x 64 heads: 2,048 counters (8 KB)."""
    if max_batch < 1 or max_rows < 1:
        raise ValueError(f"max_batch={max_batch}, max_rows={max_rows}: both must be >= 1")
    return torch.zeros(
        mla_decode_workspace_size(max_batch, max_rows), dtype=torch.int32, device=device
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
    workspace=None,
):
    b, rows, d = q_BRD.shape
    page = kv_cache.shape[1]
    max_pages = block_table.shape[1]
    if block_h is None:
        # H100 sweep: 128 heads ran 1.7x faster in 64-row head blocks (8 warps) than in 16-row ones
        # (0.32 vs 0.54 ms at batch 64, 4K): each page is read from memory/L2 by fewer programs.
        block_h = 16 if rows <= 16 or interpreting() else 64
    if num_warps is None:
        num_warps = 4 if block_h <= 16 else 8
    head_blocks = cdiv(rows, block_h)
    if num_splits is None:
        # Fill one wave of program slots (2 per SM for 16-row blocks, 1 for 64-row) without spilling
        # into a second partial wave: at batch 64 x 16 heads, 4 splits took 0.125 ms, 5 took 0.199.
        # No split shorter than 4 pages (256 tokens).
        slots = num_sms(q_BRD.device) * (2 if block_h <= 16 else 1)
        num_splits = max(1, min(slots // (b * head_blocks), cdiv(max_pages, 4)))
    num_splits = cdiv(max_pages, cdiv(max_pages, num_splits))  # none that no length could use
    if workspace is not None and workspace.numel() < head_blocks * b:
        raise ValueError(
            f"workspace has {workspace.numel()} counters; this call has {head_blocks * b} tiles "
            f"({b} sequences x {head_blocks} head blocks of {block_h} of its {rows} query rows): "
            "size it with mla_decode_workspace(max batch, max S x H)"
        )
    tile_bytes = num_splits * min(block_h, rows) * kv_lora_rank * 4
    merge = workspace is not None and tile_bytes <= _MERGE_MAX_BYTES
    o = torch.empty(b, rows, num_splits, kv_lora_rank, dtype=torch.float32, device=q_BRD.device)
    lse = torch.empty(b, rows, num_splits, dtype=torch.float32, device=q_BRD.device)
    out = torch.empty(b, rows, kv_lora_rank, dtype=q_BRD.dtype, device=q_BRD.device)
    lse_out = torch.empty(b, rows, dtype=torch.float32, device=q_BRD.device)
    upcast = interpreting()
    pdl = pdl_launch(q_BRD.device)
    rb = max(16, kv_lora_rank)
    _mla_decode_split_kernel[(head_blocks, b, num_splits)](
        q_BRD,
        kv_cache,
        block_table,
        seq_lens,
        o,
        lse,
        out,
        lse_out,
        workspace if merge else lse_out,  # not read without MERGE
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
        o.stride(0),
        o.stride(1),
        o.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        lse_out.stride(0),
        BLOCK_H=block_h,
        R=kv_lora_rank,
        P=d - kv_lora_rank,
        RB=rb,
        PB=max(16, d - kv_lora_rank),
        PAGE=page,
        UPCAST=upcast,
        MERGE=merge,
        MERGE_COLS=min(rb, max(16, _MERGE_TILE // block_h)),
        PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages or 2,
        launch_pdl=pdl,
    )
    if merge:
        # Merged in the split kernel's launch: the merge kernel's work is small (32 KB of
        # partials a split at 16 heads) but its launch costs ~2-5 us of launch and dependency
        # latency in a CUDA graph on an H200, once a layer (27 a decode step of Moonlight, in a
        # ~2.5 ms step of ~480 kernels).
        return out, lse_out
    _mla_merge_kernel[(rows, b)](
        o,
        lse,
        seq_lens,
        out,
        lse_out,
        num_splits,
        o.stride(0),
        o.stride(1),
        o.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        lse_out.stride(0),
        R=kv_lora_rank,
        PAGE=page,
        PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )
    return out, lse_out


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
    workspace: torch.Tensor | None = None,
):
    """Several query tokens per sequence: q [B, S, H, D] -> out [B, S, H, R] (and lse [B, S, H]).

    seq_lens counts the cached tokens including the S new ones; query s sees positions
    0 .. seq_len - S + s. Sequences need seq_len >= S.

    `workspace`: int32 tile counters on q's device, all zero, at least one per (head block,
    sequence) tile (`mla_decode_workspace(max batch, max S x H)` fits every head block); with it
    the splits are merged inside the split kernel (one launch) when a tile's partials are at
    most _MERGE_MAX_BYTES, and the counters are zero again when it ends. One call at a time per
    workspace: two launches in flight on different streams would share counters. Otherwise a
    second kernel merges. The output is the same to the bit either way.
    """
    _check_inputs(q_BSHD, kv_cache, block_table, seq_lens, kv_lora_rank, 4)
    if workspace is not None:
        check_tensor(
            workspace,
            "workspace",
            dtypes=(torch.int32,),
            ndim=1,
            contiguous=True,
            device=q_BSHD.device,
        )
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale={softmax_scale} must be a positive finite number")
    if block_h is not None and (not is_pow2(block_h) or block_h < 16):
        raise ValueError(f"block_h={block_h} must be a power of 2 >= 16")
    b, s, h, d = q_BSHD.shape
    if not use_triton(q_BSHD):
        out, lse = mla_decode_ref(
            q_BSHD, kv_cache, block_table, seq_lens, softmax_scale, kv_lora_rank
        )
        out = out.to(q_BSHD.dtype)
        return (out, lse) if return_lse else out
    q = q_BSHD.reshape(b, s * h, d)
    if q.stride(-1) != 1:
        q = q.contiguous()
    out, lse = _mla_decode_rows(
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
        workspace,
    )
    out = out.view(b, s, h, kv_lora_rank)
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
    workspace: torch.Tensor | None = None,
):
    """One new token per sequence: q [B, H, 576] absorbed queries -> [B, H, 512] latent output.

    kv_cache [pages, 64, 576] (bf16), block_table [B, max_pages] int32 (page ids), seq_lens [B]
    int32 (>= 1, including the current token). num_splits / block_h override the automatic choice.
    `workspace`: the split merge in the split kernel's launch (`mla_decode_multi` says how).
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
        workspace=workspace,
    )
    if return_lse:
        return res[0].squeeze(1), res[1].squeeze(1)
    return res.squeeze(1)
