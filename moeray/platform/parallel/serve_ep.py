"""Expert parallelism for serving: one plain model per rank, made expert-parallel from outside,
and the lockstep that keeps the ranks' collectives lined up.

Each rank of an EP gang runs its own engine (its own requests, scheduler and paged latent cache:
data-parallel attention); only the MoE layers talk to the other ranks, dispatching tokens to the
ranks that hold their experts and combining them back with all-to-all (`parallel/expert.py`).
Every MoE all-to-all is a collective, so every rank must run the same number of model forwards in
the same order, whatever its own batch holds. `Lockstep` does that in rounds: before each real
forward a rank joins a small max-all-reduce of [forwarding, has work, -ready] = [1, 1, -ready]; a
rank that has run all forwards of its step joins the same all-reduce with [0, has work, -ready]
and, while the first entry is non-zero (a peer is about to forward), runs an empty forward (a
batch of zero tokens, which still takes part in every MoE all-to-all). A round whose first entry
is zero ends the step on every rank at once; the second entry then says whether any rank still
has requests, and the third (negated back) is the lowest placement version staged on every rank,
which the ranks switch to together before the next step (`parallel/serve_placement.py`).

Costs: one 3-element all-reduce per forward plus one per step (decode: two per step).

Decode CUDA graphs are off under EP for now: the dispatch reads the per-rank counts back to the
host (`dispatch` sizes its receive buffers from them) and the lockstep round is a host decision.
Capturing decode steps needs fixed-size dispatch buffers instead: every rank sends
max_batch * K rows to each peer (padding marked by an invalid expert id), so the all-to-all has
static splits, and the round decision moved before the replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moeray.platform.model.quant import set_fp8_expert_weight
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.expert import (
    ExpertParallelMoE,
    all_to_all,
    combine,
    dispatch,
    enable_expert_parallel,
)
from moeray.platform.placement import to_physical


@dataclass(frozen=True)
class ExpertStack:
    """One projection of n experts stacked: weight [n, N, K] in the activation dtype, or e4m3 with
    its 128x128 block scales scale_inv [n, ceil(N/128), ceil(K/128)] (FP8-stored experts, as the
    official checkpoint keeps them: the scales move with the weights)."""

    weight: torch.Tensor
    scale_inv: torch.Tensor | None = None


ExpertStacks = tuple[ExpertStack, ExpertStack, ExpertStack]  # gate_proj, up_proj, down_proj


class ServingEPMoE(ExpertParallelMoE):
    """The serving MoE layer: the routing weight of each (token, expert) row travels with it and
    the expert applies it, as the single-device fused MoE does (each row weighted and rounded to
    the activation dtype, then a token's K rows summed in fp32), so a bf16 EP forward rounds
    where the single-device one does. Greedy bf16 decodes of small() (32 requests x 64 tokens,
    random weights, H200, ep=1) equal the plain engine's in 31 of 32 requests this way, against 5
    of 32 when weighting after the exchange (the training layer, whose routing-weight gradient
    flows through combine).

    `load_E` sums the tokens this rank routed to each (global) expert since it was built: the
    per-expert load a placement policy reads (platform/placement.py).

    Redundant experts: the layer runs over P physical slots, S = P / ep_size per rank (slot p on
    rank p // S), each holding one logical expert (`phy2log_P`). Routing stays logical; then
    `placement.to_physical` spreads each expert's tokens over its replicas by token order, and the
    dispatch sends rows to the slots' ranks. Replicas hold identical weights, so the output does
    not depend on which replica computed a row. Built with the identity map (P = E, expert e in
    slot e: the contiguous shard the rank loader reads); `set_placement` swaps in another
    (`parallel/serve_placement.py`)."""

    load_E: torch.Tensor

    def __init__(self, moe, group, ep_rank: int, ep_size: int) -> None:
        super().__init__(moe, group, ep_rank, ep_size)
        E = self.num_global_experts
        device = self.gate.weight.device
        self.register_buffer("load_E", torch.zeros(E, dtype=torch.int64, device=device), False)
        self.num_slots = E
        self.phy2log_P = torch.arange(E)
        # None while the map is the identity: routing ids are slot ids, to_physical is skipped.
        self.log2phy_ER: torch.Tensor | None = None
        self.logcnt_E: torch.Tensor | None = None
        self.rows_computed = 0  # (token, expert) rows this rank's experts ran: its measured load

    def held_experts(self) -> list[int]:
        """The logical expert of each slot this rank holds, in slot order."""
        S = self.num_slots // self.ep_size
        return self.phy2log_P[self.ep_rank * S : (self.ep_rank + 1) * S].tolist()

    def set_placement(
        self,
        phy2log_P: torch.Tensor,
        log2phy_ER: torch.Tensor,
        logcnt_E: torch.Tensor,
        weights: ExpertStacks,
    ) -> None:
        """Swap in a new slot map and this rank's stacked (gate, up, down) slot weights (e4m3
        ones with their block scales). Only between forwards: every rank of the gang must switch
        before the same forward."""
        P = phy2log_P.numel()
        n = weights[0].weight.shape[0]
        if P % self.ep_size or n != P // self.ep_size:
            raise ValueError(f"{P} slots over ep={self.ep_size} ranks, but {n} slot weights")
        device = self.gate.weight.device
        for name, stack in zip(("gate_proj", "up_proj", "down_proj"), weights, strict=True):
            if stack.scale_inv is not None:
                set_fp8_expert_weight(self.experts, name, stack.weight, stack.scale_inv)
            else:
                setattr(self.experts, name, nn.Parameter(stack.weight, requires_grad=False))
        self.experts.num_experts = P // self.ep_size
        self.num_slots = P
        self.phy2log_P = phy2log_P.cpu()
        identity = P == self.num_global_experts and bool((self.phy2log_P == torch.arange(P)).all())
        self.log2phy_ER = None if identity else log2phy_ER.to(device)
        self.logcnt_E = None if identity else logcnt_E.to(device)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        r = self.route(x_TD)
        self.last_routing = r
        self.load_E += r.counts_E
        slots_TK = r.expert_ids_TK
        if self.log2phy_ER is not None and self.logcnt_E is not None:
            slots_TK = to_physical(slots_TK, self.log2phy_ER, self.logcnt_E)
        x_RD, local_R, plan = dispatch(x_TD, slots_TK, self.num_slots, self.group)
        self.rows_computed += sum(plan.recv_counts)
        w_A = r.weights_TK.reshape(-1)[plan.order_A].float().contiguous()
        w_R = all_to_all(w_A, plan.recv_counts, plan.send_counts, self.group)
        y_RD = self.experts(x_RD, local_R[:, None], w_R[:, None]) if local_R.numel() else x_RD
        y_TD = combine(y_RD, torch.ones_like(r.weights_TK), plan, self.group)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view_as(x_BSD)


@dataclass(frozen=True)
class Round:
    forwarding: int  # 1 if any rank is about to run a real forward
    busy: int  # 1 if any rank has unfinished requests
    ready: int  # the newest placement version every rank has staged


def expert_loads(model: nn.Module) -> list[list[int]]:
    """Tokens this rank routed to each expert, per MoE layer (ServingEPMoE.load_E), in layer
    order."""
    return [m.load_E.tolist() for m in model.modules() if isinstance(m, ServingEPMoE)]


def rows_computed(model: nn.Module) -> list[int]:
    """(token, expert) rows this rank's experts computed since it was built, per MoE layer."""
    return [m.rows_computed for m in model.modules() if isinstance(m, ServingEPMoE)]


class Lockstep:
    """Keeps the model forwards of a gang's ranks in step (module docstring). Installed as a
    forward pre-hook on the model, so the runner that calls the model needs no change."""

    def __init__(self, model: nn.Module, group=None) -> None:
        self.model = model
        self.group = group
        self.device = next(model.parameters()).device
        self.rounds = 0
        self.padding_forwards = 0
        self._padding = False
        self._busy = True  # what this rank reports with its next real forward
        self.ready_version = 0  # this rank's newest staged placement (set by the engine)
        self.last_round = Round(0, 0, 0)  # the round that ended the last step
        self._hook = model.register_forward_pre_hook(self._before_forward)

    def _round(self, forwarding: bool, busy: bool) -> Round:
        flags_3 = torch.tensor(
            [int(forwarding), int(busy), -self.ready_version], dtype=torch.int64, device=self.device
        )
        # MAX: "any rank" for the flags, and max(-v) = -min(v) for the versions.
        dist.all_reduce(flags_3, op=dist.ReduceOp.MAX, group=self.group)
        self.rounds += 1
        f, b, v = flags_3.tolist()
        return Round(int(f), int(b), -int(v))

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if not self._padding:
            self._round(True, True)

    def empty_forward(self) -> None:
        """A forward of zero tokens: it runs every MoE layer's all-to-alls with nothing to send."""
        self._padding = True
        try:
            ids_BS = torch.empty(0, 1, dtype=torch.long, device=self.device)
            self.model(ids_BS, return_mtp=False)
        finally:
            self._padding = False
        self.padding_forwards += 1

    def finish_step(self, busy: bool) -> bool:
        """After this rank's own forwards of a step: run empty forwards while any peer still runs
        real ones. Returns whether any rank has unfinished requests."""
        while True:
            r = self._round(False, busy)
            if r.forwarding == 0:
                self.last_round = r
                return r.busy > 0
            self.empty_forward()

    def remove(self) -> None:
        self._hook.remove()


def parallelize_for_serving(model: Transformer, group=None) -> Lockstep:
    """Make a plain single-device model one rank of an expert-parallel serving gang over `group`
    (the default group when None), in order: (1) every MoE layer (the MTP modules' too) keeps only
    this rank's slice of the routed experts (already-sliced experts from a shard-wise load are
    kept) and dispatches/combines with all-to-all; (2) the lockstep pre-hook. Everything else
    (embedding, attention, dense layers, shared experts, head) stays replicated."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    E = model.config.n_routed_experts
    if E % size:
        raise ValueError(f"{E} routed experts do not split evenly over ep={size} ranks")
    enable_expert_parallel(model, group, rank, size, ServingEPMoE)
    return Lockstep(model, group)
