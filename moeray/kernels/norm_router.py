"""The residual add, the RMSNorm after it and the MoE router's logits of the normed rows in one
launch, for decode's few tokens: `norm_router_logits`, its PyTorch reference
`norm_router_logits_ref` (`norm.rms_norm_ref` then `router_logits.router_logits_ref`), the test
`norm_router_logits_applies` by which the model's Gate (`moeray.platform.model.moe.Gate.
norm_logits`) chooses it, and the kernel `_norm_router_logits_kernel`. On by default;
MOERAY_FUSED_NORM_ROUTER=0 keeps the norm and the router apart (the A/B switch); past 32 rows it
runs to 64 for small routers (`max_tokens`; MOERAY_FUSED_NORM_ROUTER_WIDE=0 keeps 32).

Legend: T tokens (<= `max_tokens`), D model width, E routed experts, BE experts per program,
BD features per step.

Why: at decode batch 1 every MoE layer runs the post-attention `rms_norm` (one program, ~2.5 us
on an H100 for a 4 KB row: the PDL wait, two L2 reads, a reduction and the writes, all on the
step's chain of dependent launches; 27 of a Moonlight step's 55 norms) and then `router_logits`.
Here each of the router's programs recomputes the norm of its token's row (8 KB of L2 reads at
Moonlight's D = 2,048) before its dot products, and the first program of each token also stores
the sum and the normed row for the experts after the router: one launch fewer per MoE layer, and
the norm's reads overlap the router's weight reads, which start before the PDL wait. Measured
in the engine on an H100 (`bench engine --ab NORM_ROUTER`, benchmarks/results/engine-nvidia-
h100-80gb-hbm3-*-normrouter.json): Moonlight's batch-1 decode graph 0.989x (bf16) and 0.984x
(FP8) as long, ~0.8 us a MoE layer; batch 8 and V3 widths (3 MoE layers, rows of 4 steps read
twice) even within the run's spread.

Numerics: h = x + residual rounded once to the row's dtype, rstd = 1 / sqrt(mean(h^2) + eps) in
fp32, y = weight * (h * rstd rounded to the dtype), rounded again: `rms_norm`'s formula, so y and
h equal its outputs up to the fp32 order of the sum of squares (one rounding step of y at most);
the logits are `router_logits`' per-token dot products of that y.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    check_tensor,
    pdl_launch,
    pdl_wait,
    switched_off,
    to_dtype_rn,
    use_triton,
)
from moeray.kernels.norm import MAX_D, rms_norm_ref
from moeray.kernels.router_logits import (
    DTYPES,
    ROW_MAX_TOKENS,
    _w_step,
    router_logits_ref,
    row_tiles,
)

# The per-token programs re-read all of W and the row for each token: router_logits' own bound.
MAX_TOKENS = ROW_MAX_TOKENS
# Decode batches up to this many rows take the fold too, where the router's weight is at most
# WIDE_MAX_ROUTER_BYTES (MOERAY_FUSED_NORM_ROUTER_WIDE=0 keeps MAX_TOKENS). Why: past 32 rows
# the post-attention norm runs alone and the router as cuBLAS's fp32-output GEMM; in Moonlight's
# FP8 batch-64 profile on an H200 (benchmarks/results/engine-nvidia-h200-moonlight-fp8-
# defaults5.json) `_rms_norm_kernel` takes 2.3 us a call and the 26 calls of the fp32-output GEMM
# (`nvjet_sm90_tss_64x8...`) 8.0 us each for a 64 x 64 x 2,048 product: latency, not bytes. Folded,
# each token's programs re-read the 256 KB router and the token's rows from L2 (WIDE_ROWS expert
# rows a program: 64 x 16 programs, ~25 MB of L2 reads at Moonlight batch 64). On an H100 at
# Moonlight batch 64 (`bench engine --ab NORM_ROUTER_WIDE`, benchmarks/results/engine-nvidia-
# h100-80gb-hbm3-moonlight-{fp8-moelaunches,bf16-launches}.json): decode graph 0.984x as long in
# FP8, 0.996x in bf16 (its run's own spread 1.000x).
WIDE_MAX_TOKENS = 64
# Moonlight's router is 256 KB (64 x 2,048 bf16); DeepSeek-V3's 3.7 MB would be ~0.35 GB of L2
# reads at 64 rows, where the GEMM reads it once.
WIDE_MAX_ROUTER_BYTES = 512 * 1024
# Expert rows a program past MAX_TOKENS rows: a quarter of the x and residual re-reads of one.
WIDE_ROWS = 4


def max_tokens(router_weight_ED: torch.Tensor) -> int:
    """The most rows `norm_router_logits` takes with this router weight: WIDE_MAX_TOKENS for a
    router of at most WIDE_MAX_ROUTER_BYTES (unless MOERAY_FUSED_NORM_ROUTER_WIDE=0), else
    MAX_TOKENS."""
    small = router_weight_ED.numel() * router_weight_ED.element_size() <= WIDE_MAX_ROUTER_BYTES
    return WIDE_MAX_TOKENS if small and not switched_off("NORM_ROUTER_WIDE") else MAX_TOKENS


def norm_router_logits_ref(
    x_TD: torch.Tensor,
    norm_weight_D: torch.Tensor,
    eps: float,
    router_weight_ED: torch.Tensor,
    residual_TD: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp32 logits [T, E], y = norm(h) [T, D], h = x + residual [T, D]; x without one)."""
    y, h = rms_norm_ref(x_TD, norm_weight_D, eps, residual_TD)
    return router_logits_ref(y, router_weight_ED), y, h


