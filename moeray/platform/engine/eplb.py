"""Redundant experts in serving: MoE layers over physical expert slots (EPLB placement).

Legend: T tokens, K experts per token, E logical experts, P physical slots (E + redundant), D model
width, I expert width.

`placement.place_experts` turns measured loads into a `Placement`: which logical expert each
physical slot holds, and on which GPU each slot lives. `PlacedMoE` is the serving MoE layer that
honours it: routing stays logical (the gate, the bias and the node limit are unchanged), then
`placement.to_physical` spreads each expert's tokens evenly over its replicas, and the experts run
per physical slot. Replicas hold identical weights, so outputs equal the unreplicated layer's; what
changes is the load per slot, hence per GPU once slots are sharded over expert-parallel ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.platform.model.moe import Experts, MoE
from moeray.platform.placement import Placement, to_physical


class PlacedMoE(MoE):
    log2phy_ER: torch.Tensor  # buffers, registered in __init__
    logcnt_E: torch.Tensor

    def __init__(self, moe: MoE, placement: Placement, layer: int) -> None:
        nn.Module.__init__(self)
        self.config = moe.config
        self.gate = moe.gate
        self.shared_experts = moe.shared_experts
        self.group_mask_value = moe.group_mask_value
        self.last_routing = None
        E = moe.experts.num_experts
        phy2log_P = placement.phy2log_LP[layer]
        if int(phy2log_P.max()) >= E or placement.logcnt_LE.shape[1] != E:
            raise ValueError(
                f"placement layer {layer} is for {placement.logcnt_LE.shape[1]} experts; "
                f"this layer has {E}"
            )
        experts = Experts.__new__(Experts)
        nn.Module.__init__(experts)
        # Every physical slot is held here and routing hands out slot ids: the slots are this
        # module's whole set (Experts._all_local), as the model's experts are an unplaced one's
        experts.num_experts = experts.routed_experts = phy2log_P.numel()
        experts.linear, experts.mlp_fn = moe.experts.linear, moe.experts.mlp_fn
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(moe.experts, name).detach()
            experts.register_parameter(
                name, nn.Parameter(w[phy2log_P.to(w.device)].clone(), requires_grad=False)
            )
        self.experts = experts
        self.register_buffer("log2phy_ER", placement.log2phy_LER[layer].clone(), persistent=False)
        self.register_buffer("logcnt_E", placement.logcnt_LE[layer].clone(), persistent=False)
        self.slot_counts_P: torch.Tensor | None = None  # tokens per physical slot, last forward

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        r = self.route(x_TD)
        self.last_routing = r  # logical loads: what the RouterActor's moving average observes
        phys_TK = to_physical(r.expert_ids_TK, self.log2phy_ER, self.logcnt_E)
        self.slot_counts_P = torch.bincount(phys_TK.flatten(), minlength=self.experts.num_experts)
        y_TD = self.experts(x_TD, phys_TK, r.weights_TK)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view_as(x_BSD)


def apply_placement(model: nn.Module, placement: Placement) -> list[PlacedMoE]:
    """Swap every MoE layer of `model` (in `Transformer.moe_layers()` order, which is the order the
    router numbers them) for its placed version; returns the new layers."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if len(layers) != placement.phy2log_LP.shape[0]:
        raise ValueError(
            f"placement has {placement.phy2log_LP.shape[0]} layers; the model has "
            f"{len(layers)} MoE layers"
        )
    placed = []
    for layer, (name, moe) in enumerate(layers):
        base = moe
        if isinstance(moe, PlacedMoE):
            raise ValueError(f"{name} already has a placement; build a fresh model to re-place")
        new = PlacedMoE(base, placement, layer)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        placed.append(new)
    return placed


def gpu_loads(slot_counts_P: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Tokens per GPU from tokens per physical slot."""
    return torch.zeros(placement.num_gpus, dtype=torch.int64).index_add_(
        0, placement.gpu_of_slot(), slot_counts_P.cpu().to(torch.int64)
    )
