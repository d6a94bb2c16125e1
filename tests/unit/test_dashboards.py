"""Dashboards generated from metrics.py: coverage, committed files up to date, every PromQL
expression evaluated by a real Prometheus, and `push` through grafana-client."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from moeray.platform import dashboards as D
from moeray.platform.metrics import METRICS, Metrics

REPO = Path(__file__).resolve().parents[2]
SERIES_RE = re.compile(r"\b(?:ray_)?moeray_[a-z0-9_]+")


def _exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_metric_has_a_panel_and_every_query_names_a_real_series():
    dashes = D.all_dashboards()
    exprs = [e for d in dashes.values() for e in _exprs(d)]
    known = {s for d in METRICS for rt in ("ray", "prometheus") for s in d.series(rt)}
    used = {m for e in exprs for m in SERIES_RE.findall(e)}
    assert used <= known, used - known
    for d in METRICS:
        assert any(s in used for s in d.series("ray")), f"{d.name} has no panel"
        if d.group == "training":  # queried under both exported names
            assert d.exported_name("prometheus") in used
    for uid, dash in dashes.items():
        assert dash["uid"] == uid
        panels = dash["panels"]
        assert len({p["id"] for p in panels}) == len(panels)
        cells = set()
        for p in panels:
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24
            for cx in range(g["x"], g["x"] + g["w"]):
                for cy in range(g["y"], g["y"] + g["h"]):
                    assert (cx, cy) not in cells, f"{uid}: panel {p['title']} overlaps"
                    cells.add((cx, cy))
            refs = [t["refId"] for t in p.get("targets", [])]
            assert len(set(refs)) == len(refs)


def test_committed_dashboards_are_up_to_date(capsys):
    assert D.generate(REPO / "dashboards", check=True) == [], (
        "dashboards/ is stale: run `moeray dashboards generate`"
    )
    assert D.main(["generate", "--check", "--out", str(REPO / "dashboards")]) == 0


def test_generate_writes_and_check_detects_drift(tmp_path):
    assert sorted(D.generate(tmp_path)) == sorted(D.rendered_files())
    assert D.generate(tmp_path, check=True) == []
    (tmp_path / "moeray-router.json").write_text("{}")
    assert D.main(["generate", "--check", "--out", str(tmp_path)]) == 1
    assert D.generate(tmp_path) == ["moeray-router.json"]
    dash = json.loads((tmp_path / "moeray-serving.json").read_text())
    assert dash == json.loads(json.dumps(D.build_dashboard("moeray-serving")))
    assert (
        "url: http://prometheus:9090"
        in (tmp_path / "provisioning/datasources/moeray.yaml").read_text()
    )


@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="`prometheus` binary not installed (`make test` installs the Debian package)",
)
def test_real_prometheus_evaluates_every_panel_query(tmp_path):
    """Metrics exported by prometheus_client, renamed to Ray's `ray_` names by Prometheus
    relabeling; every panel expression must parse, and the TTFT and KV panels must show the
    values we record."""
    import prometheus_client as pc

    reg = pc.CollectorRegistry()
    m = Metrics("prometheus", registry=reg, default_labels={"model": "tiny"})
    m.create_all()
    m.set("moeray_kv_pages_used", 30, deployment="decode", replica="0")
    m.set("moeray_kv_pages_free", 90, deployment="decode", replica="0")
    m.set("moeray_kv_pages_used", 10, deployment="decode", replica="1")
    m.set("moeray_kv_pages_free", 70, deployment="decode", replica="1")
    m.set("moeray_train_loss", 2.75)
    stop = threading.Event()

    def record() -> None:  # a steady stream of 0.3 s TTFTs, so rate() has increases to see
        while not stop.is_set():
            m.observe("moeray_ttft_seconds", 0.3)
            m.inc("moeray_requests", 1, endpoint="chat", status="200")
            stop.wait(0.05)

    recorder = threading.Thread(target=record, daemon=True)
    recorder.start()
    server, thread = pc.start_http_server(_free_port(), addr="127.0.0.1", registry=reg)
    target = f"127.0.0.1:{server.server_port}"
    prom_port = _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: moeray\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
        "    metric_relabel_configs:\n"
        "      - source_labels: [__name__]\n        regex: '(moeray_.*)'\n"
        "        target_label: __name__\n        replacement: 'ray_$1'\n"
    )
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def query(expr: str) -> dict:
        expr = (
            expr.replace("$__rate_interval", "5s").replace("$model", ".*").replace("$layer", ".*")
        )
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400 bad_data: a PromQL syntax error
            return json.loads(e.read())

    ttft_p50 = next(
        e
        for e in _exprs(D.build_dashboard("moeray-serving"))
        if e.startswith("histogram_quantile(0.5,") and "ttft" in e
    )
    try:
        deadline = time.monotonic() + 40
        values: list = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                values = query(ttft_p50).get("data", {}).get("result", [])
            except OSError:
                values = []
            if values and values[0]["value"][1] not in ("NaN",):
                break
            time.sleep(0.5)
        assert values, "the TTFT panel never showed data"
        # 0.3 s lies in the (0.25, 0.5] bucket; histogram_quantile interpolates inside it
        assert 0.25 < float(values[0]["value"][1]) <= 0.5
        for dash in D.all_dashboards().values():
            for expr in _exprs(dash):
                body = query(expr)
                assert body["status"] == "success", (expr, body.get("error"))
            for var in dash["templating"]["list"][1:]:  # label_values(...) uses the same series
                series = re.match(r"label_values\((\w+), (\w+)\)", var["definition"]).group(1)
                assert query(f"count({series})")["status"] == "success"
        util = next(e for e in _exprs(D.build_dashboard("moeray-serving")) if "/ (sum" in e)
        (res,) = query(util)["data"]["result"]
        assert float(res["value"][1]) == pytest.approx(40 / 200)  # (30 + 10) / (30+90+10+70)
        loss = next(e for e in _exprs(D.build_dashboard("moeray-training")) if "train_loss" in e)
        assert float(query(loss)["data"]["result"][0]["value"][1]) == 2.75
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        server.shutdown()
        thread.join(timeout=5)
        recorder.join(timeout=5)


class _GrafanaAPI(BaseHTTPRequestHandler):
    """The two Grafana HTTP API endpoints `push` uses (GET/POST /api/folders,
    POST /api/dashboards/db), recording what it receives. No Grafana server is available here."""

    folders: ClassVar[dict[str, dict]] = {}
    dashboards: ClassVar[list[dict]] = []
    auth: ClassVar[list[str]] = []

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.auth.append(self.headers.get("Authorization", ""))
        uid = self.path.removeprefix("/api/folders/")
        if self.path.startswith("/api/folders/") and uid in self.folders:
            self._reply(200, self.folders[uid])
        else:
            self._reply(404, {"message": "folder not found"})

    def do_POST(self) -> None:
        self.auth.append(self.headers.get("Authorization", ""))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/folders":
            self.folders[body["uid"]] = {"uid": body["uid"], "title": body["title"]}
            self._reply(200, self.folders[body["uid"]])
        elif self.path == "/api/dashboards/db":
            self.dashboards.append(body)
            self._reply(200, {"status": "success", "uid": body["dashboard"]["uid"]})
        else:
            self._reply(404, {"message": "not found"})

    def log_message(self, *args) -> None:
        pass


def test_push_uses_the_grafana_http_api():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _GrafanaAPI)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{srv.server_port}"
    try:
        assert D.main(["push", "--url", url, "--api-key", "glsa_test"]) == 0
        assert set(_GrafanaAPI.folders) == {"moeray"}
        posted = _GrafanaAPI.dashboards
        assert [p["dashboard"]["uid"] for p in posted] == list(D.DASHBOARDS)
        assert all(
            p["overwrite"] and p["folderUid"] == "moeray" and p["dashboard"]["id"] is None
            for p in posted
        )
        assert posted[0]["dashboard"]["panels"] == D.build_dashboard("moeray-serving")["panels"]
        assert set(_GrafanaAPI.auth) == {"Bearer glsa_test"}
        assert D.push(url, "glsa_test") == list(D.DASHBOARDS)  # folder exists now: no re-create
        assert len(_GrafanaAPI.dashboards) == 2 * len(D.DASHBOARDS)
    finally:
        srv.shutdown()
        t.join(timeout=5)
