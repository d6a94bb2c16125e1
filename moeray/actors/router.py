"""RouterActor: a named, detached Ray actor around `moeray.platform.routing.state.RouterState`.

It owns load balancing for training and serving: per-layer biases (the aux-loss-free rule),
gamma, the group -> node map, load history and the serving expert placement. Tokens never pass
through it: workers send one [layers, experts] count tensor per step (58 x 256 int64 = 119 KB for
V3) and read back the biases.

Training protocol, per step s, on every data-/expert-parallel rank r:
    ray.get(router.report.remote(s, r, loads_LE))            # idempotent: safe to retry
    biases = ray.get(router.biases.remote(min_step=s))       # waits until every rank reported s
Serving (one router per expert-parallel gang, owned by the gang's Serve replica: actors/ep.py):
the gang's front sends the ranks' cumulative tokens-per-expert counters every placement period,
`serve_report(step, loads_GLE, rows_GL)`; the router's PlacementController
(routing/live_placement.py) keeps the moving average, decides when the placement changes, logs
the change and exports per-expert load, per-GPU load and MaxVio; the front stages the returned
placement on the ranks and answers `serve_staged(version, ok)`. A router that restarted (fresh
state) answers {"attached": False}, and the front re-attaches it at the applied placement.

Fault tolerance: the actor restarts forever (max_restarts=-1) and Ray retries calls that were in
flight (max_task_retries=-1). Its state is written to `state_path` after every counted report,
and a restarted actor (same constructor arguments) reads it back, so a report is never lost nor,
being keyed by (step, rank), counted twice. `state_path` is a `train.storage.Storage` (or a path
or URI): a shared location, as the actor may restart on another node. Training checkpoints also
save `state_dict()` and restore it with `load_state_dict()`.

This module imports Ray at the top; import it only where Ray is wanted.
"""

from __future__ import annotations

import asyncio
import io
import os
import time

import ray
import torch

from moeray.actors.logs import log_to_stderr
from moeray.platform.metrics import (
    EXPERT_LOAD,
    GPU_LOAD,
    PLACEMENT_CHANGES,
    PLACEMENT_MAXVIO,
    ROUTER_MAXVIO,
    Metrics,
)
from moeray.platform.placement import Placement
from moeray.platform.routing.live_placement import PlacementController, PlacementPolicy
from moeray.platform.routing.state import RouterConfig, RouterState
from moeray.platform.train.storage import Storage

# A worker waiting for the other ranks' reports gives up after this long (a rank that died
# mid-step is Ray Train's to restart; the waiters should fail, not hang forever).
DEFAULT_WAIT_S = 300.0


