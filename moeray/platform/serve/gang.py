"""An expert-parallel serving replica without Ray: the ranks of a gang and the front that spreads
requests over them.

  * EPRank: one rank (one process, one GPU): joins the gang's process group, loads its shard of
    the weights (rank_weights.py), and serves its own requests with an ExpertParallelEngine on a
    collective EngineLoop: a ColocatedWorker, or with P/D a PrefillWorker (prefill gang) or a
    DecodeWorker whose KV rows come from the prefill gang (decode gang). The Ray actor of a
    rank is this class itself (moeray.actors.ep wraps it with ray.remote).
  * GangFront: a GenerationBackend over the ranks: admission (a request per rank up to its
    max_num_seqs + max_waiting, else BackendOverloaded) and placement (most free KV pages, with
    affinity to the rank holding the prompt's prefix: DecodeRoutingPolicy), for `generate`
    (colocated, decode) and `prefill`; with a PlacementService (the gang's RouterActor, or a
    LocalPlacement), `update_placement` sends it the ranks' tokens per expert and stages the
    new expert placement it decides on every rank (the ranks switch to it together between two
    steps: parallel/serve_placement.py). A rank that fails (its actor died, or its engine raised)
    fails the gang: every request in flight ends with BackendUnavailable (503 at the API), and
    so does every new one, until Serve replaces the replica. The Serve deployment
    (moeray.actors.ep.EPServer) is a thin shell around it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any, Protocol

import torch

from moeray.platform.config import ServeConfig
from moeray.platform.engine.ep import ExpertParallelEngine
from moeray.platform.parallel.distributed import GRAPHS_CUDA_ENV, init_distributed
from moeray.platform.parallel.serve_ep import expert_loads, rows_computed
from moeray.platform.placement import Placement
from moeray.platform.rank_weights import CheckpointExperts, LoadReport, load_rank_model
from moeray.platform.routing.live_placement import PlacementController
from moeray.platform.serve.http.protocol import (
    BackendOverloaded,
    BackendUnavailable,
    GenerationRequest,
    GenerationStep,
)
from moeray.platform.serve.worker import (
    ColocatedWorker,
    DecodeRoutingPolicy,
    DecodeWorker,
    PrefillResult,
    PrefillWorker,
    device_and_dtype,
    engine_config,
    freeze_gc,
)

log = logging.getLogger(__name__)
ROLES = ("colocated", "prefill", "decode")
# (request, export_from, decode endpoint) -> the prefill gang's result (a decode rank's source).
Fetch = Callable[[GenerationRequest, int, Any], Awaitable[PrefillResult]]


def free_tcp_address(host: str) -> str:
    """host:port with a port free now on this machine (the gang's rendezvous, rank 0's)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return f"{host}:{s.getsockname()[1]}"


