"""How MLA decode's split kernels are launched (kernels/mla_decode.py): rows of heads a program,
warps, and KV splits, by batch, rows, block-table width and SM count. Pure arithmetic: the kernel
modules and their benchmarks share it."""

from __future__ import annotations

from moeray.kernels.common import cdiv

# 64-row head blocks on the wgmma kernels (sm_90) from this many block-table tokens over the
# batch (opt-in, MOERAY_FUSED_MLA_WIDE=1; else 64 only from 33 sequences at 128 heads). 128 heads,
# H100, WS kernel in 64-row blocks against 16-row Triton ones: 1.8-2.3x at 8 x 4K to 1 x 32K,
# even at 8 x 1K, 1.2-1.5x slower at 1 x 1K / 4K (benchmarks/results/kernels-nvidia-h100-80gb-
# hbm3-mla-rows.json). Opt-in: a CUDA graph's table is max_model_len wide whatever the lengths,
# so there it would pick 64 for every batch; not yet timed so.
WIDE_TOKENS = 8192


def decode_launch(
    b: int,
    rows: int,
    max_pages: int,
    sms: int,
    block_h: int | None = None,
    num_warps: int | None = None,
    num_splits: int | None = None,
    wide_tokens: int | None = None,
) -> tuple[int, int, int]:
    """(block_h, num_warps, num_splits) of the split kernel for b sequences of `rows` query rows
    (heads x tokens) over a block table `max_pages` wide on a GPU of `sms` SMs; a value passed in
    is kept. `wide_tokens`: the tokens the tables span (b x width x page) where the wgmma kernels
    can take 64-row blocks, else None."""
    if block_h is None and wide_tokens is not None and rows >= 64 and wide_tokens >= WIDE_TOKENS:
        block_h = 64
    if block_h is None:
        # 64-row head blocks read each page from memory/L2 in fewer programs: 128 heads ran 1.7x
        # faster in them than in 16-row ones at batch 64, 4K context (H100: 0.32 vs 0.54 ms). With
        # few sequences they leave the GPU idle instead: at batch 1, 128 heads, 160 / 1,024 cached
        # tokens 16-row blocks took 6.2 / 10.8 us against 11.2 / 18.0 for the best 64-row config
        # (H200, results/mla-decode-sweep-nvidia-h200.json). So 64 only once the sequences alone
        # give 64-row blocks half a wave.
        few = b * cdiv(rows, 64) < sms // 2
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
