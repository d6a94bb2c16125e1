"""Per-expert load counting for a serving MoE layer: `count_expert_load` adds, for the first
valid_1 rows of a forward (the rest are a captured decode graph's padding rows), one to load_E at
each row's expert ids and their number to rows_1. One launch; no host sync, so it runs inside
captured decode graphs with valid_1 read from device memory at replay.

Legend: T rows (tokens), K experts per row, TK = T * K assignments, E experts.

Why a kernel: in PyTorch the count is ~6 launches per MoE layer (the row mask from an arange and
a compare, its expansion to assignments, a clamp, a scatter_add, the rows sum), each ~2-3 us
inside a decode graph for a few hundred bytes; one layer's weight read at Moonlight's shape takes
~30 us, so they cost the expert-parallel engine at ep=1 several percent of a decode step against
the plain engine, which counts nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import cdiv, check_tensor, switched_off, use_triton

_BLOCK = 1024  # assignments per program: a decode step has at most a few thousand


def count_expert_load_ref(
    expert_ids_TK: torch.Tensor, valid_1: torch.Tensor, load_E: torch.Tensor, rows_1: torch.Tensor
) -> None:
    """`count_expert_load` in PyTorch (the oracle), in place."""
    T = expert_ids_TK.shape[0]
    ids_TK = expert_ids_TK.long()
    row_ok_T = torch.arange(T, device=ids_TK.device) < valid_1
    ok_TK = row_ok_T[:, None] & (ids_TK >= 0) & (ids_TK < load_E.numel())
    load_E.scatter_add_(0, torch.where(ok_TK, ids_TK, 0).flatten(), ok_TK.flatten().long())
    rows_1 += ok_TK.sum()


@triton.jit
def _count_expert_load_kernel(
    ids_ptr, valid_ptr, load_ptr, rows_ptr, TK, K, E, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = tl.load(valid_ptr)
    ok = (offs < TK) & (offs // K < valid)
    ids = tl.load(ids_ptr + offs, mask=ok, other=-1).to(tl.int64)
    ok = ok & (ids >= 0) & (ids < E)
    # Integer atomics: the totals do not depend on the order (deterministic).
    tl.atomic_add(load_ptr + tl.where(ok, ids, 0), tl.where(ok, 1, 0).to(tl.int64), mask=ok)
    tl.atomic_add(rows_ptr, tl.sum(ok.to(tl.int64), axis=0))


def count_expert_load(
    expert_ids_TK: torch.Tensor, valid_1: torch.Tensor, load_E: torch.Tensor, rows_1: torch.Tensor
) -> None:
    """In place: load_E[e] += the number of assignments to expert e among rows t < valid_1[0] of
    expert_ids_TK [T, K] (int32/int64; ids outside [0, E) are skipped: other ranks' or padding),
    and rows_1 (one int64 element) += their total. valid_1: one int64 element on the device.
    Runs the Triton kernel on CUDA (and under the interpreter), the reference otherwise or with
    MOERAY_FUSED_LOAD=0."""
    check_tensor(expert_ids_TK, "expert_ids_TK", dtypes=(torch.int32, torch.int64), ndim=2)
    dev = expert_ids_TK.device
    check_tensor(valid_1, "valid_1", dtypes=(torch.int64,), device=dev)
    check_tensor(load_E, "load_E", dtypes=(torch.int64,), ndim=1, contiguous=True, device=dev)
    check_tensor(rows_1, "rows_1", dtypes=(torch.int64,), device=dev)
    if valid_1.numel() != 1 or rows_1.numel() != 1:
        raise ValueError(
            f"valid_1 has {valid_1.numel()} and rows_1 {rows_1.numel()} elements: one each"
        )
    if switched_off("LOAD") or not use_triton(expert_ids_TK, valid_1, load_E, rows_1):
        count_expert_load_ref(expert_ids_TK, valid_1, load_E, rows_1)
        return
    T, K = expert_ids_TK.shape
    if T * K == 0:
        return
    ids = expert_ids_TK.contiguous()
    _count_expert_load_kernel[(cdiv(T * K, _BLOCK),)](
        ids, valid_1, load_E, rows_1, T * K, K, load_E.numel(), BLOCK=_BLOCK, num_warps=4
    )
