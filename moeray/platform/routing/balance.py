"""Expert load balance: statistics of a routed batch, the auxiliary-loss-free bias update and the
sequence-wise balance loss (docs/deepseek-v3.md, "Auxiliary-loss-free balancing").

Legend: T tokens, E routed experts, K experts per token, G expert groups (one per node in
training), L MoE layers, N nodes, B sequences, S tokens per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def maxvio(counts_E: torch.Tensor) -> torch.Tensor:
    """MaxVio = max load / mean load - 1 over the last dim ([E] -> scalar, [L, E] -> [L]).

    0 is perfect balance; with E experts the worst case is E - 1 (every token on one expert).
    An empty batch (mean 0) counts as balanced.
    """
    counts = counts_E.double()
    mean = counts.mean(-1)
    return torch.where(
        mean > 0, counts.amax(-1) / mean.clamp_min(1e-12) - 1.0, torch.zeros_like(mean)
    )


def check_group_to_node(
    group_to_node: tuple[int, ...] | list[int], n_group: int
) -> tuple[int, ...]:
    """Validate a group -> node map: one entry per group, nodes numbered 0..N-1 with none unused."""
    g2n = tuple(int(n) for n in group_to_node)
    if len(g2n) != n_group:
        raise ValueError(
            f"group_to_node has {len(g2n)} entries, need one per group (n_group={n_group})"
        )
    if min(g2n) < 0 or sorted(set(g2n)) != list(range(max(g2n) + 1)):
        raise ValueError(f"group_to_node={g2n} must use node ids 0..N-1, each at least once")
    return g2n


def expert_to_node(n_experts: int, group_to_node: tuple[int, ...] | list[int]) -> torch.Tensor:
    """[E] node id of each expert: experts are split into contiguous groups, groups map to nodes."""
    g2n = check_group_to_node(group_to_node, len(group_to_node))
    if n_experts % len(g2n):
        raise ValueError(f"n_experts={n_experts} is not divisible by the {len(g2n)} groups")
    return torch.tensor(g2n, dtype=torch.int64).repeat_interleave(n_experts // len(g2n))


@dataclass(frozen=True)
class BalanceStats:
    tokens_per_expert_E: torch.Tensor  # int64
    maxvio: float
    tokens_per_node_N: torch.Tensor  # int64: tokens with at least one expert on the node
    nodes_per_token_max: int
    nodes_per_token_mean: float


def balance_stats(
    expert_ids_TK: torch.Tensor, n_experts: int, group_to_node: tuple[int, ...] | list[int]
) -> BalanceStats:
    """Per-layer balance statistics of one routed batch.

    A token sent to two experts on the same node crosses the network once (the dispatch
    deduplicates per node, as DeepEP does), so tokens per node counts tokens, not (token, expert)
    pairs; nodes per token is what node-limited routing bounds by `topk_group`.
    """
    if expert_ids_TK.dim() != 2:
        raise ValueError(f"expert_ids must be [tokens, k], got shape {tuple(expert_ids_TK.shape)}")
    node_E = expert_to_node(n_experts, group_to_node).to(expert_ids_TK.device)
    n_nodes = int(node_E.max()) + 1
    T = expert_ids_TK.shape[0]
    counts_E = torch.bincount(expert_ids_TK.flatten(), minlength=n_experts)
    touched_TN = torch.zeros(T, n_nodes, dtype=torch.bool, device=expert_ids_TK.device)
    touched_TN.scatter_(1, node_E[expert_ids_TK], True)
    nodes_T = touched_TN.sum(-1)
    return BalanceStats(
        tokens_per_expert_E=counts_E,
        maxvio=float(maxvio(counts_E)),
        tokens_per_node_N=touched_TN.sum(0),
        nodes_per_token_max=int(nodes_T.max()) if T else 0,
        nodes_per_token_mean=float(nodes_T.float().mean()) if T else 0.0,
    )


def bias_update(bias_LE: torch.Tensor, counts_LE: torch.Tensor, gamma: float) -> torch.Tensor:
    """One sign step per layer: b_i -= gamma if expert i is over the layer's mean load, += if under.

    `counts_LE` are tokens per expert over the whole global batch (summed over every rank). An
    expert exactly at the mean keeps its bias. Not a gradient: the step size is gamma whatever
    the size of the imbalance, so the bias moves at most gamma per step.
    """
    if bias_LE.shape != counts_LE.shape:
        raise ValueError(
            f"bias shape {tuple(bias_LE.shape)} != counts shape {tuple(counts_LE.shape)}"
        )
    if gamma < 0:
        raise ValueError(f"gamma={gamma} must be >= 0")
    counts = counts_LE.to(torch.float64)
    sign = torch.sign(counts - counts.mean(-1, keepdim=True))
    return (bias_LE.double() - gamma * sign).to(bias_LE.dtype)


@dataclass(frozen=True)
class GammaSchedule:
    """Bias update speed: `gamma`, then from each `changes` step on its value; from step
    `zero_at_step` on, 0 (V3: 0.001, then 0 for the last 500B of 14.8T tokens, i.e.
    changes=((step of 14.3T, 0.0),)). `zero_at_step=None` and no changes: never stops."""

    gamma: float = 0.001
    zero_at_step: int | None = None
    changes: tuple[tuple[int, float], ...] = ()  # (first step, gamma), steps increasing

    def __post_init__(self) -> None:
        if self.gamma < 0:
            raise ValueError(f"gamma={self.gamma} must be >= 0")
        if self.zero_at_step is not None and self.zero_at_step < 0:
            raise ValueError(f"zero_at_step={self.zero_at_step} must be >= 0 or None")
        changes = tuple((int(s), float(g)) for s, g in self.changes)
        object.__setattr__(self, "changes", changes)
        starts = [s for s, _ in changes]
        if starts != sorted(set(starts)) or any(s < 0 or g < 0 for s, g in changes):
            raise ValueError(
                f"gamma changes {changes} must be (step >= 0, gamma >= 0) pairs with "
                "increasing steps"
            )

    def __call__(self, step: int) -> float:
        if self.zero_at_step is not None and step >= self.zero_at_step:
            return 0.0
        gamma = self.gamma
        for start, g in self.changes:
            if step >= start:
                gamma = g
        return gamma


def sequence_balance_loss(
    scores_BSE: torch.Tensor, expert_ids_BSK: torch.Tensor, alpha: float
) -> torch.Tensor:
    """alpha * sum_i f_i * P_i per sequence, averaged over the B sequences.

    f_i = E / (K * S) * (tokens of the sequence routed to i)  (1 for every expert when balanced),
    P_i = mean over the sequence's tokens of s_i / sum_j s_j.
    Gradient flows through the scores only (f is a count). With B=1 and all tokens as one
    "sequence" this is the conventional batch-wise expert-balance loss (DeepSeekMoE, Switch).
    """
    if scores_BSE.dim() != 3 or expert_ids_BSK.dim() != 3:
        raise ValueError(
            f"need scores [B, S, E] and expert ids [B, S, K], got {tuple(scores_BSE.shape)} "
            f"and {tuple(expert_ids_BSK.shape)}"
        )
    B, S, E = scores_BSE.shape
    K = expert_ids_BSK.shape[-1]
    if expert_ids_BSK.shape[:2] != (B, S):
        raise ValueError(
            f"expert ids {tuple(expert_ids_BSK.shape)} do not match scores {(B, S, E)}"
        )
    counts_BE = torch.zeros(B, E, dtype=scores_BSE.dtype, device=scores_BSE.device)
    ones = torch.ones(B, S * K, dtype=scores_BSE.dtype, device=scores_BSE.device)
    counts_BE.scatter_add_(1, expert_ids_BSK.reshape(B, S * K), ones)
    f_BE = counts_BE * (E / (K * S))
    p_BE = (scores_BSE / scores_BSE.sum(-1, keepdim=True)).mean(1)
    return alpha * (f_BE * p_BE).sum(-1).mean()
