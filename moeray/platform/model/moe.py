"""DeepSeekMoE: a sigmoid-gated, group-limited top-k over routed experts plus shared experts.

Legend: T tokens (B*S flattened), D model width, E routed experts, I expert width, K experts per
token.

Routed experts are stored stacked ([E, I, D] and [E, D, I]) rather than as E modules: one tensor
per projection is what expert-parallel sharding and the fused-MoE kernel want. The checkpoint code
maps them to the official per-expert keys `experts.{e}.{gate,up,down}_proj.weight`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moeray.kernels.common import FP8_DTYPE
from moeray.kernels.gate import Routing
from moeray.kernels.moe import fused_moe_gate_up
from moeray.kernels.moe_permute import (
    moe_combine,
    moe_combine_applies,
    moe_permute,
    moe_positions,
)
from moeray.kernels.norm_router import norm_router_logits, norm_router_logits_applies
from moeray.kernels.router_logits import router_logits, router_logits_applies, router_logits_ref
from moeray.kernels.swiglu import swiglu, swiglu_applies, swiglu_ref
from moeray.platform.config import ModelConfig
from moeray.platform.model.linear import Linear, MergedLinear
from moeray.platform.model.norm import RMSNorm
from moeray.platform.model.quant import dequantize_fp8_blocks
from moeray.platform.routing.gate import GROUP_MASK_OFFICIAL, route

LinearFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RowLayout(Protocol):
    """Where an `mlp_fn` with a `layout` method wants the rows sorted by expert: the a-th at row
    dst_A[a] (int64 [A] on the device, distinct) of P, the other P - A rows zeros. Opaque to the
    model otherwise: it hands the layout back to mlp_fn in place of the rows per expert."""

    @property
    def P(self) -> int: ...

    @property
    def dst_A(self) -> torch.Tensor | None: ...


# (x_AD rows sorted by expert, gate [E, I, D], up [E, I, D], down [E, D, I], rows per expert) ->
# y_AD: every local expert's SwiGLU over its rows, as one call (see Experts.mlp_fn). The rows per
# expert come as a list of ints, or as an int64 [E] tensor on x's device when every routed expert
# is local (reading them would make the host wait for the GPU; see Experts._routed), or as the
# RowLayout the function's own `layout` gave (x_PD in, y_PD out; see Experts._padded_layout).
ExpertsMLPFn = Callable[
    [
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        "list[int] | torch.Tensor | RowLayout",
    ],
    torch.Tensor,
]


class SharedFusedFn(Protocol):
    """model/shared_fuse.py's SharedFused (an nn.Module), set by its transform: whether it takes
    x_TD, and (x_TD, routing) -> the MoE's output with the shared experts' added."""

    def applies(self, x_TD: torch.Tensor) -> bool: ...

    def holds(self, moe: MoE) -> bool: ...

    def __call__(self, x_TD: torch.Tensor, r: Routing) -> torch.Tensor | None: ...


class SharedStreamFn(Protocol):
    """model/shared_stream.py's SharedStream, set by its transform: the shared MLP started beside
    the routed experts (`start`) and added after both (`join`), for the x_TD it `applies` to."""

    def applies(self, x_TD: torch.Tensor) -> bool: ...

    def start(
        self, mlp: Callable[[torch.Tensor], torch.Tensor], x_TD: torch.Tensor
    ) -> torch.Tensor: ...

    def join(self, routed_TD: torch.Tensor, shared_TD: torch.Tensor) -> torch.Tensor: ...

    # True: the routed experts add the shared output in their last launch, after `ready`
    add_in_sum: bool

    def ready(self) -> torch.cuda.Event | None: ...


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)
        # Set for inference by model/merge.py: gate_proj and up_proj as one GEMM over their
        # stacked rows (both read x).
        self.gate_up_proj: MergedLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.gate_up_proj
        if fused is not None and fused.applies(x):
            gate, up = fused(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = swiglu(gate, up) if use_fused_swiglu(gate, up) else swiglu_ref(gate, up)
        return self.down_proj(act)


def use_fused_swiglu(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """The one place that picks the Triton silu(gate) * up over PyTorch's two kernels: CUDA
    inference (no gradient) with tensors the kernel takes; training and CPU run the reference.
    On the GPU both give the same bits (moeray.kernels.swiglu)."""
    needs_grad = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
    return gate.is_cuda and not needs_grad and swiglu_applies(gate, up)


def use_fused_moe_combine(
    x_TD: torch.Tensor, weights_TK: torch.Tensor, add_TD: torch.Tensor | None = None
) -> bool:
    """The one place that picks the Triton token permute and weighted combine around the routed
    experts' `mlp_fn` (moeray.kernels.moe_permute: one launch each way and each direction, fp32
    sums in registers, no atomics) over PyTorch's gather, fp32 multiply, index_add_ and casts
    (and their autograd reverses): on CUDA, training and inference alike, for tokens the kernels
    take. `Experts._routed` asks only when every routed expert is local (pos is then a
    permutation of all T * K rows); CPU keeps PyTorch. MOERAY_FUSED_MOE_COMBINE=0 keeps PyTorch."""
    return x_TD.is_cuda and moe_combine_applies(x_TD, weights_TK, add_TD)


def use_norm_router(
    x_TD: torch.Tensor,
    norm_weight_D: torch.Tensor,
    router_weight_ED: torch.Tensor,
    residual_TD: torch.Tensor | None,
) -> bool:
    """Whether `Gate.norm_logits` runs kernels.norm_router: CUDA inference (no gradient wanted)
    where `norm_router_logits_applies`."""
    tensors = (x_TD, norm_weight_D, router_weight_ED, residual_TD)
    if not x_TD.is_cuda or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    ):
        return False
    return norm_router_logits_applies(x_TD, norm_weight_D, router_weight_ED, residual_TD)


def _plus(y_TD: torch.Tensor, add_TD: torch.Tensor | None) -> torch.Tensor:
    return y_TD if add_TD is None else y_TD + add_TD


class Gate(nn.Module):
    """Router weight and the aux-loss-free correction bias (used for selection only)."""

    e_score_correction_bias: torch.Tensor  # buffer [E], registered in __init__

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        # fp32 whatever the model dtype: bias steps of gamma=0.001 vanish in bf16 near 1.0.
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32)
        )

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, E] = x . W^T. The one place that picks the Triton kernel (one launch,
        no fp32 copy of W; moeray.kernels.router_logits) over PyTorch's three: CUDA inference
        with at most its MAX_TOKENS rows; training and CPU run the reference."""
        w = self.weight
        needs_grad = torch.is_grad_enabled() and (x_TD.requires_grad or w.requires_grad)
        if x_TD.is_cuda and not needs_grad and router_logits_applies(x_TD, w):
            return router_logits(x_TD, w)
        return router_logits_ref(x_TD, w)

    def norm_logits(
        self, norm: RMSNorm, x_TD: torch.Tensor, residual_TD: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(fp32 logits [T, E] of y, y = norm(h), h = x + residual) in one launch
        (`kernels.norm_router`; MOERAY_FUSED_NORM_ROUTER=0 turns it off) for CUDA inference at
        decode rows, where the norm's weight and the router's are in the rows' dtype; None where
        it does not apply (the caller runs the norm, then `logits`)."""
        w, nw = self.weight, norm.weight
        if not use_norm_router(x_TD, nw, w, residual_TD):
            return None
        return norm_router_logits(x_TD, nw, norm.eps, w, residual_TD)


class Experts(nn.Module):
    """E routed SwiGLU experts. `linear` is F.linear by default; FP8 training swaps it from
    outside."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, D = config.n_routed_experts, config.hidden_size
        width = config.moe_intermediate_size  # I in the legend
        self.num_experts = E  # held here: expert parallelism lowers it to this rank's share
        self.routed_experts = E  # the model's, whatever this module holds
        self.gate_proj = nn.Parameter(torch.empty(E, width, D))
        self.up_proj = nn.Parameter(torch.empty(E, width, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, width))
        self.linear: LinearFn = F.linear
        # Set from outside (the pipeline's weight-grad split: parallel/stages.py) to run all local
        # experts through one autograd node instead of the per-expert loop's ~10 nodes per expert.
        # One with a `layout` method (parallel/experts_mlp.py ExpertsMLP) may ask for its rows
        # padded: see `_padded_layout`.
        self.mlp_fn: ExpertsMLPFn | None = None

    def expert_weights(
        self, e: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e's (gate, up, down) matrices; FP8-stored ones (see `quant.py`) dequantized."""
        out = []
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(self, name)[e]
            if w.dtype == FP8_DTYPE:
                w = dequantize_fp8_blocks(w, getattr(self, f"{name}_scale_inv")[e], dtype)
            out.append(w)
        return out[0], out[1], out[2]

    def forward(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        expert_offset: int = 0,
        add_TD: torch.Tensor | None = None,
        add_ready: torch.cuda.Event | None = None,
    ) -> torch.Tensor:
        """Sum over each token's experts of weight * expert(x), plus add_TD if given (the shared
        experts' output: the fused MoE kernel adds it in its last launch, the fused combine of
        `_routed` in its one pass). Ids outside
        [expert_offset, expert_offset + E) belong to other expert-parallel ranks and are skipped.
        `add_ready`: an event after add_TD's producer on another stream; the current stream waits
        for it before add_TD is read (in the fused kernel: before its last launch only)."""
        if x_TD.is_cuda and x_TD.shape[0] > 0:
            # Without expert parallelism the offset is 0: no subtraction kernel per layer.
            local_TK = expert_ids_TK - expert_offset if expert_offset else expert_ids_TK
            y_TD = self._fused(x_TD, local_TK, weights_TK, add_TD, add_ready)
            if y_TD is not None:
                return y_TD
        if add_ready is not None:
            torch.cuda.current_stream(x_TD.device).wait_event(add_ready)
        return self._routed(x_TD, expert_ids_TK, weights_TK, expert_offset, add_TD)

    def _routed(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        expert_offset: int,
        add_TD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`forward` without the fused MoE kernel (training; CPU): sorted per-expert GEMMs, plus
        add_TD if given. With `mlp_fn`, every expert local and `use_fused_moe_combine`, the rows
        come back through `moe_combine` (one launch each way, add_TD added in its pass); they go
        out through `moe_permute` straight into the padded layout mlp_fn asks for
        (`_padded_layout`) if it asks for one, else through PyTorch's gather. Otherwise PyTorch's
        gather and index_add_ both ways."""
        K = expert_ids_TK.shape[1]
        local_ids = expert_ids_TK.flatten() - expert_offset
        # Ids of other ranks get key E so that they sort last and are never computed here.
        key = torch.where(
            (local_ids >= 0) & (local_ids < self.num_experts), local_ids, self.num_experts
        )
        order = torch.argsort(key, stable=True)
        # scatter_add, not bincount: bincount reads the largest id back to the host on CUDA
        counts = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=key.device)
        counts.scatter_add_(0, key, torch.ones_like(key))
        weights = (self.gate_proj, self.up_proj, self.down_proj)
        all_local = self.mlp_fn is not None and self._all_local(expert_offset)
        if (
            self.mlp_fn is not None  # (all_local says so too; mypy needs it here)
            and all_local
            and use_fused_moe_combine(x_TD, weights_TK, add_TD)
        ):
            out_dtype = (
                x_TD.dtype if add_TD is None else torch.promote_types(x_TD.dtype, add_TD.dtype)
            )
            counts_E = counts[: self.num_experts]
            layout = self._padded_layout(x_TD, counts_E, key.numel())
            if layout is None:
                # pos: each assignment's row among the sorted ones, the combine's index. The rows
                # go out through PyTorch's gather, not `moe_permute`: on the H200 at T 4096 x
                # top-6 x D 2048 gather + index_put took 0.22 ms forward and backward against
                # the kernel pair's 0.59 ms (kernels-nvidia-h200-moe-permute.json), where the
                # combine's pair wins 2.96x.
                pos_TK = moe_positions(order, K)
                y_AD = self.mlp_fn(x_TD[order // K], *weights, counts_E)
                return moe_combine(y_AD, weights_TK, pos_TK, add_TD, out_dtype=out_dtype)
            # posP: each assignment's row of the padded layout (P rows). The permute writes x_PD
            # whole (zero rows where no token goes) and the combine reads y_PD: mlp_fn copies no
            # rows into or out of its layout, forward or backward.
            assert layout.dst_A is not None  # (_padded_layout says so; mypy needs it here)
            posP_TK = moe_positions(order, K, layout.dst_A)
            x_PD = moe_permute(x_TD, posP_TK, rows=layout.P)
            y_PD = self.mlp_fn(x_PD, *weights, layout)
            return moe_combine(y_PD, weights_TK, posP_TK, add_TD, out_dtype=out_dtype)
        token_of = order // K
        # Summed in fp32 whatever x's dtype (the K contributions of a token arrive by atomic
        # adds in no fixed order: in bf16 the result would depend on it), cast back at the end.
        out_TD = torch.zeros_like(x_TD, dtype=torch.promote_types(x_TD.dtype, torch.float32))
        if self.mlp_fn is not None:
            rows: list[int] | torch.Tensor
            if all_local:
                # Every id is local: all T*K assignments are computed here, and the counts stay
                # on the device. Read back (.tolist()), they made the host wait for the GPU
                # twice per MoE layer and micro-batch (one-H200 profile: benchmarks/notes-train.md)
                rows, n = counts[: self.num_experts], key.numel()
            else:
                rows = counts[: self.num_experts].tolist()
                n = sum(rows)
            idx, tokens = order[:n], token_of[:n]
            y_AD = self.mlp_fn(x_TD[tokens], *weights, rows)
            out_TD.index_add_(
                0, tokens, y_AD.to(out_TD.dtype) * weights_TK.flatten()[idx, None].to(out_TD.dtype)
            )
            return _plus(out_TD.to(x_TD.dtype), add_TD)
        start = 0
        for e, n in enumerate(counts[: self.num_experts].tolist()):
            if n == 0:
                continue
            idx = order[start : start + n]
            tokens = token_of[start : start + n]
            start += n
            w1, w3, w2 = self.expert_weights(e, x_TD.dtype)
            x = x_TD[tokens]
            y = self.linear(F.silu(self.linear(x, w1)) * self.linear(x, w3), w2)
            out_TD.index_add_(
                0, tokens, y.to(out_TD.dtype) * weights_TK.flatten()[idx, None].to(out_TD.dtype)
            )
        return _plus(out_TD.to(x_TD.dtype), add_TD)

    def _padded_layout(
        self, x_TD: torch.Tensor, counts_E: torch.Tensor, A: int
    ) -> RowLayout | None:
        """The padded layout `mlp_fn` runs its grouped GEMMs on for these A rows (counts_E per
        expert, on the device), where it has a `layout` method and one applies; None: it takes
        the rows as they are sorted. Which layout (its alignment, whether any) is mlp_fn's
        business alone."""
        ask = getattr(self.mlp_fn, "layout", None)
        layout: RowLayout | None = None if ask is None else ask(x_TD, counts_E, A)
        return layout if layout is not None and layout.dst_A is not None else None

    def _all_local(self, expert_offset: int) -> bool:
        """Whether every routed expert of the model is held here (no expert parallelism)."""
        return expert_offset == 0 and self.num_experts == self.routed_experts

    def _fused(
        self,
        x_TD: torch.Tensor,
        local_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        add_TD: torch.Tensor | None = None,
        add_ready: torch.cuda.Event | None = None,
    ) -> torch.Tensor | None:
        """GPU inference: the fused Triton MoE over these experts (`fused_experts`); None where it
        does not apply, and with a swapped `linear` (FP8 training)."""
        if self.linear is not F.linear:
            return None
        w1, w3, w2 = self.gate_proj, self.up_proj, self.down_proj
        scales = None
        if w1.dtype == FP8_DTYPE:
            s1, s3, s2 = (
                getattr(self, f"{n}_scale_inv", None) for n in ("gate_proj", "up_proj", "down_proj")
            )
            if s1 is None or s3 is None or s2 is None:
                return None
            scales = (s1, s3, s2)
        return fused_experts(
            x_TD, (w1, w3, w2), scales, local_ids_TK, weights_TK, add_TD, add_ready=add_ready
        )


def fused_experts(
    x_TD: torch.Tensor,
    w: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    add_TD: torch.Tensor | None = None,
    early_shared: int = 0,
    add_ready: torch.cuda.Event | None = None,
) -> torch.Tensor | None:
    """The fused Triton MoE (moeray.kernels.moe) over stacked experts w = (gate [E, I, D], up
    [E, I, D], down [E, D, I]; FP8: e4m3 with `scales` their [E, ., .] scale_inv): one launch per
    GEMM over all of them and no host sync, so the engine can capture decode steps in CUDA graphs
    (the loop of `Experts._routed` reads per-expert counts back with .tolist()). The one place that
    says when it applies; None otherwise: gradients needed (it has no backward), mixed dtypes, or
    FP8 weights without whole 128x128 blocks. `early_shared` is moe_gemv's (its promise: the
    last S ids of each token are the last S experts, x not written by the launch just before);
    `add_ready` is fused_moe_gate_up's (an event the launch reading add_TD waits for)."""
    w1, w3, w2 = w
    half = (torch.bfloat16, torch.float16)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TD, weights_TK, w1, w3, w2)
    )
    if needs_grad:
        return None
    if w1.dtype == FP8_DTYPE:
        ok = (
            w3.dtype == FP8_DTYPE
            and w2.dtype == FP8_DTYPE
            and x_TD.dtype in half
            and scales is not None
            and w1.shape[1] % 128 == 0
            and w1.shape[2] % 128 == 0
        )
    else:
        ok = w1.dtype in half and w1.dtype == w3.dtype == w2.dtype == x_TD.dtype
        scales = None
    if add_TD is not None and (add_TD.dtype != x_TD.dtype or add_TD.shape != x_TD.shape):
        ok = False
    if not ok:
        return None
    s1 = s3 = s2 = None
    if scales is not None:
        s1, s3, s2 = (s.float() for s in scales)
    return fused_moe_gate_up(
        x_TD,
        w1,
        w3,
        w2,
        ids_TK,
        weights_TK,
        w1_scale=s1,
        w3_scale=s3,
        w2_scale=s2,
        add_TH=add_TD,
        early_shared=early_shared,
        add_ready=add_ready,
    )


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = Gate(config)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.group_mask_value = GROUP_MASK_OFFICIAL
        # Set for inference by model/shared_fuse.py: the shared experts run as extra experts of
        # the fused MoE kernels (their own GEMMs and SwiGLU not launched). See `_fused_shared`.
        self.register_module("fused_shared", None)
        # Set for inference by model/shared_stream.py: the shared MLP on a second CUDA stream beside
        # the routing and the routed experts where the fused one does not apply.
        self.register_module("shared_stream", None)
        # The last forward's routing (counts per expert, affinities): read by the training loop for
        # the bias update and the balance loss, and by serving for expert-load metrics.
        self.last_routing: Routing | None = None

    @property
    def e_score_correction_bias(self) -> torch.Tensor:
        return self.gate.e_score_correction_bias

    def route(
        self,
        x_TD: torch.Tensor,
        shared_experts: int = 0,
        logits_TE: torch.Tensor | None = None,
    ) -> Routing:
        """The gate's choice; with shared_experts=S the fused gate also appends the S shared
        experts' ids and weights (Routing.fused_ids_TJ). `logits_TE`: the router's logits of x
        where the caller computed them already (`Gate.norm_logits`)."""
        c = self.config
        kw: dict[str, Any] = dict(
            top_k=c.num_experts_per_tok,
            n_group=c.n_group,
            topk_group=c.topk_group,
            routed_scaling_factor=c.routed_scaling_factor,
            norm_topk_prob=c.norm_topk_prob,
            shared_experts=shared_experts,
        )
        return route(  # routing.gate.route, not this method
            self.gate.logits(x_TD) if logits_TE is None else logits_TE,
            self.gate.e_score_correction_bias,
            group_mask_value=self.group_mask_value,
            **kw,
        )

    def _fused_shared(self) -> SharedFusedFn | None:
        """model/shared_fuse.py's SharedFused where set, else None; read from the submodules so
        that the subclasses built without MoE.__init__ (expert-parallel, placed: never fused) that
        call this forward need no attribute of their own."""
        return self._modules.get("fused_shared")  # type: ignore[return-value]

    def _shared_stream(self) -> SharedStreamFn | None:
        """model/shared_stream.py's SharedStream where set, else None (read as `_fused_shared`)."""
        return self._modules.get("shared_stream")  # type: ignore[return-value]

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.forward_with_logits(x_BSD, None)

    def forward_with_logits(
        self, x_BSD: torch.Tensor, logits_TE: torch.Tensor | None
    ) -> torch.Tensor:
        """The layer's output for x; `logits_TE`: the router's logits of x where the decoder layer
        computed them with its norm (`Gate.norm_logits`), else None."""
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        fused = self._fused_shared()
        side = self._shared_stream()
        shared_TD = None
        if (
            side is not None
            and self.shared_experts is not None
            and not (fused is not None and fused.applies(x_TD))
            and side.applies(x_TD)
        ):
            # Launched first: its GEMMs take SMs while the router's short launches run.
            shared_TD = side.start(self.shared_experts, x_TD)
        r = self.route(x_TD, 0 if fused is None else self.config.n_shared_experts, logits_TE)
        self.last_routing = r
        if side is not None and shared_TD is not None:  # the shared MLP ran beside (above)
            if side.add_in_sum:
                ids_TK, w_TK = r.expert_ids_TK, r.weights_TK
                y_TD = self.experts(x_TD, ids_TK, w_TK, add_TD=shared_TD, add_ready=side.ready())
                return y_TD.view_as(x_BSD)
            routed_TD = self.experts(x_TD, r.expert_ids_TK, r.weights_TK)
            return side.join(routed_TD, shared_TD).view_as(x_BSD)
        y_TD = None if fused is None else fused(x_TD, r)
        if y_TD is None:  # not fused, or the fused MoE does not apply (shared_fuse.py)
            shared_TD = None if self.shared_experts is None else self.shared_experts(x_TD)
            y_TD = self.experts(x_TD, r.expert_ids_TK, r.weights_TK, add_TD=shared_TD)
        return y_TD.view_as(x_BSD)
