"""Serve deployment shell around `PrefillWorker` (the wiring is in `platform/serve/app.py`).

Routing to prefill replicas is Serve's default power-of-two-choices router: it samples two
replicas, probes their number of ongoing requests (for this deployment: prefills queued or
running) and sends to the shorter queue, so with one or two replicas it is exactly "shortest
queue"; with more it is the power-of-two approximation of it.

The KV sender's relay actors (rdt) are owned by this replica's process, so Ray removes them with it.
"""

from __future__ import annotations

from typing import Any

from moeray.actors.engine_metrics import EngineMetrics
from moeray.platform.config import ServeConfig
from moeray.platform.serve.http.protocol import GenerationRequest
from moeray.platform.serve.kv_transport.factory import make_sender
from moeray.platform.serve.worker import PrefillResult, PrefillWorker, freeze_gc, make_engine


class PrefillServer:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = ServeConfig.from_dict(config)
        engine = make_engine(cfg, decodes=False)
        self.worker = PrefillWorker(
            engine,
            max_waiting=cfg.max_waiting,
            sender=make_sender(
                cfg.kv_transport, engine.device, timeout_s=cfg.kv_transfer_timeout_s
            ),
        )
        self.metrics = EngineMetrics("prefill", self.worker.loop)
        freeze_gc()

    async def prefill(
        self, request: GenerationRequest, export_from: int, dest: Any = None
    ) -> PrefillResult:
        try:
            return await self.worker.prefill(request, export_from, dest)
        finally:
            self.metrics.update()

    def queue_length(self) -> int:
        return self.worker.queue_length()
