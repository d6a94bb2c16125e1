"""The aligned fused MoE's tiles (kernels/moe.py): the block config by assignments, experts and
width (`moe_config`), the down launch's own tile (`down_config`), and which tiles mask their
padding rows (`mask_rows`). Numbers from the sweeps of scripts/moe_decode_sweep.py."""

from __future__ import annotations

from moeray.kernels.common import interpreting, is_pow2, switched_on

# Row blocks up to this many rows are decode tiles (most of a block's rows are padding).
DECODE_BLOCK_M = 32


def mask_rows(block_m: int) -> bool:
    """Whether the aligned kernels mask their padding rows' activation loads: at decode tiles
    (BLOCK_M <= 32), where most of a block's rows are padding (DeepSeek-V3 at batch 64: ~2 rows
    of 16 an expert). Unmasked, those rows read token 0's row again: on an H200 at batch 64 the
    FP8 fused MoE took 2,816 us unmasked and 2,431 masked at V3's experts, 186.9 and 153.9 at
    Moonlight's (bf16 283.5 / 266.4; results/moe-mask-rows-nvidia-h200.json). Prefill tiles are
    full and keep the unmasked loads (results/kernels-nvidia-h200-prefill-mla.json)."""
    return block_m <= DECODE_BLOCK_M


# With MOERAY_FUSED_MOE_H128=1 (opt-in), FP8 decode batches of at least this many assignments
# (T * K) run gate/up in 128-column tiles, which quantize h in their epilogue: one act_quant
# launch a layer fewer. At 8 tokens (48 assignments at Moonlight) 128-column tiles ran the whole
# fused MoE 7% slower than 32 on an H200, at 64 tokens (384) 1% faster
# (benchmarks/results/moe-decode-sweep-nvidia-h200.json, before the epilogue quantization). With
# the epilogue, in the engine on an H100 (`bench engine --ab MOE_H128`, Moonlight FP8): decode
# graph 1.007x as long at batch 32, 0.998x at 64, V3 widths 0.999x at 64
# (benchmarks/results/engine-nvidia-h100-80gb-hbm3-*-launches*.json, -moelaunches.json): even
# or slower, so it stays opt-in.
MOE_H128_MIN_ASSIGNMENTS = 128


def moe_config(tk: int, num_experts: int, fp8: bool, hidden: int = 0) -> dict:
    """Block shapes: decode (few rows per expert) wants short row blocks; prefill wants big
    tiles. `hidden`: the model width H (FP8 decode tiles depend on it)."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128 if fp8 else 32, num_warps=4, num_stages=1)
    # From the H100 sweep (hidden 7168, width 2048, 64 experts, top-8): decode best at 32x64 tiles
    # (2.67 ms bf16, 1.84 ms fp8); prefill bf16 at 128x128x64 / 8 warps (13.2 ms), fp8 at
    # 64x128x128 / 4 warps (11.9 ms; 128x128 with two fp32 accumulators spilled: 28.6 ms).
    rows_per_expert = tk / max(num_experts, 1)
    if rows_per_expert <= 16:
        # H200 sweep at Moonlight's experts, 1 and 8 tokens (scripts/moe_decode_sweep.py,
        # benchmarks/results/moe-decode-sweep-nvidia-h200.json; a whole fused_moe, weights out of
        # L2): 16-row blocks beat 32 at every width and stage count, FP8 best at 32 columns
        # (34.2 vs 41.5 us at 1 token, 86.4 vs 94.3 at 8), bf16 at 64 (37.7 vs 39.3, 139.5 vs
        # 148.0). At V3's width (H 7168) FP8 is faster at 64 columns from 16 tokens (865.8 vs
        # 896.5 us at 16, 2,420 vs 2,493 at 64; equal at 8), at Moonlight's (H 2048) at 32 (85.4
        # vs 90.3 at 8, equal at 16 and 64): results/moe-decode-bn-nvidia-h200.json.
        bn = (64 if hidden >= 4096 else 32) if fp8 else 64
        if fp8 and tk >= MOE_H128_MIN_ASSIGNMENTS and switched_on("MOE_H128"):
            bn = 128  # gate/up quantizes h itself (`moe.fused_moe_gate_up`); opt-in, even
        return dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, num_warps=4, num_stages=4)
    if rows_per_expert <= 32:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    if fp8 and rows_per_expert > 256:
        # H200 prefill sweep (T8192: 1,024 rows an expert; results/kernels-nvidia-h200-prefill-mla-
        # sweep.json): 128x128 tiles on 8 warps 8.65 ms (667 TFLOP/s), 64x128 on 4 warps 9.39.
        # One weight scale per tile (ROW_SCALE) is what lets 128x128's two accumulators fit: with
        # per-column scales it spilled (28.6 ms on the H100).
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
    if fp8:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3)
    if rows_per_expert <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


DOWN_KEYS = frozenset({"BLOCK_N", "num_warps", "num_stages"})


def down_config(down: dict | None) -> dict:
    """A copy of the aligned config's optional "down" entry, ValueError naming a bad one."""
    if down is None:
        return {}
    if not isinstance(down, dict) or not down.keys() <= DOWN_KEYS:
        got = sorted(down) if isinstance(down, dict) else type(down).__name__
        raise ValueError(f'config "down" keys {got}: accepted {sorted(DOWN_KEYS)} (any subset)')
    bn = down.get("BLOCK_N", 16)
    if not isinstance(bn, int) or not is_pow2(bn) or not 16 <= bn <= 256:
        raise ValueError(f'config "down" BLOCK_N={bn!r}: must be a power of two in [16, 256]')
    return dict(down)
