"""metrics.py: the definitions, the recording helper, and a real Prometheus scraping them."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import replace

import pytest

from moeray.platform import metrics as M


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_registry_has_every_metric_the_issue_names():
    names = {d.name: d for d in M.METRICS}
    M.check_registry()
    required = {
        "moeray_ttft_seconds": "histogram",
        "moeray_tpot_seconds": "histogram",
        "moeray_inter_token_latency_seconds": "histogram",
        "moeray_e2e_latency_seconds": "histogram",
        "moeray_running_requests": "gauge",
        "moeray_waiting_requests": "gauge",
        "moeray_kv_pages_used": "gauge",
        "moeray_kv_pages_free": "gauge",
        "moeray_kv_transfer_bytes": "counter",
        "moeray_kv_transfer_seconds": "histogram",
        "moeray_mtp_draft_tokens": "counter",
        "moeray_mtp_accepted_tokens": "counter",
        "moeray_mtp_draft_tokens_per_position": "counter",
        "moeray_mtp_accepted_tokens_per_position": "counter",
        "moeray_prompt_tokens": "counter",
        "moeray_generation_tokens": "counter",
        "moeray_expert_load": "gauge",
        "moeray_router_maxvio": "gauge",
        "moeray_train_loss": "gauge",
        "moeray_train_mtp_loss": "gauge",
        "moeray_train_tokens_per_s": "gauge",
        "moeray_train_maxvio": "gauge",
        "moeray_train_learning_rate": "gauge",
    }
    for name, kind in required.items():
        assert names[name].kind == kind, name
    assert names["moeray_expert_load"].labels == ("gang", "layer", "expert")
    assert names["moeray_router_maxvio"].labels == ("gang", "layer")
    assert names["moeray_mtp_accepted_tokens_per_position"].labels == ("deployment", "position")
    assert names["moeray_running_requests"].labels[0] == "deployment"
    assert len(names) == len(M.METRICS)
    assert M.metric("moeray_ttft_seconds") is M.TTFT
    with pytest.raises(ValueError, match="unknown metric"):
        M.metric("moeray_nope")


def test_exported_names_follow_ray_and_prometheus_conventions():
    # Checked against a real Ray 2.58 node's metrics endpoint: Ray adds `ray_`, and its
    # OpenTelemetry Prometheus exporter adds `_total` to counters.
    assert M.PROMPT_TOKENS.exported_name("ray") == "ray_moeray_prompt_tokens_total"
    assert M.PROMPT_TOKENS.exported_name("prometheus") == "moeray_prompt_tokens_total"
    assert M.EXPERT_LOAD.exported_name("ray") == "ray_moeray_expert_load"
    assert M.TTFT.series("ray") == (
        "ray_moeray_ttft_seconds_bucket",
        "ray_moeray_ttft_seconds_sum",
        "ray_moeray_ttft_seconds_count",
    )
    with pytest.raises(ValueError, match="runtime"):
        M.TTFT.exported_name("statsd")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"name": "ttft_seconds"}, "prefix moeray_"),
        ({"name": "moeray_TTFT"}, "must match"),
        ({"kind": "summary"}, "kind"),
        ({"help": "  "}, "help"),
        ({"labels": ("model", "model")}, "unique"),
        ({"labels": ("le",)}, "label 'le'"),
        ({"labels": ("Model",)}, "label 'Model'"),
        ({"buckets": ()}, "buckets"),
        ({"buckets": (0.1, 0.1, 0.2)}, "strictly"),
        ({"buckets": (0.0, 0.1)}, "positive"),
        ({"buckets": (0.1, float("inf"))}, "finite"),
    ],
)
def test_bad_histogram_definitions_are_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        replace(M.TTFT, **change)


def test_bad_counter_and_gauge_definitions_are_rejected():
    with pytest.raises(ValueError, match="_total"):
        replace(M.PROMPT_TOKENS, name="moeray_prompt_tokens_total")
    with pytest.raises(ValueError, match="only for histograms"):
        replace(M.RUNNING, buckets=(1.0, 2.0))
    with pytest.raises(ValueError, match="more than one metric"):
        M.check_registry((*M.METRICS, replace(M.TTFT, help="again")))
    with pytest.raises(ValueError, match="group"):
        M.check_registry((replace(M.TTFT, group="misc"),))


def test_prometheus_runtime_records_exact_values():
    import prometheus_client as pc

    rng = random.Random(7)
    reg = pc.CollectorRegistry()
    m = M.Metrics("prometheus", registry=reg, default_labels={"model": "tiny", "gang": "train"})
    ttfts = [rng.uniform(0.001, 70.0) for _ in range(200)]
    for t in ttfts:
        m.observe("moeray_ttft_seconds", t)
    counts = [rng.randint(0, 500) for _ in range(50)]
    for c in counts:
        m.inc("moeray_prompt_tokens", c)
    loads = {(layer, e): rng.randint(0, 1000) for layer in (3, 4) for e in range(8)}
    for (layer, e), v in loads.items():
        m.set("moeray_expert_load", v, layer=str(layer), expert=str(e))
    m.set("moeray_expert_load", 17, layer="4", expert="5")  # a gauge keeps the last value
    loads[(4, 5)] = 17

    g = reg.get_sample_value
    assert g("moeray_ttft_seconds_count", {"model": "tiny"}) == len(ttfts)
    assert g("moeray_ttft_seconds_sum", {"model": "tiny"}) == pytest.approx(sum(ttfts))
    for le in M.TTFT_BUCKETS:
        want = sum(t <= le for t in ttfts)
        assert g("moeray_ttft_seconds_bucket", {"model": "tiny", "le": str(le)}) == want
    assert g("moeray_prompt_tokens_total", {"model": "tiny"}) == sum(counts)
    for (layer, e), v in loads.items():
        want = {"gang": "train", "layer": str(layer), "expert": str(e)}
        assert g("moeray_expert_load", want) == v


def test_metrics_rejects_wrong_labels_kinds_and_values():
    import prometheus_client as pc

    m = M.Metrics("prometheus", registry=pc.CollectorRegistry())
    with pytest.raises(ValueError, match="takes labels"):
        m.observe("moeray_ttft_seconds", 0.1)  # model missing
    with pytest.raises(ValueError, match="takes labels"):
        m.set("moeray_router_maxvio", 0.1, gang="train", layer="3", expert="1")
    with pytest.raises(ValueError, match="is a histogram, not a counter"):
        m.inc("moeray_ttft_seconds", 1, model="x")
    with pytest.raises(ValueError, match="not in this"):
        m.inc("moeray_unknown", 1)
    with pytest.raises(ValueError, match=">= 0"):
        m.inc("moeray_prompt_tokens", -1, model="x")
    with pytest.raises(ValueError, match="finite"):
        m.observe("moeray_ttft_seconds", float("nan"), model="x")
    with pytest.raises(ValueError, match="runtime"):
        M.Metrics("statsd")
    with pytest.raises(ValueError, match="registry"):
        M.Metrics("ray", registry=pc.CollectorRegistry())


def test_import_creates_no_backend_objects():
    import prometheus_client as pc

    reg = pc.CollectorRegistry()
    m = M.Metrics("prometheus", registry=reg)
    assert not [s for fam in reg.collect() for s in fam.samples]
    m.create_all()
    names = {fam.name for fam in reg.collect()}
    # prometheus_client names counter families without `_total`.
    assert names == {d.name for d in M.METRICS}


@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="`prometheus` binary not installed (`make test` installs the Debian package)",
)
def test_real_prometheus_scrapes_our_metrics(tmp_path):
    import prometheus_client as pc

    reg = pc.CollectorRegistry()
    m = M.Metrics("prometheus", registry=reg, default_labels={"model": "tiny", "gang": "train"})
    m.create_all()
    n_tokens = random.Random(3).randint(10, 10_000)
    m.inc("moeray_generation_tokens", n_tokens)
    m.observe("moeray_ttft_seconds", 0.3)
    m.observe("moeray_ttft_seconds", 3.0)
    target_port = _free_port()
    server, thread = pc.start_http_server(target_port, addr="127.0.0.1", registry=reg)
    prom_port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: moeray\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def query(q: str) -> list:
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        with urllib.request.urlopen(url, timeout=2) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    try:
        deadline = time.monotonic() + 40
        result: list = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                result = query(M.GENERATION_TOKENS.exported_name("prometheus"))
            except OSError:
                result = []
            if result:
                break
            time.sleep(0.5)
        assert result, "Prometheus never scraped the endpoint"
        (sample,) = result
        assert sample["metric"]["job"] == "moeray" and sample["metric"]["model"] == "tiny"
        assert float(sample["value"][1]) == n_tokens
        # The histogram's buckets arrive too: one of two observations is <= 0.5 s.
        (b,) = query('moeray_ttft_seconds_bucket{le="0.5"}')
        (c,) = query("moeray_ttft_seconds_count")
        assert (float(b["value"][1]), float(c["value"][1])) == (1.0, 2.0)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        server.shutdown()
        thread.join(timeout=5)
