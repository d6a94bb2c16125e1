"""Tile sweep of fp8_gemm_kgrouped (every expert's FP8 weight gradient in one launch, 128x1-scaled
e4m3 operands over each expert's 128-aligned tokens), accumulating into an fp32 gradient as the
training step's later micro-batches do, and fresh (fp32 out) as its first does.

Shapes: Moonlight-16B-A3B's experts on one GPU (64 experts, D 2048, I 1408, ~18,432 token rows a
micro-batch, each expert's rows padded to 128): gate/up dW [I, D] and down dW [D, I]. The default
tile (64 x 128, 4 warps, 3 stages) ran 749 us a call accumulating in the one-H200 training bench
(results/train-1gpu-nvidia-h200.json), ~47 of its FP8 step's 656 ms."""

from __future__ import annotations

import torch

from moeray.kernels.bench.common import print_mode_sweep, time_us_or_reason
from moeray.kernels.fp8.kgrouped import _KGROUPED_CONFIG, fp8_gemm_kgrouped
from moeray.kernels.fp8.quant import act_quant_t

# (name, experts, rows before padding, M, N, empty experts)
SHAPES = (
    ("moonlight gate/up", 64, 18000, 1408, 2048, (3, 40)),
    ("moonlight down", 64, 18000, 2048, 1408, (3, 40)),
)
# (BLOCK_M, BLOCK_N, num_warps, num_stages), GROUP_M 8; the first is the default
SWEEP_TILES = (
    (64, 128, 4, 3),
    (64, 128, 4, 4),
    (128, 128, 4, 3),
    (128, 128, 8, 3),
    (128, 128, 8, 4),
    (128, 256, 8, 3),
    (64, 256, 8, 3),
    (256, 128, 8, 3),
    (128, 64, 4, 4),
    (128, 128, 8, 2),
)
DEFAULT = {k: v for k, v in _KGROUPED_CONFIG.items() if k != "BLOCK_K"}


def _inputs(experts: int, total: int, m: int, n: int, empty: tuple[int, ...], seed: int = 0):
    """Quantized a [M, P], b [N, P] (act_quant_t of random rows), ends, and an fp32 gradient."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.multinomial(torch.ones(experts), total, replacement=True, generator=g)
    counts = raw.bincount(minlength=experts)
    counts[list(empty)] = 0
    rows = [-(-int(c) // 128) * 128 for c in counts]
    p = sum(rows)
    a = act_quant_t(torch.randn(p, m, device="cuda", dtype=torch.bfloat16))
    b = act_quant_t(torch.randn(p, n, device="cuda", dtype=torch.bfloat16))
    ends = torch.tensor(rows, device="cuda").cumsum(0).to(torch.int32)
    grad = torch.randn(experts, m, n, device="cuda")
    return p, a, b, ends, grad


def sweep_fp8_kgrouped() -> list[dict]:
    """Time SWEEP_TILES at SHAPES, accumulating and fresh; each row says whether it is the
    default tile (`kgrouped._KGROUPED_CONFIG`, chosen from here)."""
    out = []
    for name, e, total, m, n, empty in SHAPES:
        p, a, b, ends, grad = _inputs(e, total, m, n, empty)
        flop = 2 * p * m * n
        for bm, bn, warps, stages in SWEEP_TILES:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, num_warps=warps, num_stages=stages)
            for mode, acc in (("accumulate", grad), ("fresh", None)):
                call = (*a, *b, ends, torch.float32)
                us = time_us_or_reason(
                    lambda cfg=cfg, acc=acc, call=call: fp8_gemm_kgrouped(
                        *call, accumulate_into=acc, config=cfg
                    )
                )
                out.append(
                    {
                        "shape": name,
                        "mode": mode,
                        "rows": p,
                        **cfg,
                        "us": us,
                        "TFLOPs": round(flop / us / 1e6, 1) if isinstance(us, float) else None,
                        "chosen": cfg == DEFAULT,
                    }
                )
        torch.cuda.empty_cache()
    return out


def print_fp8_kgrouped_sweep(rows: list[dict]) -> None:
    print_mode_sweep("fp8_kgrouped", rows, ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
