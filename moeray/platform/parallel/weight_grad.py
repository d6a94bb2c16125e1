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
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import nn

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


# The higher-precision GEMMs of split_linear. On CUDA the token dimension is padded with zero rows
# to a multiple of 128, as the FP8 ones are (platform/fp8.py says why): cuBLAS picks its kernel by
# shape, and a kernel first loaded mid-step may need the GPU idle while a posted NCCL receive spins
# on it, a wait that never ends when the peer is stuck the same way (benchmarks/notes-train.md).
# Routed experts use these GEMMs only where `experts_mlp.GroupedExperts` does not apply. Padded,
# the counts take max_rows / 128 values and `PipelineExecutor.rehearse` runs each of them first
# (`fp8.pad_rows`, `fp8.padded_row_counts`). Zero rows change nothing: extra rows of y and dx are
# cut off, and they add zero terms to dW.


def matmul_forward(
    x_MK: torch.Tensor, w_NK: torch.Tensor, cast: torch.dtype | None
) -> torch.Tensor:
    x, w = (x_MK, w_NK) if cast is None else (x_MK.to(cast), w_NK.to(cast))
    return (pad_rows(x) @ w.t())[: x_MK.shape[0]] if x.is_cuda else x @ w.t()


def matmul_dgrad(dy_MN: torch.Tensor, w_NK: torch.Tensor, cast: torch.dtype | None) -> torch.Tensor:
    w = w_NK if cast is None else w_NK.to(cast)
    return (pad_rows(dy_MN) @ w)[: dy_MN.shape[0]] if dy_MN.is_cuda else dy_MN @ w


def matmul_wgrad(dy_MN: torch.Tensor, x_MK: torch.Tensor, cast: torch.dtype | None) -> torch.Tensor:
    x = x_MK if cast is None else x_MK.to(cast)
    return pad_rows(dy_MN).t() @ pad_rows(x) if dy_MN.is_cuda else dy_MN.t() @ x


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


def linear_gemms(fp8: bool, cast: torch.dtype | None, cache=None):
    """split_linear's (forward, dgrad, wgrad) GEMMs, each returning the dtype the caller stores
    into (the FP8 ones return the kernels' bf16 on CUDA, fp32 on CPU). `cache`: an
    fp8.WeightCache that keeps the FP8 weights from one micro-batch to the next."""
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
            lambda x, w: matmul_forward(x.to(cast), cache.cast(w, cast), None),
            lambda dy, w: matmul_dgrad(dy, cache.cast(w, cast), None),
            functools.partial(matmul_wgrad, cast=cast),
        )
    return (
        functools.partial(matmul_forward, cast=cast),
        functools.partial(matmul_dgrad, cast=cast),
        functools.partial(matmul_wgrad, cast=cast),
    )


class _SplitLinearFn(torch.autograd.Function):
    """y = x W^T whose dW GEMM can be deferred to the stage's WeightGradStore.

    `fp8`: the three GEMMs of `fp8.py` (block-scaled e4m3); else plain matmuls. Under autocast the
    GEMMs run in the autocast dtype (like F.linear) and the output takes it; gradients come back
    in the dtypes of x and W.
    """

    @staticmethod
    def forward(ctx, x_MK, w_NK, store: WeightGradStore | None, fp8: bool, cache):
        dev = x_MK.device.type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        ctx.save_for_backward(x_MK, w_NK)
        ctx.store, ctx.fp8, ctx.cast, ctx.cache = store, fp8, cast, cache
        fwd, _, _ = linear_gemms(fp8, cast, cache)
        with torch.autocast(dev, enabled=False):
            return fwd(x_MK, w_NK).to(cast or x_MK.dtype)

    @staticmethod
    def backward(ctx, dy_MN):
        x_MK, w_NK = ctx.saved_tensors
        store = ctx.store
        _, dgrad, wgrad = linear_gemms(ctx.fp8, ctx.cast, ctx.cache)
        with torch.autocast(dy_MN.device.type, enabled=False):
            dx = dgrad(dy_MN, w_NK).to(x_MK.dtype) if ctx.needs_input_grad[0] else None
            dw = None
            if ctx.needs_input_grad[1]:
                if store is not None and store.defer:

                    def deferred(dy=dy_MN, x=x_MK, w=w_NK):
                        # outside the autograd engine grad mode is on: dW must not build a graph
                        with torch.no_grad(), torch.autocast(dy.device.type, enabled=False):
                            dw_NK = wgrad(dy, x).to(w.dtype)
                        accumulate_weight_grad(w, dw_NK)

                    store.put(deferred)
                else:
                    dw = wgrad(dy_MN, x_MK).to(w_NK.dtype)
        return dx, dw, None, None, None


def split_linear(
    x: torch.Tensor,
    weight_NK: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    store: WeightGradStore | None = None,
    fp8: bool = False,
    cache=None,
) -> torch.Tensor:
    """F.linear (any leading dims) with a deferrable weight gradient. `cache`: an fp8.WeightCache
    keeping the FP8 weight (or its autocast-dtype cast) from one micro-batch to the next."""
    if weight_NK.dim() != 2 or x.shape[-1] != weight_NK.shape[1]:
        raise ValueError(
            f"split_linear: x [..., {x.shape[-1]}] does not match weight "
            f"{tuple(weight_NK.shape)} [N, K]"
        )
    lead = x.shape[:-1]
    y = _SplitLinearFn.apply(x.reshape(-1, x.shape[-1]), weight_NK, store, fp8, cache)
    y = y.reshape(*lead, weight_NK.shape[0])
    return y if bias is None else y + bias


class SplitLinear(nn.Module):
    """Replaces an nn.Linear (or an FP8TrainLinear), sharing its Parameters (same names). Its
    WeightCache keeps the weight's GEMM form (FP8, or the autocast cast) for one optimizer step
    instead of making it twice per micro-batch (forward and input grad)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, store: WeightGradStore, fp8: bool
    ) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.store, self.fp8 = store, fp8
        self.cache = f8.WeightCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_linear(
            x, self.weight, self.bias, store=self.store, fp8=self.fp8, cache=self.cache
        )

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, fp8={self.fp8}, deferred dW"