@triton.jit
def _h_step(x_ptr, r_ptr, t, stride_x, stride_r, d0, offs_d, D, HAS_RESIDUAL: tl.constexpr):
    """h = x (+ residual) of token t, features d0 .. d0 + BD, rounded to x's dtype (0 past D)."""
    ok = d0 + offs_d < D
    h = tl.load(x_ptr + t * stride_x + d0 + offs_d, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + t * stride_r + d0 + offs_d, mask=ok, other=0.0)
        h = to_dtype_rn(h.to(tl.float32) + r.to(tl.float32), h.dtype)
    return h


@triton.jit
def _y_step(h, rstd, nw_ptr, d0, offs_d, D):
    """The normed features weight * (h * rstd rounded to h's dtype), rounded to h's dtype."""
    nw = tl.load(nw_ptr + d0 + offs_d, mask=d0 + offs_d < D, other=0.0)
    normed = to_dtype_rn(h.to(tl.float32) * rstd, h.dtype)
    return to_dtype_rn(normed.to(tl.float32) * nw.to(tl.float32), h.dtype)


@triton.jit
def _norm_router_logits_kernel(
    x_ptr,
    r_ptr,
    nw_ptr,
    w_ptr,
    logits_ptr,
    y_ptr,
    h_ptr,
    D,
    E,
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    stride_w,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BE: tl.constexpr,
    BD: tl.constexpr,
    PDL: tl.constexpr,  # launched with PDL: the first router weight step is loaded before the wait
):
    """Token program_id(1)'s logits of experts program_id(0) * BE ..; the programs of expert block
    0 also store the token's y (and h with a residual)."""
    t = tl.program_id(1).to(tl.int64)
    writer = tl.program_id(0) == 0
    offs_e = tl.program_id(0) * BE + tl.arange(0, BE)
    ok_e = offs_e < E
    offs_d = tl.arange(0, BD)
    # The router weights (no kernel of the step writes them) before the wait; the row after.
    w = _w_step(w_ptr, offs_e, ok_e, stride_w, 0, offs_d, D)
    pdl_wait(PDL)
    h = _h_step(x_ptr, r_ptr, t, stride_x, stride_r, 0, offs_d, D, HAS_RESIDUAL)
    if HAS_RESIDUAL and writer:
        tl.store(h_ptr + t * stride_h + offs_d, h, mask=offs_d < D)
    hf = h.to(tl.float32)
    sq = hf * hf
    for d0 in range(BD, D, BD):  # wider rows (V3's 7,168): the rest of the sum of squares
        hd = _h_step(x_ptr, r_ptr, t, stride_x, stride_r, d0, offs_d, D, HAS_RESIDUAL)
        if HAS_RESIDUAL and writer:
            tl.store(h_ptr + t * stride_h + d0 + offs_d, hd, mask=d0 + offs_d < D)
        hdf = hd.to(tl.float32)
        sq += hdf * hdf
    rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / D + eps)
    # The first step's row is still in registers (the whole row at D <= BD); wider rows read
    # their further steps again (L2: this token's first program has just read them).
    y = _y_step(h, rstd, nw_ptr, 0, offs_d, D)
    if writer:
        tl.store(y_ptr + t * stride_y + offs_d, y, mask=offs_d < D)
    acc = tl.sum(w * y.to(tl.float32)[None, :], axis=1)
    for d0 in range(BD, D, BD):
        hd = _h_step(x_ptr, r_ptr, t, stride_x, stride_r, d0, offs_d, D, HAS_RESIDUAL)
        yd = _y_step(hd, rstd, nw_ptr, d0, offs_d, D)
        if writer:
            tl.store(y_ptr + t * stride_y + d0 + offs_d, yd, mask=d0 + offs_d < D)
        wd = _w_step(w_ptr, offs_e, ok_e, stride_w, d0, offs_d, D)
        acc += tl.sum(wd * yd.to(tl.float32)[None, :], axis=1)
    tl.store(logits_ptr + t * E + offs_e, acc, mask=ok_e)


