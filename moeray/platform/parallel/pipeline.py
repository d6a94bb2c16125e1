"""Pipeline parallelism: the model split into stages, and an executor that runs a schedule's op list
(`schedule.py`: 1F1B, ZB1P, DualPipe) with torch.distributed point-to-point messages.

Legend: b sequences of a micro-batch, S positions, D model width, V vocabulary, M micro-batches of
a step (both DualPipe directions together), PP pipeline ranks, E routed experts, L MoE layers
(main layers then MTP blocks: the RouterActor's order).

Stages (`split_layers`, `PipelineStage`). Stage 0 holds the embedding, the last stage the final
norm, the head and the MTP modules; decoder layers are spread so that every stage runs about the
same number of blocks (an MTP block counts as one). A stage keeps the full model's module names,
so its state_dict keys are the checkpoint's and the stages of all ranks merge back into one model.

Shared weights. MTP depth k reads the main model's embedding of token s+k and the shared head.
The head lives on the last stage with the MTP modules, so only the embedding is needed twice: the
last stage holds a copy of `model.embed_tokens` built from the same initial weights. Every
parameter's *holders* are the pipeline ranks that hold a copy of it (1F1B: embedding on ranks 0
and PP-1, everything else once; DualPipe: stage s on ranks s and PP-1-s, i.e. every parameter
twice). After the backward pass the gradients of all copies are summed (and averaged over the
EP x DP data shards) in one all-reduce per holder set, so every copy takes the same AdamW step and
the copies never drift apart. On one rank two stages share a single embedding module (DualPipe:
rank 0 holds stages 0 and PP-1), so the sum over copies counts each contribution once.

Backward split (ZB1P, DualPipe). `BI` runs the backward with every linear layer's weight-gradient
GEMM (dW = dy^T x) deferred into the stage's `WeightGradStore`; the input gradient, what the
previous stage waits for, is ready sooner. `W` runs the deferred GEMMs. Linear layers, the lm head,
the MTP projection and the routed experts (the GEMMs, about 2/3 of a backward's weight-grad work
on the tiny model and more at scale) are deferred; norms, the router gate and the embedding take
their (cheap) gradients inside BI.

Messages. Between two pipeline ranks four kinds of stream can flow: activations and gradients of
each direction. Every stream has its own two-rank process group, so the messages of one stream are
matched in order (micro-batch order on both ends, which every schedule keeps) without tags, and
every communicator carries one stream one way: a rank only sends or only receives on it, so NCCL
never queues a send of one stream behind a receive of another, and no send/recv pair on one
communicator can be posted in clashing orders. A slot's receives are all posted when the slot
starts, not earlier: on NCCL a posted receive is a kernel spinning on the GPU until its message
comes, and any implicit device synchronization on the host (a cudaMalloc, a module load) waits
for it. Posted a slot early, it can wait for a message the peer sends only after this rank's
current slot, and with both ranks so the GPUs never idle (suspected in the BF16 DualPipe hang,
notes-train.md). Posted at slot start, it waits only for what the schedule needs now, sent in an
earlier slot of the peer. Sends are asynchronous and waited for at the end of the step, so no
rank blocks on a peer that is itself waiting to receive. Every message goes through
`dist.batch_isend_irecv` (a batch of one: torch batches only ops of one group, and each group
holds one stream): on NCCL a batched p2p op
runs on the group's own communicator, made when the group is (`init_distributed` binds the device,
so `new_group` splits it eagerly) and checked by `PipelineGroups.create`, where a lone
`isend`/`irecv` would lazily build a separate two-rank communicator at its first message. That
lazy build blocks until the peer builds the same one, and DualPipe's first messages differ per
rank (rank 0 first receives direction 1's activations, rank 1 direction 0's): both ranks wait in
different communicators' setup forever. The communicator alone is not enough: NCCL also connects
a pair of ranks for point-to-point traffic lazily, inside the first send/recv between them, and
that connection step blocks until the peer posts its matching op on the same communicator. The
2-GPU run on H200s (2026-11-27) hung exactly there, both ranks inside their first `irecv`'s group
end. So `PipelineGroups.create` also warms every stream (`warm_links`): one small message per
stream and one all-to-all per EP group, in one global order, before any step.

Overlap (CUDA). Each direction computes on its own CUDA stream and uses its own EP process group.
A DualPipe F&B slot pairs a forward of one direction with a backward of the other; with
`overlap=True` the two run in two host threads, so one chunk's all-to-all (and its p2p messages)
proceed while the other chunk computes. Two directions never share a collective, so the EP ranks'
collectives stay matched whatever the interleaving. On CPU/gloo the slot runs sequentially unless
asked (the tests run the threaded path on gloo too).

Rank layout (`Topology`): global rank = (pp_rank * DP + dp_rank) * EP + ep_rank. EP is innermost
(its all-to-all is the heaviest traffic: keep it inside a node), pipeline outermost (one
activation per micro-batch crosses a stage boundary). With PP = 1 this is the EP x DP layout of
`train/loop.py`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moeray.platform.fp8 import pad_rows
from moeray.platform.parallel.schedule import Kind, Op, Schedule, Slot, validate

# ----------------------------------------------------------------------------------------------
# layout


@dataclass(frozen=True)
class Topology:
    pp: int
    dp: int = 1
    ep: int = 1

    def __post_init__(self):
        if min(self.pp, self.dp, self.ep) < 1:
            raise ValueError(f"pp={self.pp}, dp={self.dp}, ep={self.ep} must all be >= 1")

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.ep

    @property
    def shards(self) -> int:
        """Data shards: every (dp, ep) coordinate is one pipeline with its own slice of the batch."""
        return self.dp * self.ep

    def rank(self, pp_rank: int, dp_rank: int, ep_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.ep + ep_rank

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, ep_rank) of a global rank."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank={rank} outside a world of {self.world}")
        return rank // (self.dp * self.ep), rank // self.ep % self.dp, rank % self.ep

    def shard(self, rank: int) -> int:
        """This rank's data shard: all pipeline ranks of one (dp, ep) pipeline read the same one."""
        _, d, e = self.coords(rank)
        return d * self.ep + e


@dataclass(frozen=True)
class StageLayout:
    num_layers: int
    num_mtp: int
    layers: tuple[tuple[int, ...], ...]  # main decoder layer ids of each stage

    @property
    def pp(self) -> int:
        return len(self.layers)


