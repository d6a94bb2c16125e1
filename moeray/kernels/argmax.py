"""Row argmax for greedy decoding over a vocabulary: `argmax_rows` (Triton), its reference
`argmax_rows_ref` (torch.argmax), and `argmax_rows_applies`, the test by which the sampler chooses
it.

Legend: B rows, V columns (the vocabulary), C chunks of BLOCK columns a row.

torch.argmax runs a [1, V] row as one 512-thread block: 27.6 us at DeepSeek-V3's 129,280 columns
and 8.3 us at Moonlight's 163,840 on an H200 (after an fp32 copy of the logits), where the row is
0.26-0.33 MB. Here one launch of B x C programs: program (b, c) finds chunk c's maximum and its
first column, stores the pair, and counts itself in on row b's counter (a barrier, then one acq_rel
atomic); the row's last program to count in reduces the C pairs and sets the counter back to zero.

Opt-in (MOERAY_FUSED_ARGMAX=1, `Sampler.greedy_ids`) until timed on a GPU (recipe `argmax`). The
same reduction in four torch launches (chunk maxima, their argmax, two gathers) measured 13.9 us
at V3 batch 1 against 27.6 + the fp32 copy, and 13.7 against 8.3 + the copy at Moonlight's
(benchmarks/notes-engine.md): the one launch has to beat both.

What it returns is torch.argmax's: the first column holding the row's maximum, and a NaN counts as
larger than any number (the first NaN's column). Chunks are in column order, so among chunks whose
maximum ties, the smallest stored column is the row's first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import cdiv, check_tensor, use_triton

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Columns a program reads: 32 a thread at 4 warps; V3's row is 32 chunks, Moonlight's 40.
BLOCK = 4096
# Chunks a row at most (the last program holds the row's pairs in one block): V <= 1,048,576.
MAX_CHUNKS = 256
# Rows a Sampler's counters cover (int32 each); wider batches take torch.argmax.
MAX_ROWS = 4096
# Below this many columns a row is a few warps' work: torch.argmax's one block is as fast.
MIN_COLUMNS = 2 * BLOCK
_NONE = tl.constexpr(2**31 - 1)  # "no column": larger than any column index


@triton.jit
def _first_max(x, cols, ok):
    """(value, column) of the smallest column among the `ok` entries of x (fp32) that hold its
    maximum, a NaN above any number: (NaN, the smallest column of a NaN) where x has one."""
    nan = (x != x) & ok
    first_nan = tl.min(tl.where(nan, cols, _NONE), axis=0)
    xs = tl.where(nan | (ok == 0), float("-inf"), x)
    m = tl.max(xs, axis=0)
    first = tl.min(tl.where((xs == m) & ok, cols, _NONE), axis=0)
    has_nan = first_nan < _NONE
    return tl.where(has_nan, float("nan"), m), tl.where(has_nan, first_nan, first)


@triton.jit
def _argmax_rows_kernel(
    x_ptr,
    val_ptr,  # fp32 [B, C]: each chunk's maximum
    col_ptr,  # int32 [B, C]: its first column
    out_ptr,  # int64 [B]
    cnt_ptr,  # int32 [>= B], zero; left zero
    V,
    stride_x,
    C,
    BLOCK: tl.constexpr,
    CP: tl.constexpr,  # C padded to a power of two
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    ok = cols < V
    x = tl.load(x_ptr + b.to(tl.int64) * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    val, col = _first_max(x, cols, ok)
    tl.store(val_ptr + b * C + c, val)
    tl.store(col_ptr + b * C + c, col)
    # Every thread's stores issued before the release; the row's last program sees them all.
    tl.debug_barrier()
    if tl.atomic_add(cnt_ptr + b, 1, sem="acq_rel") == C - 1:
        offs = tl.arange(0, CP)
        okc = offs < C
        # .cg: written by other SMs; read from L2, never from a stale line of this SM's L1
        vals = tl.load(val_ptr + b * C + offs, mask=okc, other=0.0, cache_modifier=".cg")
        firsts = tl.load(col_ptr + b * C + offs, mask=okc, other=_NONE, cache_modifier=".cg")
        # The chunks' pairs as a row of their own, each labelled by its stored column: the smallest
        # label among the chunks holding the row's maximum (or a NaN) is the row's first.
        _, first = _first_max(vals, firsts, okc)
        tl.store(out_ptr + b, first.to(tl.int64))
        tl.atomic_xchg(cnt_ptr + b, 0)  # no program of this launch counts on it again


def argmax_rows_ref(x_BV: torch.Tensor) -> torch.Tensor:
    """int64 [B]: each row's first maximal column (torch.argmax)."""
    return x_BV.argmax(-1)


def argmax_rows_applies(x_BV: torch.Tensor) -> bool:
    """Whether `argmax_rows` takes x as it is: [B <= MAX_ROWS, V] in bf16, fp16 or fp32, unit
    stride over V, MIN_COLUMNS <= V <= MAX_CHUNKS * BLOCK, on CUDA (or the interpreter)."""
    return (
        x_BV.dim() == 2
        and x_BV.dtype in DTYPES
        and x_BV.stride(-1) == 1
        and 1 <= x_BV.shape[0] <= MAX_ROWS
        and MIN_COLUMNS <= x_BV.shape[1] <= MAX_CHUNKS * BLOCK
        and use_triton(x_BV)
    )


def argmax_rows(x_BV: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """`argmax_rows_ref` in one launch: x [B, V] (bf16, fp16 or fp32; unit stride over V);
    `counters` an int32 [>= B] of zeros on x's device (left zero; one launch at a time per
    tensor: a row whose counter is not zero at the launch is never reduced, and its id is left
    unwritten). Returns int64 [B]."""
    check_tensor(x_BV, "x", dtypes=DTYPES, ndim=2)
    check_tensor(counters, "counters", dtypes=(torch.int32,), ndim=1, device=x_BV.device)
    B, V = x_BV.shape
    if x_BV.stride(-1) != 1:
        raise ValueError(f"x has strides {tuple(x_BV.stride())}: expected unit stride over V")
    C = cdiv(V, BLOCK)
    if not 1 <= C <= MAX_CHUNKS:
        raise ValueError(f"x has {V} columns: expected 1 to {MAX_CHUNKS * BLOCK}")
    if counters.numel() < B:
        raise ValueError(f"counters has {counters.numel()} entries for {B} rows: expected >= {B}")
    dev = x_BV.device
    vals = torch.empty(B, C, dtype=torch.float32, device=dev)
    cols = torch.empty(B, C, dtype=torch.int32, device=dev)
    out = torch.empty(B, dtype=torch.int64, device=dev)
    if B == 0:
        return out
    _argmax_rows_kernel[(B, C)](
        x_BV,
        vals,
        cols,
        out,
        counters,
        V,
        x_BV.stride(0),
        C,
        BLOCK=BLOCK,
        CP=triton.next_power_of_2(C),
        num_warps=4,
    )
    return out
