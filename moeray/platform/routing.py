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

from dataclasses import asdict, dataclass

import torch

from moeray.platform.placement import Placement, identity_placement, place_experts

GROUP_MASK_OFFICIAL = float("-inf")
GROUP_MASK_TRANSFORMERS = 0.0


@dataclass(frozen=True)
class Routing:
    expert_ids_TK: torch.Tensor  # int64
    weights_TK: torch.Tensor  # fp32, already times routed_scaling_factor
    counts_E: torch.Tensor  # int64 tokens per expert in this batch
    scores_TE: torch.Tensor  # fp32 sigmoid affinities (before bias), for the balance loss


def check_group_sizes(num_experts: int, top_k: int, n_group: int, topk_group: int) -> int:
    """ValueError unless top_k experts can be chosen from topk_group of n_group equal groups;
    returns the experts per group. Shared by `route_torch` and the fused kernel's wrapper."""
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group={n_group} must divide the number of experts {num_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    per_group = num_experts // n_group
    if not 1 <= top_k <= topk_group * per_group:
        raise ValueError(
            f"top_k={top_k} must be in [1, topk_group*experts_per_group={topk_group * per_group}]"
        )
    return per_group


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
    """Group-limited top-k routing of T tokens over E experts (see the module docstring).

    CUDA inference with the official mask and at most FUSED_MAX_TOKENS rows goes to the fused
    Triton gate (moeray.kernels.router, one launch instead of ~15; same results, ties aside);
    training (gradients to the gate) and everything else run the PyTorch code, `route_torch`.
    """
    kw = dict(
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
        norm_topk_prob=norm_topk_prob,
    )
    needs_grad = torch.is_grad_enabled() and (
        logits_TE.requires_grad or (bias_E is not None and bias_E.requires_grad)
    )
    if logits_TE.is_cuda and group_mask_value == GROUP_MASK_OFFICIAL and not needs_grad:
        from moeray.kernels.router import fused_route_applies, route_fused

        if fused_route_applies(logits_TE, bias_E):
            return route_fused(logits_TE, bias_E, **kw)
    return route_torch(logits_TE, bias_E, group_mask_value=group_mask_value, **kw)


def route_torch(
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
    """`route` in PyTorch ops: the reference for the fused kernel, and the differentiable path."""
    if logits_TE.dim() != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    per_group = check_group_sizes(E, top_k, n_group, topk_group)
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
    # scatter_add, not bincount: bincount syncs with the host on CUDA, which breaks graph capture.
    flat = expert_ids_TK.flatten()
    counts_E = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    return Routing(expert_ids_TK, weights_TK, counts_E, scores_TE)


# ---------------------------------------------------------------------------------------------
# Balance statistics. Legend (continued): L MoE layers, N nodes, B sequences, S tokens/sequence.
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Auxiliary-loss-free bias update and the sequence-wise balance loss (REFERENCE.md).
# ---------------------------------------------------------------------------------------------


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
    """Bias update speed: `gamma` until step `zero_at_step`, then 0 (V3: 0.001, then 0 for the
    last 500B of 14.8T tokens). `zero_at_step=None` never stops."""

    gamma: float = 0.001
    zero_at_step: int | None = None

    def __post_init__(self) -> None:
        if self.gamma < 0:
            raise ValueError(f"gamma={self.gamma} must be >= 0")
        if self.zero_at_step is not None and self.zero_at_step < 0:
            raise ValueError(f"zero_at_step={self.zero_at_step} must be >= 0 or None")

    def __call__(self, step: int) -> float:
        if self.zero_at_step is not None and step >= self.zero_at_step:
            return 0.0
        return self.gamma


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


# ---------------------------------------------------------------------------------------------
# Router state: everything the RouterActor holds, as a plain class (tests build it without Ray).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterConfig:
    """What the router needs to know about the model and the cluster.

    `layer_ids` are the model's MoE layer indices (metric labels; loads come in this order).
    `num_reporters` is the number of ranks (data- x expert-parallel) whose loads make one global
    batch: a step's bias update waits until all of them have reported.
    `group_to_node[g]` is the training node that holds expert group g (default: one per node).
    Serving placement: `num_physical` slots (experts plus redundant replicas) over `serve_gpus`
    GPUs on `serve_nodes` nodes, recomputed from a moving average of loads (`load_ema` weight of
    the old average per update).
    """

    layer_ids: tuple[int, ...]
    n_experts: int
    n_group: int
    topk_group: int
    num_reporters: int = 1
    gamma: float = 0.001
    gamma_zero_at_step: int | None = None
    group_to_node: tuple[int, ...] | None = None
    num_physical: int | None = None
    serve_gpus: int = 1
    serve_nodes: int = 1
    load_ema: float = 0.9

    def __post_init__(self) -> None:
        if not self.layer_ids or len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(
                f"layer_ids={self.layer_ids} must be a non-empty tuple of distinct ids"
            )
        if self.n_group < 1 or self.n_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide n_experts={self.n_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.num_reporters < 1:
            raise ValueError(f"num_reporters={self.num_reporters} must be >= 1")
        GammaSchedule(self.gamma, self.gamma_zero_at_step)  # validates
        if self.group_to_node is not None:
            check_group_to_node(self.group_to_node, self.n_group)
        if not 0.0 <= self.load_ema < 1.0:
            raise ValueError(f"load_ema={self.load_ema} must be in [0, 1)")
        physical = self.physical_slots
        if (
            physical < self.n_experts
            or physical % self.serve_gpus
            or self.serve_gpus % self.serve_nodes
        ):
            raise ValueError(
                f"num_physical={physical} must be >= n_experts={self.n_experts} and a multiple of "
                f"serve_gpus={self.serve_gpus}, itself a multiple of serve_nodes={self.serve_nodes}"
            )

    @property
    def nodes(self) -> tuple[int, ...]:
        return self.group_to_node if self.group_to_node is not None else tuple(range(self.n_group))

    @property
    def physical_slots(self) -> int:
        return self.n_experts if self.num_physical is None else self.num_physical

    @classmethod
    def from_model(cls, model_config, **overrides) -> RouterConfig:
        """From a ModelConfig with HF field names (n_routed_experts, n_group, topk_group,
        num_hidden_layers, first_k_dense_replace, num_nextn_predict_layers). The MTP blocks are
        MoE layers too (ids from num_hidden_layers on, as in the HF checkpoint), so they get biases."""
        first = int(getattr(model_config, "first_k_dense_replace", 0))
        last = int(model_config.num_hidden_layers) + int(
            getattr(model_config, "num_nextn_predict_layers", 0)
        )
        layers = tuple(range(first, last))
        kw = dict(
            layer_ids=layers,
            n_experts=int(model_config.n_routed_experts),
            n_group=int(model_config.n_group),
            topk_group=int(model_config.topk_group),
        )
        kw.update(overrides)
        return cls(**kw)


class RouterState:
    """Per-layer biases, gamma schedule, group -> node map, load history and serving placement.

    Training: every rank calls `report(step, rank, loads_LE)` with its tokens per expert; once all
    `num_reporters` ranks have reported step s, their sum is the global batch's load, and the
    biases take one sign step with gamma(s). A report repeated for a (step, rank) already counted,
    or for a step already applied, changes nothing (so Ray can retry calls safely).
    Serving: `observe(loads_LE)` feeds the moving average only; `rebalance()` recomputes placement.
    """

    def __init__(self, config: RouterConfig):
        self.config = config
        L, E = len(config.layer_ids), config.n_experts
        self.schedule = GammaSchedule(config.gamma, config.gamma_zero_at_step)
        self.bias_LE = torch.zeros(L, E, dtype=torch.float32)
        self.step = -1  # last applied step
        self.pending: dict[int, dict] = {}  # step -> {"sum_LE": int64 tensor, "ranks": set[int]}
        self.last_loads_LE = torch.zeros(L, E, dtype=torch.int64)
        self.load_ema_LE: torch.Tensor | None = None
        self.placement = identity_placement(L, E, config.serve_gpus, config.serve_nodes)
        if config.physical_slots != E:
            # Before any load is seen, spread replicas as if every expert were equally loaded.
            self.placement = self._place(torch.ones(L, E, dtype=torch.float64))

    # -- training --------------------------------------------------------------------------
    def _check_loads(self, loads_LE) -> torch.Tensor:
        loads = torch.as_tensor(loads_LE).detach().cpu()
        shape = (len(self.config.layer_ids), self.config.n_experts)
        if tuple(loads.shape) != shape:
            raise ValueError(f"loads shape {tuple(loads.shape)} != [layers, experts] {shape}")
        if loads.is_floating_point():
            if not bool((loads == loads.round()).all()):
                raise ValueError("loads must be whole token counts")
        loads = loads.to(torch.int64)
        if bool((loads < 0).any()):
            raise ValueError("loads must be >= 0")
        return loads

    def report(self, step: int, rank: int, loads_LE) -> dict:
        """Count one rank's loads for `step`; apply the update when every rank is in.

        Returns {"counted": this report was new, "applied": this report completed the step,
        "step": last applied step}.
        """
        if not 0 <= rank < self.config.num_reporters:
            raise ValueError(
                f"rank={rank} must be in [0, num_reporters={self.config.num_reporters})"
            )
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        loads = self._check_loads(loads_LE)
        if step <= self.step:
            return {"counted": False, "applied": False, "step": self.step}
        entry = self.pending.setdefault(step, {"sum_LE": torch.zeros_like(loads), "ranks": set()})
        if rank in entry["ranks"]:
            return {"counted": False, "applied": False, "step": self.step}
        entry["sum_LE"] += loads
        entry["ranks"].add(rank)
        if len(entry["ranks"]) < self.config.num_reporters:
            return {"counted": True, "applied": False, "step": self.step}
        self._apply(step, entry["sum_LE"])
        return {"counted": True, "applied": True, "step": self.step}

    def _apply(self, step: int, global_loads_LE: torch.Tensor) -> None:
        self.bias_LE = bias_update(self.bias_LE, global_loads_LE, self.schedule(step))
        self.step = step
        # Steps at or before this one can never complete now (training moved past them).
        self.pending = {s: e for s, e in self.pending.items() if s > step}
        self._observe(global_loads_LE)

    def _observe(self, loads_LE: torch.Tensor) -> None:
        self.last_loads_LE = loads_LE.clone()
        loads = loads_LE.double()
        if self.load_ema_LE is None:
            self.load_ema_LE = loads
        else:
            a = self.config.load_ema
            self.load_ema_LE = a * self.load_ema_LE + (1 - a) * loads

    def observe(self, loads_LE) -> None:
        """Serving replicas' loads: update the moving average only (no bias step)."""
        self._observe(self._check_loads(loads_LE))

    def set_gamma(self, gamma: float, zero_at_step: int | None = None) -> None:
        self.schedule = GammaSchedule(gamma, zero_at_step)

    def biases(self) -> dict:
        """{"step": last applied step, "bias_LE": fp32 [L, E], "layer_ids": ..., "gamma": next}."""
        return {
            "step": self.step,
            "bias_LE": self.bias_LE.clone(),
            "layer_ids": self.config.layer_ids,
            "gamma": self.schedule(self.step + 1),
        }

    def maxvio(self) -> dict[int, float]:
        """Per-layer MaxVio of the last applied global batch (or last observed serving loads)."""
        v = maxvio(self.last_loads_LE)
        return {layer: float(v[i]) for i, layer in enumerate(self.config.layer_ids)}

    # -- serving placement -------------------------------------------------------------------
    def _place(self, load_LE: torch.Tensor) -> Placement:
        c = self.config
        return place_experts(load_LE, c.physical_slots, c.n_group, c.serve_nodes, c.serve_gpus)

    def rebalance(self) -> Placement:
        """Recompute the serving placement from the moving average of loads."""
        if self.load_ema_LE is not None:
            self.placement = self._place(self.load_ema_LE)
        return self.placement

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": 1,
            "config": _config_dict(self.config),
            "step": self.step,
            "bias_LE": self.bias_LE.clone(),
            "gamma": self.schedule.gamma,
            "gamma_zero_at_step": self.schedule.zero_at_step,
            "pending": {
                s: {"sum_LE": e["sum_LE"].clone(), "ranks": sorted(e["ranks"])}
                for s, e in self.pending.items()
            },
            "last_loads_LE": self.last_loads_LE.clone(),
            "load_ema_LE": None if self.load_ema_LE is None else self.load_ema_LE.clone(),
            "placement": self.placement.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(
                f"router state version {state.get('version')!r} not supported (need 1)"
            )
        mine, theirs = _config_dict(self.config), state["config"]
        for key in ("layer_ids", "n_experts", "n_group", "topk_group"):
            if mine[key] != theirs[key]:
                raise ValueError(
                    f"router state has {key}={theirs[key]}, this router has {mine[key]}"
                )
        self.step = int(state["step"])
        self.bias_LE = state["bias_LE"].to(torch.float32).clone()
        self.schedule = GammaSchedule(float(state["gamma"]), state["gamma_zero_at_step"])
        self.pending = {
            int(s): {"sum_LE": e["sum_LE"].clone(), "ranks": set(e["ranks"])}
            for s, e in state["pending"].items()
        }
        self.last_loads_LE = state["last_loads_LE"].clone()
        ema = state["load_ema_LE"]
        self.load_ema_LE = None if ema is None else ema.clone()
        self.placement = Placement.from_state_dict(state["placement"])


def _config_dict(config: RouterConfig) -> dict:
    d = asdict(config)
    d["layer_ids"] = list(config.layer_ids)
    d["group_to_node"] = None if config.group_to_node is None else list(config.group_to_node)
    return d