def split_layers(num_layers: int, num_mtp: int, pp: int) -> StageLayout:
    """Contiguous layers per stage; the last stage's MTP blocks count as layers when balancing.

    tiny (3 layers + 1 MTP): PP=2 -> (0, 1) | (2,)+MTP; PP=4 -> (0,) | (1,) | (2,) | ()+MTP.
    """
    if pp < 1:
        raise ValueError(f"pp={pp} must be >= 1")
    if pp > num_layers + 1:
        raise ValueError(
            f"pp={pp} stages need at least pp-1={pp - 1} decoder layers, the model has {num_layers}"
        )
    units = num_layers + num_mtp
    last = max(units // pp - num_mtp, 0) if pp > 1 else num_layers
    rest = num_layers - last
    base, extra = divmod(rest, pp - 1) if pp > 1 else (0, 0)
    sizes = [base + (1 if i < extra else 0) for i in range(pp - 1)] + [last]
    if pp > 1 and min(sizes[:-1]) == 0:
        raise ValueError(f"pp={pp} leaves a stage without decoder layers ({num_layers} layers)")
    out, start = [], 0
    for n in sizes:
        out.append(tuple(range(start, start + n)))
        start += n
    return StageLayout(num_layers, num_mtp, tuple(out))


def moe_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the MoE modules in the RouterActor's row order (`step.moe_layers`)."""
    from moeray.platform.model.moe import MoE

    return [name for name, m in model.named_modules() if isinstance(m, MoE)]


class PipelineStage(nn.Module):
    """Stage `index` of `layout`, holding the full model's modules under the full model's names.

    The modules are taken (not copied) from `full`: stages built from one model on one rank share
    what they have in common (the embedding of stage 0 and of the last stage).
    """

    def __init__(self, full: nn.Module, layout: StageLayout, index: int) -> None:
        super().__init__()
        if not 0 <= index < layout.pp:
            raise ValueError(f"stage {index} outside pp={layout.pp}")
        self.config = full.config
        self.index = index
        self.first, self.last = index == 0, index == layout.pp - 1
        self.model = nn.Module()
        self.model.rotary_emb = full.model.rotary_emb
        if self.first or (self.last and layout.num_mtp > 0):
            self.model.embed_tokens = full.model.embed_tokens
        self.model.layers = nn.ModuleDict(
            {str(i): full.model.layers[i] for i in layout.layers[index]}
        )
        if self.last:
            self.model.norm = full.model.norm
            self.lm_head = full.lm_head
            self.mtp = full.mtp
        self.store = WeightGradStore()
        # rows of this stage's MoE layers in the model's [L, E] order
        names = moe_layer_names(full)
        self.moe_rows = {name: names.index(name) for name in moe_layer_names(self)}
        self.num_moe_layers = len(names)

    def forward_chunk(
        self, x_bSD: torch.Tensor | None, tokens_bS1: torch.Tensor, loss_cfg, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch through this stage.

        Returns (out, aux, stats): out is the activation for the next stage, or on the last stage
        the scaled objective of `train/step.compute_loss`; aux is this stage's scaled balance loss
        (a scalar; backward runs on it with gradient 1); stats holds detached unscaled parts.
        """
        from moeray.platform.routing.balance import sequence_balance_loss

        inputs_bS, targets_bS = tokens_bS1[:, :-1], tokens_bS1[:, 1:]
        b, S = inputs_bS.shape
        positions_bS = torch.arange(S, device=inputs_bS.device).expand(b, S)
        cos, sin = self.model.rotary_emb(positions_bS)
        x = self.model.embed_tokens(inputs_bS) if self.first else x_bSD
        for layer in self.model.layers.values():
            x = layer(x, cos, sin)
        stats: dict[str, torch.Tensor] = {}
        if self.last:
            hidden_bSD = self.model.norm(x)
            logits = self.lm_head(hidden_bSD)
            main = F.cross_entropy(logits.flatten(0, 1).float(), targets_bS.flatten())
            objective = main
            mtp_ces = []
            h_bSD = hidden_bSD
            for k, module in enumerate(self.mtp, start=1):
                if S - k < 1:
                    break
                pos = positions_bS[:, : S - k]
                cos_k, sin_k = self.model.rotary_emb(pos)
                h_bSD = module(
                    h_bSD[:, :-1], self.model.embed_tokens(inputs_bS[:, k:]), cos_k, sin_k
                )
                logits_k = self.lm_head(module.shared_head.norm(h_bSD))
                mtp_ces.append(
                    F.cross_entropy(logits_k.flatten(0, 1).float(), targets_bS[:, k:].flatten())
                )
            if mtp_ces:
                objective = (
                    objective + loss_cfg.mtp_lambda / len(mtp_ces) * torch.stack(mtp_ces).sum()
                )
                stats["mtp"] = torch.stack(mtp_ces).mean().detach()
            stats["main"] = main.detach()
        balance = x.new_zeros((), dtype=torch.float32)
        loads = []
        for name, row in self.moe_rows.items():
            r = self.get_submodule(name).last_routing
            loads.append((row, r.counts_E.detach()))
            if loss_cfg.balance_alpha > 0:
                T = r.scores_TE.shape[0]
                balance = balance + sequence_balance_loss(
                    r.scores_TE.view(b, T // b, -1),
                    r.expert_ids_TK.view(b, T // b, -1),
                    loss_cfg.balance_alpha,
                )
        stats["balance"] = balance.detach()
        stats["loads"] = loads  # type: ignore[assignment]
        if self.last:
            return (objective + balance) * scale, balance.new_zeros(()), stats
        return x, balance * scale, stats


# ----------------------------------------------------------------------------------------------
# backward split: deferred weight-gradient GEMMs


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


def _accumulate_weight_grad(w: torch.Tensor, dw: torch.Tensor) -> None:
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
# to a multiple of 128, as the FP8 ones are (platform/fp8.py says why; there it fixed the FP8
# PP=2 x EP=2 hang on 4x H200): cuBLAS picks its kernel by shape, and a kernel first loaded
# mid-step may need the GPU idle while a posted NCCL receive spins on it (suspected in the BF16
# DualPipe hang of 2026-11-27, which stopped with CUDA_ENV and the host waits; which of the three
# mattered is not isolated). Routed experts use these GEMMs only where `_Grouped` does not apply.
# Padded, the counts take max_rows / 128 values and rehearse runs each of them first (`fp8.pad_rows`,
# `fp8.padded_row_counts`). Zero rows change nothing: extra rows of y and dx are cut off, and
# they add zero terms to dW.


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


class _SplitLinearFn(torch.autograd.Function):
    """y = x W^T whose dW GEMM can be deferred to the stage's WeightGradStore.

    `fp8`: the three GEMMs of `fp8.py` (block-scaled e4m3); else plain matmuls. Under autocast the
    GEMMs run in the autocast dtype (like F.linear) and the output takes it; gradients come back
    in the dtypes of x and W.
    """

    @staticmethod
    def forward(ctx, x_MK, w_NK, store: WeightGradStore | None, fp8: bool):
        dev = x_MK.device.type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        ctx.save_for_backward(x_MK, w_NK)
        ctx.store, ctx.fp8, ctx.cast = store, fp8, cast
        fwd, _, _ = _gemms(fp8, cast)
        with torch.autocast(dev, enabled=False):
            return fwd(x_MK, w_NK).to(cast or x_MK.dtype)

    @staticmethod
    def backward(ctx, dy_MN):
        x_MK, w_NK = ctx.saved_tensors
        store = ctx.store
        _, dgrad, wgrad = _gemms(ctx.fp8, ctx.cast)
        with torch.autocast(dy_MN.device.type, enabled=False):
            dx = dgrad(dy_MN, w_NK).to(x_MK.dtype) if ctx.needs_input_grad[0] else None
            dw = None
            if ctx.needs_input_grad[1]:
                if store is not None and store.defer:

                    def deferred(dy=dy_MN, x=x_MK, w=w_NK):
                        # outside the autograd engine grad mode is on: dW must not build a graph
                        with torch.no_grad(), torch.autocast(dy.device.type, enabled=False):
                            dw_NK = wgrad(dy, x).to(w.dtype)
                        _accumulate_weight_grad(w, dw_NK)

                    store.put(deferred)
                else:
                    dw = wgrad(dy_MN, x_MK).to(w_NK.dtype)
        return dx, dw, None, None


def split_linear(
    x: torch.Tensor,
    weight_NK: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    store: WeightGradStore | None = None,
    fp8: bool = False,
) -> torch.Tensor:
    """F.linear (any leading dims) with a deferrable weight gradient."""
    if weight_NK.dim() != 2 or x.shape[-1] != weight_NK.shape[1]:
        raise ValueError(
            f"split_linear: x [..., {x.shape[-1]}] does not match weight "
            f"{tuple(weight_NK.shape)} [N, K]"
        )
    lead = x.shape[:-1]
    y = _SplitLinearFn.apply(x.reshape(-1, x.shape[-1]), weight_NK, store, fp8)
    y = y.reshape(*lead, weight_NK.shape[0])
    return y if bias is None else y + bias


def _swiglu_backward(
    dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of h = silu(g) * u."""
    return torch.ops.aten.silu_backward(dh * u, g), dh * F.silu(g)


class _ExpertsMLPFn(torch.autograd.Function):
    """Every local expert's SwiGLU, y = (silu(x W1^T) * (x W3^T)) W2^T, on rows sorted by expert
    (`rows[e]` of them for expert e), as ONE autograd node with a deferrable weight gradient.

    Why: the per-expert loop of `Experts.forward` builds ~10 autograd nodes and ~17 kernel launches
    per expert, plus as many again backward; small() with 32 local experts in 6 MoE layers per stage
    ran a stage's forward of one micro-batch in 0.2 s on H200 (4x H200, 2026-11-27), ~45 us per op
    for 1.75 GFLOP/token: host-bound. Here the SwiGLU runs once over all rows, and the weight
    gradients of all experts are one deferred closure and one accumulation per stacked weight.
    GEMMs: without FP8 one grouped GEMM per projection for all experts (`_Grouped`); with FP8 the
    per-expert block-scaled GEMMs of split_linear (padded on CUDA as there). Gradients equal the
    loop's (unit tests): the same products on the same rows.
    """

    @staticmethod
    def forward(
        ctx,
        x_AD,
        w1_EID,
        w3_EID,
        w2_EDI,
        rows: list[int],
        store: WeightGradStore | None,
        fp8: bool,
        cache,
        grouped_fp8: bool,
    ):
        dev = x_AD.device.type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        act = cast or x_AD.dtype
        ctx.rows, ctx.store, ctx.fp8, ctx.cast, ctx.x_dtype = rows, store, fp8, cast, x_AD.dtype
        ctx.cache = cache
        ctx.grouped = _Grouped.applies(x_AD, fp8, act)
        ctx.grouped_fp8 = fp8 and grouped_fp8 and x_AD.shape[0] > 0
        if ctx.grouped_fp8:
            with torch.autocast(dev, enabled=False):
                return _GroupedFP8.forward(ctx, x_AD, w1_EID, w3_EID, w2_EDI, act)
        if ctx.grouped:
            with torch.autocast(dev, enabled=False):
                grp = _Grouped(x_AD, rows)
                w1, w3, w2 = (w.to(act) for w in (w1_EID, w3_EID, w2_EDI))
                x_PD = grp.pad(x_AD.to(act))
                g_PI = grp.mm(x_PD, w1.transpose(-2, -1))
                u_PI = grp.mm(x_PD, w3.transpose(-2, -1))
                h_PI = F.silu(g_PI) * u_PI
                y_AD = grp.unpad(grp.mm(h_PI, w2.transpose(-2, -1)))
            ctx.grp = grp
            ctx.save_for_backward(x_PD, g_PI, u_PI, h_PI, w1_EID, w3_EID, w2_EDI)
            return y_AD
        fwd, _, _ = _gemms(fp8, cast, cache)
        with torch.autocast(dev, enabled=False):
            if fp8:  # gate and up quantize their shared rows once
                from moeray.platform import fp8 as f8

                quantized = cache.get if cache is not None else f8.QuantizedWeight
                pairs = [
                    f8.forward_gemm_pair(x_AD[sl], quantized(w1_EID[e]), quantized(w3_EID[e]))
                    for e, sl in _segments(rows)
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
            return _GroupedFP8.backward(ctx, dy_AD)
        if ctx.grouped:
            return _ExpertsMLPFn._grouped_backward(ctx, dy_AD)
        x_AD, g_AI, u_AI, h_AI, w1, w3, w2 = ctx.saved_tensors
        rows, store = ctx.rows, ctx.store
        _, dgrad, wgrad = _gemms(ctx.fp8, ctx.cast, ctx.cache)
        with torch.autocast(dy_AD.device.type, enabled=False):
            dh_AI = _per_expert(dgrad, dy_AD, w2, rows, h_AI.dtype, w2.shape[2])
            dg_AI, du_AI = _swiglu_backward(dh_AI, g_AI, u_AI)
            dx_AD = _per_expert(dgrad, dg_AI, w1, rows, x_AD.dtype, w1.shape[2]) + _per_expert(
                dgrad, du_AI, w3, rows, x_AD.dtype, w3.shape[2]
            )

        def weight_grads(dy=dy_AD, dg=dg_AI, du=du_AI, x=x_AD, h=h_AI):
            with torch.no_grad(), torch.autocast(dy.device.type, enabled=False):
                if ctx.fp8:  # gate and up re-tile their shared rows x once
                    from moeray.platform import fp8 as f8

                    pairs = {
                        e: f8.wgrad_gemm_pair(dg[sl], du[sl], x[sl]) for e, sl in _segments(rows)
                    }
                    dw1, dw3 = (
                        _stack_experts({e: p[i] for e, p in pairs.items()}, w)
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
            *_weight_grads_or_defer(ctx, (w1, w3, w2), weight_grads),
            None,
            None,
            None,
            None,
            None,
        )

    @staticmethod
    def _grouped_backward(ctx, dy_AD):
        x_PD, g_PI, u_PI, h_PI, w1, w3, w2 = ctx.saved_tensors
        grp = ctx.grp
        act = x_PD.dtype
        with torch.autocast(dy_AD.device.type, enabled=False):
            w1c, w3c, w2c = (w.to(act) for w in (w1, w3, w2))
            dy_PD = grp.pad(dy_AD.to(act))
            dh_PI = grp.mm(dy_PD, w2c)
            dg_PI, du_PI = _swiglu_backward(dh_PI, g_PI, u_PI)
            dx_AD = grp.unpad(grp.mm(dg_PI, w1c)).to(ctx.x_dtype) + grp.unpad(
                grp.mm(du_PI, w3c)
            ).to(ctx.x_dtype)

        def weight_grads(dy=dy_PD, dg=dg_PI, du=du_PI, x=x_PD, h=h_PI):
            with torch.no_grad(), torch.autocast(dy.device.type, enabled=False):
                return (
                    grp.wgrad(dg, x, w1.dtype),
                    grp.wgrad(du, x, w3.dtype),
                    grp.wgrad(dy, h, w2.dtype),
                )

        return (
            dx_AD,
            *_weight_grads_or_defer(ctx, (w1, w3, w2), weight_grads),
            None,
            None,
            None,
            None,
            None,
        )


class _GroupedFP8:
    """FP8 experts on the 128-aligned layout (`_Grouped` with align 128, DeepGEMM's contiguous
    layout): one quantization per tensor for all experts (1x128 and 128x1 groups never straddle
    two experts there), one grouped GEMM per projection forward and input-grad
    (`kernels.fp8.fp8_gemm_grouped`), weight gradients one GEMM per expert on slices of one 128x1
    quantization. Weights come stacked from the WeightCache. Launches per MoE layer and
    micro-batch: ~10 forward, ~12 + 3 E backward, where the per-expert path makes ~29 E."""

    @staticmethod
    def forward(ctx, x_AD, w1, w3, w2, act):
        from moeray.kernels import fp8 as k

        cache = ctx.cache
        grp = _Grouped(x_AD, ctx.rows, align=128)
        blocks = grp.block_expert()
        x_PD = grp.pad(x_AD.to(torch.bfloat16))
        xq, xs = k.act_quant(x_PD, scale_col_major=True)
        s1, s3, s2 = cache.stacked(w1), cache.stacked(w3), cache.stacked(w2)
        g_PI = k.fp8_gemm_grouped(xq, xs, s1.q, s1.scale, blocks)
        u_PI = k.fp8_gemm_grouped(xq, xs, s3.q, s3.scale, blocks)
        h_PI = F.silu(g_PI) * u_PI
        hq, hs = k.act_quant(h_PI, scale_col_major=True)
        y_AD = grp.unpad(k.fp8_gemm_grouped(hq, hs, s2.q, s2.scale, blocks)).to(act)
        ctx.grp, ctx.blocks = grp, blocks
        ctx.save_for_backward(x_PD, g_PI, u_PI, h_PI, w1, w3, w2)
        return y_AD

    @staticmethod
    def backward(ctx, dy_AD):
        from moeray.kernels import fp8 as k

        x_PD, g_PI, u_PI, h_PI, w1, w3, w2 = ctx.saved_tensors
        grp, blocks, cache = ctx.grp, ctx.blocks, ctx.cache

        def input_grad(d_PN, s):  # d @ W per expert, with W^T stored K-major
            dq, ds = k.act_quant(d_PN, scale_col_major=True)
            return k.fp8_gemm_grouped(dq, ds, *s.transposed, blocks)

        with torch.autocast(dy_AD.device.type, enabled=False):
            s1, s3, s2 = cache.stacked(w1), cache.stacked(w3), cache.stacked(w2)
            dy_PD = grp.pad(dy_AD.to(torch.bfloat16))
            dh_PI = input_grad(dy_PD, s2)
            dg_PI, du_PI = _swiglu_backward(dh_PI, g_PI, u_PI)
            dx_AD = grp.unpad(input_grad(dg_PI, s1)).to(ctx.x_dtype) + grp.unpad(
                input_grad(du_PI, s3)
            ).to(ctx.x_dtype)

        def weight_grads(dy=dy_PD, dg=dg_PI, du=du_PI, x=x_PD, h=h_PI):
            with torch.no_grad(), torch.autocast(dy.device.type, enabled=False):
                xt, ht, dgt, dut, dyt = (k.act_quant_t(t) for t in (x, h, dg, du, dy))

                def per_expert(at, bt, w):  # dW[e] = a[rows of e]^T b[rows of e], 128x1 on both
                    got = {}
                    for e, sl in grp.padded_segments():
                        sb = slice(sl.start // 128, sl.stop // 128)
                        got[e] = k.fp8_gemm(at[0][:, sl], at[1][:, sb], bt[0][:, sl], bt[1][:, sb])
                    return _stack_experts(got, w)

                return per_expert(dgt, xt, w1), per_expert(dut, xt, w3), per_expert(dyt, ht, w2)

        return (
            dx_AD,
            *_weight_grads_or_defer(ctx, (w1, w3, w2), weight_grads),
            None,
            None,
            None,
            None,
            None,
        )


def _weight_grads_or_defer(ctx, weights, weight_grads) -> tuple:
    """The weight gradients now, or (during a BI backward) a W-op closure that accumulates them."""
    needs_w = any(ctx.needs_input_grad[1:4])
    if needs_w and ctx.store is not None and ctx.store.defer:

        def deferred():
            for w, dw in zip(weights, weight_grads()):
                _accumulate_weight_grad(w, dw)

        ctx.store.put(deferred)
        return None, None, None
    return weight_grads() if needs_w else (None, None, None)


class _Grouped:
    """All experts' rows in one grouped GEMM (`torch._grouped_mm`: CUTLASS on sm90 for bf16, a
    per-group loop on CPU): one launch per projection instead of one per expert. On CUDA each
    expert's rows start at a multiple of ALIGN (zero rows between), the grouped kernel's alignment;
    on CPU the rows stay as they are."""

    ALIGN = 16

    @staticmethod
    def available(device: torch.device, fp8: bool, act: torch.dtype | None) -> bool:
        """Whether experts with these settings run their GEMMs grouped. FP8 keeps its own GEMMs
        (torch's grouped FP8 GEMM scales per row, not in 1x128 / 128x128 blocks); on CUDA the
        grouped kernel takes bf16 only."""
        return (
            not fp8
            and hasattr(torch, "_grouped_mm")
            and (act == torch.bfloat16 if device.type == "cuda" else device.type == "cpu")
        )

    @staticmethod
    def applies(x: torch.Tensor, fp8: bool, act: torch.dtype) -> bool:
        return x.shape[0] > 0 and _Grouped.available(x.device, fp8, act)

    def __init__(self, x_AD: torch.Tensor, rows: list[int], align: int | None = None) -> None:
        self.rows, self.device = rows, x_AD.device
        align = align or (self.ALIGN if x_AD.is_cuda else 1)
        self.padded = padded = [-(-n // align) * align for n in rows]
        ends = torch.tensor(padded).cumsum(0)
        self.P = int(ends[-1]) if len(rows) else 0
        self._ends = ends
        if align == 1:
            self.dst_A = None
        else:  # padded position of each row: its expert's padded start + its rank within the expert
            starts = [0] + ends.tolist()[:-1]
            self.dst_A = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, rows)]).to(
                x_AD.device, non_blocking=True
            )

    def block_expert(self, block: int = 128) -> torch.Tensor:
        """int32 [P / block]: the expert of each `block`-row block of the padded layout."""
        ids = [e for e, p in enumerate(self.padded) for _ in range(p // block)]
        return torch.tensor(ids, dtype=torch.int32).to(self.device, non_blocking=True)

    def padded_segments(self):
        """(expert, slice of its padded rows) for every expert with rows."""
        return _segments(self.padded)

    def pad(self, t_A: torch.Tensor) -> torch.Tensor:
        if self.dst_A is None:
            return t_A
        return t_A.new_zeros(self.P, t_A.shape[1]).index_copy_(0, self.dst_A, t_A)

    def unpad(self, t_P: torch.Tensor) -> torch.Tensor:
        return t_P if self.dst_A is None else t_P.index_select(0, self.dst_A)

    @functools.cached_property
    def offs(self) -> torch.Tensor:
        """int32 end row of each expert on the device: torch._grouped_mm's offsets (made on first
        use: the grouped FP8 path indexes blocks instead)."""
        return self._ends.to(torch.int32).to(self.device, non_blocking=True)

    def mm(self, a_P: torch.Tensor, b_E: torch.Tensor) -> torch.Tensor:
        """Rows of expert e times b_E[e] ([E, K, N]) -> [P, N]."""
        return torch._grouped_mm(a_P, b_E, offs=self.offs)

    def wgrad(self, dy_PN: torch.Tensor, x_PK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dW [E, N, K]: dW[e] = dy[rows of e]^T x[rows of e], exact zeros for experts without rows
        (not left to the kernel's handling of empty groups)."""
        dw = torch._grouped_mm(dy_PN.t(), x_PK, offs=self.offs).to(dtype)
        empty = [e for e, n in enumerate(self.rows) if n == 0]
        if empty:
            dw[empty] = 0
        return dw


def _segments(rows: list[int]):
    """(expert, slice of its rows) for every expert with rows, in expert order."""
    start = 0
    for e, n in enumerate(rows):
        if n:
            yield e, slice(start, start + n)
        start += n


def _per_expert(
    gemm, a_A: torch.Tensor, w_E: torch.Tensor, rows: list[int], dtype: torch.dtype, width: int
) -> torch.Tensor:
    """gemm(rows of expert e, w_E[e]) for every expert with rows, concatenated in one copy;
    [0, width] when no expert has rows."""
    outs = [gemm(a_A[sl], w_E[e]).to(dtype) for e, sl in _segments(rows)]
    return torch.cat(outs) if outs else a_A.new_empty(0, width, dtype=dtype)


def _per_expert_wgrad(
    wgrad, dy_AN: torch.Tensor, x_AK: torch.Tensor, rows: list[int], w_ENK: torch.Tensor
) -> torch.Tensor:
    """dW [E, N, K]: dW[e] = dy[rows of e]^T x[rows of e]; zeros for experts without rows."""
    return _stack_experts({e: wgrad(dy_AN[sl], x_AK[sl]) for e, sl in _segments(rows)}, w_ENK)


def _stack_experts(got: dict[int, torch.Tensor], w_ENK: torch.Tensor) -> torch.Tensor:
    """[E, N, K] in w_ENK's dtype from per-expert results; zeros for experts not in `got`."""
    zero = torch.zeros_like(w_ENK[0])
    return torch.stack(
        [got[e].to(w_ENK.dtype) if e in got else zero for e in range(w_ENK.shape[0])]
    )


def _gemms(fp8: bool, cast: torch.dtype | None, cache=None):
    """split_linear's (forward, dgrad, wgrad) GEMMs, each returning the dtype the caller stores
    into (the FP8 ones return the kernels' bf16 on CUDA, fp32 on CPU). `cache`: an
    fp8.WeightCache that keeps the FP8 weights from one micro-batch to the next."""
    if fp8:
        from moeray.platform import fp8 as f8

        if cache is None:
            return f8.forward_gemm, f8.dgrad_gemm, f8.wgrad_gemm
        return (
            lambda x, w: f8.forward_gemm(x, w, cache.get(w)),
            lambda dy, w: f8.dgrad_gemm(dy, w, cache.get(w)),
            f8.wgrad_gemm,
        )
    return (
        functools.partial(matmul_forward, cast=cast),
        functools.partial(matmul_dgrad, cast=cast),
        functools.partial(matmul_wgrad, cast=cast),
    )


def experts_mlp(
    x_AD: torch.Tensor,
    w1_EID: torch.Tensor,
    w3_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    rows: list[int],
    *,
    store: WeightGradStore | None = None,
    fp8: bool = False,
    cache=None,
    grouped_fp8: bool = False,
) -> torch.Tensor:
    """`Experts.mlp_fn` for pipeline stages: see _ExpertsMLPFn. `cache`: an fp8.WeightCache.
    `grouped_fp8`: the FP8 GEMMs on the 128-aligned layout with the grouped kernel (_GroupedFP8)."""
    if sum(rows) != x_AD.shape[0] or len(rows) != w1_EID.shape[0]:
        raise ValueError(
            f"experts_mlp: rows {rows} (sum {sum(rows)}) for {x_AD.shape[0]} rows "
            f"and {w1_EID.shape[0]} experts"
        )
    if grouped_fp8 and (not fp8 or cache is None):
        raise ValueError(
            f"experts_mlp: grouped_fp8 needs fp8=True and a WeightCache, got fp8={fp8}, "
            f"cache={cache}"
        )
    return _ExpertsMLPFn.apply(x_AD, w1_EID, w3_EID, w2_EDI, rows, store, fp8, cache, grouped_fp8)


class SplitLinear(nn.Module):
    """Replaces an nn.Linear (or an FP8TrainLinear), sharing its Parameters (same names)."""

    def __init__(
        self, weight: nn.Parameter, bias: nn.Parameter | None, store: WeightGradStore, fp8: bool
    ) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.store, self.fp8 = store, fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_linear(x, self.weight, self.bias, store=self.store, fp8=self.fp8)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, fp8={self.fp8}, deferred dW"


def enable_weight_grad_split(
    stage: nn.Module, store: WeightGradStore, *, grouped_fp8: bool = False
) -> int:
    """Route every linear layer and routed-expert GEMM of `stage` through `split_linear` with
    `store` (FP8 ones stay FP8). `grouped_fp8`: FP8 routed experts through the grouped FP8 GEMM
    (`_GroupedFP8`) instead of one GEMM per expert. Returns how many layers were switched."""
    from moeray.platform.fp8 import FP8TrainLinear, WeightCache, fp8_linear
    from moeray.platform.model.moe import Experts

    n = 0
    for module in list(stage.modules()):
        if isinstance(module, Experts):
            if isinstance(module.linear, functools.partial):
                raise ValueError("enable_weight_grad_split: experts already switched")
            fp8 = module.linear is fp8_linear
            module.linear = functools.partial(split_linear, store=store, fp8=fp8)
            module.mlp_fn = functools.partial(
                experts_mlp,
                store=store,
                fp8=fp8,
                cache=WeightCache() if fp8 else None,
                grouped_fp8=fp8 and grouped_fp8,
            )
            n += 1
            continue
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear or isinstance(child, FP8TrainLinear):
                setattr(
                    module,
                    child_name,
                    SplitLinear(
                        child.weight, child.bias, store, fp8=isinstance(child, FP8TrainLinear)
                    ),
                )
                n += 1
    return n


# ----------------------------------------------------------------------------------------------
# process groups


TIMEOUT_ENV = "MOERAY_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0  # 10 minutes: far above any step here (the small model on GPUs: seconds)


def dist_timeout_s(environ: dict[str, str] | None = None) -> float:
    """How long a collective or p2p op may wait before the process group fails it, in seconds:
    env MOERAY_DIST_TIMEOUT_S, default 600. A hang becomes an error after this long."""
    raw = (os.environ if environ is None else environ).get(TIMEOUT_ENV, "")
    if raw.strip() == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


# The CUDA environment of a pipeline worker; it must be in place before the process creates its
# CUDA context (`apply_cuda_env`, and the Ray job's runtime_env, train/job.py). Set, not defaulted:
# CUDA images often export other values (NVIDIA's containers export CUDA_MODULE_LOADING=LAZY).
CUDA_ENV = {
    # CUDA loads a kernel's module at its first launch by default (lazy loading), and a load may
    # wait for the whole device: with a peer's NCCL receive spinning on this GPU, that wait never
    # ends (both ranks hung so, 2x H200, 2026-11-27). Load torch's kernels at context creation;
    # Triton's are loaded by `PipelineExecutor.rehearse`.
    "CUDA_MODULE_LOADING": "EAGER",
    # Streams share the GPU's hardware work queues, 8 by default: kernels of two streams on one
    # queue run in launch order. A rank here has ~20 streams (two compute streams, one NCCL stream
    # per communicator), so a receive spinning on its communicator's stream can hold back compute
    # of the other direction queued behind it on the same hardware queue -- the compute that
    # leads to the message the peer waits for. 32 (the most) gives every stream its own queue.
    "CUDA_DEVICE_MAX_CONNECTIONS": "32",
    # torch's native allocator calls cudaMalloc at each new peak of a stream's cache, and a
    # cudaMalloc waits for the whole GPU to idle: the deadlock above again (4x H200, 2026-11-27:
    # two EP peers each stuck in an allocation while its GPU spun on the other's all-to-all).
    # The stream-ordered allocator (cudaMallocAsync) allocates without a device-wide wait. torch
    # picks its allocator when it is imported: launchers put this in a worker's environment before
    # the process starts (train/bench.py's spawn, train/job.py's runtime_env).
    "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync",
}


def apply_cuda_env(environ) -> None:
    """Put CUDA_ENV into `environ` (os.environ); a ValueError if this process's CUDA context
    already exists, since the settings would then be silently ignored."""
    if torch.cuda.is_initialized() and any(environ.get(k) != v for k, v in CUDA_ENV.items()):
        current = {k: environ.get(k) for k in CUDA_ENV}
        raise ValueError(
            f"CUDA is already initialized with {current}; a pipeline worker needs "
            f"{CUDA_ENV} before its first CUDA call"
        )
    environ.update(CUDA_ENV)


def init_distributed(rank: int, world: int, init_method: str, device: torch.device) -> None:
    """init_process_group for one worker of `world`: gloo on CPU, NCCL on CUDA, timeout from
    `dist_timeout_s`. On CUDA the device is made current *before* the group exists and bound to it
    (`device_id`): NCCL then builds the world communicator at once, and every later `new_group`
    splits its communicator from it eagerly (all ranks of the world take part in each split,
    members or not, so every rank must make every group in one order: `PipelineGroups.create`).
    Without the binding NCCL guesses the device from the global rank and builds communicators
    lazily at each group's first op (the warning of the first GPU run)."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=dist_timeout_s())
    if device.type == "cuda":
        if device.index is None:
            raise ValueError(
                f"device={device}: a CUDA worker needs an explicit index (cuda:<local rank>)"
            )
        apply_cuda_env(os.environ)
        backend = (
            torch.cuda.get_allocator_backend()
            if hasattr(torch._C, "_cuda_getAllocatorBackend")
            else "none (torch built without CUDA)"
        )
        if backend != "cudaMallocAsync":
            raise ValueError(
                f"the CUDA allocator is {backend!r}; a pipeline worker needs PYTORCH_CUDA_ALLOC_CONF="
                f"{CUDA_ENV['PYTORCH_CUDA_ALLOC_CONF']!r} in its environment before torch is imported "
                f"(its launcher's job: pipeline.CUDA_ENV)"
            )
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl",
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=device,
        )
    elif device.type == "cpu":
        dist.init_process_group(
            "gloo", init_method=init_method, rank=rank, world_size=world, timeout=timeout
        )
    else:
        raise ValueError(f"device={device}: expected cpu or cuda")


def check_groups(
    made: list[tuple[str, tuple[int, ...], Any]], rank: int, world: int, device: torch.device
) -> int:
    """Run one small all-reduce on every group of `made` (name, global ranks, group) that this rank
    belongs to, in list order, each finished before the next, and check that exactly the listed
    ranks answered. Returns how many groups were checked.

    Every rank walks the same list, so the groups' first ops (and on NCCL any communicator set-up
    still pending) happen in one global order: the earliest unfinished group always has all its
    members waiting in it, so this cannot deadlock, whereas first ops issued in rank-dependent
    orders (DualPipe's first messages) can. A mismatch means the ranks disagree on the groups."""
    import torch.distributed as dist

    checked = 0
    for name, ranks, group in made:
        if rank not in ranks or len(ranks) < 2:
            continue
        onehot_W = torch.zeros(world, device=device)
        onehot_W[rank] = 1.0
        dist.all_reduce(onehot_W, group=group)
        answered = [r for r, v in enumerate(onehot_W.tolist()) if v != 0.0]
        if answered != sorted(ranks) or max(onehot_W.tolist()) != 1.0:
            raise RuntimeError(
                f"process group {name} of ranks {sorted(ranks)}: rank {rank} saw "
                f"{onehot_W.tolist()} (the ranks created their groups differently)"
            )
        checked += 1
    return checked


def warm_links(
    links: list[tuple[int, int, Any]],
    ep_groups: list[tuple[tuple[int, ...], Any]],
    rank: int,
    device: torch.device,
) -> None:
    """Make NCCL connect every point-to-point path before the first step (module docstring,
    "Messages"): one 1-element message per stream (src -> dst, through `batch_isend_irecv` as the
    steps do) and one all-to-all per EP group, walked in one global order by every rank, each
    finished on the host before the next, so the earliest unfinished one always has both (all)
    its ranks in it. Cheap on gloo too (a few ms), where it also checks the streams' ends."""
    import torch.distributed as dist

    for src, dst, group in links:
        if rank not in (src, dst):
            continue
        buf = torch.full((1,), float(src), device=device)
        if rank == dst:
            buf.zero_()
        op = dist.isend if rank == src else dist.irecv
        (work,) = dist.batch_isend_irecv([dist.P2POp(op, buf, dst if rank == src else src, group)])
        work.wait()
        if rank == dst and buf.item() != float(src):  # .item() also syncs the host on CUDA
            raise RuntimeError(
                f"stream {src} -> {dst}: received {buf.item()}, expected {float(src)}"
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for ranks, group in ep_groups:
        if rank not in ranks:
            continue
        x = torch.full((len(ranks),), float(rank), device=device)
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x, group=group)
        if y.tolist() != [float(r) for r in ranks]:
            raise RuntimeError(f"EP group {ranks}: all-to-all gave {y.tolist()} on rank {rank}")


@dataclass
class PipelineGroups:
    """Every process group a pipeline rank uses; `create` makes them on all ranks in one order."""

    topology: Topology
    rank: int
    ep: dict[int, Any]  # direction -> this rank's EP group (None when EP = 1)
    p2p: dict[
        tuple[str, int, int], tuple[Any, int, int]
    ]  # (kind, direction, stage s) -> (group, src, dst)
    sync: dict[
        tuple[tuple[int, ...], bool], Any
    ]  # (holder pp ranks, expert?) -> group (None: alone)
    made: list[tuple[str, tuple[int, ...], Any]] = field(default_factory=list)  # creation order

    @staticmethod
    def create(
        topology: Topology,
        rank: int,
        directions: int,
        holder_sets: list[tuple[int, ...]],
        device: torch.device | None = None,
        check: bool = True,
    ) -> PipelineGroups:
        """p2p: for stage boundary s -> s+1 of each direction, an "act" stream (s to s+1) and a
        "grad" stream (s+1 to s), one group each; keyed by (kind, direction, s) where s is the
        lower stage. sync: per holder set, one group over all data shards (replicated parameters)
        and one per EP rank (expert shards).

        Every rank calls `new_group` for every group, its own or not, in one order fixed by the
        topology alone (never by the rank): NCCL splits each communicator from the world's with
        all ranks taking part. With `check` every group then runs `check_groups` (world first)
        on `device`, before any step."""
        import torch.distributed as dist

        t = topology
        me_p, me_d, me_e = t.coords(rank)
        made: list[tuple[str, tuple[int, ...], Any]] = [("world", tuple(range(t.world)), None)]

        def new_group(name: str, ranks: list[int]):
            ranks_t = tuple(sorted(ranks))
            g = dist.new_group(list(ranks_t))
            made.append((name, ranks_t, g))
            return g

        def pp_rank_of(stage: int, direction: int) -> int:
            return stage if direction == 0 else t.pp - 1 - stage

        ep: dict[int, Any] = {direction: None for direction in range(directions)}
        ep_groups: list[tuple[tuple[int, ...], Any]] = []  # creation order, every rank's
        links: list[tuple[int, int, Any]] = []  # (src, dst, group) of every stream, creation order
        if t.ep > 1:
            for p in range(t.pp):
                for d in range(t.dp):
                    for direction in range(directions):
                        g = new_group(
                            f"ep(pp={p},dp={d},dir={direction})",
                            [t.rank(p, d, e) for e in range(t.ep)],
                        )
                        ep_groups.append((tuple(t.rank(p, d, e) for e in range(t.ep)), g))
                        if (p, d) == (me_p, me_d):
                            ep[direction] = g
        p2p: dict[tuple[str, int, int], tuple[Any, int, int]] = {}
        for d in range(t.dp):
            for e in range(t.ep):
                for direction in range(directions):
                    for s in range(t.pp - 1):
                        lo = t.rank(pp_rank_of(s, direction), d, e)
                        hi = t.rank(pp_rank_of(s + 1, direction), d, e)
                        for kind, src, dst in (("act", lo, hi), ("grad", hi, lo)):
                            g = new_group(
                                f"{kind}(dir={direction},s={s},dp={d},ep={e})", [src, dst]
                            )
                            links.append((src, dst, g))
                            if (d, e) == (me_d, me_e):
                                p2p[(kind, direction, s)] = (g, src, dst)
        sync: dict[tuple[tuple[int, ...], bool], Any] = {}
        for holders in sorted(set(holder_sets)):
            ranks = sorted(
                t.rank(p, d, e) for p in holders for d in range(t.dp) for e in range(t.ep)
            )
            g = new_group(f"sync{holders}", ranks) if len(ranks) > 1 else None
            if me_p in holders:
                sync[(holders, False)] = g
            for e in range(t.ep):
                ranks = sorted(t.rank(p, d, e) for p in holders for d in range(t.dp))
                g = new_group(f"sync{holders}-experts(ep={e})", ranks) if len(ranks) > 1 else None
                if me_p in holders and e == me_e:
                    sync[(holders, True)] = g
        if check and t.world > 1:
            dev = torch.device("cpu") if device is None else device
            check_groups(made, rank, t.world, dev)
            warm_links(links, ep_groups, rank, dev)
        return PipelineGroups(topology, rank, ep, p2p, sync, made)


def reserve_device_memory(
    device: torch.device,
    large_fraction: float = 0.5,
    small_fraction: float = 0.05,
    streams: list | None = None,
) -> tuple[int, int]:
    """Grow the CUDA allocator's cache now so that no step has to ask the driver for memory.

    A cudaMalloc is an implicit synchronization (CUDA C Programming Guide, "Implicit
    Synchronization"): the host waits until the GPU idles (H200: a 768 MiB allocation in one
    thread waited 951 ms for another stream's 1 s kernel, tests/gpu/test_reserve_memory_gpu.py).
    Mid-step the GPU does not idle while a posted NCCL receive spins for a message its peer has
    not sent, and if the peer is stuck the same way neither rank moves again (the 4x H200 run of
    2026-11-27 afternoon: one rank's backward thread stuck in `torch.empty`, its EP peer's forward
    thread in `torch.cat`, notes-train.md). Pipeline workers use the stream-ordered allocator
    (`CUDA_ENV`), whose allocations do not synchronize; this keeps torch's native allocator safe
    too. The native allocator reuses a freed block only on the stream that allocated it, so the
    cache is grown on each of `streams` (default: the current stream), `large_fraction` of the
    free memory in all as one block per stream (tensors over 1 MiB are split from it) and
    `small_fraction` as 2 MiB small-pool segments (tensors up to 1 MiB: per-expert scales,
    indices, short activations). Returns the two sizes in bytes, all streams together."""
    if device.type != "cuda":
        return 0, 0
    if not (
        0 < large_fraction < 1 and 0 <= small_fraction < 1 and large_fraction + small_fraction < 1
    ):
        raise ValueError(
            f"large_fraction={large_fraction}, small_fraction={small_fraction}: "
            f"each in [0, 1) and together under 1"
        )
    streams = list(streams) if streams else [torch.cuda.current_stream(device)]
    free, _ = torch.cuda.mem_get_info(device)
    large = int(free * large_fraction / len(streams)) // (2 << 20) * (2 << 20)
    small_segments = int(free * small_fraction / len(streams)) // (2 << 20)
    for stream in streams:
        with torch.cuda.stream(stream):
            block = torch.empty(large, dtype=torch.uint8, device=device)
            # two 1 MiB tensors fill one 2 MiB small-pool segment
            smalls = [
                torch.empty(1 << 20, dtype=torch.uint8, device=device)
                for _ in range(2 * small_segments)
            ]
            del block, smalls  # back to the allocator's cache for this stream, not to the driver
    return large * len(streams), small_segments * (2 << 20) * len(streams)


# ----------------------------------------------------------------------------------------------
# the executor


@dataclass
class OpTiming:
    kind: str  # "F", "B", "BI", "W" or "F&B"
    start: float  # seconds from the step's start: inputs received, compute begins
    end: float  # compute done (sends posted)


@dataclass
class StepTimings:
    wall: float  # seconds from the step's start (after a barrier) to this rank's last op
    slots: list[OpTiming] = field(default_factory=list)

    @property
    def busy(self) -> float:
        return sum(s.end - s.start for s in self.slots)

    @property
    def idle(self) -> float:
        return max(self.wall - self.busy, 0.0)

    def mean_cost(self, kind: str) -> float | None:
        xs = [s.end - s.start for s in self.slots if s.kind == kind]
        return sum(xs) / len(xs) if xs else None


@dataclass
class StepOutput:
    main_sum: float  # sum over this rank's last-stage micro-batches of CE / M
    mtp_sum: float
    balance_sum: float  # sum over this rank's stages and micro-batches of the balance loss / M
    loads_LE: torch.Tensor  # int64 tokens per expert, this rank's layers, all its micro-batches
    timings: StepTimings


def _slot_kind(slot: Slot) -> str:
    return "F&B" if len(slot) == 2 else slot[0].kind.value


class PipelineExecutor:
    """Runs one rank's ops of `schedule` for one step.

    `stages[(direction, stage)]` are this rank's stage modules; `groups.p2p` the message streams.
    """

    def __init__(
        self,
        schedule: Schedule,
        pp_rank: int,
        stages: dict[tuple[int, int], PipelineStage],
        groups: PipelineGroups,
        *,
        device: torch.device,
        act_dtype: torch.dtype,
        seq_len: int,
        hidden: int,
        autocast_dtype: torch.dtype | None = None,
        overlap: bool | None = None,
        time_ops: bool = True,
    ) -> None:
        validate(schedule)
        self.schedule, self.pp_rank, self.stages, self.groups = schedule, pp_rank, stages, groups
        need = {
            (d, st)
            for st in schedule.stages_of(pp_rank)
            for d in range(schedule.directions)
            if schedule.rank_of(st, d) == pp_rank
        }
        if set(stages) != need:
            raise ValueError(
                f"rank {pp_rank} needs stages {sorted(need)} (direction, stage), "
                f"got {sorted(stages)}"
            )
        self.device, self.act_dtype = device, act_dtype
        self.seq_len, self.hidden = seq_len, hidden
        self.autocast_dtype = autocast_dtype
        self.cuda = device.type == "cuda"
        self.overlap = self.cuda if overlap is None else overlap
        self.time_ops = time_ops
        # one CUDA stream per direction: a forward of one overlaps a backward of the other
        self.streams = (
            {d: torch.cuda.Stream(device) for d in range(schedule.directions)} if self.cuda else {}
        )
        self._pool = None
        self._rehearsed = False  # on CPU too: cheap, and the gloo tests then cover it

    # -- helpers --------------------------------------------------------------------------------

    def _stream(self, direction: int):
        return torch.cuda.stream(self.streams[direction]) if self.cuda else contextlib.nullcontext()

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _recv_key(self, op: Op) -> tuple[str, int, int] | None:
        """The stream an op receives from: (kind, direction, lower stage of the boundary)."""
        d, _, st = op.key
        if op.kind == Kind.F:
            return ("act", d, st - 1) if st > 0 else None
        if op.kind in (Kind.B, Kind.BI):
            return ("grad", d, st) if st < self.schedule.pp - 1 else None
        return None

    def _post_recv(self, op: Op) -> None:
        key = self._recv_key(op)
        if key is None or op.key + (op.kind == Kind.F,) in self._recvs:
            return
        import torch.distributed as dist

        group, src, _ = self.groups.p2p[key]
        with self._stream(op.direction):
            buf = torch.empty(
                self._mb_rows, self.seq_len, self.hidden, dtype=self.act_dtype, device=self.device
            )
            # a batch of one: on NCCL it runs on the group's own communicator (module docstring)
            (work,) = dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, src, group)])
        self._recvs[op.key + (op.kind == Kind.F,)] = [buf, work]

    def _wait_recv(self, op: Op) -> None:
        """Wait once for an op's receive (a gloo Work must not be waited on twice); on CUDA this
        makes the direction's stream, not the host, wait for it. Only that op waits: a host wait
        for both inputs of an F&B slot deadlocked DualPipe (4x H200, 2026-11-27), since one op's
        input can come from a peer's op that needs this rank's other op first."""
        entry = self._recvs.get(op.key + (op.kind == Kind.F,))
        if entry is not None and entry[1] is not None:
            with self._stream(op.direction):
                entry[1].wait()
            entry[1] = None

    def _take_recv(self, op: Op) -> torch.Tensor:
        """The op's received input, in the op's own thread. On CUDA the host waits for it too:
        the op's thousands of launches are then never queued behind a receive that spins until a
        peer sends. Queued so, they can fill the launch queue; the other direction's thread then
        blocks in its next launch, and the message that would free the peer is never sent (4x H200,
        2026-11-27: every thread of every rank inside a kernel launch)."""
        self._wait_recv(op)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return self._recvs.pop(op.key + (op.kind == Kind.F,))[0]

    def _send(self, key: tuple[str, int, int], tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        group, _, dst = self.groups.p2p[key]
        if tensor.dtype != self.act_dtype:
            raise ValueError(f"stage boundary sends {tensor.dtype}, expected {self.act_dtype}")
        tensor = tensor.detach().contiguous()
        (work,) = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, dst, group)])
        self._sends.append((tensor, work))

    # -- ops ------------------------------------------------------------------------------------

    def _forward(self, op: Op) -> None:
        d, mb, st = op.key
        stage = self.stages[(d, st)]
        x = None
        if st > 0:
            x = self._take_recv(op).requires_grad_()
        g = d * self.schedule.microbatches_per_direction() + mb
        tokens = self._micro[g]
        with self._autocast():
            out, aux, stats = stage.forward_chunk(
                x, tokens, self.loss_cfg, 1.0 / self.schedule.microbatches
            )
        self._ctx[op.key] = (x, out, aux)
        for row, counts in stats.pop("loads"):
            self._loads[row] += counts.to(self._loads.device, torch.int64)
        for name, v in stats.items():
            self._stats[name] = self._stats[name] + v.float()
        if st < self.schedule.pp - 1:
            self._send(("act", d, st), out)

    def _backward(self, op: Op) -> None:
        d, mb, st = op.key
        stage = self.stages[(d, st)]
        x, out, aux = self._ctx.pop(op.key)
        if st == self.schedule.pp - 1:
            tensors, grads = [out], [torch.ones_like(out)]
        else:
            tensors, grads = [out], [self._take_recv(op)]
            if aux.requires_grad:
                tensors.append(aux)
                grads.append(torch.ones_like(aux))
        with stage.store.collect(op.key, defer=op.kind == Kind.BI):
            torch.autograd.backward(tensors, grads)
        if st > 0:
            self._send(("grad", d, st - 1), x.grad)

    def _weight(self, op: Op) -> None:
        d, _, st = op.key
        self.stages[(d, st)].store.flush(op.key)

    def _run_op(self, op: Op) -> None:
        with self._stream(op.direction):
            {
                Kind.F: self._forward,
                Kind.B: self._backward,
                Kind.BI: self._backward,
                Kind.W: self._weight,
            }[op.kind](op)

    def _run_slot(self, slot: Slot) -> None:
        if len(slot) == 2 and self.overlap:
            # the forward in a helper thread (autocast and grad mode are thread-local: both are
            # set inside), the backward here; each on its direction's stream and EP group
            fwd, bwd = slot
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                # the CUDA current device is per thread: a new thread starts on cuda:0, where
                # rank 1's allocations and NCCL calls do not belong
                init = functools.partial(torch.cuda.set_device, self.device) if self.cuda else None
                self._pool = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="pipeline-fwd", initializer=init
                )
            fut = self._pool.submit(self._run_op, fwd)
            self._run_op(bwd)
            fut.result()
        else:
            for op in slot:
                self._run_op(op)

    def rehearse(self) -> None:
        """Run every held stage's forward and both backward forms (full, and input-grad then
        deferred weight-grad) once on this step's first micro-batch, with no point-to-point message
        in flight, then drop the gradients. Kernels first launched here (Triton's JIT-compiled ones
        and any torch kernel still lazily loaded) load now: a module load may wait for the whole
        GPU, which deadlocks while a pre-posted NCCL receive spins on it waiting for a peer that is
        itself stuck the same way. EP all-to-alls inside the forwards still run: every EP rank of a
        pipeline rank holds the same stages and rehearses them in the same order."""
        tokens = self._micro[0]
        if self.cuda:
            self._prewarm_gemms()
        for (d, st), stage in sorted(self.stages.items()):
            for defer in (False, True):
                with self._stream(d):
                    x = None
                    if st > 0:
                        x = torch.zeros(
                            self._mb_rows,
                            self.seq_len,
                            self.hidden,
                            dtype=self.act_dtype,
                            device=self.device,
                            requires_grad=True,
                        )
                    with self._autocast():
                        out, aux, _ = stage.forward_chunk(x, tokens, self.loss_cfg, 1.0)
                    tensors, grads = [out], [torch.ones_like(out)]
                    if aux.requires_grad and st < self.schedule.pp - 1:
                        tensors.append(aux)
                        grads.append(torch.ones_like(aux))
                    key = (-1, -1, st)
                    with stage.store.collect(key, defer=defer):
                        torch.autograd.backward(tensors, grads)
                    stage.store.flush(key)
        for stage in self.stages.values():
            for p in stage.parameters():
                p.grad = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            reserve_device_memory(
                self.device,
                streams=[torch.cuda.current_stream(self.device), *self.streams.values()],
            )
        self._rehearsed = True

    def _prewarm_gemms(self) -> int:
        """Load the GEMM kernels of every token count a step can give any split linear layer here
        (FP8: `platform/fp8.py`'s padding note; else `matmul_forward` and the note above it). A
        routed expert receives at most one row per token of each EP rank's micro-batch: every
        padded count up to micro-batch tokens x EP; other layers always see the micro-batch's
        tokens. Returns the GEMMs run."""
        from moeray.platform import fp8 as f8
        from moeray.platform.model.moe import Experts

        # (N, K, dtype) by (fp8, routed expert)
        weights: dict[tuple[bool, bool], set[tuple[int, int, torch.dtype]]] = {
            (f, e): set() for f in (True, False) for e in (True, False)
        }
        for stage in self.stages.values():
            for module in stage.modules():
                if isinstance(module, SplitLinear):
                    n, k = module.weight.shape
                    weights[(module.fp8, False)].add((n, k, module.weight.dtype))
                elif isinstance(module, Experts) and isinstance(module.linear, functools.partial):
                    fp8 = bool(module.linear.keywords.get("fp8"))
                    if _Grouped.available(
                        self.device, fp8, self.autocast_dtype or module.gate_proj.dtype
                    ):
                        continue  # one grouped GEMM per projection: nothing per token count to load
                    for w in (module.gate_proj, module.up_proj, module.down_proj):
                        weights[(fp8, True)].add((w.shape[1], w.shape[2], w.dtype))
        tokens = self._mb_rows * self.seq_len
        counts = {
            False: f8.padded_row_counts(tokens)[-1:],  # one count: the micro-batch's
            True: f8.padded_row_counts(tokens * self.groups.topology.ep),
        }
        runs = 0
        for (fp8, expert), ws in weights.items():
            if fp8:
                runs += f8.prewarm(ws, counts[expert], self.device)
            else:
                runs += prewarm_matmuls(ws, counts[expert], self.device, self.autocast_dtype)
        return runs

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # -- a step ---------------------------------------------------------------------------------

    def run(self, tokens_BS1: torch.Tensor, loss_cfg) -> StepOutput:
        """Forward and backward of all micro-batches of this pipeline's batch (gradients are left
        in the parameters' .grad, not yet synchronized across copies or data shards)."""
        import torch.distributed as dist

        M = self.schedule.microbatches
        B = tokens_BS1.shape[0]
        if B % M or tokens_BS1.shape[1] != self.seq_len + 1:
            raise ValueError(
                f"batch {tuple(tokens_BS1.shape)} must be [k*M, seq_len+1] with "
                f"M={M} micro-batches and seq_len={self.seq_len}"
            )
        self._mb_rows = B // M
        self._micro = tokens_BS1.to(self.device).split(self._mb_rows)
        self.loss_cfg = loss_cfg
        stage0 = next(iter(self.stages.values()))
        self._loads = torch.zeros(
            stage0.num_moe_layers,
            stage0.config.n_routed_experts,
            dtype=torch.int64,
            device=self.device,
        )
        zero = torch.zeros((), device=self.device)
        self._stats = {"main": zero, "mtp": zero, "balance": zero}
        self._ctx: dict = {}
        if not self._rehearsed:
            self.rehearse()
        self._recvs: dict = {}
        self._sends: list = []
        timings = StepTimings(0.0)
        events = []
        if self.cuda:
            for s in self.streams.values():
                s.wait_stream(torch.cuda.current_stream(self.device))
        ops = self.schedule.ranks[self.pp_rank]
        dist.barrier()  # the step's clock starts together on every rank
        t0 = time.perf_counter()
        for slot in ops:
            for op in slot:  # this slot's receives, none earlier (module docstring)
                self._post_recv(op)
            for op in slot:  # inputs of this slot: the compute clock starts once they are in
                self._wait_recv(op)
            if self.cuda and self.time_ops:
                ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for s in self.streams.values():
                    torch.cuda.current_stream(self.device).wait_stream(s)
                ev[0].record()
            start = time.perf_counter() - t0
            self._run_slot(slot)
            if self.cuda and self.time_ops:
                for s in self.streams.values():
                    torch.cuda.current_stream(self.device).wait_stream(s)
                ev[1].record()
                events.append(ev)
            timings.slots.append(OpTiming(_slot_kind(slot), start, time.perf_counter() - t0))
        for _, work in self._sends:
            work.wait()
        if self.cuda:
            for s in self.streams.values():
                torch.cuda.current_stream(self.device).wait_stream(s)
            torch.cuda.synchronize(self.device)
            if self.time_ops:
                # GPU time per slot from events; host timestamps only order them
                for t, (a, b) in zip(timings.slots, events):
                    t.end = t.start + a.elapsed_time(b) / 1e3
        timings.wall = time.perf_counter() - t0
        assert not self._ctx and not self._recvs, "ops left without their backward or receive"
        left = [k for st in self.stages.values() for k in st.store.pending]
        assert not left, f"deferred weight grads never flushed: {left}"
        self._sends = []
        return StepOutput(
            float(self._stats["main"]) / M,
            float(self._stats["mtp"]) / M,
            float(self._stats["balance"]) / M,
            self._loads.cpu(),
            timings,
        )


# ----------------------------------------------------------------------------------------------
# one rank of a pipeline-parallel model


@dataclass(frozen=True)
class PipelineSpec:
    pp: int
    dp: int = 1
    ep: int = 1
    schedule: str = "dualpipe"
    microbatches: int = 8

    @property
    def topology(self) -> Topology:
        return Topology(self.pp, self.dp, self.ep)


class PipelineModel:
    """This rank's stages of the model, their optimizer-visible parameters, gradient sync.

    Build it on every rank of a `PipelineSpec.topology` world (torch.distributed initialized):
    every rank builds the full model from `seed` (identical weights everywhere), keeps its stages,
    optionally switches them to FP8 and expert parallelism, and defers weight grads.
    """

    def __init__(
        self,
        model_cfg,
        spec: PipelineSpec,
        rank: int,
        *,
        seed: int = 0,
        fp8: bool = False,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        overlap: bool | None = None,
        seq_len: int,
        full_init: Callable | None = None,
        grouped_fp8: bool | None = None,
    ) -> None:
        from moeray.platform.model.transformer import Transformer
        from moeray.platform.parallel import schedule as sched
        from moeray.platform.parallel.expert import enable_expert_parallel

        self.spec, self.rank = spec, rank
        self.topology = spec.topology
        self.pp_rank, self.dp_rank, self.ep_rank = self.topology.coords(rank)
        self.schedule = sched.build(spec.schedule, spec.pp, spec.microbatches)
        self.device = torch.device(device)
        # FP8 experts through the grouped GEMM by default on CUDA: 4x H200, small(), PP=2 x EP=2,
        # DualPipe: 2.18 s/step vs 3.69 per expert (notes-train.md). On CPU the per-expert path,
        # which the grouped one is tested against, stays the default.
        self.grouped_fp8 = self.device.type == "cuda" if grouped_fp8 is None else grouped_fp8
        full = Transformer(model_cfg)
        full.reset_parameters(seed=seed)
        if full_init is not None:
            full_init(full)  # tests: e.g. nonzero router biases
        full.to(self.device)
        self.layout = split_layers(
            model_cfg.num_hidden_layers, model_cfg.num_nextn_predict_layers, spec.pp
        )
        self.moe_names = moe_layer_names(full)
        # holders of every parameter name, from the names of every stage
        stage_names = [
            set(n for n, _ in PipelineStage(full, self.layout, s).named_parameters())
            for s in range(spec.pp)
        ]
        self.holders: dict[str, tuple[int, ...]] = {}
        for s, names in enumerate(stage_names):
            for direction in range(self.schedule.directions):
                p = self.schedule.rank_of(s, direction)
                for n in names:
                    self.holders[n] = tuple(sorted(set(self.holders.get(n, ())) | {p}))
        self.groups = PipelineGroups.create(
            self.topology,
            rank,
            self.schedule.directions,
            list(set(self.holders.values())),
            device=self.device,
        )
        self.stages: dict[tuple[int, int], PipelineStage] = {}
        for st in self.schedule.stages_of(self.pp_rank):
            for direction in range(self.schedule.directions):
                if self.schedule.rank_of(st, direction) == self.pp_rank:
                    self.stages[(direction, st)] = PipelineStage(full, self.layout, st)
        for (direction, _), stage in self.stages.items():
            if fp8:
                from moeray.platform.fp8 import enable_fp8_training

                enable_fp8_training(stage)
            if spec.ep > 1:
                enable_expert_parallel(stage, self.groups.ep[direction], self.ep_rank, spec.ep)
            enable_weight_grad_split(stage, stage.store, grouped_fp8=self.grouped_fp8)
        del full
        self.modules = nn.ModuleList(self.stages.values())  # parameters() counts shared ones once
        self.executor = PipelineExecutor(
            self.schedule,
            self.pp_rank,
            self.stages,
            self.groups,
            device=self.device,
            act_dtype=torch.float32,
            seq_len=seq_len,
            hidden=model_cfg.hidden_size,
            autocast_dtype=autocast_dtype,
            overlap=overlap,
        )

    def named_parameters(self) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        for stage in self.stages.values():
            for n, p in stage.named_parameters():
                assert out.get(n, p) is p, f"two different copies of {n} on one rank"
                out[n] = p
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for stage in self.stages.values():
            out.update(stage.state_dict())
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for stage in self.stages.values():
            own = stage.state_dict()
            missing = [k for k in own if k not in state]
            if missing:
                raise ValueError(f"checkpoint lacks {missing[:3]}... for stage {stage.index}")
            stage.load_state_dict({k: state[k] for k in own})

    def moe_layers(self):
        """(row, MoE module) of every MoE layer on this rank (each once)."""
        seen = {}
        for stage in self.stages.values():
            for name, row in stage.moe_rows.items():
                seen[row] = stage.get_submodule(name)
        return sorted(seen.items())

    @torch.no_grad()
    def set_biases(self, bias_LE: torch.Tensor) -> None:
        if bias_LE.shape[0] != len(self.moe_names):
            raise ValueError(
                f"bias_LE has {bias_LE.shape[0]} rows for {len(self.moe_names)} MoE layers"
            )
        for row, moe in self.moe_layers():
            moe.gate.e_score_correction_bias.copy_(
                bias_LE[row].to(moe.gate.e_score_correction_bias)
            )

    def train(self) -> None:
        self.modules.train()

    def zero_grad(self) -> None:
        for p in self.modules.parameters():
            p.grad = None

    def forward_backward(self, tokens_BS1: torch.Tensor, loss_cfg) -> StepOutput:
        return self.executor.run(tokens_BS1, loss_cfg)

    def sync_gradients(self) -> float:
        """Sum every parameter's gradient over its copies and average over the data shards, in
        one all-reduce per holder set; returns the global gradient norm (each parameter counted
        once: on its lowest holder, data shard 0, and for experts once per EP rank)."""
        import torch.distributed as dist

        from moeray.platform.parallel.expert import is_expert_param

        buckets: dict[tuple[tuple[int, ...], bool], list[nn.Parameter]] = {}
        sq = torch.zeros((), dtype=torch.float64)
        # sorted by name: the ranks of a holder set hold their stages in different orders
        for name, p in sorted(self.named_parameters().items()):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            buckets.setdefault((self.holders[name], is_expert_param(name)), []).append(p)
        for key in sorted(buckets):
            params = buckets[key]
            group = self.groups.sync[key]
            flat = torch.cat([p.grad.reshape(-1).float() for p in params])
            if group is not None:
                dist.all_reduce(flat, group=group)
            flat /= self.topology.shards
            offset = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p))
                offset += n
            holders, expert = key
            if self.pp_rank == holders[0] and self.dp_rank == 0 and (expert or self.ep_rank == 0):
                sq += float(flat.detach().double().pow(2).sum())
        if self.topology.world > 1:
            sq = sq.to(self.device) if self.device.type == "cuda" else sq
            dist.all_reduce(sq)
        return float(sq) ** 0.5

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The whole (EP=1, all stages) state dict on global rank 0, CPU tensors; None elsewhere.
        Collective: every rank must call it."""
        import torch.distributed as dist

        from moeray.platform.parallel.expert import is_expert_param

        state = {k: v.detach() for k, v in self.state_dict().items()}
        if self.spec.ep > 1:
            group = self.groups.ep[0]
            for k in sorted(state):
                if is_expert_param(k):
                    parts = [torch.empty_like(state[k]) for _ in range(self.spec.ep)]
                    dist.all_gather(parts, state[k].contiguous(), group=group)
                    state[k] = torch.cat(parts)
        mine = (
            {k: v.cpu() for k, v in state.items()}
            if self.dp_rank == 0 and self.ep_rank == 0
            else None
        )
        gathered = [None] * self.topology.world if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if self.rank != 0:
            return None
        full: dict[str, torch.Tensor] = {}
        for part in gathered:
            if part:
                full.update(part)
        return full

    def close(self) -> None:
        self.executor.close()
