"""Replica-level serving metrics (definitions in `platform/metrics.py`), recorded through Ray."""

from __future__ import annotations

from typing import Any

from moeray.platform.metrics import Metrics


def replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return "local"


class EngineMetrics:
    def __init__(self, deployment: str, loop: Any) -> None:
        self.loop = loop
        self.deployment = deployment
        self.m = Metrics("ray", default_labels={"deployment": deployment, "replica": replica_id()})
        self._mtp_seen = (0, 0)

    def update(self) -> None:
        engine = self.loop.engine
        self.m.set("moeray_running_requests", self.loop.num_running())
        self.m.set("moeray_waiting_requests", self.loop.num_waiting())
        free = engine.kv.pool.num_available
        self.m.set("moeray_kv_pages_free", free)
        self.m.set("moeray_kv_pages_used", engine.kv.num_pages - free)
        drafter = getattr(engine, "drafter", None)
        if drafter is not None:
            stats = drafter.stats.as_dict()
            drafted, accepted = int(stats["draft_tokens"]), int(stats["accepted_tokens"])
            d0, a0 = self._mtp_seen
            if drafted > d0:
                self.m.inc("moeray_mtp_draft_tokens", drafted - d0)
                self.m.inc("moeray_mtp_accepted_tokens", accepted - a0)
                self._mtp_seen = (drafted, accepted)

    def transfer(self, nbytes: int, seconds: float, *, recomputed: bool, transport: str) -> None:
        if not recomputed:
            self.m.inc("moeray_kv_transfer_bytes", nbytes, transport=transport)
            self.m.observe("moeray_kv_transfer_seconds", seconds, transport=transport)