class RouterActor:
    """`gang` labels every metric it exports (metrics.py: "train", or an EP serving gang's
    "<role>-<replica id>")."""

    def __init__(
        self, config: RouterConfig, state_path: Storage | str | None = None, gang: str = "train"
    ):
        log_to_stderr()  # placement changes are INFO records
        self._state = RouterState(config)
        self._path = Storage.at(state_path) if isinstance(state_path, str) else state_path
        self._restored = False
        if self._path is not None and self._path.exists():
            saved = io.BytesIO(self._path.read_bytes())
            self._state.load_state_dict(torch.load(saved, weights_only=False))
            self._restored = True
        self._applied: asyncio.Condition | None = None
        self._writing: asyncio.Lock | None = None
        self._changes = 0  # state changes so far, and how many of them the file holds
        self._durable = 0
        self._serving: PlacementController | None = None
        defs = (EXPERT_LOAD, ROUTER_MAXVIO, GPU_LOAD, PLACEMENT_MAXVIO, PLACEMENT_CHANGES)
        self._metrics = Metrics("ray", defs=defs, default_labels={"gang": gang})
        self._metrics.create_all()
        if self._state.step >= 0:
            self._export_metrics()

    # -- training ------------------------------------------------------------------------------
    async def report(self, step: int, rank: int, loads_LE) -> dict:
        """One rank's tokens per expert ([layers, experts]) for `step`; see RouterState.report."""
        result = self._state.report(step, rank, loads_LE)
        if result["counted"]:
            await self._persist()
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

    async def set_gamma(
        self, gamma: float, zero_at_step: int | None = None, changes: tuple = ()
    ) -> None:
        self._state.set_gamma(gamma, zero_at_step, changes)
        await self._persist()

    # -- serving -------------------------------------------------------------------------------
    def observe(self, loads_LE) -> None:
        self._state.observe(loads_LE)
        self._export_metrics()

    async def rebalance(self) -> dict:
        """Recompute placement from the load moving average; returns Placement.state_dict()."""
        placement = self._state.rebalance()
        await self._persist()
        return placement.state_dict()

    def placement(self) -> dict:
        return self._state.placement.state_dict()

    def serve_attach(
        self, policy: PlacementPolicy, version: int = 0, placement: dict | None = None
    ) -> None:
        """Own the placement decisions of one EP gang, whose ranks hold `placement` (default:
        the identity they load) as version `version`."""
        p = None if placement is None else Placement.from_state_dict(placement)
        self._serving = PlacementController(self._state, policy, version, p)

    def serve_report(self, step: int, loads_GLE, rows_GL) -> dict:
        """The gang's cumulative counters after gang step `step`: {"attached": False} when no
        gang is attached (a restarted router), else {"attached": True, "version": the newest
        decided, "placement": a new Placement.state_dict() to stage, or None}."""
        c = self._serving
        if c is None:
            return {"attached": False}
        new = c.report(step, list(loads_GLE), list(rows_GL))
        c.export(self._metrics)
        state = None if new is None else new.state_dict()
        return {"attached": True, "version": c.version, "placement": state}

    def serve_staged(self, version: int, ok: bool) -> None:
        if self._serving is not None:
            self._serving.staged(version, ok)

    def serve_info(self) -> dict:
        """The attached gang's placement state: version, changes, reports and the tokens per
        expert summed over every report's window."""
        c = self._serving
        if c is None:
            return {"attached": False}
        return {
            "attached": True,
            "pid": os.getpid(),  # its log: the Ray worker log file named with this pid
            "version": c.version,
            "changes": c.changes,
            "reports": c.reports,
            "tokens_seen": c.tokens_seen,
            "gpu_maxvio": float(c.gpu_maxvio_L().max()),
        }

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

    async def load_state_dict(self, state: dict) -> None:
        """Restore from a training checkpoint (the file is rewritten to match)."""
        self._state.load_state_dict(state)
        await self._persist()
        self._export_metrics()

    # -- internals -----------------------------------------------------------------------------
    def _condition(self) -> asyncio.Condition:
        # Created on first use, inside the actor's event loop.
        if self._applied is None:
            self._applied = asyncio.Condition()
        return self._applied

    async def _persist(self) -> None:
        """Return once the state file holds the state as of this call. The write runs in a
        thread, off the event loop (on an object store it is a PUT of tens of ms), one at a time,
        in order; callers that arrive during a write share the next one, so a step's reports
        from N ranks take about two writes, not N."""
        if self._path is None:
            return
        self._changes += 1
        mine = self._changes
        if self._writing is None:  # created on first use, inside the actor's event loop
            self._writing = asyncio.Lock()
        async with self._writing:
            if self._durable >= mine:  # a write that began after this change holds it
                return
            upto = self._changes
            buf = io.BytesIO()
            torch.save(self._state.state_dict(), buf)  # here, on the loop: a consistent state
            # whole: a kill mid-write leaves the previous state
            await asyncio.to_thread(self._path.write_bytes, buf.getvalue())
            self._durable = upto

    def _export_metrics(self) -> None:
        loads = self._state.last_loads_LE
        for i, (layer, vio) in enumerate(self._state.maxvio().items()):
            self._metrics.set(ROUTER_MAXVIO.name, vio, layer=str(layer))
            for expert, n in enumerate(loads[i].tolist()):
                self._metrics.set(EXPERT_LOAD.name, float(n), layer=str(layer), expert=str(expert))


def get_or_create_router(
    name: str,
    namespace: str | None,
    config: RouterConfig,
    state_path: Storage | str | None = None,
    detached: bool = True,
    gang: str = "train",
):
    """The named RouterActor, created if it does not exist yet; `gang` labels its metrics.

    Detached so it outlives the driver that created it (a training job and a Serve app share
    it); a serving gang's router is not (`detached=False`: it goes with the replica that owns
    the gang). `num_cpus=0` so it never takes a CPU slot a training worker needs.
    """
    if not name:
        raise ValueError("router name must be a non-empty string")
    remote_cls = ray.remote(RouterActor)
    return remote_cls.options(
        name=name,
        namespace=namespace,
        lifetime="detached" if detached else None,
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=0,
    ).remote(config, state_path, gang)
