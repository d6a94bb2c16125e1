"""Serve deployment shells around `DecodeWorker` (P/D) and `ColocatedWorker`, and the decode
deployment's Serve request router, `DecodeRequestRouter` (most free KV pages, with affinity to the
replica holding a prompt's prefix)."""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from moeray.actors.engine_metrics import EngineMetrics, replica_id
from moeray.platform.config import ServeConfig
from moeray.platform.serve.http.protocol import GenerationRequest, GenerationStep
from moeray.platform.serve.kv_transport.factory import make_receiver
from moeray.platform.serve.worker import (
    ColocatedWorker,
    DecodeRoutingPolicy,
    DecodeWorker,
    PrefillResult,
    TransferRecord,
    freeze_gc,
    make_engine,
)


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"


class PrefillFetch:
    """A decode replica's (or decode rank's) `fetch`: a call of the prefill deployment through
    its Serve handle (which pickles into a rank actor). A caller that gives up (the decode
    worker's prefill_timeout_s) cancels the call, and Serve cancels it in the prefill replica."""

    def __init__(self, prefill: Any) -> None:
        self.prefill = prefill

    async def __call__(
        self, req: GenerationRequest, export_from: int, endpoint: Any
    ) -> PrefillResult:
        response = self.prefill.prefill.remote(req, export_from, endpoint)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise


class DecodeServer:
    def __init__(self, config: dict[str, Any], prefill: Any) -> None:
        cfg = ServeConfig.from_dict(config)
        self.transport = cfg.kv_transport
        self.prefill = prefill  # DeploymentHandle of the prefill deployment

        engine = make_engine(cfg)
        receiver = make_receiver(
            cfg.kv_transport,
            replica_id(),
            engine.device,
            host=_node_ip(),
            timeout_s=cfg.kv_transfer_timeout_s,
        )
        self.worker = DecodeWorker(
            engine,
            PrefillFetch(prefill),
            receiver=receiver,
            on_transfer=self._on_transfer,
            prefill_timeout_s=cfg.prefill_timeout_s,
            max_waiting=cfg.max_waiting,
        )
        self.metrics = EngineMetrics("decode", self.worker.loop)
        freeze_gc()
        self._stats_seq = itertools.count()

    def _on_transfer(self, rec: TransferRecord) -> None:
        self.metrics.transfer(
            rec.bytes, rec.seconds, recomputed=rec.recomputed, transport=rec.transport
        )

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationStep, None]:
        return _metered(self.worker.generate(request), self.metrics)

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve calls this every `request_routing_stats_period_s`; DecodeRequestRouter reads it."""
        return {"free_pages": self.worker.free_pages(), "seq": next(self._stats_seq)}

    def stats(self, replica: str | None = None, last: int = 100) -> dict[str, Any]:
        """This replica's pages and its `last` transfers (at most 1000 are kept). `replica` (a
        replica id) is read by DecodeRequestRouter, which then sends the call to that replica."""
        return {
            "replica": replica_id(),
            "free_pages": self.worker.free_pages(),
            "transfers": [vars(t) for t in self.worker.transfers[-last:]] if last > 0 else [],
            "engine": self.worker.loop.engine.metrics(),
        }


class ColocatedServer:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = ServeConfig.from_dict(config)
        self.worker = ColocatedWorker(make_engine(cfg), max_waiting=cfg.max_waiting)
        self.metrics = EngineMetrics("colocated", self.worker.loop)
        freeze_gc()

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationStep, None]:
        return _metered(self.worker.generate(request), self.metrics)

    def stats(self) -> dict[str, Any]:
        return {
            "replica": replica_id(),
            "free_pages": self.worker.loop.free_pages(),
            "engine": self.worker.loop.engine.metrics(),
        }


async def _metered(
    steps: AsyncGenerator[GenerationStep, None], metrics: EngineMetrics
) -> AsyncGenerator[GenerationStep, None]:
    """Stream a worker's steps, refreshing the replica's gauges after each (and at the end)."""
    try:
        async with aclosing(steps):
            async for step in steps:
                yield step
                metrics.update()
    finally:
        metrics.update()


def _prompt(pending_request: Any) -> tuple[int, ...]:
    if pending_request is None:
        return ()
    for arg in list(pending_request.args) + list(pending_request.kwargs.values()):
        if isinstance(arg, GenerationRequest):
            return arg.prompt_ids
    return ()


@functools.cache
def decode_request_router_class():
    """The Serve RequestRouter for the decode deployment,
    `moeray.actors.decode:DecodeRequestRouter` (built on first access: it subclasses Ray Serve
    classes, and importing this module must not import Ray)."""
    from ray.serve.request_router import FIFOMixin, RequestRouter

    class DecodeRequestRouter(FIFOMixin, RequestRouter):
        """Ranks replicas with `DecodeRoutingPolicy`, one replica per rank: Serve tries the ranks
        in order and skips a replica whose queue (max_ongoing_requests) is full."""

        def initialize_state(self, page_size: int = 64, **kwargs: Any) -> None:
            self.policy = DecodeRoutingPolicy(page_size)

        async def choose_replicas(self, candidate_replicas, pending_request=None):
            if pending_request is not None:
                # Sleep (exponential backoff) between rounds when no replica takes the request.
                # Without it Serve's routing loop calls this again at once, and as nothing here
                # awaits, the router's event loop runs nothing else: a core at 100% and the
                # replica-set update that would end the loop never applied (a stats call pinned
                # to a killed replica; benchmarks/notes-serve.md).
                pending_request.routing_context.should_backoff = True
            by_id = {}
            for r in candidate_replicas:
                rid = r.replica_id.unique_id
                by_id[rid] = r
                stats = r.routing_stats or {}
                if "free_pages" in stats:
                    self.policy.observe(rid, stats["free_pages"], stats.get("seq"))
            target = pending_request.kwargs.get("replica") if pending_request is not None else None
            if target is not None:  # an operator's call for one replica (stats(replica=...))
                return [[by_id[target]]] if target in by_id else []
            order = self.policy.rank(_prompt(pending_request), list(by_id))
            return [[by_id[rid]] for rid in order]

        def on_request_routed(self, pending_request, replica_id, result) -> None:
            self.policy.routed(_prompt(pending_request), replica_id.unique_id)

        def on_replica_actor_died(self, replica_id) -> None:
            super().on_replica_actor_died(replica_id)
            self.policy.forget(replica_id.unique_id)

    DecodeRequestRouter.__module__ = __name__
    DecodeRequestRouter.__qualname__ = "DecodeRequestRouter"
    return DecodeRequestRouter


def __getattr__(name: str) -> Any:
    # PEP 562: makes the import path "moeray.actors.decode:DecodeRequestRouter" resolve.
    if name == "DecodeRequestRouter":
        return decode_request_router_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
