"""The m-grouped block-scaled e4m3 GEMM: all experts' rows in one launch (DeepGEMM's contiguous
layout), on the kernel of `gemm.py`."""

from __future__ import annotations

import torch

from moeray.kernels.common import (
    FP8_DTYPE,
    cdiv,
    check_shape,
    check_tensor,
    interpreting,
    use_triton,
)
from moeray.kernels.fp8.gemm import _fp8_gemm_kernel, _gemm_config, fp8_gemm_ref

# One tile config for every grouped GEMM, whatever its row count: `_gemm_config` picks by M, and
# in training the total rows change every step, so a by-M choice would compile a new variant
# mid-step, which can stall a multi-GPU step (benchmarks/notes-train.md). Split-M 128x128 (two
# 64-row dots of one warpgroup, b read once per 128 rows, 2 CTAs/SM): at Moonlight's MoE layer
# (49,152 rows over 64 experts, the six forward and input-grad GEMMs) 2.353 ms against 2.461 for
# the 64x128 tile and 2.741 for 128x128 on 8 warps, 700-750 TFLOP/s (H200,
# scripts/grouped_gemm_probe.py, benchmarks/results/grouped-gemm-probe-nvidia-h200.json).
_GROUPED_CONFIG = dict(
    BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, SPLIT_M=True, num_warps=4, num_stages=3
)


def fp8_gemm_grouped(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    block_expert: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """m-grouped block-scaled GEMM (DeepGEMM's contiguous layout): a [P, K] holds the rows of all
    experts, each expert's starting at a multiple of 128 (zero rows between), and rows
    [128 i, 128 (i + 1)) are multiplied by expert block_expert[i]'s b:
        c[rows of block i] = a[rows] @ b[block_expert[i]]^T        b [E, N, K], any strides
    a_scale [P, K/128] (1x128 groups), b_scale [E, N/128, K/128] (128x128 blocks), block_expert
    int32 [P / 128], each in [0, E) or -1. One launch for all experts, where per-expert GEMMs
    launch E.

    A block of expert -1 (no expert: the tail of a layout planned on the device, past the last
    expert's rows, `GroupedExperts.block_expert`) is skipped: its programs run no K step, so
    neither its rows of a and a_scale (whatever they hold, NaN and inf included) nor any b are
    read, and they store zeros in its rows of c (a zero trip count rather than an early return:
    the kernel's comment says why), so every row of c (from torch.empty) is written. The ids
    are checked against [-1, E) where that is cheap, when block_expert is on the CPU (on CUDA
    the check would make the host wait for the GPU)."""
    check_tensor(a_fp8, "a_fp8", dtypes=(FP8_DTYPE,), ndim=2)
    check_tensor(b_fp8, "b_fp8", dtypes=(FP8_DTYPE,), ndim=3, device=a_fp8.device)
    check_tensor(a_scale, "a_scale", dtypes=(torch.float32,), ndim=2, device=a_fp8.device)
    check_tensor(b_scale, "b_scale", dtypes=(torch.float32,), ndim=3, device=a_fp8.device)
    check_tensor(block_expert, "block_expert", dtypes=(torch.int32,), ndim=1, device=a_fp8.device)
    p, k = a_fp8.shape
    e, n = b_fp8.shape[:2]
    if p % 128 or block_expert.shape[0] != p // 128:
        raise ValueError(
            f"a_fp8 has {p} rows: expected a multiple of 128 with one block_expert entry "
            f"per 128 rows, got {block_expert.shape[0]} entries"
        )
    if b_fp8.shape[2] != k:
        raise ValueError(
            f"b_fp8 [E, N, K] has K={b_fp8.shape[2]}, a_fp8 [P, K] has K={k}: they must match"
        )
    kb = cdiv(k, 128)
    check_shape(a_scale, "a_scale", (p, kb))
    check_shape(b_scale, "b_scale", (e, cdiv(n, 128), kb))
    if not block_expert.is_cuda:
        bad = sorted({i for i in block_expert.tolist() if not -1 <= i < e})
        if bad:
            raise ValueError(
                f"block_expert holds {bad}: expected expert ids in [0, {e}) or -1 (no expert)"
            )
    if not use_triton(a_fp8):
        return fp8_gemm_grouped_ref(a_fp8, a_scale, b_fp8, b_scale, block_expert, out_dtype)
    c = torch.empty((p, n), dtype=out_dtype, device=a_fp8.device)
    if p == 0 or n == 0:
        return c
    cfg = _gemm_config(p, n, a_fp8.device) if interpreting() else _GROUPED_CONFIG
    grid = (cdiv(p, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]),)
    _fp8_gemm_kernel[grid](
        a_fp8,
        b_fp8,
        c,
        a_scale,
        b_scale,
        p,
        n,
        k,
        a_fp8.stride(0),
        a_fp8.stride(1),
        b_fp8.stride(1),
        b_fp8.stride(2),
        c.stride(0),
        c.stride(1),
        a_scale.stride(0),
        a_scale.stride(1),
        b_scale.stride(1),
        b_scale.stride(2),
        block_expert,
        b_fp8.stride(0),
        b_scale.stride(0),
        B_SCALE_DIV=128,
        ROW_SCALE=cfg["BLOCK_N"] <= 128,
        EVEN_K=(k % cfg["BLOCK_K"] == 0),
        UPCAST=interpreting(),
        GROUPED=True,
        NUM_STAGES=cfg["num_stages"],
        **cfg,
    )
    return c


def fp8_gemm_grouped_ref(a_fp8, a_scale, b_fp8, b_scale, block_expert, out_dtype=torch.bfloat16):
    """fp8_gemm_grouped in PyTorch: fp8_gemm_ref per 128-row block; zeros for blocks of expert
    -1, whose rows of a are not read."""
    c = torch.empty((a_fp8.shape[0], b_fp8.shape[1]), dtype=out_dtype, device=a_fp8.device)
    for i, e in enumerate(block_expert.tolist()):
        rows = slice(128 * i, 128 * (i + 1))
        if e < 0:
            c[rows] = 0
            continue
        c[rows] = fp8_gemm_ref(a_fp8[rows], a_scale[rows], b_fp8[e], b_scale[e], out_dtype)
    return c
