"""MoE token alignment: the assignments sorted by expert, each expert's run padded to whole blocks
of BM rows, as the fused MoE kernels (`moeray.kernels.moe`) read them. `moe_align` is the one
entry: the Triton kernel `_moe_align_kernel` on the GPU (and on CPU under the interpreter), the
PyTorch reference `moe_align_ref` on CPU without the interpreter and with MOERAY_FUSED_ALIGN=0.
Both return the same tensors, element for element.

Legend: TK assignments (token t's k-th choice is assignment t * K + k), E local experts, BM rows
per block, NB = E + 1 bins padded to a power of 2, CH ids per loop step.

The kernel runs E programs, one per expert, each O(TK + NB): a histogram of all ids gives every
expert's count, so each program knows its own padded start (the sum of the padded counts below
it); it then walks the ids once more and writes its own assignments at start + rank (a cumsum of
the matches, in id order: stable, like the reference's sort), its padding slots and its blocks'
expert ids. The slots and blocks past the padded total are shared out over the programs by
stride. Every output element has exactly one writer, so no program waits for another.

Why a kernel: in PyTorch the alignment is ~35 kernels per MoE layer (comparisons, scatter_add
counts, two cumsums, a stable radix sort, gathers, a fill and a scatter, searchsorted), each ~1-2
us at decode sizes for a few hundred bytes. Why one program per expert: the alternative, one
program ranking the assignments chunk by chunk in O(TK * E) cells, is slower at every size
measured. Microseconds in a CUDA graph on an H200, both kernels bit-equal to the reference
(decode_glue, results/kernels-nvidia-h200-decode-next.json):

    experts (top-k)   path                    1      8     32     64    170 tokens
    64 (top-6)        this kernel           2.8    2.9    3.1    3.2    3.1
                      one program           3.7    3.7    7.9   13.3   33.0
                      PyTorch reference    58.6   60.6   81.5   85.5   93.2
    256 (top-8)       this kernel           4.5    4.7    4.9    4.9    8.8
                      one program           4.7   13.1   47.5   81.8  195.4
                      PyTorch reference    59.9   61.3   84.7   90.3   96.7
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    FP8_BLOCK,
    FP8_DTYPE,
    cdiv,
    check_tensor,
    interpreting,
    pdl_launch,
    pdl_wait,
    switched_off,
    use_triton,
)
from moeray.kernels.fp8.quant import act_quant, quant_row_block

# Ids per loop step: 1,024 (8 a thread at 4 warps) cover a decode batch of 128 at top-8 in one
# step.
_CHUNK = 1024
# Rows of x a quantizing program of `moe_align_quant` takes, as act_quant's programs do.
_QUANT_M = 16


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
    PADB: tl.constexpr,  # BLOCK_M rounded up to a power of 2: lanes for the padding slots
    NB: tl.constexpr,
    CH: tl.constexpr,
    PDL: tl.constexpr,
    x_ptr,
    q_ptr,
    s_ptr,
    x_rows,
    x_cols,
    stride_xm,
    stride_qm,
    stride_sm,
    QUANT: tl.constexpr,  # programs E.. quantize x as act_quant does (`moe_align_quant`)
    QUANT_M: tl.constexpr,  # rows of x a quantizing program takes (one 128-group of each)
    EXACT: tl.constexpr,  # act_quant's EXACT (the interpreter's rounding)
):
    """Grid (E,): program e writes expert e's slots and blocks and its share of the tail past
    the padded total, so every element of sorted_ptr [max_blocks * BLOCK_M] and bexp_ptr
    [max_blocks] has one writer. With QUANT the grid has more programs, each writing act_quant's
    e4m3 values and scales of QUANT_M rows x one 128-group of x."""
    pdl_wait(PDL)  # the expert ids are the gate's output
    e = tl.program_id(0)  # this program's expert
    if QUANT:
        if e >= num_experts:
            groups = tl.cdiv(x_cols, 128)
            quant_row_block(
                x_ptr, q_ptr, s_ptr, x_rows, x_cols, stride_xm, stride_qm, stride_sm, 1,
                (e - num_experts) // groups, (e - num_experts) % groups, QUANT_M, 128, EXACT,
            )  # fmt: skip
            return
    nprog = num_experts  # the aligning programs (the quantizing ones come after them)
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
    expert_ids_TK: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort assignments by expert, padded per expert to block_m.

    Returns sorted_ids [max_blocks * block_m] int32 (assignment ids, stable within an expert,
    sentinel TK for padding) and block_expert [max_blocks] int32 (expert of each block, -1 past the
    end). max_blocks = `max_aligned_blocks` bounds the padded total without reading it back to
    the host. Ids outside [0, E) (other ranks' experts) get no slot. No host syncs: it can run
    inside a CUDA graph capture.
    """
    if _reference(expert_ids_TK, num_experts, block_m):
        return moe_align_ref(expert_ids_TK, num_experts, block_m)
    sorted_ids, block_expert, _ = _align(expert_ids_TK, num_experts, block_m, None)
    return sorted_ids, block_expert


