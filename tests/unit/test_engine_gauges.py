"""Replica gauges after a client disconnects: scraped over HTTP, they read the replica's current
values and 0 once it is idle (EngineMetrics' publisher), never a stale count."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from moeray.actors.decode import _metered
from moeray.actors.engine_metrics import EngineMetrics
from moeray.platform.config import tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.metrics import Metrics
from moeray.platform.model.transformer import Transformer
from moeray.platform.serve.http.protocol import GenerationParams, GenerationRequest
from moeray.platform.serve.worker import ColocatedWorker
from tests.unit.test_openai_schemas import _free_port, httpx

LABELS = {"deployment": "colocated", "replica": "r0"}


def _scrape(url: str) -> dict[str, float]:
    """The replica's gauges from the Prometheus text format served at `url`."""
    out = {}
    for line in httpx.get(url, timeout=5).text.splitlines():
        if line.startswith("moeray_") and 'replica="r0"' in line:
            name = line.split("{", 1)[0]
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def test_gauges_read_zero_after_clients_disconnect():
    import prometheus_client as pc

    torch.manual_seed(0)
    engine = Engine(
        Transformer(tiny()).eval(),
        EngineConfig(num_pages=64, page_size=16, max_num_batched_tokens=64, use_cuda_graphs=False),
    )
    worker = ColocatedWorker(engine)
    reg = pc.CollectorRegistry()
    metrics = EngineMetrics(
        "colocated",
        worker.loop,
        metrics=Metrics("prometheus", registry=reg, default_labels=LABELS),
        period_s=0.05,
    )
    port = _free_port()
    server, _ = pc.start_http_server(port, addr="127.0.0.1", registry=reg)
    url = f"http://127.0.0.1:{port}/metrics"
    try:

        async def run() -> dict[str, float]:
            gens = []
            for i in range(3):  # three clients, each takes a step and then goes away
                req = GenerationRequest(
                    f"r{i}", tuple(range(1, 40)), GenerationParams(max_tokens=400, temperature=0.0)
                )
                gen = _metered(worker.generate(req), metrics)
                await gen.__anext__()
                gens.append(gen)
            await asyncio.sleep(0.2)
            during = await asyncio.to_thread(_scrape, url)
            for gen in gens:
                await gen.aclose()  # the client disconnects: the engine aborts on its thread
            return during

        during = asyncio.run(run())
        assert during["moeray_running_requests"] == 3
        assert during["moeray_kv_pages_used"] >= 3
        deadline = time.monotonic() + 5
        while True:
            now = _scrape(url)
            if now["moeray_running_requests"] == 0 and now["moeray_kv_pages_used"] == 0:
                break
            assert time.monotonic() < deadline, f"stale gauges after disconnect: {now}"
            time.sleep(0.05)
        assert now["moeray_waiting_requests"] == 0
        assert now["moeray_kv_pages_free"] == 64
    finally:
        metrics.close()
        worker.loop.shutdown()
        server.shutdown()


def test_publish_period_must_be_positive():
    with pytest.raises(ValueError, match="period_s=0"):
        EngineMetrics("decode", object(), metrics=Metrics("prometheus"), period_s=0)
