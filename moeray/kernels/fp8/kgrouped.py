"""The k-grouped block-scaled e4m3 GEMM: the weight gradients of all experts in one launch
(DeepGEMM's k-grouped layout), on the helpers of `gemm.py`.

Used by the one-process training path only (`parallel/experts_mlp.py`, `kgrouped_wgrad`): wired
into the pipeline's grouped FP8 experts, the 4x H200 train bench hung in step 1 (cause not found;
benchmarks/notes-train.md, "The k-grouped weight-grad GEMM")."""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    FP8_DTYPE,
    cdiv,
    check_gradient_out,
    check_shape,
    check_tensor,
    check_tile_config,
    interpreting,
    scaled_block_dot,
    use_triton,
)
from moeray.kernels.fp8.gemm import _store_tile, _tile_coords, fp8_gemm_ref


# The token count P changes every training step, and Triton specializes integer arguments on
# divisibility by 16 (and on == 1): a stride of P or P / 128 would pick a new variant, compiled and
# loaded mid-step, whenever its divisibility changes. So the kernel takes P_BLOCKS = P / 128 and
# `do_not_specialize`s it, and forms the row stride P = P_BLOCKS * 128 itself: the compiler then
# knows every row of a and b starts 128-byte aligned and loads 16 e4m3 bytes per instruction.
# Given P as an unspecialized stride it could not, and loaded byte by byte: 5.6 ms a call at
# Moonlight's expert shapes (~25 TFLOP/s; results/train-1gpu-nvidia-h200.json, fp8-kgrouped).
@triton.jit(do_not_specialize=["P_BLOCKS", "stride_asm", "stride_bsn"])
def _fp8_gemm_kgrouped_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    as_ptr,
    bs_ptr,
    ends_ptr,
    M,
    N,
    P_BLOCKS,
    stride_ce,
    stride_cm,
    stride_cn,
    stride_asm,
    stride_ask,
    stride_bsn,
    stride_bsk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # c[e] += the product (c fp32): a gradient summed over micro-batches
):
    # c[e] = a[:, tokens of e] @ b[:, tokens of e]^T: each expert reduces over its own 128-aligned
    # token range [ends[e - 1], ends[e]) of the shared K axis.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles = num_m * num_n
    pid = tl.program_id(0)
    e = pid // tiles
    pid_m, pid_n = _tile_coords(pid % tiles, num_m, num_n, GROUP_M)
    k_start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
    k_end = tl.load(ends_ptr + e)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    stride_p = P_BLOCKS.to(tl.int64) * 128  # a [M, P] and b [N, P], both row-major
    a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_p + offs_k[None, :]
    b_ptrs = b_ptr + offs_k[:, None] + (offs_n % N)[None, :] * stride_p
    as_ptrs = as_ptr + (offs_m % M) * stride_asm
    bs_ptrs = bs_ptr + (offs_n % N) * stride_bsn  # b's scales are per 1x128 row group
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # an expert without tokens has an empty range: its tile stays zero
    for kb in tl.range(k_start // BLOCK_K, k_end // BLOCK_K, num_stages=NUM_STAGES):
        a = tl.load(a_ptrs + kb * BLOCK_K)
        b = tl.load(b_ptrs + kb * BLOCK_K)
        a_s = tl.load(as_ptrs + kb * stride_ask)
        b_s = tl.load(bs_ptrs + kb * stride_bsk)
        acc = scaled_block_dot(acc, a, b, a_s, b_s, False, UPCAST)
    c_e = c_ptr + e.to(tl.int64) * stride_ce
    if ACCUMULATE:
        c_ptrs = c_e + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        acc += tl.load(c_ptrs, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
    _store_tile(c_e, acc, offs_m, offs_n, M, N, stride_cm, stride_cn)


_KGROUPED_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
# What a `config` may set (BLOCK_K stays 128: one token block of the 128x1 scales per step).
CONFIG_KEYS = frozenset({"BLOCK_M", "BLOCK_N", "GROUP_M", "num_warps", "num_stages"})


def check_config(cfg: dict) -> None:
    """Raise ValueError naming a bad tile config (keys CONFIG_KEYS; tiles powers of two >= 16)."""
    check_tile_config(cfg, CONFIG_KEYS, ("BLOCK_M", "BLOCK_N"))


def fp8_gemm_kgrouped(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    ends: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    accumulate_into: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """k-grouped block-scaled GEMM: a [M, P] and b [N, P] are two contiguous 128x1-quantized
    (act_quant_t) tensors over the tokens of all experts, expert e's tokens the columns
    [ends[e - 1], ends[e]) (from 0 for e = 0):
        c[e] = a[:, tokens of e] @ b[:, tokens of e]^T        -> c [E, M, N]
    a_scale [M, P/128], b_scale [N, P/128]; ends int32 [E], nondecreasing multiples of 128, at
    most P (the device reads them, so they are checked here only when they are on the CPU). An
    expert without tokens gets exact zeros. Tokens past ends[-1] are never read (the tail of a
    layout planned on the device, `GroupedExperts`), whatever they hold.

    `accumulate_into`: an fp32 [E, M, N] tensor (a weight's gradient) that gets `+= c` in the
    kernel's epilogue and is returned (`out_dtype` is then ignored): one pass over it instead of
    writing c and adding it in a second kernel (~2.2 GB of traffic less per call at Moonlight's
    64 experts x 2048 x 1408). `config` (keys CONFIG_KEYS) overrides the default tile (the
    bench's sweep)."""
    check_tensor(a_fp8, "a_fp8", dtypes=(FP8_DTYPE,), ndim=2, contiguous=True)
    check_tensor(b_fp8, "b_fp8", dtypes=(FP8_DTYPE,), ndim=2, contiguous=True, device=a_fp8.device)
    check_tensor(a_scale, "a_scale", dtypes=(torch.float32,), ndim=2, device=a_fp8.device)
    check_tensor(b_scale, "b_scale", dtypes=(torch.float32,), ndim=2, device=a_fp8.device)
    check_tensor(ends, "ends", dtypes=(torch.int32,), ndim=1, device=a_fp8.device)
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"out_dtype={out_dtype}; accepted: torch.bfloat16, torch.float32")
    (m, p), n = a_fp8.shape, b_fp8.shape[0]
    if b_fp8.shape[1] != p or p % 128:
        raise ValueError(
            f"a_fp8 [M, P] {tuple(a_fp8.shape)} and b_fp8 [N, P] {tuple(b_fp8.shape)}: "
            "P must match and be a multiple of 128"
        )
    check_shape(a_scale, "a_scale", (m, p // 128))
    check_shape(b_scale, "b_scale", (n, p // 128))
    if accumulate_into is not None:
        check_gradient_out(accumulate_into, "accumulate_into", (ends.shape[0], m, n), a_fp8.device)
    if not ends.is_cuda:
        e_list = ends.tolist()
        if any(x % 128 or x > p for x in e_list) or any(
            y < x for x, y in itertools.pairwise(e_list)
        ):
            raise ValueError(f"ends={e_list}: expected nondecreasing multiples of 128 up to P={p}")
    if not use_triton(a_fp8):
        c = fp8_gemm_kgrouped_ref(a_fp8, a_scale, b_fp8, b_scale, ends, out_dtype)
        return c if accumulate_into is None else accumulate_into.add_(c)
    if p == 0:  # no tokens at all: every expert's gradient is zero (and no stride-0 variant)
        if accumulate_into is not None:
            return accumulate_into
        return torch.zeros((ends.shape[0], m, n), dtype=out_dtype, device=a_fp8.device)
    c = (
        torch.empty((ends.shape[0], m, n), dtype=out_dtype, device=a_fp8.device)
        if accumulate_into is None
        else accumulate_into
    )
    if c.numel() == 0:
        return c
    if config is not None:
        check_config(config)
        cfg = dict(config, BLOCK_K=128)
    else:
        small = dict(BLOCK_M=16, BLOCK_N=32, num_stages=1) if interpreting() else {}
        cfg = dict(_KGROUPED_CONFIG, **small)
    grid = (ends.shape[0] * cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]),)
    _fp8_gemm_kgrouped_kernel[grid](
        a_fp8,
        b_fp8,
        c,
        a_scale,
        b_scale,
        ends,
        m,
        n,
        p // 128,
        c.stride(0),
        c.stride(1),
        c.stride(2),
        a_scale.stride(0),
        a_scale.stride(1),
        b_scale.stride(0),
        b_scale.stride(1),
        UPCAST=interpreting(),
        NUM_STAGES=cfg["num_stages"],
        ACCUMULATE=accumulate_into is not None,
        **cfg,
    )
    return c


def fp8_gemm_kgrouped_ref(a_fp8, a_scale, b_fp8, b_scale, ends, out_dtype=torch.bfloat16):
    """fp8_gemm_kgrouped in PyTorch: fp8_gemm_ref per expert on its token columns."""
    c = torch.zeros(
        (ends.shape[0], a_fp8.shape[0], b_fp8.shape[0]), dtype=out_dtype, device=a_fp8.device
    )
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            t, tb = slice(start, end), slice(start // 128, end // 128)
            c[e] = fp8_gemm_ref(a_fp8[:, t], a_scale[:, tb], b_fp8[:, t], b_scale[:, tb], out_dtype)
        start = end
    return c
