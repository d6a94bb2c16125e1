"""Router state: everything the RouterActor (moeray.actors.router) holds, as a plain class that
tests build without Ray: per-layer biases, the gamma schedule, the group -> node map, load history
and the serving expert placement.

Legend: L MoE layers, E routed experts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from moeray.platform.placement import Placement, identity_placement, place_experts
from moeray.platform.routing.balance import GammaSchedule, bias_update, check_group_to_node, maxvio


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
    gamma_changes: tuple[tuple[int, float], ...] = ()  # (first step, gamma): GammaSchedule
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
        GammaSchedule(self.gamma, self.gamma_zero_at_step, self.gamma_changes)  # validates
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
        MoE layers too (ids from num_hidden_layers on, as in the HF checkpoint), so they get
        biases."""
        first = int(getattr(model_config, "first_k_dense_replace", 0))
        last = int(model_config.num_hidden_layers) + int(
            getattr(model_config, "num_nextn_predict_layers", 0)
        )
        layers = tuple(range(first, last))
        kw: dict[str, Any] = dict(
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
        self.schedule = GammaSchedule(config.gamma, config.gamma_zero_at_step, config.gamma_changes)
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

    def set_gamma(self, gamma: float, zero_at_step: int | None = None, changes: tuple = ()) -> None:
        self.schedule = GammaSchedule(gamma, zero_at_step, changes)

    def biases(self) -> dict:
        """{"step": last applied step, "bias_LE": fp32 [L, E], "layer_ids": ..., "gamma": next,
        "applied_gamma": the gamma of the last applied step (None before any)}."""
        return {
            "step": self.step,
            "bias_LE": self.bias_LE.clone(),
            "layer_ids": self.config.layer_ids,
            "gamma": self.schedule(self.step + 1),
            "applied_gamma": self.schedule(self.step) if self.step >= 0 else None,
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
            "gamma_changes": list(self.schedule.changes),
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
        self.schedule = GammaSchedule(
            float(state["gamma"]), state["gamma_zero_at_step"], state.get("gamma_changes", ())
        )
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
    d["gamma_changes"] = [list(c) for c in config.gamma_changes]
    d["group_to_node"] = None if config.group_to_node is None else list(config.group_to_node)
    return d
