"""The Triton block-scaled e4m3 GEMM (DeepSeek-V3 recipe), its tile configs and its occupancy.

a [M, K] e4m3 with 1x128 scales [M, KB] times b [N, K] e4m3 with scales [NB, KB] per 128x128 block
(weights) or [N, KB] per 1x128 row group (the weight-grad GEMM) -> [M, N], fp32 accumulation, like
F.linear. Each 128-deep K block is promoted into the fp32 accumulator with both scales. The same
kernel runs the m-grouped GEMM of `grouped.py` (constexpr GROUPED).

Legend: M rows of a, N rows of b (output features), K reduction, KB = ceil(K/128), NB = ceil(N/128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    FP8_DTYPE,
    cdiv,
    check_shape,
    check_tensor,
    interpreting,
    load_k_block,
    num_sms,
    scaled_block_dot,
)
from moeray.kernels.fp8.quant import dequant_rows_ref, weight_dequant_ref


def fp8_gemm_ref(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale)^T in fp32, b_scale per 128x128 block or per 1x128 row group."""
    a = dequant_rows_ref(a_fp8, a_scale)
    n = b_fp8.shape[0]
    if b_scale.shape[0] == n and n > cdiv(n, 128):
        b = dequant_rows_ref(b_fp8, b_scale)
    else:
        b = weight_dequant_ref(b_fp8, b_scale, out_dtype=torch.float32)
    return (a @ b.t()).to(out_dtype)