def norm_router_logits_applies(
    x_TD: torch.Tensor,
    norm_weight_D: torch.Tensor,
    router_weight_ED: torch.Tensor,
    residual_TD: torch.Tensor | None = None,
) -> bool:
    """Whether `norm_router_logits` takes these as they are (not with MOERAY_FUSED_NORM_ROUTER=0):
    x [T, D] with 1 <= T <= `max_tokens` and D <= norm.MAX_D, the norm weight [D], the router weight
    [E, D] and the residual (x's shape) all in x's dtype (bf16 or fp16), unit stride over D, on
    CUDA (or the interpreter)."""
    if switched_off("NORM_ROUTER"):
        return False
    if x_TD.dim() != 2 or router_weight_ED.dim() != 2:
        return False
    if not 1 <= x_TD.shape[0] <= max_tokens(router_weight_ED):
        return False
    D = x_TD.shape[1]
    if not 1 <= D <= MAX_D or norm_weight_D.shape != (D,):
        return False
    if router_weight_ED.shape[1] != D:
        return False
    tensors = [x_TD, norm_weight_D, router_weight_ED]
    if residual_TD is not None:
        if residual_TD.shape != x_TD.shape:
            return False
        tensors.append(residual_TD)
    if x_TD.dtype not in DTYPES or any(t.dtype != x_TD.dtype for t in tensors):
        return False
    return all(t.stride(-1) == 1 for t in tensors) and use_triton(*tensors)


def norm_router_logits(
    x_TD: torch.Tensor,
    norm_weight_D: torch.Tensor,
    eps: float,
    router_weight_ED: torch.Tensor,
    residual_TD: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`norm_router_logits_ref` in one launch: (fp32 logits [T, E], y [T, D], h [T, D]; h is x
    itself without a residual). x, the residual, the norm weight and the router weight in one of
    bf16 / fp16, unit stride over D, T <= `max_tokens` rows. No gradient (inference); no host sync
    (CUDA graphs). The reference on CPU outside the interpreter."""
    check_tensor(x_TD, "x", dtypes=DTYPES, ndim=2)
    T, D = x_TD.shape
    check_tensor(norm_weight_D, "norm_weight", dtypes=(x_TD.dtype,), ndim=1, device=x_TD.device)
    check_tensor(
        router_weight_ED, "router_weight", dtypes=(x_TD.dtype,), ndim=2, device=x_TD.device
    )
    if residual_TD is not None:
        check_tensor(residual_TD, "residual", dtypes=(x_TD.dtype,), ndim=2, device=x_TD.device)
        if residual_TD.shape != x_TD.shape:
            raise ValueError(
                f"residual has shape {tuple(residual_TD.shape)}; expected x's {(T, D)}"
            )
    if norm_weight_D.shape != (D,) or router_weight_ED.shape[1] != D:
        raise ValueError(
            f"norm_weight {tuple(norm_weight_D.shape)} and router_weight "
            f"{tuple(router_weight_ED.shape)}: expected [{D}] and [E, {D}] for x [{T}, {D}]"
        )
    most = max_tokens(router_weight_ED)
    if T > most or D > MAX_D:
        raise ValueError(f"x [{T}, {D}]: at most {most} rows and {MAX_D} features")
    named = {"x": x_TD, "residual": residual_TD, "norm_weight": norm_weight_D}
    for name, t in {**named, "router_weight": router_weight_ED}.items():
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} has stride {t.stride(-1)} over D: needs 1")
    if not use_triton(x_TD):
        return norm_router_logits_ref(x_TD, norm_weight_D, eps, router_weight_ED, residual_TD)
    E = router_weight_ED.shape[0]
    logits = torch.empty(T, E, dtype=torch.float32, device=x_TD.device)
    y = torch.empty(T, D, dtype=x_TD.dtype, device=x_TD.device)
    h = x_TD if residual_TD is None else torch.empty_like(y)
    r = x_TD if residual_TD is None else residual_TD
    if T and E:
        be, bd = row_tiles(E, D)  # router_logits' per-token tiles
        if T > MAX_TOKENS:
            be = max(be, WIDE_ROWS)
        pdl = pdl_launch(x_TD.device)
        _norm_router_logits_kernel[(triton.cdiv(E, be), T)](
            x_TD,
            r,
            norm_weight_D,
            router_weight_ED,
            logits,
            y,
            h,
            D,
            E,
            x_TD.stride(0),
            r.stride(0),
            y.stride(0),
            h.stride(0),
            router_weight_ED.stride(0),
            eps,
            HAS_RESIDUAL=residual_TD is not None,
            BE=be,
            BD=bd,
            PDL=pdl,
            num_warps=4,
            launch_pdl=pdl,
        )
    return logits, y, h
