"""RouterActor: a named, detached Ray actor around `moeray.platform.routing.state.RouterState`.

It owns load balancing for training and serving: per-layer biases (the aux-loss-free rule),
gamma, the group -> node map, load history and the serving expert placement. Tokens never pass
through it: workers send one [layers, experts] count tensor per step (58 x 256 int64 = 119 KB for
V3) and read back the biases.

Training protocol, per step s, on every data-/expert-parallel rank r:
    ray.get(router.report.remote(s, r, loads_LE))            # idempotent: safe to retry
    biases = ray.get(router.biases.remote(min_step=s))       # waits until every rank reported s
Serving: replicas call `observe(loads_LE)`; a controller calls `rebalance()` every ~10 minutes
and pushes the returned placement to the MoE layers (`placement.to_physical`).

Fault tolerance: the actor restarts forever (max_restarts=-1) and Ray retries calls that were in
flight (max_task_retries=-1). Its state is written to `state_path` after every counted report,
and a restarted actor (same constructor arguments) reads it back, so a report is never lost nor,
being keyed by (step, rank), counted twice. Training checkpoints also save `state_dict()` and
restore it with `load_state_dict()`.

This module imports Ray at the top; import it only where Ray is wanted.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import ray
import torch

from moeray.platform.metrics import EXPERT_LOAD, ROUTER_MAXVIO, Metrics
from moeray.platform.routing.state import RouterConfig, RouterState

# A worker waiting for the other ranks' reports gives up after this long (a rank that died
# mid-step is Ray Train's to restart; the waiters should fail, not hang forever).
DEFAULT_WAIT_S = 300.0


class RouterActor:
    def __init__(self, config: RouterConfig, state_path: str | None = None):
        self._state = RouterState(config)
        self._path = Path(state_path) if state_path else None
        self._restored = False
        if self._path is not None and self._path.exists():
            self._state.load_state_dict(torch.load(self._path, weights_only=False))
            self._restored = True
        self._applied: asyncio.Condition | None = None
        self._metrics = Metrics("ray", defs=(EXPERT_LOAD, ROUTER_MAXVIO))
        self._metrics.create_all()
        if self._state.step >= 0:
            self._export_metrics()

    # -- training ------------------------------------------------------------------------------
    async def report(self, step: int, rank: int, loads_LE) -> dict:
        """One rank's tokens per expert ([layers, experts]) for `step`; see RouterState.report."""
        result = self._state.report(step, rank, loads_LE)
        if result["counted"]:
            self._persist()
        if result["applied"]:
            self._export_metrics()
            cond = self._condition()
            async with cond:
                cond.notify_all()
        return result

    async def biases(self, min_step: int = -1, timeout_s: float = DEFAULT_WAIT_S) -> dict:
        """Current biases; with `min_step`, first wait until that step has been applied."""
        cond = self._condition()
        deadline = time.monotonic() + timeout_s
        async with cond:
            while self._state.step < min_step:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"router step is {self._state.step}, still waiting for step {min_step} "
                        f"after {timeout_s} s (a rank has not reported?)"
                    )
                try:
                    await asyncio.wait_for(cond.wait(), timeout=left)
                except TimeoutError:
                    pass
        return self._state.biases()

    def set_gamma(self, gamma: float, zero_at_step: int | None = None, changes: tuple = ()) -> None:
        self._state.set_gamma(gamma, zero_at_step, changes)
        self._persist()

    # -- serving -------------------------------------------------------------------------------
    def observe(self, loads_LE) -> None:
        self._state.observe(loads_LE)
        self._export_metrics()

    def rebalance(self) -> dict:
        """Recompute placement from the load moving average; returns Placement.state_dict()."""
        placement = self._state.rebalance()
        self._persist()
        return placement.state_dict()

    def placement(self) -> dict:
        return self._state.placement.state_dict()

    # -- inspection and checkpoints ------------------------------------------------------------
    def maxvio(self) -> dict[int, float]:
        return self._state.maxvio()

    def info(self) -> dict:
        """Step, whether this incarnation restored from the state file, and the group map."""
        return {
            "step": self._state.step,
            "restored": self._restored,
            "pid": os.getpid(),
            "group_to_node": self._state.config.nodes,
            "pending_steps": sorted(self._state.pending),
        }

    def state_dict(self) -> dict:
        return self._state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore from a training checkpoint (the file is rewritten to match)."""
        self._state.load_state_dict(state)
        self._persist()
        self._export_metrics()

    # -- internals -----------------------------------------------------------------------------
    def _condition(self) -> asyncio.Condition:
        # Created on first use, inside the actor's event loop.
        if self._applied is None:
            self._applied = asyncio.Condition()
        return self._applied

    def _persist(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(self._path.name + f".tmp{os.getpid()}")
        torch.save(self._state.state_dict(), tmp)
        os.replace(tmp, self._path)  # atomic: a kill mid-write leaves the previous state

    def _export_metrics(self) -> None:
        loads = self._state.last_loads_LE
        for i, (layer, vio) in enumerate(self._state.maxvio().items()):
            self._metrics.set(ROUTER_MAXVIO.name, vio, layer=str(layer))
            for expert, n in enumerate(loads[i].tolist()):
                self._metrics.set(EXPERT_LOAD.name, float(n), layer=str(layer), expert=str(expert))


def get_or_create_router(
    name: str,
    namespace: str,
    config: RouterConfig,
    state_path: str | None = None,
):
    """The named detached RouterActor, created if it does not exist yet.

    Detached so it outlives the driver that created it (a training job and a Serve app share
    it); `num_cpus=0` so it never takes a CPU slot a training worker needs.
    """
    if not name:
        raise ValueError("router name must be a non-empty string")
    remote_cls = ray.remote(RouterActor)
    return remote_cls.options(
        name=name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=0,
    ).remote(config, state_path)
