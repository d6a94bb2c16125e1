"""Sweep Triton variants of the DeepSeek-V3 block-scaled FP8 GEMM against torch._scaled_mm
(issue #4).

C [M, N] bf16 = sum over 128-wide K blocks kb of
                (A[:, kb] @ B[:, kb]^T) * a_scale[:, kb] * b_scale[n // 128, kb]
with A [M, K] e4m3 (1x128 scales), B [N, K] e4m3 (128x128 block scales), fp32 accumulation.

Why a sweep: moeray/kernels/fp8/gemm.py reached 0.55-0.59x of cuBLASLt's block-scaled _scaled_mm on
H100 (576-683 vs 1100-1150 TFLOP/s). Its `acc += tl.dot(a, b) * sa * sb` reads the dot's result
every 128 of K, so Triton cannot keep the wgmma in flight (the pipeliner only leaves a dot async
when its result feeds the next dot's accumulator): each K block waits for its MMA, then scales. The
variants below attack the idle tensor-core time from different sides (fewer epilogue ops per K
block, more co-resident CTAs, TMA loads, persistent tiles, independent dot chains, warp
specialization); each is a complete kernel checked against an fp32 dequantized reference.

GPU (H100/H200, <= ~2 min):   python3 scripts/fp8_gemm_sweep.py
CPU check of every variant:   TRITON_INTERPRET=1 python3 scripts/fp8_gemm_sweep.py --check-only
Options: --variants a,b (names or prefixes), --rep MS (do_bench repetition time), --json PATH
(default $OUT/fp8_gemm_sweep.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK_K = 128  # fixed: the scale granularity (1x128 activations, 128x128 weights)
ISSUE_SHAPES = [(4096, 2112, 7168), (4096, 24576, 1536), (4096, 7168, 16384), (4096, 4096, 7168)]
# CPU shapes: several tiles in M and N, a partial N tile and partial 128-column scale block
# (N=320), an odd number of K blocks (K=384) for the K-pair tail.
CHECK_SHAPES = [(192, 320, 512), (64, 256, 384)]
REL_TOL = 1e-2  # bf16 output rounding alone gives ~2e-3 relative (Frobenius) error


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    # "prod" (moeray's kernel as shipped), "ptr" (pointer loads), "tma" (tensor descriptors),
    # "gluon"
    kind: str
    why: str
    block_m: int = 64
    block_n: int = 128
    group_m: int = 8
    warps: int = 4
    stages: int = 4
    persistent: bool = False
    ctas_per_sm: int = 1  # persistent grid = min(tiles, SMs x this)
    k_pair: bool = False  # two K blocks per iteration, two independent dots
    split_m: bool = False  # two BLOCK_M/2-row halves, each its own dot and accumulator
    device_desc: bool = (
        False  # tl.make_tensor_descriptor in the kernel (needs triton.set_allocator)
    )
    warp_spec: bool = False  # tl.range(..., warp_specialize=True)
    flatten: bool = False  # tl.range(..., flatten=True) on the persistent tile loop
    plain_loop: bool = (
        False  # ptr: the K loop as `range` pipelined by the launch's num_stages (prod's form)
    )
    # Launch option capping registers per thread. 3 CTAs of 128 threads fit an SM's 65,536 registers
    # only at <= 168 registers per thread (allocated in 8s): a 64x128 tile's fp32 accumulator and
    # the fresh dot result alone take 128, so a few extra address registers cost a whole CTA.
    maxnreg: int | None = None


VARIANTS = [
    Variant(
        "prod",
        "prod",
        "moeray.kernels.fp8.fp8_gemm_triton as shipped (its _gemm_config: 64x128 or split-M "
        "128x128, 4 warps, 3 stages)",
    ),
    Variant(
        "ptr64x128s4",
        "ptr",
        "prod + one FMA per element: scale a_s*b_s per row first (b_s is one scalar per "
        "128-col tile)",
    ),
    Variant(
        "ptr64x128s3",
        "ptr",
        "3 stages: 72 KB smem -> 3 CTAs/SM overlap each other's scale epilogue",
        stages=3,
    ),
    # The port (prod) and ptr64x128s3 share tile, stages, warps and promotion; prod loops with
    # `range` under the launch's num_stages where ptr64x128s3 uses tl.range(num_stages=): this
    # variant isolates that difference (prod ran 0.61x of _scaled_mm at N2112 K7168, ptr64x128s3
    # 0.78x).
    Variant(
        "ptr64x128s3_range",
        "ptr",
        "ptr64x128s3 with prod's K loop: range + launch num_stages",
        stages=3,
        plain_loop=True,
    ),
    Variant(
        "prod_r168",
        "prod",
        "prod with maxnreg=168: 3 CTAs/SM of 128 threads fit the register file",
        maxnreg=168,
    ),
    Variant("ptr64x128s3_r168", "ptr", "ptr64x128s3 with maxnreg=168", stages=3, maxnreg=168),
    Variant("ptr64x128s5", "ptr", "5 stages, 2 CTAs/SM", stages=5),
    Variant(
        "ptr64x64s4",
        "ptr",
        "narrow tile: 4 CTAs/SM, more overlap, more operand traffic",
        block_n=64,
    ),
    Variant(
        "ptr128x128w8s3",
        "ptr",
        "2 warpgroups per CTA interleave wgmma and scaling",
        block_m=128,
        warps=8,
        stages=3,
    ),
    Variant(
        "ptr_kpair_s3",
        "ptr",
        "two K blocks per iteration: two independent dots before scaling",
        k_pair=True,
        stages=3,
    ),
    Variant(
        "ptr_splitm128w4",
        "ptr",
        "128-row tile as two 64-row dots/accumulators, 1 warpgroup",
        block_m=128,
        split_m=True,
        stages=3,
    ),
    Variant(
        "ptr_splitm128w8",
        "ptr",
        "as splitm with 2 warpgroups",
        block_m=128,
        split_m=True,
        warps=8,
        stages=3,
    ),
    Variant(
        "ptr_persist_x2",
        "ptr",
        "persistent, 2 CTAs/SM, GROUP_M=8 swizzle",
        persistent=True,
        ctas_per_sm=2,
    ),
    Variant("tma64x128s4", "tma", "TMA loads/stores (host descriptors), grouped launch"),
    Variant("tma64x128s3", "tma", "TMA, 3 stages / 3 CTAs per SM", stages=3),
    Variant("tma128x128w8s3", "tma", "TMA, 2 warpgroups", block_m=128, warps=8, stages=3),
    Variant("tma_persist_x2", "tma", "TMA + persistent, 2 CTAs/SM", persistent=True, ctas_per_sm=2),
    Variant(
        "tma_persist_x3s3",
        "tma",
        "TMA + persistent, 3 CTAs/SM, 3 stages",
        persistent=True,
        ctas_per_sm=3,
        stages=3,
    ),
    Variant(
        "tma_persist_flat",
        "tma",
        "TMA + persistent (1 CTA/SM, 8 warps) with flatten=True: next tile's loads overlap this "
        "epilogue",
        block_m=128,
        warps=8,
        stages=3,
        persistent=True,
        flatten=True,
    ),
    Variant(
        "tma_devdesc_persist_x2",
        "tma",
        "device-side make_tensor_descriptor, persistent x2",
        persistent=True,
        ctas_per_sm=2,
        device_desc=True,
    ),
    Variant(
        "tma_ws",
        "tma",
        "automatic warp specialization of the K loop (Triton documents it for Blackwell only)",
        warp_spec=True,
    ),
    Variant(
        "tma_ws128w8",
        "tma",
        "warp specialization, 128x128, 8 warps",
        block_m=128,
        warps=8,
        stages=3,
        warp_spec=True,
    ),
    # Gluon (triton.experimental.gluon, GPU only): explicit async wgmma. K block kb's MMA is issued,
    # then wgmma.wait(1) retires block kb-1 only, so its scaling FMAs and the TMA refill of its
    # stage run while block kb's MMA is on the tensor cores -- what tl.dot's pipeliner cannot do
    # here.
    Variant(
        "gluon64x128s4",
        "gluon",
        "async wgmma, wait(1): scale block kb-1 while MMA kb runs; 4 TMA stages",
    ),
    Variant(
        "gluon64x128s3", "gluon", "as gluon64x128s4 with 3 stages (more CTAs per SM)", stages=3
    ),
    Variant(
        "gluon128x128w8s3",
        "gluon",
        "async wgmma, 2 warpgroups (64 rows each), 3 stages",
        block_m=128,
        warps=8,
        stages=3,
    ),
]
# Not swept: 128x256 and 64x256 tiles. The fp32 accumulator plus the fresh dot result they need are
# 2 x 128 registers per thread (> 255 with addresses), so they spill (the earlier sweep: 329
# TFLOP/s).
# max_num_imprecise_acc: Triton's sm_90 default (2**30) already never splits a 128-deep fp8 dot,
# and smaller values add fp32 promotions, so it cannot make this kernel faster.


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row tiles reuse each column tile of B while it sits in L2.
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % group) % size_m, (tile % group) // size_m


@triton.jit
def _scaled_dot(acc, a, b, s_row, UPCAST: tl.constexpr):
    # s_row = a_s * b_s per row: with BLOCK_N <= 128 the b scale is one scalar per tile, so the
    # promotion is one FMA per accumulator element (prod does mul + FMA with a [1, BLOCK_N] b_s).
    if UPCAST:  # the CPU interpreter has no fp8 dot: same math in fp32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return acc + tl.dot(a, b) * s_row[:, None]


@triton.jit
def _ptr_tile(
    tile,
    a_ptr,
    b_ptr,
    c_ptr,
    as_ptr,
    bs_ptr,
    M,
    N,
    num_m,
    num_n,
    KB,
    stride_am,
    stride_bn,
    stride_cm,
    stride_asm,
    stride_ask,
    stride_bsn,
    stride_bsk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    K_PAIR: tl.constexpr,
    SPLIT_M: tl.constexpr,
    UPCAST: tl.constexpr,
    PLAIN_LOOP: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/cols wrap onto valid ones, so loads need no mask; stores are masked.
    b_ptrs = b_ptr + (offs_n % N)[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    bs_tile = bs_ptr + (pid_n * BLOCK_N // 128) * stride_bsn
    c_mask_n = offs_n[None, :] < N
    if SPLIT_M:
        HALF: tl.constexpr = BLOCK_M // 2
        offs_m0 = pid_m * BLOCK_M + tl.arange(0, HALF)
        offs_m1 = offs_m0 + HALF
        a0_ptrs = a_ptr + (offs_m0 % M)[:, None] * stride_am + offs_k[None, :]
        a1_ptrs = a_ptr + (offs_m1 % M)[:, None] * stride_am + offs_k[None, :]
        as0 = as_ptr + (offs_m0 % M) * stride_asm
        as1 = as_ptr + (offs_m1 % M) * stride_asm
        acc0 = tl.zeros((HALF, BLOCK_N), dtype=tl.float32)
        acc1 = tl.zeros((HALF, BLOCK_N), dtype=tl.float32)
        for kb in tl.range(0, KB, num_stages=NUM_STAGES):
            b = tl.load(b_ptrs + kb * BLOCK_K)
            b_s = tl.load(bs_tile + kb * stride_bsk)
            a0 = tl.load(a0_ptrs + kb * BLOCK_K)
            a1 = tl.load(a1_ptrs + kb * BLOCK_K)
            s0 = tl.load(as0 + kb * stride_ask) * b_s
            s1 = tl.load(as1 + kb * stride_ask) * b_s
            acc0 = _scaled_dot(acc0, a0, b, s0, UPCAST)
            acc1 = _scaled_dot(acc1, a1, b, s1, UPCAST)
        c0 = c_ptr + offs_m0[:, None] * stride_cm + offs_n[None, :]
        tl.store(c0, acc0.to(c_ptr.dtype.element_ty), mask=(offs_m0[:, None] < M) & c_mask_n)
        c1 = c_ptr + offs_m1[:, None] * stride_cm + offs_n[None, :]
        tl.store(c1, acc1.to(c_ptr.dtype.element_ty), mask=(offs_m1[:, None] < M) & c_mask_n)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :]
        as_ptrs = as_ptr + (offs_m % M) * stride_asm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if K_PAIR:
            for kp in tl.range(0, KB // 2, num_stages=NUM_STAGES):
                k0 = 2 * kp
                a0 = tl.load(a_ptrs + k0 * BLOCK_K)
                b0 = tl.load(b_ptrs + k0 * BLOCK_K)
                a1 = tl.load(a_ptrs + (k0 + 1) * BLOCK_K)
                b1 = tl.load(b_ptrs + (k0 + 1) * BLOCK_K)
                s0 = tl.load(as_ptrs + k0 * stride_ask) * tl.load(bs_tile + k0 * stride_bsk)
                s1 = tl.load(as_ptrs + (k0 + 1) * stride_ask) * tl.load(
                    bs_tile + (k0 + 1) * stride_bsk
                )
                if UPCAST:
                    a0 = a0.to(tl.float32)
                    b0 = b0.to(tl.float32)
                    a1 = a1.to(tl.float32)
                    b1 = b1.to(tl.float32)
                # Both dots issued before either result is read: two independent wgmma chains.
                d0 = tl.dot(a0, b0)
                d1 = tl.dot(a1, b1)
                acc = acc + d0 * s0[:, None] + d1 * s1[:, None]
            if KB % 2 == 1:  # odd number of K blocks: the last one alone
                kl = KB - 1
                s = tl.load(as_ptrs + kl * stride_ask) * tl.load(bs_tile + kl * stride_bsk)
                acc = _scaled_dot(
                    acc, tl.load(a_ptrs + kl * BLOCK_K), tl.load(b_ptrs + kl * BLOCK_K), s, UPCAST
                )
        elif PLAIN_LOOP:
            for kb in range(0, KB):
                a = tl.load(a_ptrs + kb * BLOCK_K)
                b = tl.load(b_ptrs + kb * BLOCK_K)
                s = tl.load(as_ptrs + kb * stride_ask) * tl.load(bs_tile + kb * stride_bsk)
                acc = _scaled_dot(acc, a, b, s, UPCAST)
        else:
            for kb in tl.range(0, KB, num_stages=NUM_STAGES):
                a = tl.load(a_ptrs + kb * BLOCK_K)
                b = tl.load(b_ptrs + kb * BLOCK_K)
                s = tl.load(as_ptrs + kb * stride_ask) * tl.load(bs_tile + kb * stride_bsk)
                acc = _scaled_dot(acc, a, b, s, UPCAST)
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & c_mask_n)


@triton.jit
def _gemm_ptr_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    as_ptr,
    bs_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    stride_asm,
    stride_ask,
    stride_bsn,
    stride_bsk,
    NUM_PROGS,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PERSISTENT: tl.constexpr,
    K_PAIR: tl.constexpr,
    SPLIT_M: tl.constexpr,
    UPCAST: tl.constexpr,
    PLAIN_LOOP: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    KB = K // BLOCK_K
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGS, num_stages=1):
            _ptr_tile(
                tile,
                a_ptr,
                b_ptr,
                c_ptr,
                as_ptr,
                bs_ptr,
                M,
                N,
                num_m,
                num_n,
                KB,
                stride_am,
                stride_bn,
                stride_cm,
                stride_asm,
                stride_ask,
                stride_bsn,
                stride_bsk,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                GROUP_M,
                NUM_STAGES,
                K_PAIR,
                SPLIT_M,
                UPCAST,
                PLAIN_LOOP,
            )
    else:
        _ptr_tile(
            tl.program_id(0),
            a_ptr,
            b_ptr,
            c_ptr,
            as_ptr,
            bs_ptr,
            M,
            N,
            num_m,
            num_n,
            KB,
            stride_am,
            stride_bn,
            stride_cm,
            stride_asm,
            stride_ask,
            stride_bsn,
            stride_bsk,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            GROUP_M,
            NUM_STAGES,
            K_PAIR,
            SPLIT_M,
            UPCAST,
            PLAIN_LOOP,
        )


@triton.jit
def _gemm_tma_kernel(
    a_in,
    b_in,
    c_in,
    as_ptr,
    bs_ptr,
    M,
    N,
    K,
    stride_asm,
    stride_ask,
    stride_bsn,
    stride_bsk,
    NUM_PROGS,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PERSISTENT: tl.constexpr,
    FLATTEN: tl.constexpr,
    DEVICE_DESC: tl.constexpr,
    WS_OUTER: tl.constexpr,
    WS_INNER: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # a_in/b_in/c_in: host TensorDescriptors, or (DEVICE_DESC) the raw tensors, row-major.
    if DEVICE_DESC:
        a_desc = tl.make_tensor_descriptor(
            a_in, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K]
        )
        b_desc = tl.make_tensor_descriptor(
            b_in, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K]
        )
        c_desc = tl.make_tensor_descriptor(
            c_in, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N]
        )
    else:
        a_desc = a_in
        b_desc = b_in
        c_desc = c_in
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    KB = K // BLOCK_K
    # Non-persistent: this loop runs once (step = all tiles); persistent: tiles pid,
    # pid + NUM_PROGS, ...
    step = NUM_PROGS if PERSISTENT else num_m * num_n
    for tile in tl.range(
        tl.program_id(0), num_m * num_n, step, flatten=FLATTEN, warp_specialize=WS_OUTER
    ):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = (
            off_m + tl.arange(0, BLOCK_M)
        ) % M  # rows past M (zero-filled by TMA) read a valid scale
        as_ptrs = as_ptr + rows * stride_asm
        bs_tile = bs_ptr + (off_n // 128) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in tl.range(0, KB, num_stages=NUM_STAGES, warp_specialize=WS_INNER):
            a = a_desc.load([off_m, kb * BLOCK_K])
            b = b_desc.load([off_n, kb * BLOCK_K])
            s = tl.load(as_ptrs + kb * stride_ask) * tl.load(bs_tile + kb * stride_bsk)
            acc = _scaled_dot(acc, a, b.T, s, UPCAST)
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


try:  # Gluon's API moves between Triton releases; a failed import only disables the gluon variants
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.language.nvidia.hopper import tma as gtma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

    # Newer Triton renamed the TMA copies (the old names raise there); take whichever this one has.
    _tma_load = getattr(gtma, "async_load", None) or gtma.async_copy_global_to_shared
    _tma_store = getattr(gtma, "async_store", None) or gtma.async_copy_shared_to_global
    GLUON_IMPORT_ERROR = None
except Exception as _e:
    GLUON_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"[:200]

if GLUON_IMPORT_ERROR is None:

    @gluon.jit
    def _gemm_gluon_kernel(
        a_desc,
        b_desc,
        c_desc,
        as_ptr,
        bs_ptr,
        M,
        N,
        K,
        stride_asm,
        stride_ask,
        stride_bsn,
        stride_bsk,
        GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        pid = gl.program_id(0)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = gl.minimum(num_m - first_m, GROUP_M)
        off_m = (first_m + (pid % group) % size_m) * BLOCK_M
        off_n = ((pid % group) // size_m) * BLOCK_N
        KB = K // BLOCK_K

        # One m64nNk32 wgmma per 16 rows x 4 warps; warps stacked along M
        # (BLOCK_M = 16 x num_warps x reps).
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 32]
        )
        row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        rows = (off_m + gl.arange(0, BLOCK_M, layout=row_layout)) % M
        as_ptrs = as_ptr + rows * stride_asm
        bs_tile = bs_ptr + (off_n // 128) * stride_bsn

        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        for i in gl.static_range(STAGES - 1):  # prologue: K blocks 0 .. STAGES-2 in flight
            if i < KB:
                mbarrier.expect(bars.index(i), nbytes)
                _tma_load(a_desc, [off_m, i * BLOCK_K], bars.index(i), a_bufs.index(i))
                _tma_load(b_desc, [off_n, i * BLOCK_K], bars.index(i), b_bufs.index(i))

        zero = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma_layout)
        acc = zero
        prev = zero  # raw dot of K block kb-1 (still in flight at the top of iteration kb)
        s_prev = gl.zeros((BLOCK_M,), gl.float32, layout=row_layout)
        for kb in range(KB):
            slot = kb % STAGES
            mbarrier.wait(bars.index(slot), (kb // STAGES) & 1)
            cur = warpgroup_mma(
                a_bufs.index(slot),
                b_bufs.index(slot).permute((1, 0)),
                zero,
                use_acc=False,
                is_async=True,
            )
            # Retire block kb-1's MMA only; block kb's stays on the tensor cores during what
            # follows.
            cur, prev = warpgroup_mma_wait(num_outstanding=1, deps=(cur, prev))
            nxt = kb + STAGES - 1
            if nxt < KB:  # the stage block kb-1 used is free again
                ns = nxt % STAGES
                mbarrier.expect(bars.index(ns), nbytes)
                _tma_load(a_desc, [off_m, nxt * BLOCK_K], bars.index(ns), a_bufs.index(ns))
                _tma_load(b_desc, [off_n, nxt * BLOCK_K], bars.index(ns), b_bufs.index(ns))
            acc = acc + prev * s_prev[:, None]
            s_prev = gl.load(as_ptrs + kb * stride_ask) * gl.load(bs_tile + kb * stride_bsk)
            prev = cur
        prev = warpgroup_mma_wait(num_outstanding=0, deps=(prev,))
        acc = acc + prev * s_prev[:, None]
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        c_smem = gl.allocate_shared_memory(c_desc.dtype, [BLOCK_M, BLOCK_N], c_desc.layout)
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        _tma_store(c_desc, [off_m, off_n], c_smem)
        gtma.store_wait(pendings=0)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: two programs, so each walks several tiles


def make_launcher(v: Variant, a_MK, as_MKb, b_NK, bs_NbKb):
    """Validate (a, scales, b) for variant v; return a zero-argument function computing C [M, N]
    bf16. Output and descriptors are allocated once here so the timed call is the launch alone."""
    m, k = a_MK.shape
    n = b_NK.shape[0]
    kb = k // BLOCK_K
    if k % BLOCK_K:
        raise ValueError(f"K={k} must be a multiple of {BLOCK_K} for the sweep kernels")
    if tuple(as_MKb.shape) != (m, kb) or tuple(bs_NbKb.shape) != (math.ceil(n / 128), kb):
        raise ValueError(
            f"scales {tuple(as_MKb.shape)}, {tuple(bs_NbKb.shape)}; want ({m}, {kb}), "
            f"({math.ceil(n / 128)}, {kb}) for a [{m}, {k}], b [{n}, {k}]"
        )
    if a_MK.stride(1) != 1 or b_NK.stride(1) != 1:
        raise ValueError(f"a and b must be K-contiguous, strides {a_MK.stride()}, {b_NK.stride()}")
    if v.kind == "prod":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from moeray.kernels.fp8 import fp8_gemm_triton

        if v.maxnreg is None:
            return lambda: fp8_gemm_triton(a_MK, as_MKb, b_NK, bs_NbKb)
        from moeray.kernels.fp8.gemm import _gemm_config

        cfg = {**_gemm_config(m, n, a_MK.device), "maxnreg": v.maxnreg}
        return lambda: fp8_gemm_triton(a_MK, as_MKb, b_NK, bs_NbKb, config=cfg)
    if v.block_n > 128 or 128 % v.block_n:
        raise ValueError(f"{v.name}: block_n={v.block_n} must divide 128 (one b scale per tile)")
    c = torch.empty((m, n), dtype=torch.bfloat16, device=a_MK.device)
    tiles = math.ceil(m / v.block_m) * math.ceil(n / v.block_n)
    progs = min(tiles, _num_sms(a_MK.device) * v.ctas_per_sm) if v.persistent else tiles
    common = dict(
        BLOCK_M=v.block_m,
        BLOCK_N=v.block_n,
        BLOCK_K=BLOCK_K,
        GROUP_M=v.group_m,
        NUM_STAGES=v.stages,
        PERSISTENT=v.persistent,
        UPCAST=INTERPRET,
        num_warps=v.warps,
        num_stages=v.stages,
    )
    if v.maxnreg is not None:
        common["maxnreg"] = v.maxnreg
    sa = (as_MKb.stride(0), as_MKb.stride(1))
    sb = (bs_NbKb.stride(0), bs_NbKb.stride(1))
    if v.kind == "ptr":

        def run():
            _gemm_ptr_kernel[(progs,)](
                a_MK,
                b_NK,
                c,
                as_MKb,
                bs_NbKb,
                m,
                n,
                k,
                a_MK.stride(0),
                b_NK.stride(0),
                c.stride(0),
                *sa,
                *sb,
                progs,
                K_PAIR=v.k_pair,
                SPLIT_M=v.split_m,
                PLAIN_LOOP=v.plain_loop,
                **common,
            )
            return c

        return run
    if v.kind == "tma":
        if v.device_desc:
            if a_MK.stride(0) != k or b_NK.stride(0) != k:
                raise ValueError("device descriptors assume row-major a and b")
            triton.set_allocator(
                lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=a_MK.device)
            )
            a_in, b_in, c_in = a_MK, b_NK, c
        else:
            from triton.tools.tensor_descriptor import TensorDescriptor

            a_in = TensorDescriptor.from_tensor(a_MK, [v.block_m, BLOCK_K])
            b_in = TensorDescriptor.from_tensor(b_NK, [v.block_n, BLOCK_K])
            c_in = TensorDescriptor.from_tensor(c, [v.block_m, v.block_n])

        def run():
            _gemm_tma_kernel[(progs,)](
                a_in,
                b_in,
                c_in,
                as_MKb,
                bs_NbKb,
                m,
                n,
                k,
                *sa,
                *sb,
                progs,
                FLATTEN=v.flatten,
                DEVICE_DESC=v.device_desc,
                WS_OUTER=v.warp_spec and v.persistent,
                WS_INNER=v.warp_spec and not v.persistent,
                **common,
            )
            return c

        return run
    if v.kind == "gluon":
        if GLUON_IMPORT_ERROR is not None:
            raise RuntimeError(f"gluon unavailable: {GLUON_IMPORT_ERROR}")
        if a_MK.device.type != "cuda":
            raise RuntimeError("gluon kernels run on a GPU only (no interpreter)")
        if v.block_m != 16 * v.warps:
            raise ValueError(
                f"{v.name}: block_m={v.block_m} must be 16 x warps={v.warps} "
                "(warps stacked along M)"
            )

        def desc(t, block, dtype):
            layout = gl.NVMMASharedLayout.get_default_for(block, dtype)
            return GluonTensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)

        a_d = desc(a_MK, [v.block_m, BLOCK_K], gl.float8e4nv)
        b_d = desc(b_NK, [v.block_n, BLOCK_K], gl.float8e4nv)
        c_d = desc(c, [v.block_m, v.block_n], gl.bfloat16)

        def run():
            _gemm_gluon_kernel[(tiles,)](
                a_d,
                b_d,
                c_d,
                as_MKb,
                bs_NbKb,
                m,
                n,
                k,
                *sa,
                *sb,
                GROUP_M=v.group_m,
                STAGES=v.stages,
                num_warps=v.warps,
            )
            return c

        return run
    raise ValueError(f"{v.name}: unknown kind {v.kind!r}")


# ----------------------------------------------------------------------------------------------
# Inputs, reference, torch._scaled_mm
# ----------------------------------------------------------------------------------------------


def make_inputs(m: int, n: int, k: int, device: str, seed: int = 0):
    """A with 1x128 scales (returned [M, KB] with strides (1, M): the layout _scaled_mm reads and
    the sweep kernels load coalesced), B with 128x128 block scales [NB, KB]. Rows and blocks get
    different magnitudes so a scale indexing mistake changes the result."""
    g = torch.Generator(device=device).manual_seed(seed)
    kb, nb = k // 128, math.ceil(n / 128)
    x = torch.randn(m, k, device=device, generator=g)
    x = x * torch.exp2(torch.randint(-3, 4, (m, 1), device=device, generator=g).float())
    xs = x.view(m, kb, 128).abs().amax(-1).clamp(min=1e-12) / FP8_MAX  # [M, KB]
    a = (x.view(m, kb, 128) / xs[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(m, k)
    w = torch.randn(n, k, device=device, generator=g)
    w_exp = torch.randint(-4, 3, (nb, kb), device=device, generator=g).float()
    w = w * torch.exp2(w_exp).repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
    wp = torch.nn.functional.pad(w, (0, 0, 0, nb * 128 - n)).view(nb, 128, kb, 128)
    ws = wp.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # [NB, KB]
    b = (
        (wp / ws[:, None, :, None])
        .clamp(-FP8_MAX, FP8_MAX)
        .to(FP8)
        .reshape(nb * 128, k)[:n]
        .contiguous()
    )
    as_cm = xs.t().contiguous().t()  # [M, KB], strides (1, M)
    return a, as_cm, b, ws.contiguous()


def reference(a, as_MKb, b, bs_NbKb) -> torch.Tensor:
    """fp32 (a * a_scale) @ (b * b_scale)^T, no TF32."""
    n = b.shape[0]
    af = a.float() * as_MKb.repeat_interleave(128, 1)
    bf = b.float() * bs_NbKb.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return af @ bf.t()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def scaled_mm_launcher(a, as_MKb, b, bs_NbKb, ref):
    """torch._scaled_mm with 1x128 / 128x128 scales: scale_b as the (KB, NB) view or a contiguous
    copy, whichever this torch accepts and gets right (as moeray.kernels.fp8 probes)."""
    errors = []
    for sb in (bs_NbKb.t(), bs_NbKb.t().contiguous()):

        def fn(sb=sb):
            return torch._scaled_mm(a, b.t(), scale_a=as_MKb, scale_b=sb, out_dtype=torch.bfloat16)

        try:
            err = rel_err(fn(), ref)
        except (RuntimeError, NotImplementedError) as e:
            errors.append(_first_line(e))
            continue
        if err < REL_TOL:
            return fn, err
        errors.append(f"rel err {err:.3g}")
    raise RuntimeError("torch._scaled_mm block-scaled: " + " | ".join(errors))


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    # Triton compile errors put the location first and the reason last.
    if len(lines) > 1 and "Error" in lines[-1]:
        text += " ... " + lines[-1]
    return f"{type(e).__name__}: {text}"[:240]


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def compiled_report() -> list[dict]:
    """Registers, spills and shared memory of every compiled GEMM kernel in this process (the
    Triton JIT caches, keyed by specialization): what decides how many CTAs share an SM."""
    kernels = [("sweep_ptr", _gemm_ptr_kernel), ("sweep_tma", _gemm_tma_kernel)]
    try:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from moeray.kernels.fp8.gemm import _fp8_gemm_kernel

        kernels.append(("prod", _fp8_gemm_kernel))
    except ImportError:
        pass
    rows = []
    for label, fn in kernels:
        for entry in getattr(fn, "device_caches", {}).values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for compiled in getattr(cache, "values", lambda: [])():
                md = compiled.metadata
                rows.append(
                    {
                        "kernel": label,
                        "regs": getattr(compiled, "n_regs", None),
                        "spills": getattr(compiled, "n_spills", None),
                        "shared": getattr(md, "shared", None),
                        "num_warps": getattr(md, "num_warps", None),
                        "num_stages": getattr(md, "num_stages", None),
                        "maxnreg": getattr(md, "maxnreg", None),
                    }
                )
    return rows


def select(names: str | None) -> list[Variant]:
    if not names:
        return VARIANTS
    wanted = [s.strip() for s in names.split(",") if s.strip()]
    out = [v for v in VARIANTS if any(v.name == w or v.name.startswith(w) for w in wanted)]
    if not out:
        raise ValueError(f"--variants {names!r} matches none of {[v.name for v in VARIANTS]}")
    return out


def check_only(variants: list[Variant]) -> int:
    device = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    if device == "cpu" and not INTERPRET:
        raise ValueError("--check-only on CPU needs TRITON_INTERPRET=1")
    failures = 0
    print(f"{'variant':24s} " + " ".join(f"{f'{m}x{n}x{k}':>14s}" for m, n, k in CHECK_SHAPES))
    for v in variants:
        if v.kind == "gluon" and device == "cpu":
            print(
                f"{v.name:24s} skipped: Gluon kernels have no interpreter; checked in the GPU sweep"
            )
            continue
        cells = []
        for m, n, k in CHECK_SHAPES:
            a, sa, b, sb = make_inputs(m, n, k, device)
            ref = reference(a, sa, b, sb)
            try:
                err = rel_err(make_launcher(v, a, sa, b, sb)(), ref)
                ok = err < REL_TOL
                cells.append(f"{err:.2e}{'' if ok else ' BAD'}")
                failures += not ok
            except Exception as e:
                cells.append("ERROR")
                failures += 1
                print(f"  {v.name} {m}x{n}x{k}: {_first_line(e)}")
        print(f"{v.name:24s} " + " ".join(f"{c:>14s}" for c in cells))
    print(f"rel. error vs fp32 dequantized reference, tolerance {REL_TOL}; {failures} failing")
    return 1 if failures else 0


def sweep(variants: list[Variant], rep_ms: int, json_path: str | None, budget_s: float) -> int:
    if not torch.cuda.is_available():
        raise ValueError(
            "the timed sweep needs a CUDA GPU; use TRITON_INTERPRET=1 ... --check-only on CPU"
        )
    t_start = time.perf_counter()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(
        f"device {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"triton {triton.__version__}; do_bench median, rep {rep_ms} ms; M=4096, BLOCK_K=128"
    )
    results: dict[str, dict] = {v.name: {"variant": asdict(v), "shapes": {}} for v in variants}
    results["_scaled_mm"] = {"shapes": {}}
    dead: dict[str, str] = {}  # variant -> why it stopped (a compile error repeats at every shape)
    for m, n, k in ISSUE_SHAPES:
        key = f"{m}x{n}x{k}"
        flop = 2 * m * n * k
        a, sa, b, sb = make_inputs(m, n, k, "cuda")
        ref = reference(a, sa, b, sb)
        try:
            sm_fn, sm_err = scaled_mm_launcher(a, sa, b, sb, ref)
            sm_ms = triton.testing.do_bench(sm_fn, warmup=25, rep=rep_ms, return_mode="median")
            results["_scaled_mm"]["shapes"][key] = {
                "ms": sm_ms,
                "TFLOPs": flop / sm_ms / 1e9,
                "rel_err": sm_err,
            }
            print(
                f"\n== {key}: _scaled_mm {sm_ms:.4f} ms  {flop / sm_ms / 1e9:7.1f} TFLOP/s  "
                f"rel_err {sm_err:.1e}"
            )
        except Exception as e:
            sm_ms = None
            print(f"\n== {key}: _scaled_mm unavailable: {_first_line(e)}")
        for v in variants:
            if v.name in dead:
                continue
            if time.perf_counter() - t_start > budget_s:
                dead[v.name] = f"skipped: time budget {budget_s:.0f} s spent"
                continue
            t0 = time.perf_counter()
            try:
                fn = make_launcher(v, a, sa, b, sb)
                err = rel_err(fn(), ref)
                compile_s = time.perf_counter() - t0
                if not err < REL_TOL:
                    raise RuntimeError(f"wrong result: rel err {err:.3g} >= {REL_TOL}")
                ms = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
            except Exception as e:
                why = _first_line(e)
                dead[v.name] = why
                print(f"  {v.name:24s} FAILED {why}")
                continue
            tf = flop / ms / 1e9
            ratio = sm_ms / ms if sm_ms else float("nan")
            results[v.name]["shapes"][key] = {
                "ms": ms,
                "TFLOPs": tf,
                "ratio_vs_scaled_mm": ratio,
                "rel_err": err,
            }
            print(
                f"  {v.name:24s} {ms:.4f} ms {tf:7.1f} TFLOP/s  x{ratio:.3f}  err {err:.1e}  "
                f"(first call {compile_s:.1f} s)"
            )
        del a, sa, b, sb, ref
        torch.cuda.empty_cache()
    for name, why in dead.items():
        results[name]["failed"] = why
    # Final table: ratio to _scaled_mm per shape, min and geometric mean, best first.
    keys = [f"{m}x{n}x{k}" for m, n, k in ISSUE_SHAPES]
    short = [f"N{n}K{k}" for _, n, k in ISSUE_SHAPES]
    rows = []
    for v in variants:
        sh = results[v.name]["shapes"]
        ratios = [sh[k_]["ratio_vs_scaled_mm"] if k_ in sh else float("nan") for k_ in keys]
        tfs = [sh[k_]["TFLOPs"] if k_ in sh else float("nan") for k_ in keys]
        done = [r for r in ratios if not math.isnan(r)]
        gmean = math.exp(sum(map(math.log, done)) / len(done)) if done else float("nan")
        rows.append((v, ratios, tfs, min(done) if len(done) == len(keys) else float("nan"), gmean))
    rows.sort(key=lambda r: -(r[4] if not math.isnan(r[4]) else -1))
    sm = results["_scaled_mm"]["shapes"]
    print(
        "\nFINAL: TFLOP/s (ratio to torch._scaled_mm in the same run); issue #4 target: "
        "every ratio >= 0.70"
    )
    print(
        f"{'variant':24s} "
        + " ".join(f"{s:>16s}" for s in short)
        + f" {'min':>6s} {'gmean':>6s}  note"
    )
    print(
        f"{'_scaled_mm':24s} "
        + " ".join(
            f"{sm[k_]['TFLOPs']:8.1f}        " if k_ in sm else f"{'n/a':>16s}" for k_ in keys
        )
    )
    for v, ratios, tfs, mn, gm in rows:
        cells = " ".join(
            f"{t:7.1f} (x{r:.3f})"
            if not math.isnan(r)
            else (f"{t:7.1f}   (n/a) " if not math.isnan(t) else f"{'-':>16s}")
            for t, r in zip(tfs, ratios, strict=True)
        )
        note = dead.get(v.name, "")
        print(f"{v.name:24s} {cells} {mn:6.3f} {gm:6.3f}  {note[:90]}")
    try:
        compiled = compiled_report()
    except Exception as e:
        compiled = [{"error": _first_line(e)}]
    print("compiled kernels (registers/thread decide CTAs per SM: 3 x 128 threads need <= 168):")
    for row in compiled:
        print("  " + " ".join(f"{k}={v}" for k, v in row.items()))
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(
                {
                    "device": props.name,
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "torch": torch.__version__,
                    "triton": triton.__version__,
                    "command": " ".join(sys.argv),
                    "results": results,
                    "compiled": compiled,
                },
                f,
                indent=1,
            )
        print(f"wrote {json_path}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--check-only",
        action="store_true",
        help="correctness at small shapes only (CPU: TRITON_INTERPRET=1)",
    )
    p.add_argument("--variants", default=None, help="comma-separated names or name prefixes")
    p.add_argument(
        "--rep", type=int, default=100, help="do_bench repetition time per measurement, ms"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=150.0,
        help="stop timing new variants after this many seconds",
    )
    out = os.environ.get("OUT")
    p.add_argument("--json", default=os.path.join(out, "fp8_gemm_sweep.json") if out else None)
    args = p.parse_args()
    if args.rep <= 0 or args.budget <= 0:
        raise ValueError(f"--rep {args.rep} and --budget {args.budget} must be positive")
    variants = select(args.variants)
    if args.check_only:
        return check_only(variants)
    return sweep(variants, args.rep, args.json, args.budget)


if __name__ == "__main__":
    sys.exit(main())
