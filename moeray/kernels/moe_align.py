"""MoE token alignment: the assignments sorted by expert, each expert's run padded to whole blocks
of BM rows, as the fused MoE kernels (`moeray.kernels.moe`) read them. `moe_align` is the one
entry and the one place that picks how: the one-program kernel `_moe_align_kernel` for up to
`SMALL_KERNEL_MAX_CHUNKS` chunks of CH assignments (decode batch 1-2), the one-program-per-expert
kernel `_moe_align_wide_kernel` past that, and the PyTorch reference `moe_align_ref` on CPU without
the interpreter and with MOERAY_FUSED_ALIGN=0. All three return the same tensors, element for
element.

Legend: TK assignments (token t's k-th choice is assignment t * K + k), E local experts, BM rows
per block, EP = E padded to a power of 2, NB = E + 1 bins padded to a power of 2, CH assignments
per loop step.

Why: in PyTorch the alignment is ~35 kernels per MoE layer (comparisons, scatter_add counts, two
cumsums, a stable radix sort, gathers, a fill and a scatter, searchsorted), each ~1-2 us at decode
sizes for a few hundred bytes: about a quarter of the ~130 kernels of a Moonlight decode layer
(issue 19's step profile: FillFunctor<long> 156 and add<long> 106 calls per step, radixSortKVInPlace
6.5 us per layer), ~97 us a layer at DeepSeek-V3's 256 experts and 512 assignments (batch 64).

The one-program kernel does it all in one CTA: per-expert counts, padded offsets by a cumsum in
registers, the block -> expert map, then each assignment's slot = its expert's padded start + its
rank, the number of earlier assignments to the same expert (a stable sort, like the reference's).
The rank is counted chunk by chunk in O(TK * EP): a running per-expert count over the earlier
chunks plus the exclusive cumsum, down the chunk, of its one-hot [CH, EP] matrix. Its time grows
with the chunks, ~2.8 us each at 256 experts on an H200 (47 us at 256 assignments).

The wide kernel spreads that over E programs, one per expert, each O(TK + NB): a histogram of all
ids gives every expert's count, so each program knows its own padded start (the sum of the padded
counts below it); it then walks the ids once more and writes its own assignments at start + rank
(a cumsum of the matches, in id order: stable), its padding slots and its blocks' expert ids. The
slots and blocks past the padded total are shared out over the programs by stride. Every output
element has exactly one writer, so no program waits for another.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import cdiv, check_tensor, pdl_launch, pdl_wait, switched_off, use_triton

# Cells per loop tile, CH x EP (64 x 64 at Moonlight's 64 experts, 16 x 256 at V3's): 32 int32
# registers a thread over num_warps=4's 128 threads (from EP = 512 CH stays at 16, over it).
_TILE_CELLS = 4096
# Up to this many chunks of CH `moe_align` runs the one-program kernel, past it the wide one.
# Measured (decode_glue, CUDA graph, H200): the one-program kernel takes 3.7 us at 1 chunk
# (Moonlight, 6 assignments), 4.7 us at 1 chunk of 16 (V3, 8), 8.0 us at 3 chunks of 64 and
# 47.4 us at 16 chunks of 16 (V3, 256 assignments), ~2.8 us a 16-assignment chunk; the reference
# took ~97 us at V3's 512. The wide kernel's E programs each read the ids twice and histogram
# them, O(TK + NB) a program; it is not yet timed on a GPU (decode_glue's *_wide rows time both
# kernels at each size), so 2 chunks keeps decode batch 1-2 on the measured kernel.
SMALL_KERNEL_MAX_CHUNKS = 2
# Ids per loop step of the wide kernel: 1,024 (8 a thread at 4 warps) cover a decode batch of 128
# at top-8 in one step.
_WIDE_CHUNK = 1024
ALIGN_KERNELS = ("small", "wide")


def _chunk(num_experts: int) -> int:
    """CH, assignments per loop step: _TILE_CELLS / EP within [16, 64] (64 up to 64 experts, 32
    at 65-128, 16 from 129)."""
    return max(16, min(64, _TILE_CELLS // triton.next_power_of_2(num_experts)))


def small_kernel_max_tk(num_experts: int) -> int:
    """The most assignments `moe_align` gives the one-program kernel, SMALL_KERNEL_MAX_CHUNKS
    chunks: 128 at Moonlight's 64 experts (decode batch 21 at top-6), 64 at 65-128, 32 at V3's 256
    (batch 4 at top-8). More go to the wide kernel."""
    return SMALL_KERNEL_MAX_CHUNKS * _chunk(num_experts)


def max_aligned_blocks(tk: int, num_experts: int, block_m: int) -> int:
    """An upper bound on the padded blocks of TK assignments over E experts, known on the host:
    the blocks of expert e are ceil(c_e / BM) <= c_e / BM + 1 for each of the at most min(E, TK)
    experts with c_e > 0, so ceil(TK / BM) + min(E, TK) in all. The fused MoE launches this many
    row blocks; the unused ones exit at once. At decode batch 1 on Moonlight (TK = 6, E = 64,
    BM = 32) it is 7 blocks where ceil(TK / BM) + E was 65, so the gate_up and down grids had
    1,254 empty programs each and the alignment filled 2,080 padding slots instead of 224."""
    return cdiv(tk, block_m) + min(num_experts, tk)


def moe_align_ref(
    expert_ids_TK: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_align` in PyTorch: counts by scatter_add, offsets by cumsum, a stable argsort."""
    flat = expert_ids_TK.reshape(-1).long()
    tk = flat.numel()
    dev = flat.device
    valid = (flat >= 0) & (flat < num_experts)
    bucket = torch.where(valid, flat, num_experts)  # invalid ids go to a bucket that gets no blocks
    # scatter_add, not torch.bincount: CUDA bincount reads min and max back to the host (a sync),
    # which would stop the decode step from being captured in a CUDA graph.
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev)
    counts = counts.scatter_add_(0, bucket, torch.ones_like(bucket))[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(bucket, stable=True)
    sorted_bucket = bucket[order]
    ok = sorted_bucket < num_experts
    e_safe = torch.where(ok, sorted_bucket, 0)
    rank = torch.arange(tk, device=dev) - cnt_start[e_safe]
    max_blocks = max_aligned_blocks(tk, num_experts, block_m)
    cap = max_blocks * block_m
    dest = torch.where(ok, pad_start[e_safe] + rank, cap)  # invalid -> a dropped extra slot
    sorted_ids = torch.full((cap + 1,), tk, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(max_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(pad_end, block_start, right=True)
    total = pad_end[-1] if num_experts > 0 else torch.zeros((), dtype=torch.long, device=dev)
    block_expert = torch.where(block_start < total, block_expert, -1).to(torch.int32)
    return sorted_ids[:cap], block_expert


@triton.jit
def _bucket(ids_ptr, offs, tk, num_experts):
    """Expert of each assignment in offs, -1 for padding lanes and ids outside [0, E)."""
    live = offs < tk
    e = tl.load(ids_ptr + offs, mask=live, other=-1).to(tl.int32)
    return tl.where(live & (e >= 0) & (e < num_experts), e, -1)


@triton.jit
def _moe_align_kernel(
    ids_ptr,
    sorted_ptr,
    bexp_ptr,
    tk,
    num_experts,
    max_blocks,
    BLOCK_M: tl.constexpr,
    EP: tl.constexpr,
    CH: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)  # the expert ids are the gate's output
    offs_e = tl.arange(0, EP)
    lanes = tl.arange(0, CH)
    counts = tl.zeros([EP], dtype=tl.int32)
    for i0 in range(0, tk, CH):
        b = _bucket(ids_ptr, i0 + lanes, tk, num_experts)
        counts += tl.sum((b[None, :] == offs_e[:, None]).to(tl.int32), axis=1)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    total = tl.sum(padded, axis=0)
    # Every slot starts as the sentinel TK (padding); the scatter below overwrites the real ones.
    cap = max_blocks * BLOCK_M
    for s0 in range(0, cap, CH):
        offs_s = s0 + lanes
        tl.store(sorted_ptr + offs_s, tk + offs_s * 0, mask=offs_s < cap)
    # Block -> expert: the number of experts whose padded run ends at or before the block's start
    # (searchsorted right); -1 past the last run. Lanes past E have pad_end = total.
    for b0 in range(0, max_blocks, CH):
        offs_b = b0 + lanes
        start = offs_b * BLOCK_M
        e_b = tl.sum((pad_end[None, :] <= start[:, None]).to(tl.int32), axis=1)
        tl.store(bexp_ptr + offs_b, tl.where(start < total, e_b, -1), mask=offs_b < max_blocks)
    tl.debug_barrier()  # the sentinel stores land before the scatter's (one program, many threads)
    # Rank chunk by chunk: an assignment's earlier assignments to its expert are those of earlier
    # chunks (seen, the running per-expert count) and the earlier lanes of its own chunk (the
    # exclusive cumsum of the chunk's one-hot rows). CH x EP cells a chunk, TK * EP in all.
    seen = tl.zeros([EP], dtype=tl.int32)
    for i0 in range(0, tk, CH):
        offs_i = i0 + lanes
        b_i = _bucket(ids_ptr, offs_i, tk, num_experts)
        onehot = (b_i[:, None] == offs_e[None, :]).to(tl.int32)  # all zero for b_i = -1
        before = tl.cumsum(onehot, axis=0) - onehot
        base = pad_start + seen
        slot = tl.sum(onehot * (base[None, :] + before), axis=1)
        tl.store(sorted_ptr + slot, offs_i, mask=b_i >= 0)
        seen += tl.sum(onehot, axis=0)


@triton.jit
def _moe_align_wide_kernel(
    ids_ptr,
    sorted_ptr,
    bexp_ptr,
    tk,
    num_experts,
    max_blocks,
    BLOCK_M: tl.constexpr,
    PADB: tl.constexpr,  # BLOCK_M rounded up to a power of 2: lanes for the padding slots
    NB: tl.constexpr,
    CH: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)  # the expert ids are the gate's output
    e = tl.program_id(0)  # this program's expert
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, CH)
    bins = tl.arange(0, NB)
    # Every expert's count: padding lanes and foreign ids go to bin NB - 1 (>= E), never read.
    counts = tl.zeros([NB], dtype=tl.int32)
    for i0 in range(0, tk, CH):
        b = _bucket(ids_ptr, i0 + lanes, tk, num_experts)
        counts += tl.histogram(tl.where(b >= 0, b, NB - 1), NB)
    counts = tl.where(bins < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    total = tl.sum(padded, axis=0)
    start = tl.sum(tl.where(bins < e, padded, 0), axis=0)  # this expert's first slot
    count = tl.sum(tl.where(bins == e, counts, 0), axis=0)
    my_padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    # This expert's assignments in id order: slot = start + rank (stable, as the reference).
    seen = start
    for i0 in range(0, tk, CH):
        offs_i = i0 + lanes
        hit = (_bucket(ids_ptr, offs_i, tk, num_experts) == e).to(tl.int32)
        rank = tl.cumsum(hit, axis=0) - hit
        tl.store(sorted_ptr + seen + rank, offs_i, mask=hit > 0)
        seen += tl.sum(hit, axis=0)
    # Its padding (fewer than BM slots) holds the sentinel TK; its blocks hold e.
    offs_m = tl.arange(0, PADB)
    pad = start + count + offs_m
    tl.store(sorted_ptr + pad, tk + offs_m * 0, mask=pad < start + my_padded)
    for j0 in range(0, my_padded // BLOCK_M, CH):
        offs_j = j0 + lanes
        tl.store(
            bexp_ptr + start // BLOCK_M + offs_j, e + offs_j * 0, mask=offs_j < my_padded // BLOCK_M
        )
    # Past the padded total: sentinel slots and -1 blocks, CH at a time, strided over programs.
    cap = max_blocks * BLOCK_M
    for s0 in range(total + e * CH, cap, nprog * CH):
        offs_s = s0 + lanes
        tl.store(sorted_ptr + offs_s, tk + offs_s * 0, mask=offs_s < cap)
    for b0 in range(total // BLOCK_M + e * CH, max_blocks, nprog * CH):
        offs_b = b0 + lanes
        tl.store(bexp_ptr + offs_b, offs_b * 0 - 1, mask=offs_b < max_blocks)


def moe_align(
    expert_ids_TK: torch.Tensor, num_experts: int, block_m: int, kernel: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort assignments by expert, padded per expert to block_m.

    Returns sorted_ids [max_blocks * block_m] int32 (assignment ids, stable within an expert,
    sentinel TK for padding) and block_expert [max_blocks] int32 (expert of each block, -1 past the
    end). max_blocks = `max_aligned_blocks` bounds the padded total without reading it back to
    the host. Ids outside [0, E) (other ranks' experts) get no slot. No host syncs: it can run
    inside a CUDA graph capture. `kernel` ("small" or "wide") picks a Triton kernel (the
    bench and tests time and check each); None picks by size.
    """
    check_tensor(expert_ids_TK, "expert_ids", dtypes=(torch.int32, torch.int64))
    if num_experts < 1 or block_m < 1:
        raise ValueError(f"num_experts={num_experts} and block_m={block_m} must be >= 1")
    tk = expert_ids_TK.numel()
    if kernel is not None and kernel not in ALIGN_KERNELS:
        raise ValueError(f"kernel={kernel!r}: choose from {ALIGN_KERNELS} or None (by size)")
    # MOERAY_FUSED_ALIGN=0 keeps the reference: an A/B switch for the engine bench.
    if switched_off("ALIGN") or not use_triton(expert_ids_TK):
        return moe_align_ref(expert_ids_TK, num_experts, block_m)
    if kernel is None:
        kernel = "small" if tk <= small_kernel_max_tk(num_experts) else "wide"
    ids = expert_ids_TK.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    max_blocks = max_aligned_blocks(tk, num_experts, block_m)
    dev = ids.device
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    pdl = pdl_launch(dev)
    if kernel == "small":
        _moe_align_kernel[(1,)](
            ids,
            sorted_ids,
            block_expert,
            tk,
            num_experts,
            max_blocks,
            BLOCK_M=block_m,
            EP=triton.next_power_of_2(num_experts),
            CH=_chunk(num_experts),
            PDL=pdl,
            num_warps=4,
            launch_pdl=pdl,
        )
    else:
        _moe_align_wide_kernel[(num_experts,)](
            ids,
            sorted_ids,
            block_expert,
            tk,
            num_experts,
            max_blocks,
            BLOCK_M=block_m,
            PADB=triton.next_power_of_2(block_m),
            NB=triton.next_power_of_2(num_experts + 1),
            CH=_WIDE_CHUNK,
            PDL=pdl,
            num_warps=4,
            launch_pdl=pdl,
        )
    return sorted_ids, block_expert
