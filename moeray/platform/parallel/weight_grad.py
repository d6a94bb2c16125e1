"""Backward split (ZB1P, DualPipe): weight-gradient GEMMs deferred to the schedule's W op.

Legend: M rows (tokens), K input width, N output width.

`BI` runs the backward with every linear layer's weight-gradient GEMM (dW = dy^T x) deferred into
the stage's `WeightGradStore`; the input gradient, what the previous stage waits for, is ready
sooner. `W` runs the deferred GEMMs. Linear layers, the lm head, the MTP projection and the routed
experts (the GEMMs, about 2/3 of a backward's weight-grad work on the tiny model and more at
scale) are deferred; norms, the router gate and the embedding take their (cheap) gradients inside
BI. This module holds the store and the split linear layer with its GEMMs; the routed experts'
autograd paths are in `experts_mlp.py`, and `stages.enable_weight_grad_split` switches a stage to
both.

A whole (PP = 1) model takes the split linear layer too, without a store
(`enable_split_linears`): its WeightCache keeps the bf16 cast of each fp32 master weight for one
optimizer step, and where `use_fused_linear_wgrad` the weight gradient is summed and written in
fp32 by the GEMM itself, later micro-batches adding into `.grad` (`wgrad_fp32`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from moeray.kernels.common import switched_off
from moeray.platform import fp8 as f8
from moeray.platform.fp8 import pad_rows


class WeightGradStore:
    """Per-stage queue of deferred weight-gradient GEMMs, keyed by (direction, mb, stage).

    A backward run inside `collect(key, defer=True)` queues each linear layer's dW instead of
    computing it; `flush(key)` computes them (the schedule's W op)."""

    def __init__(self) -> None:
        self.key: tuple[int, int, int] | None = None
        self.defer = False
        self.pending: dict[tuple[int, int, int], list[Callable[[], None]]] = {}

    @contextlib.contextmanager
    def collect(self, key: tuple[int, int, int], defer: bool):
        self.key, self.defer = key, defer
        try:
            yield
        finally:
            self.key, self.defer = None, False

    def put(self, fn: Callable[[], None]) -> None:
        assert self.key is not None, "a deferred weight grad outside a BI backward"
        self.pending.setdefault(self.key, []).append(fn)

    def flush(self, key: tuple[int, int, int]) -> int:
        fns = self.pending.pop(key, [])
        for fn in fns:
            fn()
        return len(fns)


def accumulate_weight_grad(w: torch.Tensor, dw: torch.Tensor) -> None:
    if w.is_leaf:
        # plain parameters: add into .grad directly (what AccumulateGrad would do)
        if w.grad is None:
            w.grad = dw
        else:
            w.grad += dw
    else:
        # a view of a parameter (one routed expert of the stacked [E, I, D] weights): autograd
        # carries dW through the view's index into the stacked gradient
        torch.autograd.backward(w, dw)


def grad_to_add_into(w: torch.Tensor) -> torch.Tensor | None:
    """w's gradient when a backward adds dW into it itself (in a GEMM's epilogue) and returns None
    for w: an fp32 contiguous `.grad` of a leaf, i.e. a later micro-batch of a step (autograd's
    AccumulateGrad would add into that same tensor)."""
    g = w.grad
    ok = w.is_leaf and g is not None and g.dtype == torch.float32 and g.is_contiguous()
    return g if ok else None


# The higher-precision GEMMs of split_linear. On CUDA the token dimension is padded with zero rows
# to a multiple of 128, as the FP8 ones are (platform/fp8.py says why): cuBLAS picks its kernel by
# shape, and a kernel first loaded mid-step may need the GPU idle while a posted NCCL receive spins
# on it, a wait that never ends when the peer is stuck the same way (benchmarks/notes-train.md).
# Routed experts use these GEMMs only where `grouped_experts.GroupedExperts` does not apply. Padded,
# the counts take max_rows / 128 values and `PipelineExecutor.rehearse` runs each of them first
# (`fp8.pad_rows`, `fp8.padded_row_counts`). Zero rows change nothing: extra rows of y and dx are
# cut off, and they add zero terms to dW. `pad=False` (split linears without a store: a whole
# model's, not a pipeline's, so nothing rehearses their counts) runs the GEMMs unpadded, as the
# F.linear they replace did: padding DeepSeek-V3's MTP head at 4,096-token sequences would copy its
# dy [4,095, 129,280] bf16, 1.06 GB, every micro-batch.


def matmul_forward(
    x_MK: torch.Tensor, w_NK: torch.Tensor, cast: torch.dtype | None, pad: bool = True
) -> torch.Tensor:
    x, w = (x_MK, w_NK) if cast is None else (x_MK.to(cast), w_NK.to(cast))
    return (pad_rows(x) @ w.t())[: x_MK.shape[0]] if x.is_cuda and pad else x @ w.t()


def matmul_dgrad(
    dy_MN: torch.Tensor, w_NK: torch.Tensor, cast: torch.dtype | None, pad: bool = True
) -> torch.Tensor:
    w = w_NK if cast is None else w_NK.to(cast)
    return (pad_rows(dy_MN) @ w)[: dy_MN.shape[0]] if dy_MN.is_cuda and pad else dy_MN @ w


def matmul_wgrad(
    dy_MN: torch.Tensor, x_MK: torch.Tensor, cast: torch.dtype | None, pad: bool = True
) -> torch.Tensor:
    x = x_MK if cast is None else x_MK.to(cast)
    return pad_rows(dy_MN).t() @ pad_rows(x) if dy_MN.is_cuda and pad else dy_MN.t() @ x


def use_fused_linear_wgrad(device: torch.device) -> bool:
    """Whether split_linear computes an fp32 weight's gradient from bf16 operands with `wgrad_fp32`
    (fp32 written by the GEMM, later micro-batches added into `.grad` by it) instead of a bf16
    GEMM, a cast to fp32 and autograd's add. On CUDA (torch has no CPU kernel for mm / addmm with
    out_dtype), in a process alone (no process group, or one of one: no peer, so the GEMM needs
    no row padding, see the note above matmul_forward), unless MOERAY_FUSED_LINEAR_WGRAD=0."""
    alone = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1
    return device.type == "cuda" and alone and not switched_off("LINEAR_WGRAD")


def wgrad_fp32(
    dy_MN: torch.Tensor, x_MK: torch.Tensor, w_NK: torch.Tensor, cast: torch.dtype
) -> torch.Tensor | None:
    """dW = dy^T x of an fp32 leaf weight from `cast` (bf16) operands, summed and written in fp32
    by the GEMM itself (CUDA only). Without a gradient to add into (`grad_to_add_into`: the step's
    first micro-batch) returns dW, which autograd keeps as w.grad; otherwise adds dW into w.grad
    (addmm with beta 1, out = w.grad) and returns None. Rows are not padded: this path runs only
    in a process alone (`use_fused_linear_wgrad`), and zero rows would cost a copy of dy and x."""
    dy, x = dy_MN.to(cast), x_MK.to(cast)
    g = grad_to_add_into(w_NK)
    if g is None:
        return torch.mm(dy.t(), x, out_dtype=torch.float32)
    torch.addmm(g, dy.t(), x, out_dtype=torch.float32, out=g)
    return None


def prewarm_matmuls(
    weights: set[tuple[int, int, torch.dtype]],
    row_counts: list[int],
    device: torch.device,
    cast: torch.dtype | None,
) -> int:
    """Run matmul_forward/dgrad/wgrad for every weight (N, K, dtype) at each token count of
    `row_counts`, so cuBLAS has loaded every kernel a step can pick. Returns the GEMMs run."""
    if device.type != "cuda":
        return 0
    runs = 0
    for n, k, dtype in sorted(weights, key=str):
        w = torch.randn(n, k, device=device).to(dtype)
        act = cast or dtype
        for m in row_counts:
            x = torch.randn(m, k, device=device, dtype=act)
            dy = torch.randn(m, n, device=device, dtype=act)
            matmul_forward(x, w, cast), matmul_dgrad(dy, w, cast), matmul_wgrad(dy, x, cast)
            runs += 3
    torch.cuda.synchronize(device)
    return runs


def linear_gemms(fp8: bool, cast: torch.dtype | None, cache=None, pad: bool = True):
    """split_linear's (forward, dgrad, wgrad) GEMMs, each returning the dtype the caller stores
    into (the FP8 ones return the kernels' bf16 on CUDA, fp32 on CPU). `cache`: an
    fp8.WeightCache that keeps the FP8 weights from one micro-batch to the next. `pad`: the
    higher-precision GEMMs pad rows on CUDA (the note above matmul_forward); FP8 ones always do."""
    if fp8:
        if cache is None:
            return f8.forward_gemm, f8.dgrad_gemm, f8.wgrad_gemm
        return (
            lambda x, w: f8.forward_gemm(x, w, cache.get(w)),
            lambda dy, w: f8.dgrad_gemm(dy, w, cache.get(w)),
            f8.wgrad_gemm,
        )
    if cache is not None and cast is not None:
        return (
            lambda x, w: matmul_forward(x.to(cast), cache.cast(w, cast), None, pad),
            lambda dy, w: matmul_dgrad(dy, cache.cast(w, cast), None, pad),
            functools.partial(matmul_wgrad, cast=cast, pad=pad),
        )
    return (
        functools.partial(matmul_forward, cast=cast, pad=pad),
        functools.partial(matmul_dgrad, cast=cast, pad=pad),
        functools.partial(matmul_wgrad, cast=cast, pad=pad),
    )


class _SplitLinearFn(torch.autograd.Function):
    """y = x W^T whose dW GEMM can be deferred to the stage's WeightGradStore.

    `fp8`: the three GEMMs of `fp8.py` (block-scaled e4m3), or with `bf16_wgrad` the forward
    and input-grad ones, the weight grad a higher-precision GEMM; else plain matmuls. Under
    autocast the GEMMs run in the autocast dtype (like F.linear) and the output takes it;
    gradients come back in the dtypes of x and W. Without a store (a whole model, no pipeline)
    the higher-precision GEMMs are not row-padded. dW not deferred, of an fp32 leaf weight
    under bf16 autocast where `use_fused_linear_wgrad`: `wgrad_fp32` (fp32 from the GEMM, added
    into `.grad` after the first micro-batch, None then returned for W).
    """

    @staticmethod
    def forward(ctx, x_MK, w_NK, store: WeightGradStore | None, fp8: bool, cache, bf16_wgrad):
        dev = x_MK.device.type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        ctx.x_dtype = x_MK.dtype
        if cast is not None and not fp8:
            # x saved as the GEMMs read it (F.linear under autocast saves its cast too): an fp32
            # input (most are, the norms' outputs) keeps half the bytes, and the backward casts it
            # no second time. The same values: every higher-precision GEMM casts x to `cast`.
            x_MK = x_MK.to(cast)
        ctx.save_for_backward(x_MK, w_NK)
        ctx.store, ctx.fp8, ctx.cast, ctx.cache = store, fp8, cast, cache
        ctx.bf16_wgrad = fp8 and bf16_wgrad
        fwd, _, _ = linear_gemms(fp8, cast, cache, pad=store is not None)
        with torch.autocast(dev, enabled=False):
            return fwd(x_MK, w_NK).to(cast or x_MK.dtype)

    @staticmethod
    def backward(ctx, dy_MN):
        x_MK, w_NK = ctx.saved_tensors
        store = ctx.store
        _, dgrad, wgrad = linear_gemms(ctx.fp8, ctx.cast, ctx.cache, pad=store is not None)
        if ctx.bf16_wgrad:
            wgrad = functools.partial(matmul_wgrad, cast=ctx.cast, pad=store is not None)
        with torch.autocast(dy_MN.device.type, enabled=False):
            dx = dgrad(dy_MN, w_NK).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
            dw = None
            if ctx.needs_input_grad[1]:
                if store is not None and store.defer:

                    def deferred(dy=dy_MN, x=x_MK, w=w_NK):
                        # outside the autograd engine grad mode is on: dW must not build a graph
                        with torch.no_grad(), torch.autocast(dy.device.type, enabled=False):
                            dw_NK = wgrad(dy, x).to(w.dtype)
                        accumulate_weight_grad(w, dw_NK)

                    store.put(deferred)
                elif (
                    (not ctx.fp8 or ctx.bf16_wgrad)
                    and ctx.cast == torch.bfloat16
                    and w_NK.dtype == torch.float32
                    and w_NK.is_leaf
                    and use_fused_linear_wgrad(w_NK.device)
                ):
                    dw = wgrad_fp32(dy_MN, x_MK, w_NK, ctx.cast)
                else:
                    dw = wgrad(dy_MN, x_MK).to(w_NK.dtype)
        return dx, dw, None, None, None, None


def split_linear(
    x: torch.Tensor,
    weight_NK: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    store: WeightGradStore | None = None,
    fp8: bool = False,
    cache=None,
    bf16_wgrad: bool = False,
) -> torch.Tensor:
    """F.linear (any leading dims) with a deferrable weight gradient. `cache`: an fp8.WeightCache
    keeping the FP8 weight (or its autocast-dtype cast) from one micro-batch to the next.
    `bf16_wgrad` (with fp8): the weight gradient from operands in the autocast dtype (or x's)."""
    if weight_NK.dim() != 2 or x.shape[-1] != weight_NK.shape[1]:
        raise ValueError(
            f"split_linear: x [..., {x.shape[-1]}] does not match weight "
            f"{tuple(weight_NK.shape)} [N, K]"
        )
    lead = x.shape[:-1]
    y = _SplitLinearFn.apply(x.reshape(-1, x.shape[-1]), weight_NK, store, fp8, cache, bf16_wgrad)
    y = y.reshape(*lead, weight_NK.shape[0])
    return y if bias is None else y + bias


class SplitLinear(nn.Module):
    """Replaces an nn.Linear (or an FP8TrainLinear), sharing its Parameters (same names). Its
    WeightCache keeps the weight's GEMM form (FP8, or the autocast cast) for one optimizer step
    instead of making it twice per micro-batch (forward and input grad). `store`: the pipeline
    stage's, which a BI backward defers dW into; None for a whole model (dW computed at once)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        store: WeightGradStore | None,
        fp8: bool,
        bf16_wgrad: bool = False,
    ) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.store, self.fp8, self.bf16_wgrad = store, fp8, bf16_wgrad
        self.cache = f8.WeightCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_linear(
            x,
            self.weight,
            self.bias,
            store=self.store,
            fp8=self.fp8,
            cache=self.cache,
            bf16_wgrad=self.bf16_wgrad,
        )

    def extra_repr(self) -> str:
        dw = "deferred dW" if self.store is not None else "dW at once"
        wg = ", bf16 dW" if self.fp8 and self.bf16_wgrad else ""
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, fp8={self.fp8}{wg}, {dw}"


def enable_split_linears(model: nn.Module, bf16_wgrad: bool = False) -> int:
    """Swap every nn.Linear child (FP8TrainLinear ones too, which stay FP8: with `bf16_wgrad`
    their weight gradient from bf16 operands, as a BF16 layer's) of a whole (PP = 1)
    model for a SplitLinear without a store that shares its Parameters: parameter names, state
    dict, optimizer state and direct readers of `.weight` (the checkpoint's `hf_state_dict` reads
    `lm_head.weight`) are unchanged, and a module shared by two parents stays one module. Per
    micro-batch each layer then casts no fp32 weight (its WeightCache keeps the bf16 cast for the
    optimizer step), and where `use_fused_linear_wgrad` its weight gradient is written in fp32 by
    the GEMM (`wgrad_fp32`): under autocast nn.Linear's weight casts, fp32 casts of dW and
    autograd's adds were ~375 copies (~11 ms) and ~2.3 ms of adds in a 138 ms step (one H200,
    Moonlight widths, 4 layers x 2 micro-batches). Layers whose weight is not a Parameter (an
    inference MergedLinear's stacked buffers) are left alone. Returns the layers swapped; 0, the
    model left as it is, under MOERAY_FUSED_LINEAR_WGRAD=0 (the A/B switch)."""
    if switched_off("LINEAR_WGRAD"):
        return 0
    made: dict[int, SplitLinear] = {}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, (nn.Linear, f8.FP8TrainLinear)):
                continue
            if not isinstance(child.weight, nn.Parameter):
                continue
            if id(child) not in made:
                fp8 = isinstance(child, f8.FP8TrainLinear)
                made[id(child)] = SplitLinear(
                    child.weight, child.bias, None, fp8=fp8, bf16_wgrad=fp8 and bf16_wgrad
                )
            setattr(module, name, made[id(child)])
    return len(made)