class EPRank:
    """Rank `rank` of a gang of `world`; `start` joins the process group and loads the model.
    `role`: "colocated" (prefill and decode), or one side of a P/D split: "prefill" (KV rows
    exported through the object store), "decode" (rows from `fetch`, the prefill gang)."""

    def __init__(
        self,
        config: dict[str, Any],
        rank: int,
        world: int,
        role: str = "colocated",
        fetch: Fetch | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role={role!r}: accepted {ROLES}")
        if (role == "decode") != (fetch is not None):
            raise ValueError(f"role={role!r}: a decode rank, and only it, needs fetch")
        self.cfg = ServeConfig.from_dict(config)
        self.rank, self.world = rank, world
        self.role, self.fetch = role, fetch
        self.worker: ColocatedWorker | PrefillWorker | DecodeWorker | None = None
        self.report: LoadReport | None = None

    def address(self, host: str) -> str:
        return free_tcp_address(host)

    def start(self, init_method: str) -> dict[str, Any]:
        """Join the gang's process group at `init_method` (every rank at once: it waits for all),
        load this rank's weights and start its engine loop. Returns the load report."""
        cfg = self.cfg
        device, dtype = device_and_dtype(cfg)
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        init_distributed(self.rank, self.world, init_method, dev, GRAPHS_CUDA_ENV)
        _config, model, self.report = load_rank_model(
            cfg.model,
            self.rank,
            self.world,
            load_format=cfg.load_format,
            device=dev,
            dtype=dtype,
            keep_fp8=cfg.weights == "fp8",
        )
        # Experts a new placement brings to this rank are read from the checkpoint files (dummy
        # weights have no file to read: their placement stays the loaded one).
        source = CheckpointExperts(cfg.model, model, dtype) if cfg.load_format != "dummy" else None
        engine = ExpertParallelEngine(
            model,
            engine_config(cfg, dev.type),
            expert_source=source,
            decode_exchange=cfg.ep_decode_exchange,
        )
        loop: dict[str, Any] = {"max_waiting": cfg.max_waiting, "collective": True}
        if self.role == "prefill":
            self.worker = PrefillWorker(engine, **loop)
        elif self.role == "decode":
            assert self.fetch is not None  # checked in __init__
            self.worker = DecodeWorker(
                engine, self.fetch, prefill_timeout_s=cfg.prefill_timeout_s, **loop
            )
        else:
            self.worker = ColocatedWorker(engine, **loop)
        return dataclasses.asdict(self.report)

    def freeze_gc(self) -> None:
        """`serve.worker.freeze_gc` in this rank's process, once it has started (the gang's
        builder calls it in each rank actor: in-process callers keep their collector as is)."""
        freeze_gc()

    def _worker(self) -> ColocatedWorker | PrefillWorker | DecodeWorker:
        if self.worker is None:
            raise RuntimeError(f"EP rank {self.rank} is not started (call start first)")
        return self.worker

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[GenerationStep, None]:
        worker = self._worker()
        if isinstance(worker, PrefillWorker):
            raise RuntimeError(f"EP rank {self.rank} is a prefill rank: call prefill")
        async with aclosing(worker.generate(req)) as steps:
            async for step in steps:
                yield step

    async def prefill(
        self, req: GenerationRequest, export_from: int, dest: Any = None
    ) -> PrefillResult:
        worker = self._worker()
        if not isinstance(worker, PrefillWorker):
            raise RuntimeError(f"EP rank {self.rank} is a {self.role} rank, not a prefill rank")
        return await worker.prefill(req, export_from, dest)

    def free_pages(self) -> int:
        return self._worker().loop.free_pages()

    def ping(self) -> int:
        return self.rank

    def _engine(self) -> ExpertParallelEngine:
        engine = self._worker().loop.engine
        assert isinstance(engine, ExpertParallelEngine)
        return engine

    def expert_loads(self) -> dict[str, Any]:
        """{"steps": engine steps so far, "loads": [MoE layer][expert] tokens this rank routed,
        "rows": [MoE layer] rows this rank's experts computed}, all counted since the start."""
        engine = self._engine()
        m = engine.model
        return {"steps": engine.stats.steps, "loads": expert_loads(m), "rows": rows_computed(m)}

    async def stage_placement(self, version: int, placement: dict[str, Any]) -> dict[str, Any]:
        """Build this rank's weights for a placement (Placement.state_dict()) off the event loop;
        the engine switches once every rank has staged it. Returns the SwitchReport."""
        p = Placement.from_state_dict(placement)
        report = await asyncio.to_thread(self._engine().placements.stage, version, p)
        return dataclasses.asdict(report)

    def stats(self) -> dict[str, Any]:
        engine = self._engine()
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "free_pages": self.free_pages(),
            "steps": engine.stats.steps,
            "generated_tokens": engine.stats.generated_tokens,
            "gang_steps": engine.gang_steps,
            "last_busy_gang_step": engine.last_busy_gang_step,
            "lockstep_rounds": engine.lockstep.rounds,
            "padding_forwards": engine.lockstep.padding_forwards,
            "gathered_forwards": engine.lockstep.gathered_forwards,  # fixed-size MoE exchange
            "graph_forwards": engine.lockstep.graph_forwards,  # of those, decode graph replays
            "mtp_forwards": engine.lockstep.mtp_forwards,  # MTP depth forwards, real or empty
            "mtp": None if engine.drafter is None else engine.drafter.stats.as_dict(),
            "cuda_graphs": engine.runner.graph_status,
            "load": None if self.report is None else dataclasses.asdict(self.report),
            "expert_loads": expert_loads(engine.model),  # [MoE layer][expert] tokens routed
            "placement_version": engine.placements.version,
            "placement_switches": list(engine.placements.switches),  # (version, gang step)
            "transfers": [
                vars(t) for t in getattr(self._worker(), "transfers", [])[-100:]
            ],  # a decode rank's last KV imports
        }


