"""The MoE router's logits x . W^T in fp32 from bf16/fp16 x and W in one launch:
`router_logits`, its PyTorch reference `router_logits_ref` (DeepSeek-V3's and transformers'
`F.linear(x.float(), W.float())`), and the test `router_logits_applies` by which the model's Gate
(`moeray.platform.model.moe.Gate.logits`) chooses between them.

Legend: T tokens, D model width, E routed experts, BE experts per program, BD features per step.

Why: the reference is three launches per MoE layer at decode: x to fp32, the whole [E, D] router
weight to fp32 (Moonlight: 64 x 2048, a 512 KB write per layer and step), and an fp32 GEMM that
reads that copy back. Here each program reads its BE weight rows in their own dtype once and
accumulates in fp32.

Numerics: every product of two bf16 (or fp16) values is exact in fp32, so the logits differ from
the reference only by the order of the fp32 sum over D (cuBLAS picks its own): a few fp32 ulps,
which can change the gate's choice only between experts whose scores tie to ~1e-7.

By token count: up to ROW_MAX_TOKENS (batch-1 decode and small batches) the Triton kernel, one
program per (token, 1-2 expert rows) walking D in 2,048-feature steps (latency-bound: the fewest
dependent steps); past it (decode batches to 256, which the model's Gate sends here unless
MOERAY_FUSED_ROUTE_BATCH=0) cuBLAS's bf16 GEMM with fp32 output (`torch.mm(out_dtype=)`: one
launch, tensor cores, no fp32 copies; the same exact products, fp32 sums in cuBLAS's order as the
reference's). Prefill keeps the reference.

With PDL (sm_90, `common.pdl_launch`) each program loads its first weight step before it waits
for the previous kernel, x after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moeray.kernels.common import (
    check_tensor,
    pdl_launch,
    pdl_wait,
    route_max_tokens,
    switched_off,
    use_triton,
)

DTYPES = (torch.bfloat16, torch.float16)
# The per-token kernel re-reads all of W for each token: fine up to this many tokens (Moonlight:
# 256 KB a token from L2); past it one GEMM reads W once for all of them.
ROW_MAX_TOKENS = 32
# Rows the model's Gate sends here with MOERAY_FUSED_ROUTE_BATCH=0; by default decode batches to
# common.ROUTE_BATCH_MAX_TOKENS (cuBLAS's fp32-output GEMM past ROW_MAX_TOKENS). The reference
# is three launches (x and W to fp32, an fp32 SIMT GEMM: 5.6 us a layer at Moonlight batch 64 on
# an H200, plus a 512 KB fp32 copy of W); past the bound (prefill) its GEMM, which reads W once
# for all rows, is the better one.
MAX_TOKENS = 32


def router_logits_ref(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, E] (any leading shape of x)."""
    return F.linear(x_TD.float(), weight_ED.float())


@triton.jit
def _w_step(w_ptr, offs_e, ok_e, stride_w, d0, offs_d, D):
    """The BE weight rows' features d0 .. d0 + BD in fp32 (zeros past E and D)."""
    ok_d = d0 + offs_d < D
    return tl.load(
        w_ptr + offs_e[:, None].to(tl.int64) * stride_w + d0 + offs_d[None, :],
        mask=ok_e[:, None] & ok_d[None, :],
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _router_logits_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    D,
    E,
    stride_x,
    stride_w,
    BE: tl.constexpr,
    BD: tl.constexpr,
    PDL: tl.constexpr,  # launched with PDL: the first weight step is loaded before the wait
):
    """Token program_id(1)'s logits of experts program_id(0) * BE .."""
    t = tl.program_id(1).to(tl.int64)
    offs_e = tl.program_id(0) * BE + tl.arange(0, BE)
    ok_e = offs_e < E
    offs_d = tl.arange(0, BD)
    acc = tl.zeros([BE], dtype=tl.float32)
    d_start = 0
    if PDL:
        # The first step peeled off the loop: the weights (no earlier kernel writes them) before
        # the wait, x after; the same additions in the same order as the loop's.
        w = _w_step(w_ptr, offs_e, ok_e, stride_w, 0, offs_d, D)
        pdl_wait(PDL)
        x = tl.load(x_ptr + t * stride_x + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
        d_start = BD
    for d0 in range(d_start, D, BD):
        ok_d = d0 + offs_d < D
        x = tl.load(x_ptr + t * stride_x + d0 + offs_d, mask=ok_d, other=0.0).to(tl.float32)
        w = _w_step(w_ptr, offs_e, ok_e, stride_w, d0, offs_d, D)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + t * E + offs_e, acc, mask=ok_e)