def moe_align_quant(
    expert_ids_TK: torch.Tensor, num_experts: int, block_m: int, x_TH: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe_align` and `act_quant(x_TH)` (the FP8 fused MoE's two launches before its GEMMs) in
    one launch: programs past the E aligning ones quantize x [T, H] (a 2-D view with unit
    last-dim stride) with act_quant's math. Returns (sorted_ids, block_expert, q [T, H] e4m3,
    scale [T, H/128] fp32), each what the two functions return."""
    check_tensor(x_TH, "x", dtypes=(torch.bfloat16, torch.float16, torch.float32), ndim=2)
    if x_TH.stride(-1) != 1:
        raise ValueError(f"x needs a unit last-dim stride, got strides {x_TH.stride()}")
    if _reference(expert_ids_TK, num_experts, block_m):
        return (*moe_align_ref(expert_ids_TK, num_experts, block_m), *act_quant(x_TH))
    sorted_ids, block_expert, qs = _align(expert_ids_TK, num_experts, block_m, x_TH)
    assert qs is not None  # (x_TH given)
    return sorted_ids, block_expert, *qs


def _reference(expert_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> bool:
    """Checks the arguments (ValueError naming a bad one); whether the PyTorch reference runs:
    on CPU outside the interpreter, or with MOERAY_FUSED_ALIGN=0 (the engine bench's A/B
    switch)."""
    check_tensor(expert_ids_TK, "expert_ids", dtypes=(torch.int32, torch.int64))
    if num_experts < 1 or block_m < 1:
        raise ValueError(f"num_experts={num_experts} and block_m={block_m} must be >= 1")
    return switched_off("ALIGN") or not use_triton(expert_ids_TK)


def _align(
    expert_ids_TK: torch.Tensor, num_experts: int, block_m: int, x_TH: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The kernel's launch (arguments checked by `_reference`): moe_align's outputs, and x_TH's
    act_quant from the same launch where x_TH is given."""
    tk = expert_ids_TK.numel()
    ids = expert_ids_TK.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    max_blocks = max_aligned_blocks(tk, num_experts, block_m)
    dev = ids.device
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    pdl = pdl_launch(dev)
    quant = x_TH is not None
    if x_TH is None:
        x_TH = q = s = ids  # unused pointers
        rows = cols = 0
        quant_programs = 0
    else:
        rows, cols = x_TH.shape
        q = torch.empty((rows, cols), dtype=FP8_DTYPE, device=dev)
        s = torch.empty((rows, cdiv(cols, FP8_BLOCK)), dtype=torch.float32, device=dev)
        quant_programs = cdiv(rows, _QUANT_M) * cdiv(cols, FP8_BLOCK)
    _moe_align_kernel[(num_experts + quant_programs,)](
        ids,
        sorted_ids,
        block_expert,
        tk,
        num_experts,
        max_blocks,
        BLOCK_M=block_m,
        PADB=triton.next_power_of_2(block_m),
        NB=triton.next_power_of_2(num_experts + 1),
        CH=_CHUNK,
        PDL=pdl,
        x_ptr=x_TH,
        q_ptr=q,
        s_ptr=s,
        x_rows=rows,
        x_cols=cols,
        stride_xm=x_TH.stride(0),
        stride_qm=q.stride(0),
        stride_sm=s.stride(0),
        QUANT=quant,
        QUANT_M=_QUANT_M,
        EXACT=interpreting(),
        num_warps=4,
        launch_pdl=pdl,
    )
    return sorted_ids, block_expert, (q, s) if quant else None
