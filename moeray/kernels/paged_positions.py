"""paged_positions: a paged decode step's bookkeeping in one launch: each new token's position, each
sequence's length (int64, and int32 as the MLA decode kernel reads it) and each new token's cache
slot through the sequence's block table. `paged_positions` is the checked wrapper,
`paged_positions_ref` the PyTorch reference (what the engine's paged view computes without it).

Legend: B sequences, S new tokens each, M block-table width (pages), N tokens a page.

    positions[b, s] = starts[b] + s
    seq_lens[b]     = starts[b] + S
    slots[b * S + s] = block_table[b, positions[b, s] // N] * N + positions[b, s] % N

Why: the reference is nine small PyTorch kernels (an arange, three adds, a floor division, a
gather, a cast, a multiply, a remainder) and the int32 copy of the lengths, ~13.5 us of a
Moonlight FP8 batch-1 decode graph on an H200 (benchmarks/results/engine-nvidia-h200-moonlight-
fp8-defaults4.json, their exclusive times); one program a sequence (per 256 new tokens) does it
here. Integer math: the outputs equal the reference's exactly. In a CUDA graph on an H100 the
nine ops take 14.0 us and this 1.6 us at batch 1 (benchmarks/results/kernels-nvidia-h100-80gb-
hbm3-glue.json); the engine's decode graphs replay 0.2-1.0% faster with it
(engine-nvidia-h100-80gb-hbm3-{moonlight-fp8-glue,v3-fp8-glue-v3}.json). The engine's default
(`moeray.platform.engine.paged_view.KernelPagedView`); MOERAY_FUSED_PAGED_POSITIONS=0 keeps the
reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moeray.kernels.common import cdiv, check_tensor, use_triton
from moeray.kernels.gemv import pow2_at_least

# New tokens a program: a decode step's 1-2 in one, a prefill chunk's thousands over several.
MAX_BLOCK_S = 256


class PagedPositions(NamedTuple):
    positions_BS: torch.Tensor  # int64 [B, S]
    seq_lens_B: torch.Tensor  # int64 [B]
    seq_lens_i32_B: torch.Tensor  # int32 [B]
    slots_T: torch.Tensor  # int64 [B * S], flat slot page * N + offset of each new token


def slots_ref(
    block_table_BM: torch.Tensor, positions_BS: torch.Tensor, page_size: int
) -> torch.Tensor:
    """Flat slot (page * N + offset) [B, S] int64 of each position through its row's block
    table."""
    page_BS = block_table_BM.gather(1, positions_BS // page_size).long()
    return page_BS * page_size + positions_BS % page_size


def paged_positions_ref(
    block_table_BM: torch.Tensor, starts_B: torch.Tensor, S: int, page_size: int
) -> PagedPositions:
    """The PyTorch reference: positions, lengths and slots as the formulas in the module
    docstring, in int64 (int32 for `seq_lens_i32_B`)."""
    starts_B = starts_B.long()
    positions_BS = starts_B[:, None] + torch.arange(S, device=starts_B.device)[None, :]
    seq_lens_B = starts_B + S
    slots_T = slots_ref(block_table_BM, positions_BS, page_size).flatten()
    return PagedPositions(positions_BS, seq_lens_B, seq_lens_B.to(torch.int32), slots_T)


@triton.jit
def _paged_positions_kernel(
    bt_ptr,
    starts_ptr,
    pos_ptr,
    lens_ptr,
    lens32_ptr,
    slots_ptr,
    S,
    stride_btb,
    stride_btm,
    stride_st,
    PAGE: tl.constexpr,
    SB: tl.constexpr,  # new tokens a program: S padded to a power of two, at most MAX_BLOCK_S
):
    b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_s = pid_s * SB + tl.arange(0, SB)
    ok = offs_s < S
    start = tl.load(starts_ptr + b * stride_st).to(tl.int64)
    pos = start + offs_s
    page = tl.load(bt_ptr + b * stride_btb + (pos // PAGE) * stride_btm, mask=ok, other=0)
    page = page.to(tl.int64)
    tl.store(pos_ptr + b * S + offs_s, pos, mask=ok)
    tl.store(slots_ptr + b * S + offs_s, page * PAGE + pos % PAGE, mask=ok)
    if pid_s == 0:
        tl.store(lens_ptr + b, start + S)
        tl.store(lens32_ptr + b, (start + S).to(tl.int32))


def paged_positions(
    block_table_BM: torch.Tensor, starts_B: torch.Tensor, S: int, page_size: int
) -> PagedPositions:
    """Positions, lengths and slots of B sequences of S new tokens each from their first new
    position `starts_B` (int32 or int64) and block tables `block_table_BM` (int32 or int64, rows
    of page ids, wide enough for every new position). One launch on CUDA or under the
    interpreter, else `paged_positions_ref`; the same values either way."""
    check_tensor(block_table_BM, "block_table_BM", dtypes=(torch.int32, torch.int64), ndim=2)
    check_tensor(
        starts_B,
        "starts_B",
        dtypes=(torch.int32, torch.int64),
        ndim=1,
        device=block_table_BM.device,
    )
    b = block_table_BM.shape[0]
    if starts_B.shape[0] != b:
        raise ValueError(
            f"starts_B has {starts_B.shape[0]} sequences but block_table_BM {b}: one start a row"
        )
    if S < 1 or page_size < 1:
        raise ValueError(f"S={S} and page_size={page_size}: both must be >= 1")
    if not use_triton(block_table_BM):
        return paged_positions_ref(block_table_BM, starts_B, S, page_size)
    dev = block_table_BM.device
    out = PagedPositions(
        torch.empty(b, S, dtype=torch.int64, device=dev),
        torch.empty(b, dtype=torch.int64, device=dev),
        torch.empty(b, dtype=torch.int32, device=dev),
        torch.empty(b * S, dtype=torch.int64, device=dev),
    )
    if b:
        sb = min(pow2_at_least(S), MAX_BLOCK_S)
        _paged_positions_kernel[(b, cdiv(S, sb))](
            block_table_BM,
            starts_B,
            *out,
            S,
            block_table_BM.stride(0),
            block_table_BM.stride(1),
            starts_B.stride(0),  # the engine's starts are a column of its ids upload
            PAGE=page_size,
            SB=sb,
            num_warps=1,
        )
    return out