def row_tiles(E: int, D: int) -> tuple[int, int]:
    """(BE expert rows a program, BD features a step) of the per-token kernels (this one
    and norm_router's). Latency, not bytes, bounds them at decode (256 KB of
    weights at Moonlight, 3.7 MB at V3): one or two expert rows per program (64 programs a token
    at 64 experts, 128 at V3's 256) and 2,048 features a step (one step at Moonlight's D, four at
    V3's 7,168). With 4 / 8 rows and 512-feature steps (16 / 32 programs of 4 / 14 dependent
    steps) the logits took 4.7 us at Moonlight and 20.2 us at V3 on an H200 (engine decode at
    batch 1); as here 2.2 and 8.5 us. The loop's loads are not software-pipelined (a loop
    without tl.dot pipelines only as `tl.range(..., num_stages=)`, which is untimed here)."""
    return (1 if E <= 128 else 2), min(2048, triton.next_power_of_2(max(D, 16)))


def router_logits_applies(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> bool:
    """Whether `router_logits` takes these as they are: x [T, D] with T <=
    common.ROUTE_BATCH_MAX_TOKENS (MAX_TOKENS with MOERAY_FUSED_ROUTE_BATCH=0) and W [E, D]
    in one of bf16/fp16, unit stride over D, on CUDA (or the interpreter).
    MOERAY_FUSED_GATE_LOGITS=0 keeps the reference: an A/B switch for the engine bench."""
    if switched_off("GATE_LOGITS"):
        return False
    if x_TD.dim() != 2 or weight_ED.dim() != 2 or x_TD.shape[1] != weight_ED.shape[1]:
        return False
    if x_TD.shape[0] > route_max_tokens(MAX_TOKENS):
        return False
    if x_TD.dtype not in DTYPES or weight_ED.dtype != x_TD.dtype:
        return False
    return x_TD.stride(-1) == 1 and weight_ED.stride(-1) == 1 and use_triton(x_TD, weight_ED)


def _mm_fp32(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """x . W^T by cuBLAS in fp32 from bf16/fp16 operands (CUDA only)."""
    return torch.mm(x_TD, weight_ED.t(), out_dtype=torch.float32)


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """`router_logits_ref` in one launch for x [T, D] and W [E, D] (bf16 or fp16, one dtype):
    fp32 [T, E]: the Triton kernel up to ROW_MAX_TOKENS rows, cuBLAS's fp32-output GEMM past them
    on CUDA (the reference under the interpreter). No gradient (inference); no host sync (CUDA
    graphs)."""
    check_tensor(x_TD, "x", dtypes=DTYPES, ndim=2)
    check_tensor(weight_ED, "weight", dtypes=(x_TD.dtype,), ndim=2, device=x_TD.device)
    T, D = x_TD.shape
    E = weight_ED.shape[0]
    if weight_ED.shape[1] != D:
        raise ValueError(f"weight has shape {tuple(weight_ED.shape)}; expected [E, {D}]")
    if not use_triton(x_TD):
        return router_logits_ref(x_TD, weight_ED)
    x = x_TD if x_TD.stride(-1) == 1 else x_TD.contiguous()
    w = weight_ED if weight_ED.stride(-1) == 1 else weight_ED.contiguous()
    if T > ROW_MAX_TOKENS:
        if x.is_cuda:
            return _mm_fp32(x, w)
        return router_logits_ref(x, w)  # the interpreter: no fp32-output bf16 GEMM on CPU
    y = torch.empty(T, E, dtype=torch.float32, device=x.device)
    if T and E:
        be, bd = row_tiles(E, D)
        # PDL reads the weight before the wait: not a copy made just above (the kernel before)
        pdl = pdl_launch(x.device) and w is weight_ED
        _router_logits_kernel[(triton.cdiv(E, be), T)](
            x,
            w,
            y,
            D,
            E,
            x.stride(0),
            w.stride(0),
            BE=be,
            BD=bd,
            PDL=pdl,
            num_warps=4,
            launch_pdl=pdl,
        )
    return y
