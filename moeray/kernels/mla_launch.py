"""How MLA decode's split kernels are launched (kernels/mla_decode.py): rows of heads a program,
warps, and KV splits, by batch, rows, block-table width and SM count; the Triton kernel's half
pages. Arithmetic and switches: the kernel modules and their benchmarks share it."""

from __future__ import annotations

from moeray.kernels.common import cdiv, switched_on

# 64-row head blocks from this many (sequence, 64-row block) pairs at 64+ rows where the wgmma
# kernels take them (sm_90; MOERAY_FUSED_MLA_WIDE=0: half a wave of SMs, the Triton kernel's rule
# below): 8 sequences at 128 heads, 4 at 128 heads x 2 MTP tokens. One H100, 128 heads, graph us
# of the WS kernel in 64-row blocks against 16-row Triton ones (benchmarks/results/kernels-
# nvidia-h100-80gb-hbm3-mla-{rows,wide}.json): block tables as wide as the context, 19.5 / 21.4
# at 8 x 1K, 35 / 67 at 8 x 4K, 52 / 117 at 16 x 4K, 55 / 118 at 32 x 2K; tables 2,560 pages wide
# (a decode graph's width at V3's max_model_len), 20.1 / 21.4 at 8 x 1K, 25.4 / 35.6 at 16 x 1K.
# Below 8 sequences the 16-row blocks win at short contexts, by 5.6x at 1 x 1K in the wide table
# (66 mostly empty splits), and the WS kernel only at long ones (36 / 66 at 1 x 32K): a graph
# captured at max_model_len's width cannot tell them apart.
WGMMA_MIN_BLOCKS = 16


def decode_launch(
    b: int,
    rows: int,
    max_pages: int,
    sms: int,
    block_h: int | None = None,
    num_warps: int | None = None,
    num_splits: int | None = None,
    wgmma: bool = False,
) -> tuple[int, int, int]:
    """(block_h, num_warps, num_splits) of the split kernel for b sequences of `rows` query rows
    (heads x tokens) over a block table `max_pages` wide on a GPU of `sms` SMs; a value passed in
    is kept. `wgmma`: the wgmma kernels can take 64-row blocks (WGMMA_MIN_BLOCKS)."""
    if block_h is None:
        # 64-row head blocks read each page from memory/L2 in fewer programs: 128 heads ran 1.7x
        # faster in them than in 16-row ones at batch 64, 4K context (H100: 0.32 vs 0.54 ms). With
        # few sequences they leave the GPU idle instead: at batch 1, 128 heads, 160 / 1,024 cached
        # tokens 16-row blocks took 6.2 / 10.8 us against 11.2 / 18.0 for the best 64-row config
        # (H200, results/mla-decode-sweep-nvidia-h200.json). So 64 only once the sequences alone
        # give 64-row blocks half a wave, or on the wgmma kernels WGMMA_MIN_BLOCKS (above).
        few = b * cdiv(rows, 64) < (WGMMA_MIN_BLOCKS if wgmma and rows >= 64 else sms // 2)
        block_h = 16 if rows <= 16 or few else 64
    if num_warps is None:
        num_warps = 4 if block_h <= 16 else 8
    if num_splits is None:
        # Fill one wave of program slots (2 per SM for 16-row blocks, 1 for 64-row) without spilling
        # into a second partial wave: at batch 64 x 16 heads, 4 splits took 0.125 ms, 5 took 0.199.
        # Splits of 4 pages (256 tokens) on long tables, but at least 8 splits (one page each on
        # shorter ones): on the H200 sweep every decode case ran faster with each added split
        # (16 heads, batch 1, 3 pages: 9.7 / 7.9 / 5.9 us at 1 / 2 / 3 splits; 16 pages: 12.3 us
        # at 4 splits, 10.6 at 6). The kernel splits a sequence's own pages, not the table's
        # width, so in a graph captured for long contexts short sequences leave splits empty.
        slots = sms * (2 if block_h <= 16 else 1)
        wanted = max(cdiv(max_pages, 4), min(max_pages, 8))
        num_splits = max(1, min(slots // (b * cdiv(rows, block_h)), wanted))
    return block_h, num_warps, num_splits


def mla_subpage(page: int) -> bool:
    """Whether the Triton split kernel may walk a sequence in half pages
    (MOERAY_FUSED_MLA_SUBPAGE=1, opt-in; pages of 32+ tokens).
    The kernel takes half pages only for a sequence with fewer pages than splits, where whole
    pages leave splits idle: at Moonlight's batch 1 with 160 cached tokens, 5 programs of 32
    tokens instead of 3 of 64 (the split kernel took 5.6 us a layer exclusive there on an H200;
    on the H200 sweep each split added at 3 pages took ~2 us off: 9.7 / 7.9 / 5.9 us at 1 / 2 / 3
    splits). Half pages for every sequence (the first form) ran Moonlight FP8's batch 1 1.2-1.8%
    faster on an H100 and 2K-token contexts 0-0.5% slower (benchmarks/notes-engine.md), where
    the sequences have more pages than splits and the shorter loop step only costs."""
    return switched_on("MLA_SUBPAGE") and page >= 32
