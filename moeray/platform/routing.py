"""Expert routing shared by training and serving: the DeepSeek-V3 gate.

Legend: T tokens, E routed experts, G expert groups (one per node in training), K experts per token.

The gate (official inference code, see REFERENCE.md "Gate"):
  1. s = sigmoid(logits) in fp32;
  2. selection uses s + b (b = e_score_correction_bias), the weights use s;
  3. group score = sum of the top-2 biased scores in each group; keep the top `topk_group` groups;
  4. top-K experts among the kept groups; weights = s[topK] / sum(s[topK]) * routed_scaling_factor.
Experts outside the kept groups are masked with -inf, as the official code does. transformers masks
with 0.0, which differs only when a biased score is negative: then a masked expert (0.0) can beat a
kept one (< 0) and a token would reach more than `topk_group` groups, breaking the node limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_MASK_OFFICIAL = float("-inf")
GROUP_MASK_TRANSFORMERS = 0.0


@dataclass(frozen=True)
class Routing:
    expert_ids_TK: torch.Tensor  # int64
    weights_TK: torch.Tensor  # fp32, already times routed_scaling_factor
    counts_E: torch.Tensor  # int64 tokens per expert in this batch
    scores_TE: torch.Tensor  # fp32 sigmoid affinities (before bias), for the balance loss


def route(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool = True,
    group_mask_value: float = GROUP_MASK_OFFICIAL,
) -> Routing:
    """Group-limited top-k routing of T tokens over E experts (see the module docstring)."""
    if logits_TE.dim() != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    if n_group < 1 or E % n_group:
        raise ValueError(f"n_group={n_group} must divide the number of experts {E}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    per_group = E // n_group
    if not 1 <= top_k <= topk_group * per_group:
        raise ValueError(
            f"top_k={top_k} must be in [1, topk_group*experts_per_group={topk_group * per_group}]"
        )
    scores_TE = logits_TE.float().sigmoid()
    biased_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    if n_group > 1:
        top2 = min(2, per_group)
        group_scores_TG = biased_TE.view(T, n_group, per_group).topk(top2, dim=-1).values.sum(-1)
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_scores_TG.topk(topk_group, dim=-1).indices, True)
        keep_TE = keep_TG.unsqueeze(-1).expand(T, n_group, per_group).reshape(T, E)
        biased_TE = biased_TE.masked_fill(~keep_TE, group_mask_value)
    expert_ids_TK = biased_TE.topk(top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, expert_ids_TK)
    if norm_topk_prob and top_k > 1:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    weights_TK = weights_TK * routed_scaling_factor
    counts_E = torch.bincount(expert_ids_TK.flatten(), minlength=E)
    return Routing(expert_ids_TK, weights_TK, counts_E, scores_TE)
