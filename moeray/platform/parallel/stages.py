"""Pipeline stages: the model's decoder layers split over the stages (`split_layers`), one stage
as a module (`PipelineStage`), and its switch to deferred weight gradients
(`enable_weight_grad_split`).

Legend: b sequences of a micro-batch, S positions, D model width, E routed experts, L MoE layers
(main layers then MTP blocks: the RouterActor's order).

Stage 0 holds the embedding, the last stage the final norm, the head and the MTP modules; decoder
layers are spread so that every stage runs about the same number of blocks (an MTP block counts as
one). A stage keeps the full model's module names, so its state_dict keys are the checkpoint's and
the stages of all ranks merge back into one model.

MTP depth k reads the main model's embedding of token s+k and the shared head. The head lives on
the last stage with the MTP modules, so only the embedding is needed twice: the last stage holds a
copy of `model.embed_tokens` built from the same initial weights (`pipeline.py`, "Shared weights",
keeps the copies equal).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from moeray.platform.fp8 import FP8TrainLinear, WeightCache, fp8_linear
from moeray.platform.loss import token_cross_entropy
from moeray.platform.model.moe import Experts, MoE
from moeray.platform.model.mtp import MTPModule
from moeray.platform.model.norm import RMSNorm
from moeray.platform.model.rope import RotaryEmbedding
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.experts_mlp import ExpertsMLP, experts_mlp
from moeray.platform.parallel.weight_grad import SplitLinear, WeightGradStore, split_linear
from moeray.platform.routing.balance import sequence_balance_loss


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
    return [name for name, m in model.named_modules() if isinstance(m, MoE)]


class _StageBackbone(nn.Module):
    """The part of the model's `Backbone` that one stage holds, under the same names."""

    rotary_emb: RotaryEmbedding
    embed_tokens: nn.Embedding  # stage 0, and the last stage when the model has MTP modules
    layers: nn.ModuleDict  # this stage's decoder layers, keyed by their index in the model
    norm: RMSNorm  # last stage


class PipelineStage(nn.Module):
    """Stage `index` of `layout`, holding the full model's modules under the full model's names.

    The modules are taken (not copied) from `full`: stages built from one model on one rank share
    what they have in common (the embedding of stage 0 and of the last stage).
    """

    # last stage only
    lm_head: nn.Linear
    mtp: nn.ModuleList  # of MTPModule

    def __init__(self, full: Transformer, layout: StageLayout, index: int) -> None:
        super().__init__()
        if not 0 <= index < layout.pp:
            raise ValueError(f"stage {index} outside pp={layout.pp}")
        self.config = full.config
        self.index = index
        self.first, self.last = index == 0, index == layout.pp - 1
        self.model = _StageBackbone()
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
        inputs_bS, targets_bS = tokens_bS1[:, :-1], tokens_bS1[:, 1:]
        b, S = inputs_bS.shape
        positions_bS = torch.arange(S, device=inputs_bS.device).expand(b, S)
        cos, sin = self.model.rotary_emb(positions_bS)
        if self.first:
            x = self.model.embed_tokens(inputs_bS)
        elif x_bSD is None:
            raise ValueError(f"stage {self.index} needs the previous stage's activation x_bSD")
        else:
            x = x_bSD
        for layer in self.model.layers.values():
            x = layer(x, cos, sin)
        stats: dict[str, torch.Tensor] = {}
        if self.last:
            hidden_bSD = self.model.norm(x)
            logits = self.lm_head(hidden_bSD)
            # the logits are read by nothing after the loss (lm_head's backward saves its input
            # and weight): the fused loss may write their gradient over them (platform/loss.py)
            main = token_cross_entropy(logits, targets_bS)
            objective = main
            mtp_ces = []
            h_bSD = hidden_bSD
            for k, module in enumerate(cast(Iterable[MTPModule], self.mtp), start=1):
                if S - k < 1:
                    break
                pos = positions_bS[:, : S - k]
                cos_k, sin_k = self.model.rotary_emb(pos)
                h_bSD = module(
                    h_bSD[:, :-1], self.model.embed_tokens(inputs_bS[:, k:]), cos_k, sin_k
                )
                logits_k = self.lm_head(module.shared_head.norm(h_bSD))
                mtp_ces.append(token_cross_entropy(logits_k, targets_bS[:, k:]))
            if mtp_ces:
                objective = (
                    objective + loss_cfg.mtp_lambda / len(mtp_ces) * torch.stack(mtp_ces).sum()
                )
                stats["mtp"] = torch.stack(mtp_ces).mean().detach()
            stats["main"] = main.detach()
        balance = x.new_zeros((), dtype=torch.float32)
        loads = []
        for name, row in self.moe_rows.items():
            r = cast(MoE, self.get_submodule(name)).last_routing
            if r is None:
                raise RuntimeError(f"MoE layer {name} has no routing: it did not run a forward")
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


def enable_weight_grad_split(
    stage: nn.Module, store: WeightGradStore, *, grouped_fp8: bool = False
) -> int:
    """Route every linear layer and routed-expert GEMM of `stage` through `split_linear` with
    `store` (FP8 ones stay FP8). `grouped_fp8`: FP8 routed experts through the grouped FP8 GEMM
    (`experts_fp8.GroupedFP8`) instead of one GEMM per expert. Returns how many layers were
    switched."""
    n = 0
    for module in list(stage.modules()):
        if isinstance(module, Experts):
            if isinstance(module.linear, functools.partial):
                raise ValueError("enable_weight_grad_split: experts already switched")
            fp8 = module.linear is fp8_linear
            module.linear = functools.partial(split_linear, store=store, fp8=fp8)
            module.mlp_fn = ExpertsMLP(
                experts_mlp,
                store=store,
                fp8=fp8,
                cache=WeightCache() if fp8 else None,
                grouped_fp8=fp8 and grouped_fp8,
            )
            n += 1
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, (nn.Linear, FP8TrainLinear)):
                setattr(
                    module,
                    child_name,
                    SplitLinear(
                        child.weight, child.bias, store, fp8=isinstance(child, FP8TrainLinear)
                    ),
                )
                n += 1
    return n
