"""MoE token alignment: the assignments sorted by expert, each expert's run padded to whole blocks
of BM rows, as the fused MoE kernels (`moeray.kernels.moe`) read them. `moe_align` is the one
entry; it runs the one-launch Triton kernel `_moe_align_kernel` for up to
`align_kernel_max_tk(E)` assignments (ALIGN_KERNEL_MAX_CHUNKS chunks of CH) and the PyTorch
reference `moe_align_ref` otherwise (past that, on CPU without the interpreter, and with
MOERAY_FUSED_ALIGN=0). Both return the same tensors, element for element.

Legend: TK assignments (token t's k-th choice is assignment t * K + k), E local experts, BM rows
per block, EP = E padded to a power of 2, CH assignments per loop step.

Why: in PyTorch the alignment is ~35 kernels per MoE layer (comparisons, scatter_add counts, two
cumsums, a stable radix sort, gathers, a fill and a scatter, searchsorted), each ~1-2 us at decode
sizes for a few hundred bytes: about a quarter of the ~130 kernels of a Moonlight decode layer
(issue 19's step profile: FillFunctor<long> 156 and add<long> 106 calls per step, radixSortKVInPlace
6.5 us per layer). One program does it all here: per-expert counts, padded offsets by a cumsum in
registers, the block -> expert map, then each assignment's slot = its expert's padded start + its
rank, the number of earlier assignments to the same expert (a stable sort, like the reference's).
The rank is counted chunk by chunk in O(TK * EP): a running per-expert count over the earlier
chunks plus the exclusive cumsum, down the chunk, of its one-hot [CH, EP] matrix (assignment i's
expert == e).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import cdiv, check_tensor, pdl_launch, pdl_wait, switched_off, use_triton

# Cells per loop tile, CH x EP (64 x 64 at Moonlight's 64 experts, 16 x 256 at V3's): 32 int32
# registers a thread over num_warps=4's 128 threads (from EP = 512 CH stays at 16, over it).
_TILE_CELLS = 4096
# The kernel is one program whose time is linear in its chunks of CH assignments. An estimate, to
# be measured with `moeray bench kernels --only decode_glue` on a GPU: the earlier quadratic kernel
# (in a CUDA graph on an H200, 64 experts top-6) took 5.4 us at 6 assignments, 10.8 at 192 and 107
# at 1,020, ~0.67 us per 64 x 64 compare-and-sum step (143 more steps from 192 to 1,020). In
# Triton 3.9's sm_90 PTX a 64-assignment chunk now counts in one such step and ranks in 1,493
# instructions and 12 barriers against a step's 390 and 6: ~3-4.6 steps, ~2.5 us a chunk, or
# ~40 us per 1,000 assignments at CH = 64 (~45 us at 1,020, where the reference's ~35 launches
# took 93). A 16-assignment chunk (EP = 256) is 843 instructions and 8 barriers, ~1.2 us, ~75 us
# per 1,000. At 24 chunks the kernel is ~65 us at CH = 64 (~80 at 3.1 us a chunk), under the
# reference's 93; past that the reference's sort takes over. One chunk count for every E keeps
# CH = 16 on the safe side: 384 assignments, ~35 us by the same estimate.
ALIGN_KERNEL_MAX_CHUNKS = 24


def _chunk(num_experts: int) -> int:
    """CH, assignments per loop step: _TILE_CELLS / EP within [16, 64] (64 up to 64 experts, 32
    at 65-128, 16 from 129)."""
    return max(16, min(64, _TILE_CELLS // triton.next_power_of_2(num_experts)))


def align_kernel_max_tk(num_experts: int) -> int:
    """The most assignments the kernel aligns, ALIGN_KERNEL_MAX_CHUNKS chunks: 1,536 at
    Moonlight's 64 experts (decode batch 256 at top-6), 768 at 128, 384 at V3's 256 (batch 48 at
    top-8). More go to `moe_align_ref`."""
    return ALIGN_KERNEL_MAX_CHUNKS * _chunk(num_experts)


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


def moe_align(
    expert_ids_TK: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort assignments by expert, padded per expert to block_m.

    Returns sorted_ids [max_blocks * block_m] int32 (assignment ids, stable within an expert,
    sentinel TK for padding) and block_expert [max_blocks] int32 (expert of each block, -1 past the
    end). max_blocks = `max_aligned_blocks` bounds the padded total without reading it back to
    the host. Ids outside [0, E) (other ranks' experts) get no slot. No host syncs: it can run
    inside a CUDA graph capture.
    """
    check_tensor(expert_ids_TK, "expert_ids", dtypes=(torch.int32, torch.int64))
    if num_experts < 1 or block_m < 1:
        raise ValueError(f"num_experts={num_experts} and block_m={block_m} must be >= 1")
    tk = expert_ids_TK.numel()
    # MOERAY_FUSED_ALIGN=0 keeps the reference: an A/B switch for the engine bench.
    off = switched_off("ALIGN")
    if off or tk > align_kernel_max_tk(num_experts) or not use_triton(expert_ids_TK):
        return moe_align_ref(expert_ids_TK, num_experts, block_m)
    ids = expert_ids_TK.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    max_blocks = max_aligned_blocks(tk, num_experts, block_m)
    dev = ids.device
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    ep = triton.next_power_of_2(num_experts)
    ch = _chunk(num_experts)
    pdl = pdl_launch(dev)
    _moe_align_kernel[(1,)](
        ids,
        sorted_ids,
        block_expert,
        tk,
        num_experts,
        max_blocks,
        BLOCK_M=block_m,
        EP=ep,
        CH=ch,
        PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )
    return sorted_ids, block_expert