class RankClient(Protocol):
    """What the front needs of a rank (an EPRank, or a Ray actor handle's wrapper)."""

    def generate(self, req: GenerationRequest) -> AsyncGenerator[GenerationStep, None]: ...

    async def prefill(
        self, req: GenerationRequest, export_from: int, dest: Any = None
    ) -> PrefillResult: ...

    async def free_pages(self) -> int: ...

    async def expert_loads(self) -> dict[str, Any]: ...

    async def stage_placement(self, version: int, placement: dict[str, Any]) -> dict[str, Any]: ...


class RankFailed(Exception):
    """A rank of the gang is gone (its actor died): raised by a RankClient."""


class PlacementService(Protocol):
    """Where a gang's placement decisions are made: `report` takes the ranks' cumulative
    counters ([G, L, E] tokens routed per expert, [G, L] rows computed) after gang step `step`
    and returns a new placement to stage, (version, Placement.state_dict()), or None; `staged`
    tells it whether every rank staged that version."""

    async def report(
        self, step: int, loads_GLE: torch.Tensor, rows_GL: torch.Tensor
    ) -> tuple[int, dict[str, Any]] | None: ...

    async def staged(self, version: int, ok: bool) -> None: ...


class LocalPlacement:
    """A PlacementService over a PlacementController in this process (tests, one-process
    setups)."""

    def __init__(self, controller: PlacementController) -> None:
        self.controller = controller

    async def report(
        self, step: int, loads_GLE: torch.Tensor, rows_GL: torch.Tensor
    ) -> tuple[int, dict[str, Any]] | None:
        new = self.controller.report(step, list(loads_GLE), list(rows_GL))
        return None if new is None else (self.controller.version, new.state_dict())

    async def staged(self, version: int, ok: bool) -> None:
        self.controller.staged(version, ok)


