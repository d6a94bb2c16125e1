"""l2_prefetch: pull byte regions of device memory (weights) into the GPU's L2 ahead of the kernel
that reads them, in one launch: `l2_prefetch`, the region table it reads (`region_table`), and the
checksum `region_checksum_ref` by which the TOUCH mode is tested.

Legend: R regions (address, bytes) of at most CHUNK bytes, one program a region; W 4-byte words.

Why: at decode batch 1 a step alternates between bandwidth-bound weight reads (the projections'
GEMVs, the MoE) and latency-bound kernels that move almost no bytes (MLA decode over a few pages,
norms, the router and the gate). On an H200 a Moonlight-16B-A3B layer spends ~40 us (PDL off) in
its attention and glue kernels, whose weight bytes (~28 MB bf16) would take ~6 us at 4.8 TB/s:
DRAM idles most of that time. Weights read later in the layer (o_proj, the shared experts, whose
ids are fixed) can be fetched into L2 (50 MB) in that time and then read from it by their kernel.
The launch itself is tiny (it issues requests and exits; no data is written).

Modes (`MODE`; the wrapper's `mode`):
  LINES  one `prefetch.global.L2::evict_last` per 128-byte line: nothing returns to the SM; the
         evict_last priority keeps the lines past the streaming reads of the routed experts.
  BULK   `cp.async.bulk.prefetch.L2.global` (sm_90's bulk copy engine), one per 2 KB piece.
  TOUCH  loads (.cg: L2 only) of every 4-byte word, summed per program into `sink[R]` (int32,
         wrapping): the data does reach the SM. The only mode the CPU interpreter runs (it has no
         inline PTX), and the sum makes the coverage testable (`region_checksum_ref`).
None of them changes memory the model reads: LINES and BULK write nothing, TOUCH writes only its
sink.

PDL (`common.pdl_launch`): a program issues its region's requests before `pdl_wait` (weights
only: the caller passes regions that no kernel of the step writes) and, in TOUCH, stores its sum
after it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import interpreting, pdl_launch, pdl_wait

MODES = ("LINES", "BULK", "TOUCH")
CHUNK = 64 * 1024  # bytes a program covers: 512 lines, so ~500 programs for 32 MB
LINE = 128  # L2 line bytes (Hopper): one prefetch each
BULK_PIECES = 32  # BULK: one warp, one 2 KB piece a lane (a multiple of 16 bytes, as PTX asks)
ALIGN = 16  # every region's address and size (bulk prefetch's rule; whole words for TOUCH)
TOUCH_WORDS = 1024  # TOUCH: 4 KB a loop step


@triton.jit
def _l2_prefetch_kernel(
    base_ptr,  # int32 pointer: every region is an offset (in words) from it
    table_ptr,  # int64 [R, 2]: (word offset from base, bytes)
    sink_ptr,  # int32 [R] (TOUCH only)
    MODE: tl.constexpr,  # 0 LINES, 1 BULK, 2 TOUCH
    CHUNK_BYTES: tl.constexpr,
    LINE_BYTES: tl.constexpr,
    PIECES: tl.constexpr,
    WORDS: tl.constexpr,
    PDL: tl.constexpr,
):
    r = tl.program_id(0)
    off = tl.load(table_ptr + 2 * r)
    nbytes = tl.load(table_ptr + 2 * r + 1)
    start = base_ptr + off
    if MODE == 0:
        lines = tl.arange(0, CHUNK_BYTES // LINE_BYTES)
        # lanes past the region prefetch its first line again (harmless) rather than mask
        words = tl.where(lines * LINE_BYTES < nbytes, lines * (LINE_BYTES // 4), 0)
        tl.inline_asm_elementwise(
            "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;",
            "=r,l",
            [start + words],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
        pdl_wait(PDL)
    elif MODE == 1:
        piece = CHUNK_BYTES // PIECES
        p = tl.arange(0, PIECES)
        size = tl.minimum(tl.maximum(nbytes - p * piece, 0), piece).to(tl.int32)
        words = tl.where(size > 0, p * (piece // 4), 0)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
            "mov.u32 $0, 0; }",
            "=r,l,r",
            [start + words, size],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
        pdl_wait(PDL)
    else:
        acc = tl.zeros((WORDS,), dtype=tl.int32)
        n_words = nbytes // 4
        for w0 in range(0, CHUNK_BYTES // 4, WORDS):
            w = w0 + tl.arange(0, WORDS)
            acc += tl.load(start + w, mask=w < n_words, other=0, cache_modifier=".cg")
        pdl_wait(PDL)
        tl.store(sink_ptr + r, tl.sum(acc, axis=0))


def prefetchable(t: torch.Tensor) -> bool:
    """Whether `region_table` takes t: contiguous, non-empty, its address and size multiples of
    ALIGN."""
    nbytes = t.numel() * t.element_size()
    return t.is_contiguous() and nbytes > 0 and t.data_ptr() % ALIGN == 0 and nbytes % ALIGN == 0


def region_table(
    tensors: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The table `l2_prefetch` reads for these tensors' bytes: (int64 [R, 2] of (word offset from
    the base, bytes), base: the first tensor viewed as int32), each tensor cut into CHUNK-byte
    regions. Each must be contiguous on `device`, its address and size multiples of ALIGN bytes
    (ValueError naming the tensor otherwise). Model weights do not move, so the table is made
    once and holds as long as the tensors live (the caller keeps them)."""
    if not tensors:
        raise ValueError("region_table needs at least one tensor")
    base = tensors[0]
    rows: list[tuple[int, int]] = []
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if t.device != device or not t.is_contiguous():
            raise ValueError(
                f"tensor {i} ({tuple(t.shape)}, {t.dtype}) must be contiguous on {device}; "
                f"got device {t.device}, contiguous={t.is_contiguous()}"
            )
        if t.data_ptr() % ALIGN or nbytes % ALIGN or nbytes == 0:
            raise ValueError(
                f"tensor {i} ({tuple(t.shape)}, {t.dtype}): address {t.data_ptr()} and size "
                f"{nbytes} bytes must be non-zero multiples of {ALIGN}"
            )
        delta = t.data_ptr() - base.data_ptr()
        for c in range(0, nbytes, CHUNK):
            rows.append(((delta + c) // 4, min(CHUNK, nbytes - c)))
    table = torch.tensor(rows, dtype=torch.int64, device=device)
    return table, _as_words(base)


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """A one-word int32 view at t's address (its bytes are a multiple of 16: region_table)."""
    return t.reshape(-1).view(torch.uint8)[:4].view(torch.int32)


def l2_prefetch(
    table: torch.Tensor, base: torch.Tensor, mode: str = "LINES", sink: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Launch the prefetch of `region_table`'s regions (module docstring). TOUCH returns the
    per-region int32 sums (into `sink` when given, [R] int32); the others return None. LINES and
    BULK need a compiled CUDA kernel (sm_80; BULK sm_90); the interpreter runs TOUCH only."""
    if mode not in MODES:
        raise ValueError(f"l2_prefetch mode {mode!r}: choose one of {MODES}")
    if table.dim() != 2 or table.shape[1] != 2 or table.dtype != torch.int64:
        raise ValueError(
            f"l2_prefetch table must be int64 [R, 2] (region_table); got {table.dtype} "
            f"{tuple(table.shape)}"
        )
    if mode != "TOUCH" and (interpreting() or table.device.type != "cuda"):
        raise ValueError(
            f"l2_prefetch mode {mode} needs a compiled CUDA kernel; on {table.device} "
            f"(interpreter: {interpreting()}) only TOUCH runs"
        )
    r = table.shape[0]
    if mode == "TOUCH":
        if sink is None:
            sink = torch.empty(r, dtype=torch.int32, device=table.device)
        elif sink.shape != (r,) or sink.dtype != torch.int32:
            raise ValueError(f"sink must be int32 [{r}]; got {sink.dtype} {tuple(sink.shape)}")
    out = sink if mode == "TOUCH" else None
    pdl = pdl_launch(table.device)
    _l2_prefetch_kernel[(r,)](
        base,
        table,
        sink if sink is not None else table,
        MODE=MODES.index(mode),
        CHUNK_BYTES=CHUNK,
        LINE_BYTES=LINE,
        PIECES=BULK_PIECES,
        WORDS=TOUCH_WORDS,
        PDL=pdl,
        num_warps=1,
        launch_pdl=pdl,
    )
    return out


def region_checksum_ref(tensors: list[torch.Tensor]) -> torch.Tensor:
    """TOUCH's sums in PyTorch: per CHUNK-byte region of each tensor in order, the int32 sum
    (wrapping) of its bytes read as int32 words."""
    sums = []
    for t in tensors:
        words = t.reshape(-1).view(torch.uint8).view(torch.int32).to(torch.int64)
        per = CHUNK // 4
        for c in range(0, words.numel(), per):
            s = int(words[c : c + per].sum()) & 0xFFFFFFFF
            sums.append(s - (1 << 32) if s >= 1 << 31 else s)
    return torch.tensor(sums, dtype=torch.int32)


def regions_bytes(table: torch.Tensor) -> int:
    """The bytes a table covers."""
    return int(table[:, 1].sum()) if table.numel() else 0
