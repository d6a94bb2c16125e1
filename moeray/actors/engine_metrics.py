"""Replica-level serving metrics (definitions in `platform/metrics.py`), recorded through Ray.

The gauges (running and waiting requests, KV pages) are published by a background thread every
`period_s`, not only when a request streams a step: when a client goes away, the engine thread
aborts its request after the last step was metered, so a gauge set only then would keep its stale
non-zero value, and Ray's exporter drops a series nothing sets for a while instead of showing 0.
Set every second, an idle replica reads 0 within a second.
"""

from __future__ import annotations

import threading
from typing import Any

from moeray.platform.metrics import Metrics

PUBLISH_PERIOD_S = 1.0  # Ray's metrics agent exports every 10 s by default; 1 s keeps scrapes fresh


def replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return "local"


class EngineMetrics:
    """`loop` is the replica's EngineLoop (num_running, num_waiting, engine.kv.pool); `metrics`
    defaults to Ray's runtime with this replica's labels."""

    def __init__(
        self,
        deployment: str,
        loop: Any,
        *,
        metrics: Metrics | None = None,
        period_s: float = PUBLISH_PERIOD_S,
    ) -> None:
        if not period_s > 0:
            raise ValueError(f"period_s={period_s} must be > 0")
        self.loop = loop
        self.deployment = deployment
        self.m = metrics or Metrics(
            "ray", default_labels={"deployment": deployment, "replica": replica_id()}
        )
        self._mtp_seen = (0, 0)
        self._mtp_seen_by_position: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()  # update() runs on the request path and the publisher
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._publish, args=(period_s,), name=f"moeray-{deployment}-metrics", daemon=True
        )
        self._thread.start()

    def _publish(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            self.update()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def update(self) -> None:
        """Set the gauges to the replica's current values (0 when idle), count new MTP drafts."""
        with self._lock:
            engine = self.loop.engine
            self.m.set("moeray_running_requests", self.loop.num_running())
            self.m.set("moeray_waiting_requests", self.loop.num_waiting())
            free = engine.kv.pool.num_available
            self.m.set("moeray_kv_pages_free", free)
            self.m.set("moeray_kv_pages_used", engine.kv.num_pages - free)
            drafter = getattr(engine, "drafter", None)
            if drafter is not None:
                self._count_mtp(drafter.stats)

    def _count_mtp(self, stats) -> None:
        """Add the drafts verified since the last update to the MTP counters (the totals and by
        draft position)."""
        drafted, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
        d0, a0 = self._mtp_seen
        if drafted <= d0:
            return
        self.m.inc("moeray_mtp_draft_tokens", drafted - d0)
        self.m.inc("moeray_mtp_accepted_tokens", accepted - a0)
        self._mtp_seen = (drafted, accepted)
        by_position = zip(stats.drafted_per_position, stats.accepted_per_position, strict=True)
        for j, (dj, aj) in enumerate(by_position):
            dj0, aj0 = self._mtp_seen_by_position.get(j, (0, 0))
            self.m.inc("moeray_mtp_draft_tokens_per_position", dj - dj0, position=str(j))
            self.m.inc("moeray_mtp_accepted_tokens_per_position", aj - aj0, position=str(j))
            self._mtp_seen_by_position[j] = (dj, aj)

    def transfer(self, nbytes: int, seconds: float, *, recomputed: bool, transport: str) -> None:
        if not recomputed:
            self.m.inc("moeray_kv_transfer_bytes", nbytes, transport=transport)
            self.m.observe("moeray_kv_transfer_seconds", seconds, transport=transport)