class GangFront:
    """The gang's GenerationBackend: admission and spreading requests over the ranks."""

    def __init__(
        self,
        ranks: Sequence[RankClient],
        *,
        page_size: int,
        max_per_rank: int,
        stats_period_s: float = 1.0,
        stats_timeout_s: float = 10.0,
        placements: PlacementService | None = None,
        stage_timeout_s: float = 600.0,
    ) -> None:
        if not ranks:
            raise ValueError("a gang needs at least one rank")
        self.ranks = list(ranks)
        self.max_per_rank = max_per_rank
        self.stats_period_s = stats_period_s
        self.stats_timeout_s = stats_timeout_s
        self.policy = DecodeRoutingPolicy(page_size)
        self.in_flight = [0] * len(self.ranks)
        self.routed_to = [0] * len(self.ranks)  # requests sent to each rank so far
        self._last_stats = -float("inf")
        self._refreshing: asyncio.Future | None = None
        self._seq = itertools.count()
        self.placements = placements
        self.placement_version = 0  # the newest placement every rank staged
        self.stage_timeout_s = stage_timeout_s
        self.failure: str | None = None  # why the gang failed; None while it serves
        self._failed = asyncio.Event()

    def fail(self, reason: str) -> None:
        """Mark the gang failed: requests in flight end with BackendUnavailable now (not when
        the surviving ranks' collectives time out), new ones are refused."""
        if self.failure is None:
            self.failure = reason
            log.error("EP gang failed: %s", reason)
        self._failed.set()

    def _unavailable(self) -> BackendUnavailable:
        return BackendUnavailable(
            f"this expert-parallel replica lost a rank ({self.failure}) and is being replaced; "
            "retry the request",
            retry_after_s=5.0,
        )

    async def update_placement(self) -> int | None:
        """Send the ranks' tokens per expert to the placement service; when it decides a new
        placement, stage it on every rank (weights first: the ranks switch together once all
        have it) and report the outcome. Returns the new placement's version, or None."""
        if self.placements is None:
            raise RuntimeError("this gang has no placement service")
        seen = await asyncio.wait_for(
            asyncio.gather(*(r.expert_loads() for r in self.ranks)), self.stats_timeout_s
        )
        step = max(s["steps"] for s in seen)
        loads_GLE = torch.tensor([s["loads"] for s in seen], dtype=torch.int64)
        rows_GL = torch.tensor([s["rows"] for s in seen], dtype=torch.int64)
        decided = await self.placements.report(step, loads_GLE, rows_GL)
        if decided is None:
            return None
        version, state = decided
        try:
            await asyncio.wait_for(
                asyncio.gather(*(r.stage_placement(version, state) for r in self.ranks)),
                self.stage_timeout_s,
            )
        except BaseException:
            # A rank without it never votes for it, so the gang keeps the applied placement
            # (the ranks that staged it drop it at the next switch; versions only grow).
            try:
                await self.placements.staged(version, False)
            except Exception:
                log.exception("could not report placement v%d as not staged", version)
            raise
        self.placement_version = version
        log.info("expert placement v%d staged on all %d ranks", version, len(self.ranks))
        await self.placements.staged(version, True)
        return version

    async def _refresh(self) -> None:
        """Ask every rank for its free pages, at most every stats_period_s. Requests that arrive
        while a refresh runs wait for it: routed before any report, a burst would see every rank
        equally empty (DecodeRoutingPolicy counts an unreported rank as infinitely free, where
        debits do not separate them) and all go to rank 0."""
        if self._refreshing is None:
            if time.monotonic() - self._last_stats < self.stats_period_s:
                return
            self._refreshing = asyncio.ensure_future(self._observe())
        task = self._refreshing
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and self._refreshing is task:
                self._refreshing = None

    async def _observe(self) -> None:
        pages = await asyncio.wait_for(
            asyncio.gather(*(r.free_pages() for r in self.ranks)), self.stats_timeout_s
        )
        self._last_stats = time.monotonic()
        seq = next(self._seq)
        for i, p in enumerate(pages):
            self.policy.observe(str(i), p, seq)

    def pick(self, prompt: Sequence[int]) -> int:
        """The rank for a prompt: among ranks below max_per_rank requests, the prefix owner (when
        it has the pages) or the one with the most free pages."""
        open_ranks = [str(i) for i, n in enumerate(self.in_flight) if n < self.max_per_rank]
        if not open_ranks:
            raise BackendOverloaded(
                f"all {len(self.ranks)} ranks hold {self.max_per_rank} requests", retry_after_s=1.0
            )
        choice = self.policy.rank(list(prompt), open_ranks)[0]
        self.policy.routed(list(prompt), choice)
        return int(choice)

    async def _until_failed(self, work: Awaitable[Any], failed: asyncio.Future) -> Any:
        """`work`, unless the gang fails first (`failed`, a request's wait on the gang's failure,
        completes: then BackendUnavailable, `work` cancelled). A rank that is gone (RankFailed)
        fails the gang."""
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait({task, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                # Let it unwind (a rank's stream is cancelled there) before the caller closes it.
                await asyncio.wait({task})
        if task.cancelled():
            raise self._unavailable()
        error = task.exception()
        if isinstance(error, RankFailed):
            self.fail(str(error))
            raise self._unavailable() from error
        return task.result()

    async def prefill(
        self, req: GenerationRequest, export_from: int, dest: Any = None
    ) -> PrefillResult:
        """A prefill gang's front: one rank prefills and exports the request's KV rows."""
        if self.failure is not None:
            raise self._unavailable()
        await self._refresh()
        i = self.pick(req.prompt_ids)
        self.in_flight[i] += 1
        self.routed_to[i] += 1
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            return await self._until_failed(self.ranks[i].prefill(req, export_from, dest), failed)
        finally:
            failed.cancel()
            self.in_flight[i] -= 1

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[GenerationStep, None]:
        if self.failure is not None:
            raise self._unavailable()
        await self._refresh()
        i = self.pick(req.prompt_ids)
        self.in_flight[i] += 1
        self.routed_to[i] += 1
        # One wait on the gang's failure per request, raced against each step.
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            async with aclosing(self.ranks[i].generate(req)) as steps:
                while (step := await self._until_failed(anext(steps, None), failed)) is not None:
                    yield step
        finally:
            failed.cancel()
            self.in_flight[i] -= 1
