"""gemv: weight-only GEMM for decode rows, y [M, N] = x [M, K] @ W [N, K]^T in bf16, fp16 or fp32.

At decode (M <= 4) a linear layer is a read of its weight: the bound is N*K*elem bytes at HBM rate
(a 2048 x 3072 bf16 matrix is 12.6 MB, 2.6 us at 4.8 TB/s). cuBLAS runs these shapes as 64x8
tiles, too few CTAs for 132 SMs on 2-20 MB matrices (~1.1-1.3 TB/s measured on an H200, Moonlight
decode at batch 1). Here each program owns BLOCK_N (1..64) weight rows over the FULL K, walking K
in wide steps (BLOCK_N x BLOCK_K elements, 16-64 bytes per thread per step), so one launch keeps
~4 programs per SM streaming. The inner product is a broadcast on the CUDA cores,
acc [BM, BN, BK] += x[:, None, :] * w[None, :, :] in fp32, reduced over K once after the loop; at
M = 4 that is 4 FMAs per weight element, ~10 T FMA/s at 4.8 TB/s of bf16, under the H200's fp32
rate (~33 T FMA/s). Rows beyond 4 run as further M tiles (the dispatch below sends at most
GEMV_MAX_ROWS rows here; `gemv` itself is correct at any M).

Split-K only when even BLOCK_N = 1 leaves fewer programs than SMs (N < 132): S programs per tile
write fp32 partials [S, M, N] and `_gemv_reduce_kernel` sums them in split order (deterministic,
no atomics). Allocations depend on the shape only and nothing syncs with the host: CUDA-graph safe.

With programmatic dependent launch (sm_90, `common.pdl_launch`) each program loads its first
weight step before it waits for the previous kernel (`common.pdl_wait`), so that read overlaps
the previous kernel's tail (a chain of 8.4 MB GEMVs: 3.80 -> 3.40 us each on an H200); x and every
store come after the wait. The weight must not be written by the kernel launched just before
(model weights are not written during a step).

`linear` is the one dispatch of the model's plain (non-FP8) projections: gemv for up to
GEMV_MAX_ROWS rows of CUDA inference, F.linear otherwise (training, CPU, bias, more rows, or
MOERAY_FUSED_GEMV=0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moeray.kernels.common import (
    cdiv,
    check_tensor,
    interpreting,
    is_pow2,
    load_k_step,
    num_sms,
    pdl_launch,
    pdl_wait,
    switched_off,
)

GEMV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Rows up to which `linear` takes gemv: the broadcast inner product stays bandwidth-bound up to 4
# rows (module docstring); `moeray bench kernels --only gemv` times M = 1, 2, 4, 8 against
# cuBLAS for moving this bound.
GEMV_MAX_ROWS = 4
# Rows one broadcast program covers: the weight tile is read once for all of them.
BCAST_MAX_ROWS = 4
# Programs to aim for: 4 per SM. Little's law on an H200: 4.8 TB/s x ~0.6 us latency is ~2.9 MB
# in flight, ~22 KB per SM, i.e. 3-4 programs each with 8 KB per K step (2 stages) in flight.
PROGRAMS_PER_SM = 4
# fp32 accumulator elements per program: BM * BN * BK <= 8192 is 64 registers a thread at 4 warps.
ACC_ELEMS = 8192
MAX_BLOCK_N = 64
# 2048 e4m3 bytes (4096 bf16) per row per step: at BLOCK_N = 1 still 16 bytes a thread (4 warps).
MAX_BLOCK_K = 2048
_CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages"}


def gemv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T in fp32 (F.linear), returned in x's dtype (the oracle of gemv)."""
    return F.linear(x.float(), w.float()).to(x.dtype)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    c_ptr,
    M,
    N,
    K,
    K_PER_SPLIT,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_cs,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks in the loop
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,  # launched with PDL (common.pdl_launch): the first weight step is loaded
    # before the wait, so its read overlaps the previous kernel's tail
):
    # M tiles vary fastest: programs sharing a weight tile run together and hit it in L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows wrap onto valid ones, so loads need no row mask; the store is masked.
    # int64 row offsets: a 129280 x 7168 lm_head is 0.93e9 elements.
    x_ptrs = x_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_start = k_lo
    if PDL:
        # The split's first step (never empty: `_k_splits`) peeled off the loop: its weights
        # (read by no earlier kernel's writes) before the wait, x after. The same additions in
        # the same order as the loop's, so the same bits.
        w = load_k_step(w_ptrs, k_lo, stride_wk, offs_k, K, EVEN_K)
        pdl_wait(PDL)
        x = load_k_step(x_ptrs, k_lo, stride_xk, offs_k, K, EVEN_K)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        k_start = k_lo + BLOCK_K
    for k0 in tl.range(k_start, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        x = load_k_step(x_ptrs, k0, stride_xk, offs_k, K, EVEN_K)
        w = load_k_step(w_ptrs, k0, stride_wk, offs_k, K, EVEN_K)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)
    c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_reduce_kernel(
    p_ptr, y_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    # y (contiguous [M, N]) = sum of the S contiguous fp32 partials [S, M, N], in split order.
    pdl_wait(PDL)  # every read here is of the previous kernel's partials
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + i * MN + offs, mask=ok, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def pow2_at_least(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def bcast_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """gemv's broadcast tiles by shape (not autotuned: one launch per shape, graph-safe).

    BLOCK_M = all rows up to 4 (one read of the weight for them); BLOCK_N the widest power of two
    <= 64 that still gives PROGRAMS_PER_SM programs per SM (Moonlight q_proj N = 3072 on 132 SMs:
    4 rows, 768 programs; kv_a N = 576: 1 row); BLOCK_K = ACC_ELEMS / (BM * BN), at most
    MAX_BLOCK_K and not past K (at one row: at most half of K). SPLIT_K > 1 only when the tiles
    are fewer than the SMs (N < 132 at M <= 4). `moeray bench kernels --only gemv_sweep` sweeps
    the alternatives."""
    block_m = min(BCAST_MAX_ROWS, pow2_at_least(max(m, 1)))
    m_tiles = cdiv(m, block_m)
    sms = num_sms(device)
    target = PROGRAMS_PER_SM * sms
    block_n = MAX_BLOCK_N
    while block_n > 1 and m_tiles * cdiv(n, block_n) < target:
        block_n //= 2
    block_k = min(MAX_BLOCK_K, ACC_ELEMS // (block_m * block_n), max(128, pow2_at_least(k)))
    if m == 1:
        # At least two K steps, so the loop pipelines its loads: Moonlight q_proj (K = 2,048) at
        # one row took 7.8 us in one 2,048-deep step and 5.4 in two (H200 sweep, 4 warps x 3
        # stages, results/kernels-nvidia-h200-gemv-sweep-small-warps.json; kv_a 2.8 -> 2.6).
        # One deep step, whose whole K a program reads before its PDL wait, ran the engine's
        # decode graph ~4% slower at Moonlight bf16 batch 1 on an H100
        # (results/engine-nvidia-h100-80gb-hbm3-*-b1ab*.json).
        block_k = min(block_k, max(128, pow2_at_least(k) // 2))
    tiles = m_tiles * cdiv(n, block_n)
    split = 1 if tiles >= sms else max(1, min(cdiv(k, block_k), cdiv(target, tiles)))
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split,
        num_warps=4,
        num_stages=3,
    )


def _check_config(cfg: dict) -> None:
    """ValueError naming the bad key or value of a tile config and what is accepted."""
    if cfg.keys() != _CONFIG_KEYS:
        raise ValueError(f"config keys {sorted(cfg)}: need exactly {sorted(_CONFIG_KEYS)}")
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if not is_pow2(bm):
        raise ValueError(f"BLOCK_M={bm}: must be a power of two")
    if not is_pow2(bn) or bn > 128:
        raise ValueError(f"BLOCK_N={bn}: must be a power of two <= 128")
    if not is_pow2(bk) or bk < 16:
        raise ValueError(f"BLOCK_K={bk}: must be a power of two >= 16")
    if cfg["SPLIT_K"] < 1:
        raise ValueError(f"SPLIT_K={cfg['SPLIT_K']}: must be >= 1")
    warps, stages = cfg["num_warps"], cfg["num_stages"]
    if not is_pow2(warps) or warps > 16:
        raise ValueError(f"num_warps={warps}: must be a power of two <= 16")
    if stages < 1:
        raise ValueError(f"num_stages={stages}: must be >= 1")
    # 128 fp32 accumulator registers a thread at most (the heuristic keeps 64 at 4 warps).
    limit = 128 * 32 * warps
    if bm * bn * bk > limit:
        raise ValueError(
            f"BLOCK_M * BLOCK_N * BLOCK_K = {bm}*{bn}*{bk} = {bm * bn * bk}: the fp32 accumulator "
            f"must be <= 128 registers a thread, {limit} elements at num_warps={warps}"
        )


def _k_splits(k: int, block_k: int, split: int) -> tuple[int, int]:
    """(K elements per split, a multiple of block_k; splits) with no empty split."""
    steps = cdiv(k, block_k)
    per_split = cdiv(steps, min(split, steps))
    return per_split * block_k, cdiv(steps, per_split)


def reduce_splits(c: torch.Tensor, y: torch.Tensor) -> None:
    """y [M, N] (contiguous) = the fp32 partials c [S, M, N] summed in split order, one launch."""
    mn = y.numel()
    block = 1024
    pdl = pdl_launch(y.device)
    _gemv_reduce_kernel[(cdiv(mn, block),)](
        c, y, mn, SPLIT_K=c.shape[0], BLOCK=block, PDL=pdl, num_warps=4, launch_pdl=pdl
    )


def _check_gemv_inputs(x: torch.Tensor, w: torch.Tensor) -> None:
    check_tensor(x, "x", dtypes=GEMV_DTYPES, ndim=2)
    check_tensor(w, "w", dtypes=(x.dtype,), ndim=2, device=x.device)
    if x.shape[1] != w.shape[1]:
        raise ValueError(
            f"x [M, K] has K={x.shape[1]} but w [N, K] has K={w.shape[1]}: they must match"
        )


def gemv(x: torch.Tensor, w: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ w [N, K]^T in x's dtype, fp32 accumulation, one launch (two when N is
    under the SM count and K is split).

    x: bf16, fp16 or fp32 (any strides); w: x's dtype (any strides). Any N and K (a ragged last K
    step is masked). Made for few rows (decode); correct at any M. `config` (keys of
    `_CONFIG_KEYS`) overrides the heuristic tiles (`bcast_config`). On CPU tensors outside the
    interpreter it runs gemv_ref."""
    _check_gemv_inputs(x, w)
    if not (x.is_cuda or interpreting()):
        return gemv_ref(x, w)
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    cfg = config if config is not None else bcast_config(m, n, k, x.device)
    _check_config(cfg)
    k_per_split, split = _k_splits(k, cfg["BLOCK_K"], cfg["SPLIT_K"])
    c = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (cdiv(m, cfg["BLOCK_M"]), cdiv(n, cfg["BLOCK_N"]), split)
    pdl = pdl_launch(x.device)
    _gemv_kernel[grid](
        x,
        w,
        c,
        m,
        n,
        k,
        k_per_split,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        c.stride(0) if split > 1 else 0,
        c.stride(-2),
        c.stride(-1),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        EVEN_K=k % cfg["BLOCK_K"] == 0,
        NUM_STAGES=cfg["num_stages"],
        PDL=pdl,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        launch_pdl=pdl,
    )
    if split > 1:
        reduce_splits(c, y)
    return y


def gemv_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `linear` takes gemv: CUDA inference (no gradient wanted), no bias, x and weight in
    one of bf16/fp16/fp32, 1 to GEMV_MAX_ROWS rows. MOERAY_FUSED_GEMV=0 keeps F.linear: an A/B
    switch for the engine bench."""
    # the tensor checks first: on CPU (training, tests) this runs at every projection
    if bias is not None or not (x.is_cuda and weight.is_cuda):
        return False
    if switched_off("GEMV"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False  # training keeps F.linear and its autograd
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.shape[-1] == 0:
        return False
    if x.dtype not in GEMV_DTYPES or weight.dtype != x.dtype:
        return False
    return 0 < x.numel() // x.shape[-1] <= GEMV_MAX_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), computed by gemv where `gemv_applies` (decode rows on CUDA
    without gradients): the same values up to fp32 summation order."""
    if gemv_applies(x, weight, bias):
        y = gemv(x.reshape(-1, x.shape[-1]), weight)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
