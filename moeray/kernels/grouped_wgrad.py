"""The k-grouped BF16/FP16 weight-gradient GEMM: every expert's dW in one launch, written in fp32
and optionally added into an existing fp32 gradient in the epilogue (`grouped_wgrad`), with its
PyTorch reference `grouped_wgrad_ref`.

Legend: P rows (tokens of all experts, each expert's a contiguous range), N and K the widths of dy
and x (dW [E, N, K] = a weight's [out, in]), E experts.

    c[e] (+)= dy[rows of e]^T @ x[rows of e]      dy [P, N], x [P, K] -> c [E, N, K] fp32

Why: the BF16 experts' weight gradients came from `torch._grouped_mm` (CUTLASS), which writes bf16
only; the path then cast them to fp32 (~0.4 ms a projection at Moonlight's 64 x 1408 x 2048) and
autograd added them into the fp32 gradient (~0.55 ms more): ~900 casts and ~1,300 adds a step,
~160 ms of a 0.7 s one-H200 step. Here one launch writes fp32, or reads, adds and writes the
gradient once (`accumulate_into`), and each product is summed in fp32 instead of rounded to bf16.

Rows of expert e are [ends[e - 1], ends[e]) (from 0 for e = 0), any counts: `GroupedExperts`
starts each expert at a multiple of 16 on CUDA, and reduction tiles (64 rows) straddle experts, so
the kernel masks rows outside the range. Kernels know no model: the choice to use it lives in
`platform/parallel/grouped_experts.py` (`use_grouped_wgrad`).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    cdiv,
    check_gradient_out,
    check_tensor,
    check_tile_config,
    interpreting,
    use_triton,
)
from moeray.kernels.fp8.gemm import _tile_coords

DTYPES = (torch.bfloat16, torch.float16)
CONFIG_KEYS = frozenset({"BLOCK_N", "BLOCK_K", "BLOCK_P", "GROUP_N", "num_warps", "num_stages"})
# Default tile: the best of `moeray bench kernels --only grouped_wgrad_sweep` on an H200 at all
# four shapes, accumulating and fresh (results/kernels-nvidia-h200-grouped-wgrad.json): a 128x128
# fp32 accumulator over 4 warps, 32 token rows a step, 4 stages of (128 + 128) x 32 bf16 = 64 KB
# of shared memory. Moonlight's accumulate call: 592 us against 787 for 128x128x64 / 8 warps / 3
# stages (and 1,308 for torch._grouped_mm + cast + add). Each expert reduces only ~288 rows at
# 18,432 rows / 64 experts, so short row steps waste less on the experts' ragged ends; the
# epilogue's fp32 read-modify-write (738 MB each way at 64 x 1408 x 2048) is much of the time.
DEFAULT_CONFIG = dict(BLOCK_N=128, BLOCK_K=128, BLOCK_P=32, GROUP_N=8, num_warps=4, num_stages=4)
# The interpreter runs numpy per program: small tiles keep CPU tests fast; the same code path.
INTERPRETER_CONFIG = dict(BLOCK_N=16, BLOCK_K=32, BLOCK_P=16, GROUP_N=2, num_warps=4, num_stages=1)


# No argument depends on the token count P (the rows live behind ends_ptr, the row strides are
# widths): Triton specializes integer arguments on divisibility by 16, and a P-dependent
# one would compile a new variant mid-step whenever the count's divisibility changed
# (kernels/fp8/kgrouped.py: such a compile is a suspect in a multi-GPU hang). Variants: one per
# dtype, ACCUMULATE, tile config and divisibility of N and K (fixed per projection).
@triton.jit
def _grouped_wgrad_kernel(
    dy_ptr,
    x_ptr,
    c_ptr,
    ends_ptr,
    N,
    K,
    stride_dyp,  # dy [P, N] rows: N, or 2N for a half of a [P, 2N] tensor
    stride_xp,  # x [P, K] rows: K
    stride_ce,
    stride_cn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    GROUP_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # c[e] += the product: a gradient summed over micro-batches
    UPCAST: tl.constexpr,  # the interpreter (3.9) multiplies bf16 as raw bits: same math in fp32
):
    num_n = tl.cdiv(N, BLOCK_N)
    num_k = tl.cdiv(K, BLOCK_K)
    tiles = num_n * num_k
    pid = tl.program_id(0)
    # expert-major launch order: the tiles of one expert run together while its rows sit in L2
    e = pid // tiles
    pid_n, pid_k = _tile_coords(pid % tiles, num_n, num_k, GROUP_N)
    p_start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
    p_end = tl.load(ends_ptr + e)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_P)
    first = p_start // BLOCK_P
    # an expert without rows runs no step: its tile stays zero
    steps = tl.where(p_end > p_start, tl.cdiv(p_end, BLOCK_P) - first, 0)
    # the first row as a 64-bit offset (P x width passes 2^31 at V3 widths past ~300k rows); the
    # pointers then advance by BLOCK_P rows a step
    row0 = (first * BLOCK_P).to(tl.int64)
    dy_ptrs = dy_ptr + row0 * stride_dyp + offs_p[:, None] * stride_dyp + offs_n[None, :]
    x_ptrs = x_ptr + row0 * stride_xp + offs_p[:, None] * stride_xp + offs_k[None, :]
    n_ok = offs_n[None, :] < N
    k_ok = offs_k[None, :] < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for i in tl.range(0, steps, num_stages=NUM_STAGES):
        rows = (first + i) * BLOCK_P + offs_p
        in_e = ((rows >= p_start) & (rows < p_end))[:, None]  # the tile's rows of this expert
        a = tl.load(dy_ptrs, mask=in_e & n_ok, other=0.0)  # [BLOCK_P, BLOCK_N]
        b = tl.load(x_ptrs, mask=in_e & k_ok, other=0.0)  # [BLOCK_P, BLOCK_K]
        if UPCAST:  # exact: a bf16 or fp16 product fits fp32's mantissa
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc)  # sm_90: wgmma takes the transposed a from shared memory
        dy_ptrs += BLOCK_P * stride_dyp
        x_ptrs += BLOCK_P * stride_xp
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + offs_n[:, None] * stride_cn + offs_k[None, :]
    c_ok = (offs_n[:, None] < N) & k_ok
    if ACCUMULATE:  # one fp32 add of the same two values as `fresh + grad`: bit-equal to it
        acc += tl.load(c_ptrs, mask=c_ok, other=0.0)
    tl.store(c_ptrs, acc, mask=c_ok)


def check_config(cfg: dict) -> None:
    """Raise ValueError naming a bad tile config (keys CONFIG_KEYS; tiles powers of two >= 16)."""
    check_tile_config(cfg, CONFIG_KEYS, ("BLOCK_N", "BLOCK_K", "BLOCK_P"))


def _check_ends(ends: torch.Tensor, p: int) -> None:
    """Nondecreasing, from 0 up to P: checked only when the values are on the CPU (on the GPU
    reading them would synchronize the host with the device every call)."""
    if ends.is_cuda:
        return
    e_list = ends.tolist()
    if (e_list and (e_list[0] < 0 or e_list[-1] > p)) or any(
        y < x for x, y in itertools.pairwise(e_list)
    ):
        raise ValueError(f"ends={e_list}: expected nondecreasing row counts from 0 up to P={p}")


def grouped_wgrad(
    dy_PN: torch.Tensor,
    x_PK: torch.Tensor,
    ends: torch.Tensor,
    *,
    accumulate_into: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """c [E, N, K] fp32, c[e] = dy[rows of e]^T @ x[rows of e], the rows of expert e being
    [ends[e - 1], ends[e]) (from 0 for e = 0); an expert without rows gets exact zeros.

    dy_PN [P, N] and x_PK [P, K]: bf16 or fp16 (one dtype), unit stride along the row (any row
    stride: e.g. the gate and up halves of one [P, 2I] gradient), on one device. ends: int32
    [E] on that device, nondecreasing, at most P (checked only when on the CPU); any counts, rows
    past ends[-1] are not read. Sums in fp32.

    `accumulate_into`: an fp32 contiguous [E, N, K] tensor (a weight's gradient) that gets `+= c`
    in the epilogue and is returned: one read-modify-write pass instead of writing c and adding it
    in a second kernel; an expert without rows leaves its slice unchanged. Bit-equal to
    `accumulate_into + grouped_wgrad(dy_PN, x_PK, ends)`.

    `config` (keys CONFIG_KEYS) overrides DEFAULT_CONFIG (the bench's sweep). On CPU tensors
    outside the interpreter it runs `grouped_wgrad_ref`."""
    check_tensor(dy_PN, "dy_PN", dtypes=DTYPES, ndim=2)
    check_tensor(x_PK, "x_PK", dtypes=(dy_PN.dtype,), ndim=2, device=dy_PN.device)
    for name, t in (("dy_PN", dy_PN), ("x_PK", x_PK)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(
                f"{name} has strides {t.stride()}: its rows must be contiguous (stride 1 along "
                "the last dim; any row stride)"
            )
    check_tensor(ends, "ends", dtypes=(torch.int32,), ndim=1, device=dy_PN.device)
    (p, n), k, e = dy_PN.shape, x_PK.shape[1], ends.shape[0]
    if x_PK.shape[0] != p:
        raise ValueError(
            f"dy_PN [P, N] {tuple(dy_PN.shape)} and x_PK [P, K] {tuple(x_PK.shape)}: "
            "P (rows) must match"
        )
    if accumulate_into is not None:
        check_gradient_out(accumulate_into, "accumulate_into", (e, n, k), dy_PN.device)
    _check_ends(ends, p)
    cfg = config if config is not None else INTERPRETER_CONFIG if interpreting() else DEFAULT_CONFIG
    check_config(cfg)
    if not use_triton(dy_PN):
        c = grouped_wgrad_ref(dy_PN, x_PK, ends)
        return c if accumulate_into is None else accumulate_into.add_(c)
    if accumulate_into is not None:
        c = accumulate_into
    elif p == 0:  # no rows at all: every expert's gradient is zero, no launch
        return torch.zeros((e, n, k), dtype=torch.float32, device=dy_PN.device)
    else:
        c = torch.empty((e, n, k), dtype=torch.float32, device=dy_PN.device)
    if p == 0 or c.numel() == 0:
        return c
    grid = (e * cdiv(n, cfg["BLOCK_N"]) * cdiv(k, cfg["BLOCK_K"]),)
    _grouped_wgrad_kernel[grid](
        dy_PN,
        x_PK,
        c,
        ends,
        n,
        k,
        dy_PN.stride(0),
        x_PK.stride(0),
        c.stride(0),
        c.stride(1),
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_P=cfg["BLOCK_P"],
        GROUP_N=cfg["GROUP_N"],
        NUM_STAGES=cfg["num_stages"],
        ACCUMULATE=accumulate_into is not None,
        UPCAST=interpreting(),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return c


def grouped_wgrad_ref(dy_PN: torch.Tensor, x_PK: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """grouped_wgrad in PyTorch: one fp32 matmul per expert on its rows; zeros for experts without
    rows."""
    c = torch.zeros(
        (ends.shape[0], dy_PN.shape[1], x_PK.shape[1]), dtype=torch.float32, device=dy_PN.device
    )
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            c[e] = dy_PN[start:end].float().t() @ x_PK[start:end].float()
        start = end
    return c
