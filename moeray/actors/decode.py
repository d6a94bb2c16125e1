"""Serve deployment shells around `DecodeWorker` (P/D) and `ColocatedWorker`."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from moeray.actors.engine_metrics import EngineMetrics
from moeray.platform.config import ServeConfig
from moeray.platform.serve.openai import EngineRequest, GenerationStep
from moeray.platform.serve.worker import ColocatedWorker, DecodeWorker, TransferRecord, make_engine


class DecodeServer:
    def __init__(self, config: dict[str, Any], prefill: Any) -> None:
        cfg = ServeConfig.from_dict(config)
        self.transport = cfg.kv_transport
        self.prefill = prefill  # DeploymentHandle of the prefill deployment

        async def fetch(req: EngineRequest, export_from: int):
            return await self.prefill.prefill.remote(req, export_from)

        self.worker = DecodeWorker(make_engine(cfg), fetch, on_transfer=self._on_transfer,
                                   max_waiting=cfg.max_waiting)
        self.metrics = EngineMetrics("decode", self.worker.loop)

    def _on_transfer(self, rec: TransferRecord) -> None:
        self.metrics.transfer(rec.bytes, rec.seconds, recomputed=rec.recomputed, transport=self.transport)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[GenerationStep, None]:
        try:
            async with aclosing(self.worker.generate(request)) as steps:
                async for step in steps:
                    yield step
                    self.metrics.update()
        finally:
            self.metrics.update()

    def stats(self) -> dict[str, Any]:
        return {"free_pages": self.worker.free_pages(),
                "transfers": [vars(t) for t in self.worker.transfers[-100:]],
                "engine": self.worker.loop.engine.metrics()}


class ColocatedServer:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = ServeConfig.from_dict(config)
        self.worker = ColocatedWorker(make_engine(cfg), max_waiting=cfg.max_waiting)
        self.metrics = EngineMetrics("colocated", self.worker.loop)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[GenerationStep, None]:
        try:
            async with aclosing(self.worker.generate(request)) as steps:
                async for step in steps:
                    yield step
                    self.metrics.update()
        finally:
            self.metrics.update()

    def stats(self) -> dict[str, Any]:
        return {"free_pages": self.worker.loop.free_pages(), "engine": self.worker.loop.engine.metrics()}
