"""The routed experts of a pipeline stage as one autograd node with a deferrable weight gradient
(`experts_mlp`, set as `Experts.mlp_fn` by `stages.enable_weight_grad_split`).

Legend: A rows sorted by expert, P rows of the padded layout (each expert's rows start aligned),
D model width, I expert width, E local experts, N and K a GEMM's output and input widths.

Three paths, picked per call (`_ExpertsMLPFn.forward`, by `_grouped_align`): with FP8 and
`grouped_fp8`, the grouped FP8 kernel on the 128-aligned layout (`experts_fp8.GroupedFP8`);
without FP8, one grouped GEMM per projection for all experts (`GroupedExperts`,
grouped_experts.py: bf16 on CUDA, any dtype on CPU; its weight gradients one Triton k-grouped
launch per projection where `use_grouped_wgrad`); otherwise one GEMM per expert (the
block-scaled FP8 GEMMs of `platform/fp8.py`, or `weight_grad.py`'s padded matmuls). The grouped
paths run gate and up as one [E, 2I, D] weight (`experts_common.gate_up_fused`): one GEMM
forward, one input-grad GEMM over [dg, du].

The grouped paths take x and return y either as rows sorted by expert (padding them into their
layout and back: `GroupedExperts.pad` / `unpad`, forward and backward) or, where the layout is
planned on the device, already on it: `ExpertsMLP.layout` (`experts_layout`) gives the layout to
the model, whose permute writes x_PD and whose combine reads y_PD (model/moe.py
`Experts._routed`), and `experts_mlp` takes that layout in place of the rows per expert.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moeray.kernels import swiglu_train as sw
from moeray.kernels.common import switched_off
from moeray.platform import fp8 as f8
from moeray.platform.model.moe import Experts
from moeray.platform.parallel.experts_common import (
    grouped_wgrad_bf16,
    stack_experts,
    swiglu_bwd,
    swiglu_fwd,
    unpadded,
    weight_grads_or_defer,
)
from moeray.platform.parallel.experts_fp8 import NO_GRAD_ARGS, GroupedFP8
from moeray.platform.parallel.grouped_experts import GroupedExperts, row_segments
from moeray.platform.parallel.weight_grad import (
    WeightGradStore,
    linear_gemms,
)


def _cast(w: torch.Tensor | tuple[torch.Tensor, ...], dtype: torch.dtype, cache) -> torch.Tensor:
    """w in the GEMMs' dtype, from `cache` (an fp8.WeightCache) when there is one; a tuple as its
    concatenation along N (gate and up as one [E, 2I, D] weight)."""
    return f8.cast_cat(w, dtype) if cache is None else cache.cast(w, dtype)


class _ExpertsMLPFn(torch.autograd.Function):
    """Every local expert's SwiGLU, y = (silu(x W1^T) * (x W3^T)) W2^T, on rows sorted by expert
    (`rows[e]` of them for expert e), as ONE autograd node with a deferrable weight gradient.

    Why: the per-expert loop of `Experts.forward` builds ~10 autograd nodes and ~17 kernel launches
    per expert, plus as many again backward; with small()'s 32 local experts in 6 MoE layers per
    stage, one micro-batch's stage forward took 0.2 s on an H200, ~45 us per op for 1.75
    GFLOP/token: host-bound (benchmarks/notes-train.md). Here the SwiGLU runs once over all rows,
    and the weight gradients of all experts are one deferred closure and one accumulation per
    stacked weight. GEMMs (module docstring): without FP8 one grouped GEMM per projection for all
    experts (`GroupedExperts`); with FP8 the grouped FP8 kernel (`GroupedFP8`) or the per-expert
    block-scaled GEMMs of split_linear (padded on CUDA as there). Gradients equal the loop's (unit
    tests): the same products on the same rows.
    """

    @staticmethod
    def forward(
        ctx,
        x_AD,
        w1_EID,
        w3_EID,
        w2_EDI,
        rows: list[int] | torch.Tensor,
        store: WeightGradStore | None,
        fp8: bool,
        cache,
        grouped_fp8: bool,
        kgrouped_wgrad: bool,
        bf16_wgrad: bool = False,
    ):
        dev = x_AD.device.type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        act = cast or x_AD.dtype
        # rows as a GroupedExperts: x is x_PD, already on that (device-planned) layout, and y
        # is returned on it (y_PD), as is dy taken and dx returned backward
        layout = rows if isinstance(rows, GroupedExperts) else None
        ctx.padded = layout is not None
        if layout is not None:
            rows = layout.rows
        ctx.rows, ctx.store, ctx.fp8, ctx.cast, ctx.x_dtype = rows, store, fp8, cast, x_AD.dtype
        ctx.cache = cache
        align = _grouped_align(x_AD.device, x_AD.shape[0], fp8, grouped_fp8, act)
        ctx.grouped = align is not None and not fp8
        ctx.grouped_fp8 = align is not None and fp8
        if layout is not None and layout.align != align:
            raise ValueError(
                f"experts_mlp: x given on a layout aligned to {layout.align} rows; these "
                f"experts run {'a per-expert path' if align is None else f'{align}-aligned'}"
            )
        if isinstance(rows, torch.Tensor) and not (
            (ctx.grouped or ctx.grouped_fp8)
            and GroupedExperts.device_layout(
                x_AD, fp8=fp8, kgrouped_wgrad=kgrouped_wgrad, bf16_wgrad=bf16_wgrad
            )
        ):
            # the per-expert paths, and grouped ones whose weight gradients slice experts on the
            # host, plan on the host
            rows = ctx.rows = rows.tolist()
        ctx.kgrouped_wgrad, ctx.bf16_wgrad = kgrouped_wgrad, bf16_wgrad
        if ctx.grouped_fp8:
            with torch.autocast(dev, enabled=False):
                return GroupedFP8.forward(ctx, x_AD, w1_EID, w3_EID, w2_EDI, act, layout)
        if ctx.grouped:
            with torch.autocast(dev, enabled=False):
                grp = GroupedExperts(x_AD, rows) if layout is None else layout
                w13, w2 = _cast((w1_EID, w3_EID), act, cache), _cast(w2_EDI, act, cache)
                x_PD = x_AD.to(act) if ctx.padded else grp.pad(x_AD.to(act))
                g_PI, u_PI = grp.mm(x_PD, w13.transpose(-2, -1)).chunk(2, dim=1)
                h_PI = swiglu_fwd(g_PI, u_PI)
                y_PD = grp.mm(h_PI, w2.transpose(-2, -1))
                y_AD = y_PD if ctx.padded else grp.unpad(y_PD)
            ctx.grp = grp
            ctx.save_for_backward(x_PD, g_PI, u_PI, h_PI, w1_EID, w3_EID, w2_EDI)
            return y_AD
        assert isinstance(rows, list)  # read back above: only grouped paths keep a tensor
        assert layout is None  # refused above: a layout's align is a grouped path's
        fwd, _, _ = linear_gemms(fp8, cast, cache)
        with torch.autocast(dev, enabled=False):
            if fp8:  # gate and up quantize their shared rows once
                quantized = cache.get if cache is not None else f8.QuantizedWeight
                pairs = [
                    f8.forward_gemm_pair(x_AD[sl], quantized(w1_EID[e]), quantized(w3_EID[e]))
                    for e, sl in row_segments(rows)
                ]
                g_AI, u_AI = (
                    torch.cat([p[i].to(act) for p in pairs])
                    if pairs
                    else x_AD.new_empty(0, w1_EID.shape[1], dtype=act)
                    for i in (0, 1)
                )
            else:
                g_AI = _per_expert(fwd, x_AD, w1_EID, rows, act, w1_EID.shape[1])
                u_AI = _per_expert(fwd, x_AD, w3_EID, rows, act, w3_EID.shape[1])
            h_AI = F.silu(g_AI) * u_AI
            y_AD = _per_expert(fwd, h_AI, w2_EDI, rows, act, w2_EDI.shape[1])
        ctx.save_for_backward(x_AD, g_AI, u_AI, h_AI, w1_EID, w3_EID, w2_EDI)
        return y_AD

    @staticmethod
    def backward(ctx, dy_AD):
        if ctx.grouped_fp8:
            return GroupedFP8.backward(ctx, dy_AD)
        if ctx.grouped:
            return _ExpertsMLPFn._grouped_backward(ctx, dy_AD)
        x_AD, g_AI, u_AI, h_AI, w1, w3, w2 = ctx.saved_tensors
        rows = ctx.rows
        _, dgrad, wgrad = linear_gemms(ctx.fp8, ctx.cast, ctx.cache)
        with torch.autocast(dy_AD.device.type, enabled=False):
            dh_AI = _per_expert(dgrad, dy_AD, w2, rows, h_AI.dtype, w2.shape[2])
            dg_AI, du_AI = sw.swiglu_bwd_ref(dh_AI, g_AI, u_AI)
            dx_AD = _per_expert(dgrad, dg_AI, w1, rows, x_AD.dtype, w1.shape[2]) + _per_expert(
                dgrad, du_AI, w3, rows, x_AD.dtype, w3.shape[2]
            )

        def weight_grads(dy=dy_AD, dg=dg_AI, du=du_AI, x=x_AD, h=h_AI):
            with torch.no_grad(), torch.autocast(dy.device.type, enabled=False):
                if ctx.fp8:  # gate and up re-tile their shared rows x once
                    pairs = {
                        e: f8.wgrad_gemm_pair(dg[sl], du[sl], x[sl]) for e, sl in row_segments(rows)
                    }
                    dw1, dw3 = (
                        stack_experts({e: p[i] for e, p in pairs.items()}, w)
                        for i, w in ((0, w1), (1, w3))
                    )
                else:
                    dw1, dw3 = (
                        _per_expert_wgrad(wgrad, dg, x, rows, w1),
                        _per_expert_wgrad(wgrad, du, x, rows, w3),
                    )
                return dw1, dw3, _per_expert_wgrad(wgrad, dy, h, rows, w2)

        return (
            dx_AD,
            *weight_grads_or_defer(ctx, (w1, w3, w2), weight_grads),
            *NO_GRAD_ARGS,
        )

    @staticmethod
    def _grouped_backward(ctx, dy_AD):
        x_PD, g_PI, u_PI, h_PI, w1, w3, w2 = ctx.saved_tensors
        grp = ctx.grp
        act = x_PD.dtype
        with torch.autocast(dy_AD.device.type, enabled=False):
            w13c, w2c = _cast((w1, w3), act, ctx.cache), _cast(w2, act, ctx.cache)
            # padded: dy_PD as the combine's backward wrote it, zeros outside the tokens' rows
            dy_PD = dy_AD.to(act) if ctx.padded else grp.pad(dy_AD.to(act))
            dh_PI = grp.mm(dy_PD, w2c)
            dgu_P2I = swiglu_bwd(dh_PI, g_PI, u_PI, cat=True)
            dg_PI, du_PI = dgu_P2I.chunk(2, dim=1)
            dx_AD = unpadded(ctx, grp, grp.mm(dgu_P2I, w13c))

        def weight_grads(dy=dy_PD, dg=dg_PI, du=du_PI, x=x_PD, h=h_PI):
            with torch.no_grad(), torch.autocast(dy.device.type, enabled=False):
                return tuple(
                    grouped_wgrad_bf16(grp, d, a, w)
                    for d, a, w in ((dg, x, w1), (du, x, w3), (dy, h, w2))
                )

        return (
            dx_AD,
            *weight_grads_or_defer(ctx, (w1, w3, w2), weight_grads),
            *NO_GRAD_ARGS,
        )


def _grouped_align(
    device: torch.device, n_rows: int, fp8: bool, grouped_fp8: bool, act: torch.dtype
) -> int | None:
    """The row alignment of the grouped path that experts with these settings run n_rows rows
    of act (the GEMMs' dtype) on: 128 for FP8 with `grouped_fp8` (`GroupedFP8`), ALIGN or 1 for
    `GroupedExperts` (`GroupedExperts.default_align`); None for the per-expert paths (and for
    no rows). The one rule `_ExpertsMLPFn.forward` and `experts_layout` both follow."""
    if n_rows == 0:
        return None
    if fp8 and grouped_fp8:
        return 128
    if GroupedExperts.available(device, fp8, act):
        return GroupedExperts.default_align(device)
    return None


def _per_expert(
    gemm, a_A: torch.Tensor, w_E: torch.Tensor, rows: list[int], dtype: torch.dtype, width: int
) -> torch.Tensor:
    """gemm(rows of expert e, w_E[e]) for every expert with rows, concatenated in one copy;
    [0, width] when no expert has rows."""
    outs = [gemm(a_A[sl], w_E[e]).to(dtype) for e, sl in row_segments(rows)]
    return torch.cat(outs) if outs else a_A.new_empty(0, width, dtype=dtype)


def _per_expert_wgrad(
    wgrad, dy_AN: torch.Tensor, x_AK: torch.Tensor, rows: list[int], w_ENK: torch.Tensor
) -> torch.Tensor:
    """dW [E, N, K]: dW[e] = dy[rows of e]^T x[rows of e]; zeros for experts without rows."""
    return stack_experts({e: wgrad(dy_AN[sl], x_AK[sl]) for e, sl in row_segments(rows)}, w_ENK)


def experts_mlp(
    x_AD: torch.Tensor,
    w1_EID: torch.Tensor,
    w3_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    rows: list[int] | torch.Tensor,
    *,
    store: WeightGradStore | None = None,
    fp8: bool = False,
    cache=None,
    grouped_fp8: bool = False,
    kgrouped_wgrad: bool = False,
    bf16_wgrad: bool = False,
) -> torch.Tensor:
    """`Experts.mlp_fn` for pipeline stages (bound as `ExpertsMLP`): see _ExpertsMLPFn. `cache`:
    an fp8.WeightCache. `grouped_fp8`: the FP8 GEMMs on the 128-aligned layout with the grouped
    kernel (GroupedFP8).
    `kgrouped_wgrad` (with `grouped_fp8`): its weight gradients in one k-grouped launch per
    projection (`kernels/fp8/kgrouped.py`) instead of one GEMM per expert; one-process training
    only (the kernel's module docstring says why). `bf16_wgrad` (with `grouped_fp8`): the
    weight gradients from the bf16 operands instead (`GroupedExperts.wgrad`), forward and input
    gradients staying FP8: at 4,096-token micro-batches each expert's weight gradient is
    memory-bound on the fp32 accumulation (K ~ 384 rows per expert), which FP8 does not shorten,
    while its 128x1 quantizations cost a pass over five operands. `rows`: per expert, a list or
    an int64 [E] tensor on x's device (its sum is not checked: reading it would sync); or the
    GroupedExperts layout `experts_layout` gave for these settings, x then on it (x_PD [P, D],
    zeros in the rows no token owns) and y returned on it (y_PD, its rows past the last
    expert's end unspecified)."""
    if isinstance(rows, GroupedExperts):
        counts = rows.rows
        if x_AD.shape[0] != rows.P or not isinstance(counts, torch.Tensor):
            raise ValueError(
                f"experts_mlp: x has {x_AD.shape[0]} rows; its layout has P={rows.P} and must "
                "be planned on the device (experts_layout)"
            )
        if counts.shape != (w1_EID.shape[0],) or counts.device != x_AD.device:
            raise ValueError(
                f"experts_mlp: layout for {counts.shape[0]} experts on {counts.device}; "
                f"expected {w1_EID.shape[0]} on {x_AD.device}"
            )
    elif isinstance(rows, torch.Tensor):
        if rows.shape != (w1_EID.shape[0],) or rows.device != x_AD.device:
            raise ValueError(
                f"experts_mlp: rows tensor of shape {tuple(rows.shape)} on {rows.device}; "
                f"expected [{w1_EID.shape[0]}] (one count per expert) on {x_AD.device}"
            )
    elif sum(rows) != x_AD.shape[0] or len(rows) != w1_EID.shape[0]:
        raise ValueError(
            f"experts_mlp: rows {rows} (sum {sum(rows)}) for {x_AD.shape[0]} rows "
            f"and {w1_EID.shape[0]} experts"
        )
    if grouped_fp8 and (not fp8 or cache is None):
        raise ValueError(
            f"experts_mlp: grouped_fp8 needs fp8=True and a WeightCache, got fp8={fp8}, "
            f"cache={cache}"
        )
    if (kgrouped_wgrad or bf16_wgrad) and not grouped_fp8:
        raise ValueError(
            f"experts_mlp: kgrouped_wgrad={kgrouped_wgrad}, bf16_wgrad={bf16_wgrad} need "
            "grouped_fp8=True"
        )
    if kgrouped_wgrad and bf16_wgrad:
        raise ValueError("experts_mlp: kgrouped_wgrad and bf16_wgrad exclude each other")
    return _ExpertsMLPFn.apply(
        x_AD,
        w1_EID,
        w3_EID,
        w2_EDI,
        rows,
        store,
        fp8,
        cache,
        grouped_fp8,
        kgrouped_wgrad,
        bf16_wgrad,
    )


def experts_layout(
    x_TD: torch.Tensor,
    counts_E: torch.Tensor,
    A: int,
    *,
    fp8: bool = False,
    grouped_fp8: bool = False,
    kgrouped_wgrad: bool = False,
    bf16_wgrad: bool = False,
    **_: object,
) -> GroupedExperts | None:
    """The padded layout that `experts_mlp` with these settings would plan for A rows of x's
    tokens (x_TD gives the device and dtype; counts_E int64 [E] per expert on the device), so
    that the rows can be written there directly; None where it would not pad on the device:
    the per-expert paths, the CPU's unaligned BF16 layout, or weight gradients that slice
    experts on the host (`GroupedExperts.device_layout`). Call it under the autocast that the
    experts then run under (the GEMMs' dtype decides the BF16 path). Other keywords (store,
    cache) are experts_mlp's and ignored."""
    dev = x_TD.device.type
    act = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_TD.dtype
    align = _grouped_align(x_TD.device, A, fp8, grouped_fp8, act)
    if align is None or align == 1:
        return None
    if not GroupedExperts.device_layout(
        x_TD, fp8=fp8, kgrouped_wgrad=kgrouped_wgrad, bf16_wgrad=bf16_wgrad
    ):
        return None
    return GroupedExperts.from_counts(counts_E, A, align)


class ExpertsMLP(functools.partial):
    """`Experts.mlp_fn`: `experts_mlp` with its settings bound (a functools.partial: `func`,
    `keywords`), and `layout`, the padded layout it wants its rows on (`experts_layout` with the
    same settings): the model's permute then writes x_PD and its combine reads y_PD, so the
    grouped paths copy no rows into or out of their layout. At Moonlight's training shape (A =
    24,576 rows of D = 2048 bf16, 96 MiB) that is five passes of 192 MiB (read and write) and
    five launches less per MoE layer and micro-batch: the pad of x and of dy (index_copy_), the
    unpad of y and of the two input-gradient products (index_select). The sum of those two
    products then runs over the layout's P rows instead of A: P - A = 960 more rows at BF16's
    16-row bound (25,536), 8,064 at FP8's 128-row one (32,640), 11 and 95 MiB of traffic.
    On the H200 at 32,768 tokens a step (BF16, 11 Moonlight layers) the step took 0.714 s with
    it and 0.750 s without (results/train-1gpu-nvidia-h200-padfree.json). MOERAY_FUSED_MOE_PADFREE=0
    asks for no layout: the rows then go through PyTorch's gather and the experts pad and unpad
    them themselves."""

    @property
    def cache(self) -> f8.WeightCache | None:
        """The WeightCache the experts' GEMMs read their weights from (`fp8.weight_caches`)."""
        return self.keywords.get("cache")

    def layout(self, x_TD: torch.Tensor, counts_E: torch.Tensor, A: int) -> GroupedExperts | None:
        if switched_off("MOE_PADFREE"):
            return None
        return experts_layout(x_TD, counts_E, A, **self.keywords)


def enable_grouped_experts(
    model: torch.nn.Module,
    *,
    grouped_fp8: bool,
    kgrouped_wgrad: bool = False,
    bf16_wgrad: bool = False,
) -> int:
    """Run every routed-experts module of a whole (PP = 1) model through `experts_mlp`, weight
    gradients computed at once (no W-op store: pipeline stages get theirs from
    `stages.enable_weight_grad_split`). FP8 experts (`linear` set to `fp8.fp8_linear` by
    `fp8.enable_fp8_training`, called first) keep FP8 with a WeightCache, through the grouped FP8
    GEMM when `grouped_fp8` (its weight gradients k-grouped with `kgrouped_wgrad`, see
    `experts_mlp`; from bf16 operands with `bf16_wgrad`); BF16 ones take `GroupedExperts` where
    it applies. Returns the number of modules switched. Every module gets a WeightCache: FP8
    keeps its quantized weights there, BF16 its bf16 casts of the fp32 weights (one per
    optimizer step instead of two per micro-batch)."""
    n = 0
    for module in model.modules():
        if isinstance(module, Experts):
            fp8 = module.linear is f8.fp8_linear
            module.mlp_fn = ExpertsMLP(
                experts_mlp,
                fp8=fp8,
                cache=f8.WeightCache(),
                grouped_fp8=fp8 and grouped_fp8,
                kgrouped_wgrad=fp8 and grouped_fp8 and kgrouped_wgrad,
                bf16_wgrad=fp8 and grouped_fp8 and bf16_wgrad,
            )
            n += 1
    return n