@triton.jit
def _store_tile(c_ptr, acc, offs_m, offs_n, M, N, stride_cm, stride_cn):
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(
        c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N)
    )


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    # Grouped launch order: GROUP_M row tiles share each column tile of b while it sits in L2.
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % group) % size_m, (tile % group) // size_m


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    as_ptr,
    bs_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_asm,
    stride_ask,
    stride_bsn,
    stride_bsk,
    expert_ptr,
    stride_be,
    stride_bse,  # GROUPED only: the expert of each 128-row block of a, -1 for none (zeros)
    B_SCALE_DIV: tl.constexpr,  # 128: b scale per 128x128 block; 1: per 1x128 row group
    ROW_SCALE: tl.constexpr,  # B_SCALE_DIV == 128, BLOCK_N <= 128: one b scale per tile and K block
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_M: tl.constexpr,  # the BLOCK_M rows as two BLOCK_M/2-row dots, each its own accumulator
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    GROUPED: tl.constexpr,  # b [E, N, K]: rows of a in 128-row blocks, each block one expert's
    NUM_STAGES: tl.constexpr,  # the launch's num_stages, for the K loop's tl.range
):
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    if GROUPED:  # BLOCK_M divides 128, so the whole tile is one expert's
        e = tl.load(expert_ptr + (pid_m * BLOCK_M) // 128).to(tl.int64)
        # Expert -1 (no expert: a device-planned layout's tail): no K block (below), so nothing
        # read, and zeros stored. Not an early return: that took 172 registers a thread instead
        # of 167 for the grouped 64x128 tile (Triton 3.6 compiling for sm_90a at Moonlight's
        # gate shape, ptxas -v), past the 168 that let 3 CTAs share an SM (_CTAS_PER_SM_64); a
        # zero trip count keeps 167.
        has_expert = e >= 0
        e = tl.maximum(e, 0)
        b_ptr += e * stride_be
        bs_ptr += e * stride_bse

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrap out-of-range rows/cols onto valid ones so loads need no row mask; stores are masked.
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n % N)[None, :] * stride_bn
    if ROW_SCALE:
        bs_ptrs = bs_ptr + (pid_n * BLOCK_N // 128) * stride_bsn  # the tile's 128-column block
    else:
        bs_ptrs = bs_ptr + ((offs_n % N) // B_SCALE_DIV) * stride_bsn
    num_kb = tl.cdiv(K, BLOCK_K)
    if GROUPED:
        num_kb = tl.where(has_expert, num_kb, 0)
    if SPLIT_M:
        # One warpgroup, two 64-row dots sharing each b tile: b is read once per 128 rows and the
        # grid has half the CTAs of 64-row tiles (wins at large K / large N; see _split_m_wins).
        HALF: tl.constexpr = BLOCK_M // 2
        offs_m0 = pid_m * BLOCK_M + tl.arange(0, HALF)
        offs_m1 = offs_m0 + HALF
        a0_ptrs = a_ptr + (offs_m0 % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
        a1_ptrs = a_ptr + (offs_m1 % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
        as0_ptrs = as_ptr + (offs_m0 % M) * stride_asm
        as1_ptrs = as_ptr + (offs_m1 % M) * stride_asm
        acc0 = tl.zeros((HALF, BLOCK_N), dtype=tl.float32)
        acc1 = tl.zeros((HALF, BLOCK_N), dtype=tl.float32)
        for kb in tl.range(0, num_kb, num_stages=NUM_STAGES):
            k_left = K - kb * BLOCK_K
            b = load_k_block(b_ptrs + kb * BLOCK_K * stride_bk, offs_k[:, None], k_left, EVEN_K)
            b_s = tl.load(bs_ptrs + kb * stride_bsk)
            a0 = load_k_block(a0_ptrs + kb * BLOCK_K * stride_ak, offs_k[None, :], k_left, EVEN_K)
            a1 = load_k_block(a1_ptrs + kb * BLOCK_K * stride_ak, offs_k[None, :], k_left, EVEN_K)
            a0_s = tl.load(as0_ptrs + kb * stride_ask)
            a1_s = tl.load(as1_ptrs + kb * stride_ask)
            acc0 = scaled_block_dot(acc0, a0, b, a0_s, b_s, ROW_SCALE, UPCAST)
            acc1 = scaled_block_dot(acc1, a1, b, a1_s, b_s, ROW_SCALE, UPCAST)
        _store_tile(c_ptr, acc0, offs_m0, offs_n, M, N, stride_cm, stride_cn)
        _store_tile(c_ptr, acc1, offs_m1, offs_n, M, N, stride_cm, stride_cn)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
        as_ptrs = as_ptr + (offs_m % M) * stride_asm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # tl.range with the stage count, not `range` under the launch's num_stages: same pipeline,
        # but Triton 3.6 then fits the tile in 167 registers/thread instead of 177, and 3 CTAs of
        # 128 threads fit an SM only at <= 168 (ptxas -v, sm_90). With 2 CTAs per SM this tile ran
        # 0.61x of _scaled_mm at 4096x2112x7168 on an H200 (the sweep kernel at 167 registers:
        # 0.78x).
        for kb in tl.range(0, num_kb, num_stages=NUM_STAGES):
            k_left = K - kb * BLOCK_K
            a = load_k_block(a_ptrs + kb * BLOCK_K * stride_ak, offs_k[None, :], k_left, EVEN_K)
            b = load_k_block(b_ptrs + kb * BLOCK_K * stride_bk, offs_k[:, None], k_left, EVEN_K)
            a_s = tl.load(as_ptrs + kb * stride_ask)
            b_s = tl.load(bs_ptrs + kb * stride_bsk)
            acc = scaled_block_dot(acc, a, b, a_s, b_s, ROW_SCALE, UPCAST)
        _store_tile(c_ptr, acc, offs_m, offs_n, M, N, stride_cm, stride_cn)


# CTAs per SM each M >= 128 tile shape fits on sm_90 (228 KB shared memory per SM), 3 stages of
# a and b fp8 tiles: 64x128 -> 3 x (64 + 128) x 128 B = 72 KB -> 3 CTAs; split-M 128x128 ->
# 3 x (128 + 128) x 128 B = 96 KB -> 2 CTAs. Registers must allow it too: 3 x 128 threads need
# <= 168 per thread (64x128 compiles to 167 on Triton 3.6), 2 x 128 allow 256 (split-M: 255).
# tests/gpu/test_fp8_gemm_variants_gpu.py checks both counts against the compiled kernels.
_CTAS_PER_SM_64 = 3
_CTAS_PER_SM_SPLIT = 2


def _launch_fill(m: int, n: int, block_m: int, ctas_per_sm: int, num_sms: int) -> tuple[int, int]:
    """Useful fraction of the launched work as (num, den): rows of m among the padded rows, times
    tiles among the CTA slots of all waves (a last wave that is mostly empty wastes the GPU)."""
    tiles_m = cdiv(m, block_m)
    tiles = tiles_m * cdiv(n, 128)
    slots = num_sms * ctas_per_sm
    return m * tiles, tiles_m * block_m * cdiv(tiles, slots) * slots


def _split_m_wins(m: int, n: int, num_sms: int) -> bool:
    """Split-M 128x128 (2 CTAs/SM) instead of 64x128 (3 CTAs/SM) where its launch fills the GPU at
    least as well. H200 sweep (scripts/fp8_gemm_sweep.py, 132 SMs, M=4096, one run), ratio to
    _scaled_mm for 64x128 / split-M: N2112K7168 0.777 / 0.675, N24576K1536 0.676 / 0.717,
    N7168K16384 0.760 / 0.825, N4096K7168 0.688 / 0.688. This rule's fills (64x128 vs split):
    0.92 vs 0.69 -> 64x128; 0.97 vs 0.97 -> split; 0.91 vs 0.97 -> split; 0.86 vs 0.97 -> split
    (measured a tie): the faster or an equal variant at all four. Shapes away from M=4096 are
    extrapolated by the model, not measured. Integer cross-multiplication: no float ties."""
    n64, d64 = _launch_fill(m, n, 64, _CTAS_PER_SM_64, num_sms)
    ns, ds = _launch_fill(m, n, 128, _CTAS_PER_SM_SPLIT, num_sms)
    return ns * d64 >= n64 * ds


def _gemm_config(m: int, n: int, device: torch.device) -> dict:
    """Tile shapes by problem size (see _split_m_wins and benchmarks/notes-kernels.md)."""
    if interpreting():
        return dict(
            BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=4, SPLIT_M=False, num_warps=4, num_stages=1
        )
    # At M=64 (H100 sweep, benchmarks/results/kernels-*-sweep.json): narrow 32-column tiles spread
    # the weight read over more SMs (79 vs 72 TFLOP/s); not re-measured with the one-FMA promotion.
    if m <= 64:
        return dict(
            BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, SPLIT_M=False, num_warps=4, num_stages=6
        )
    # One FMA per K block and 3 stages (72 KB smem -> 3 CTAs/SM for 64x128, each hiding the others'
    # wait for their wgmma before scaling): 0.68-0.78 of _scaled_mm at M=4096 in the H200 sweep,
    # where 4 or 5 stages, a multiply plus an FMA, or 128x128 tiles with 8 warps ran 0.49-0.75
    # (benchmarks/notes-kernels.md, "Variant sweep and the ported kernel"). 4 warps everywhere:
    # one warpgroup per CTA, more CTAs per SM.
    if m >= 128 and _split_m_wins(m, n, num_sms(device)):
        return dict(
            BLOCK_M=128,
            BLOCK_N=128,
            BLOCK_K=128,
            GROUP_M=8,
            SPLIT_M=True,
            num_warps=4,
            num_stages=3,
        )
    return dict(
        BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, SPLIT_M=False, num_warps=4, num_stages=3
    )


def _b_scale_div(b_fp8: torch.Tensor, b_scale: torch.Tensor, kb: int) -> int:
    n = b_fp8.shape[0]
    if tuple(b_scale.shape) == (cdiv(n, 128), kb):
        return 128
    if tuple(b_scale.shape) == (n, kb):
        return 1
    raise ValueError(
        f"b_scale has shape {tuple(b_scale.shape)}; accepted: ({cdiv(n, 128)}, {kb}) for 128x128 "
        f"blocks or ({n}, {kb}) for 1x128 row groups of b [{n}, {b_fp8.shape[1]}]"
    )


def _check_gemm_inputs(a_fp8, a_scale, b_fp8, b_scale) -> int:
    check_tensor(a_fp8, "a_fp8", dtypes=(FP8_DTYPE,), ndim=2)
    check_tensor(b_fp8, "b_fp8", dtypes=(FP8_DTYPE,), ndim=2, device=a_fp8.device)
    check_tensor(a_scale, "a_scale", dtypes=(torch.float32,), ndim=2, device=a_fp8.device)
    check_tensor(b_scale, "b_scale", dtypes=(torch.float32,), ndim=2, device=a_fp8.device)
    m, k = a_fp8.shape
    if b_fp8.shape[1] != k:
        raise ValueError(
            f"b_fp8 [N, K] has K={b_fp8.shape[1]}, a_fp8 [M, K] has K={k}: they must match"
        )
    kb = cdiv(k, 128)
    check_shape(a_scale, "a_scale", (m, kb))
    return _b_scale_div(b_fp8, b_scale, kb)


def fp8_gemm_triton(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    config: dict | None = None,
) -> torch.Tensor:
    """The Triton block-scaled GEMM (any strides for a, b and both scales)."""
    return _fp8_gemm_launch(a_fp8, a_scale, b_fp8, b_scale, out_dtype, config)[0]


_CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}
_CONFIG_OPTIONAL = {"SPLIT_M", "maxnreg"}


def _fp8_gemm_launch(a_fp8, a_scale, b_fp8, b_scale, out_dtype=torch.bfloat16, config=None):
    """fp8_gemm_triton's launch; also returns the compiled kernel (None under the interpreter or
    for an empty output), whose registers and shared memory `ctas_per_sm` turns into occupancy."""
    div = _check_gemm_inputs(a_fp8, a_scale, b_fp8, b_scale)
    m, k = a_fp8.shape
    n = b_fp8.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a_fp8.device)
    if m == 0 or n == 0:
        return c, None
    if config is not None and (
        _CONFIG_KEYS - config.keys() or config.keys() - _CONFIG_KEYS - _CONFIG_OPTIONAL
    ):
        raise ValueError(
            f"config keys {sorted(config)}: need {sorted(_CONFIG_KEYS)}, "
            f"optionally {sorted(_CONFIG_OPTIONAL)}"
        )
    # Configs without SPLIT_M (the sweep list of moeray/kernels/bench/fp8.py) run unsplit tiles.
    cfg = {"SPLIT_M": False, **(config or _gemm_config(m, n, a_fp8.device))}
    if cfg["BLOCK_K"] != 128:
        raise ValueError(f"BLOCK_K={cfg['BLOCK_K']}: must be 128, the scale group size along K")
    if div == 128 and cfg["BLOCK_N"] % 128 and 128 % cfg["BLOCK_N"]:
        raise ValueError(f"BLOCK_N={cfg['BLOCK_N']} must divide or be a multiple of 128")
    if cfg["SPLIT_M"] and cfg["BLOCK_M"] < 32:
        raise ValueError(
            f"SPLIT_M needs BLOCK_M >= 32 (two dots of >= 16 rows), got {cfg['BLOCK_M']}"
        )
    grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]),)
    compiled = _fp8_gemm_kernel[grid](
        a_fp8,
        b_fp8,
        c,
        a_scale,
        b_scale,
        m,
        n,
        k,
        a_fp8.stride(0),
        a_fp8.stride(1),
        b_fp8.stride(0),
        b_fp8.stride(1),
        c.stride(0),
        c.stride(1),
        a_scale.stride(0),
        a_scale.stride(1),
        b_scale.stride(0),
        b_scale.stride(1),
        a_scale,
        0,
        0,
        B_SCALE_DIV=div,
        ROW_SCALE=(div == 128 and cfg["BLOCK_N"] <= 128),
        EVEN_K=(k % cfg["BLOCK_K"] == 0),
        UPCAST=interpreting(),
        GROUPED=False,
        NUM_STAGES=cfg["num_stages"],
        **cfg,
    )
    return c, (None if interpreting() else compiled)


def ctas_per_sm(compiled, regs_per_sm: int = 65536, smem_per_sm: int = 228 * 1024) -> dict:
    """How many CTAs of a compiled Triton kernel fit one sm_90 SM: registers are granted per warp
    in units of 256 (8 per thread), and each CTA also reserves 1 KB of shared memory."""
    warps = compiled.metadata.num_warps
    regs = compiled.n_regs
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = regs_per_sm // (per_warp * warps)
    by_smem = smem_per_sm // (compiled.metadata.shared + 1024)
    return {
        "regs": regs,
        "spills": compiled.n_spills,
        "shared": compiled.metadata.shared,
        "ctas_by_regs": by_regs,
        "ctas_by_smem": by_smem,
        "ctas_per_sm": min(by_regs, by_smem),
    }
