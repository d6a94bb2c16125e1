"""Serve deployment shell around `PrefillWorker` (the wiring is in `platform/serve/app.py`)."""

from __future__ import annotations

from typing import Any

from moeray.actors.engine_metrics import EngineMetrics
from moeray.platform.config import ServeConfig
from moeray.platform.serve.openai import EngineRequest
from moeray.platform.serve.worker import PrefillResult, PrefillWorker, make_engine


class PrefillServer:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = ServeConfig.from_dict(config)
        self.worker = PrefillWorker(make_engine(cfg), max_waiting=cfg.max_waiting)
        self.metrics = EngineMetrics("prefill", self.worker.loop)

    async def prefill(self, request: EngineRequest, export_from: int) -> PrefillResult:
        try:
            return await self.worker.prefill(request, export_from)
        finally:
            self.metrics.update()

    def queue_length(self) -> int:
        return self.worker.queue_length()
