"""Replica gauges after clients disconnect (the openai client over real HTTP, a real engine behind
the app): scraped over HTTP, they read the replica's current values and 0 once it is idle
(EngineMetrics' publisher), never a stale count."""

from __future__ import annotations

import time

import pytest
import torch

from moeray.actors.decode import _metered
from moeray.actors.engine_metrics import EngineMetrics
from moeray.platform.config import tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.metrics import Metrics
from moeray.platform.model.transformer import Transformer
from moeray.platform.serve.http.app import build_app
from moeray.platform.serve.http.server import OpenAIServerConfig
from moeray.platform.serve.worker import ColocatedWorker
from tests.unit.test_openai_schemas import ByteTokenizer, _client, _free_port, httpx, serve_app

LABELS = {"deployment": "colocated", "replica": "r0"}


def _scrape(url: str) -> dict[str, float]:
    """The replica's gauges from the Prometheus text format served at `url`."""
    out = {}
    for line in httpx.get(url, timeout=5).text.splitlines():
        if line.startswith("moeray_") and 'replica="r0"' in line:
            name = line.split("{", 1)[0]
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


class MeteredBackend:
    """The Serve path without Ray: the ingress' backend streams a colocated replica's steps
    through `_metered`, as ColocatedServer.generate does."""

    def __init__(self, worker: ColocatedWorker, metrics: EngineMetrics) -> None:
        self.worker, self.metrics = worker, metrics

    def generate(self, request):
        return _metered(self.worker.generate(request), self.metrics)


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
    app = build_app(
        MeteredBackend(worker, metrics),
        ByteTokenizer(),
        OpenAIServerConfig(model_id="tiny", max_context=512),
    )
    port = _free_port()
    server, _ = pc.start_http_server(port, addr="127.0.0.1", registry=reg)
    scrape_url = f"http://127.0.0.1:{port}/metrics"
    try:
        with serve_app(app) as url:
            client = _client(url)
            streams = []
            for i in range(3):  # three clients, each reads a chunk and then goes away
                stream = client.completions.create(
                    model="tiny",
                    prompt=f"client {i} " * 4,
                    max_tokens=400,
                    temperature=0.0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                next(iter(stream))
                streams.append(stream)
            during = _scrape(scrape_url)
            for stream in streams:
                stream.close()  # the client disconnects; the engine aborts on its thread
            deadline = time.monotonic() + 5
            while True:
                now = _scrape(scrape_url)
                if now["moeray_running_requests"] == 0 and now["moeray_kv_pages_used"] == 0:
                    break
                assert time.monotonic() < deadline, f"stale gauges after disconnect: {now}"
                time.sleep(0.05)
        assert during["moeray_running_requests"] == 3
        assert during["moeray_kv_pages_used"] >= 3
        assert now["moeray_waiting_requests"] == 0
        assert now["moeray_kv_pages_free"] == 64
    finally:
        metrics.close()
        worker.loop.shutdown()
        server.shutdown()


def test_publish_period_must_be_positive():
    with pytest.raises(ValueError, match="period_s=0"):
        EngineMetrics("decode", object(), metrics=Metrics("prometheus"), period_s=0)
