"""The serving expert-placement controller: per-rank token counts in, a new redundant-expert
placement out when the GPUs are unbalanced.

Legend: L MoE layers, E logical experts, G expert-parallel ranks (GPUs) of the gang.

Plain class over a RouterState: the gang's RouterActor (moeray.actors.router) holds one, so the
load average and the placement decision live in the control plane that training uses too; tests
and single-process setups drive it directly. Every `report(step, loads_by_rank)` takes the ranks'
cumulative tokens-per-expert counters (ServingEPMoE.load_E), turns them into the window since the
last report, and feeds their sum to the RouterState's moving average. The load of each GPU under
the current placement follows from it (each expert's tokens split evenly over its replicas:
`placement.to_physical` rounds to within one token per batch); when the worst layer's GPU MaxVio
exceeds `maxvio_threshold`, at least `min_interval_steps` engine steps after the last change, the
EPLB policy (`platform/placement.py`) recomputes the placement from the average, and the
controller returns it if it lowers that MaxVio by at least `min_gain`. The gang then stages it on
every rank and switches between two steps (`parallel/serve_placement.py`), and tells the
controller whether staging worked (`staged`): a placement some rank could not stage is dropped
(the applied one stays current; version numbers only grow).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeray.platform.metrics import (
    EXPERT_LOAD,
    GPU_LOAD,
    PLACEMENT_CHANGES,
    PLACEMENT_MAXVIO,
    Metrics,
)
from moeray.platform.placement import Placement, gpu_loads, identity_placement
from moeray.platform.routing.balance import maxvio
from moeray.platform.routing.state import RouterConfig, RouterState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlacementPolicy:
    """`num_physical`: expert slots over the gang (experts plus redundant replicas; a multiple
    of the gang size). A change needs the worst layer's GPU MaxVio above `maxvio_threshold`,
    `min_interval_steps` engine steps since the last one, and a predicted MaxVio at least
    `min_gain` lower. `load_ema`: weight of the old average per report."""

    num_physical: int
    maxvio_threshold: float = 0.25
    min_interval_steps: int = 200
    min_gain: float = 0.05
    load_ema: float = 0.9

    def __post_init__(self) -> None:
        if self.maxvio_threshold < 0:
            raise ValueError(f"maxvio_threshold={self.maxvio_threshold} must be >= 0")
        if self.min_interval_steps < 0:
            raise ValueError(f"min_interval_steps={self.min_interval_steps} must be >= 0")
        if self.min_gain < 0:
            raise ValueError(f"min_gain={self.min_gain} must be >= 0")


def serving_router_config(
    model_config, ep_size: int, policy: PlacementPolicy, num_nodes: int = 1
) -> RouterConfig:
    """The RouterConfig of one EP serving gang's router: the model's MoE layers and experts,
    `policy.num_physical` slots over `ep_size` GPUs on `num_nodes` nodes."""
    return RouterConfig.from_model(
        model_config,
        num_physical=policy.num_physical,
        serve_gpus=ep_size,
        serve_nodes=num_nodes,
        load_ema=policy.load_ema,
    )


class PlacementController:
    """Load average and placement decisions for one EP serving gang, over `router` (its config
    gives the gang: serve_gpus ranks on serve_nodes nodes). Starts from `placement` at `version`
    (default: the identity the ranks load, rank r holding experts [r*E/G, (r+1)*E/G), version
    0); a router that restarted is re-attached at the gang's applied placement."""

    def __init__(
        self,
        router: RouterState,
        policy: PlacementPolicy,
        version: int = 0,
        placement: Placement | None = None,
    ) -> None:
        c = router.config
        if (c.physical_slots, c.load_ema) != (policy.num_physical, policy.load_ema):
            raise ValueError(
                f"policy num_physical={policy.num_physical}, load_ema={policy.load_ema} differ "
                f"from the router's {c.physical_slots}, {c.load_ema} (serving_router_config)"
            )
        if version < 0:
            raise ValueError(f"version={version} must be >= 0")
        self.policy = policy
        self.router = router
        self.layer_ids = c.layer_ids
        L, E = len(c.layer_ids), c.n_experts
        if placement is None:
            placement = identity_placement(L, E, c.serve_gpus, c.serve_nodes)
        elif tuple(placement.logcnt_LE.shape) != (L, E) or placement.num_gpus != c.serve_gpus:
            raise ValueError(
                f"placement for {tuple(placement.logcnt_LE.shape)} [layers, experts] over "
                f"{placement.num_gpus} GPUs; the router has {(L, E)} over {c.serve_gpus}"
            )
        self.placement = placement  # the newest decided (staged or being staged)
        self.applied = placement  # the newest every rank staged
        self.router.placement = placement
        self.version = version
        self.changes = 0
        self.reports = 0
        self.tokens_seen = 0  # (token, expert) pairs routed, summed over every report's window
        self._last_change_step: int | None = None
        self._seen: dict[int, torch.Tensor] = {}  # rank -> cumulative loads at its last report
        self._window_LE = torch.zeros(L, E, dtype=torch.int64)
        self._exported_changes = 0
        self._rows_seen: dict[int, torch.Tensor] = {}
        self.gpu_rows_LG: torch.Tensor | None = None  # measured rows per GPU, last window

    @classmethod
    def for_model(
        cls, model_config, ep_size: int, policy: PlacementPolicy, num_nodes: int = 1
    ) -> PlacementController:
        """A controller over its own RouterState (no RouterActor)."""
        return cls(
            RouterState(serving_router_config(model_config, ep_size, policy, num_nodes)), policy
        )

    @staticmethod
    def _since(seen: dict[int, torch.Tensor], rank: int, counter, shape: tuple) -> torch.Tensor:
        """A rank's cumulative counter minus its value at the last report. A counter that went
        down (a restarted rank) counts from zero."""
        now = torch.as_tensor(counter, dtype=torch.int64)
        if tuple(now.shape) != shape:
            raise ValueError(f"rank {rank} counts have shape {tuple(now.shape)}, expected {shape}")
        before = seen.get(rank)
        seen[rank] = now.clone()
        return now if before is None or bool((now < before).any()) else now - before

    def gpu_maxvio_L(self, placement: Placement | None = None) -> torch.Tensor:
        """[L] MaxVio over the GPUs of the load average under `placement` (default: current)."""
        ema = self.router.load_ema_LE
        if ema is None:
            return torch.zeros(len(self.layer_ids), dtype=torch.float64)
        return maxvio(gpu_loads(ema, placement or self.placement))

    def report(
        self, step: int, loads_by_rank: Sequence, rows_by_rank: Sequence | None = None
    ) -> Placement | None:
        """Feed the ranks' cumulative counters seen after engine step `step`: tokens each routed
        per expert ([L, E] per rank) and, optionally, rows each one's experts computed ([L] per
        rank: the measured GPU load). Returns a new placement (then `version` is its number) or
        None."""
        shape = tuple(self._window_LE.shape)
        self._window_LE = sum(
            (self._since(self._seen, r, x, shape) for r, x in enumerate(loads_by_rank)),
            torch.zeros(shape, dtype=torch.int64),
        )
        if rows_by_rank is not None:
            rows = [
                self._since(self._rows_seen, r, x, shape[:1]) for r, x in enumerate(rows_by_rank)
            ]
            self.gpu_rows_LG = torch.stack(rows, dim=1)
        self.reports += 1
        self.tokens_seen += int(self._window_LE.sum())
        if int(self._window_LE.sum()) > 0:
            self.router.observe(self._window_LE)
        p = self.policy
        if (
            self._last_change_step is not None
            and step - self._last_change_step < p.min_interval_steps
        ):
            return None
        now = float(self.gpu_maxvio_L().max())
        if now <= p.maxvio_threshold:
            return None
        candidate = self.router.rebalance()
        self.router.placement = self.placement  # the router's placement is the decided one
        after = float(self.gpu_maxvio_L(candidate).max())
        if after > now - p.min_gain:
            return None
        self.router.placement = candidate
        self.placement = candidate
        self.version += 1
        self.changes += 1
        self._last_change_step = step
        moved = int((candidate.logcnt_LE > 1).sum())
        log.info(
            "expert placement v%d at step %d: GPU MaxVio %.3f -> %.3f (worst layer), "
            "%d slots, %d (layer, expert) pairs replicated",
            self.version,
            step,
            now,
            after,
            candidate.phy2log_LP.shape[1],
            moved,
        )
        return candidate

    def staged(self, version: int, ok: bool) -> None:
        """The gang's outcome of staging placement `version`: applied, or (`ok` False: some rank
        could not stage it) dropped, the applied placement current again. A stale version (a
        newer decision exists) changes nothing."""
        if version != self.version:
            return
        if ok:
            self.applied = self.placement
        else:
            log.warning(
                "expert placement v%d not staged on every rank: kept the applied one", version
            )
            self.placement = self.applied
            self.router.placement = self.applied

    def export(self, metrics: Metrics) -> None:
        """Gauges of the last window: tokens per expert; per GPU, the rows its experts computed
        when the ranks report them (else the moving average split by the placement); their GPU
        MaxVio. And the count of placement changes."""
        ema = self.router.load_ema_LE
        gpu_LG = self.gpu_rows_LG
        if gpu_LG is None and ema is not None:
            gpu_LG = gpu_loads(ema, self.placement)
        vio_L = self.gpu_maxvio_L() if gpu_LG is None else maxvio(gpu_LG)
        for i, layer in enumerate(self.layer_ids):
            lab = str(layer)
            metrics.set(PLACEMENT_MAXVIO.name, float(vio_L[i]), layer=lab)
            for e, n in enumerate(self._window_LE[i].tolist()):
                metrics.set(EXPERT_LOAD.name, float(n), layer=lab, expert=str(e))
            if gpu_LG is not None:
                for g, n in enumerate(gpu_LG[i].tolist()):
                    metrics.set(GPU_LOAD.name, float(n), layer=lab, gpu=str(g))
        if self.changes > self._exported_changes:
            metrics.inc(PLACEMENT_CHANGES.name, float(self.changes - self._exported_changes))
        self._exported_changes = self.changes
