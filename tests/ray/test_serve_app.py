"""The Serve application end to end on a local Ray: real HTTP, the real openai client.

One Serve start per module (CI time): the P/D app is brought up the way an operator would, with
`moeray serve --write-config F` and the `serve run F` CLI (a subprocess against this test's Ray
cluster); 1 prefill + 2 decode replicas, KV over Ray Direct Transport (gloo). A second, colocated
app under /secure checks the API key. Greedy answers are compared with an in-process engine on the
same directory, lm-eval's log-likelihoods with its transformers backend's; a real Prometheus,
scraping Ray's metrics endpoint from the module's start, holds the module's metrics near its end."""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
yaml = pytest.importorskip("yaml")

from moeray.platform.config import ServeConfig, tiny  # noqa: E402
from moeray.platform.engine.engine import Engine, EngineConfig  # noqa: E402
from moeray.platform.engine.sampler import SamplingParams  # noqa: E402
from moeray.platform.serve.tokenizer import ServeTokenizer  # noqa: E402
from tests import eval_clients as clients  # noqa: E402

API_KEY = "sk-test-" + os.urandom(6).hex()


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def server(ray_local, serve_shutdowns, model_dir, tmp_path_factory):
    from moeray.platform.serve.cli import main as serve_main

    serve_shutdowns.wait()
    port = _free_port()
    f = tmp_path_factory.mktemp("cfg") / "serve.yaml"
    assert (
        serve_main(
            [
                "--model",
                str(model_dir),
                "--model-id",
                "tiny",
                "--decode-replicas",
                "2",
                "--port",
                str(port),
                "--kv-transport",
                "rdt",
                "--cpus-per-replica",
                "0.25",
                "--write-config",
                str(f),
            ]
        )
        == 0
    )
    conf = yaml.safe_load(f.read_text())
    (app,) = conf["applications"]
    assert app["import_path"] == "moeray.platform.serve.app:build"
    assert conf["http_options"]["port"] == port and app["args"]["decode_replicas"] == 2
    # A Serve config file is meant for editing: engine sizes that have no flag.
    app["args"].update(
        num_pages=64,
        page_size=16,
        max_num_batched_tokens=256,
        max_in_flight=6,
        routing_stats_period_s=0.5,
    )
    f.write_text(yaml.safe_dump(conf, sort_keys=False))
    serve_cli = str(Path(sys.executable).with_name("serve"))
    run = subprocess.run(
        [
            serve_cli,
            "run",
            "--non-blocking",
            "--address",
            ray_local.get_runtime_context().gcs_address,
            str(f),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the app from `serve run` never answered"
        time.sleep(0.2)
    cfg = ServeConfig.from_dict(app["args"])
    yield cfg, url
    serve_shutdowns.start()  # serve.shutdown() on a thread, overlapping the next module


@pytest.fixture(scope="module")
def secure(server):
    """A colocated app under /secure whose key comes from $MOERAY_API_KEY."""
    from moeray.platform.serve.app import start

    cfg, url = server
    os.environ["MOERAY_API_KEY"] = API_KEY
    try:
        start(
            cfg.replace(mode="colocated", decode_replicas=1), name="secure", route_prefix="/secure"
        )
    finally:
        del os.environ["MOERAY_API_KEY"]
    return url + "/secure"


def _expected(model_dir, prompt: str, n: int) -> str:
    tok = ServeTokenizer(model_dir)
    engine = Engine.from_pretrained(
        model_dir, EngineConfig(num_pages=64, page_size=16, use_cuda_graphs=False)
    )
    out = engine.generate(
        [tok.encode(prompt)], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=False)
    )
    return tok.decode(out[0].output_token_ids)


def _decode_stats() -> dict[str, dict]:
    """Stats of every decode replica (stats(replica=...) is routed to that replica)."""
    import ray
    from ray import serve

    handle = serve.get_deployment_handle("Decode", app_name="moeray")
    ids = [
        a["name"].rsplit("#", 1)[-1]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "#Decode#" in a["name"] and "moeray" in a["name"]
    ]
    assert len(ids) == 2, ids
    return {rid: handle.stats.remote(replica=rid).result(timeout_s=30) for rid in ids}


def test_completions_through_prefill_and_decode(server, model_dir):
    _cfg, url = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    prompt = "def add(a, b):"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == _expected(model_dir, prompt, 12)
    assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"

    chunks = list(
        client.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text

    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    assert chat.choices[0].message.role == "assistant"
    # one logprob per token of the text: the EOS that ends a "stop" choice is counted, not shown
    eos = chat.choices[0].finish_reason == "stop"
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens - eos
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_lm_eval_through_prefill_and_decode(server, model_dir, tmp_path, monkeypatch):
    """lm-eval's completions backend through the P/D app (echoed prompts scored by the prefill
    replica, generation by the decode replicas) agrees with its transformers backend
    (tests/eval_clients.py; aiperf runs against the colocated app in tests/unit)."""
    pytest.importorskip("lm_eval")
    _cfg, url = server
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    greedy = clients.write_tasks(tasks, model_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    api = clients.evaluate(
        "local-completions",
        clients.api_args(url, "tiny", model_dir),
        clients.TASKS,
        tasks,
        batch_size=3,
    )
    oracle = clients.evaluate("hf", clients.hf_args(model_dir), clients.TASKS, tasks, device="cpu")
    # This model's greedy tokens are mostly past its 400-token tokenizer (vocab 1024): few or
    # no greedy choices; test_eval_clients.py has one per question.
    assert clients.greedy_flags(oracle) == greedy
    clients.assert_same(api, oracle)


def test_kv_moved_over_rdt_and_prefix_affinity_sends_only_missing_pages(server):
    _cfg, url = server
    c = tiny()
    per_token = (c.kv_lora_rank + c.qk_rope_head_dim) * 4 * c.num_hidden_layers
    prompt = list(range(40, 40 + 53))  # 3 full pages of 16 + 5 tokens
    ids = []
    for _ in range(3):
        status, body, _ = _post(
            url + "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 2}
        )
        assert status == 200
        ids.append(body["id"])
        time.sleep(0.6)  # a routing-stats period
    stats = _decode_stats()
    where = {}
    for rid, st in stats.items():
        for t in st["transfers"]:
            for i, req_id in enumerate(ids):
                if t["request_id"].startswith(req_id):
                    where[i] = (rid, t)
    assert sorted(where) == [0, 1, 2]
    # Affinity: the repeats went where the prompt's pages are, and only the uncached rows moved.
    assert len({rid for rid, _ in where.values()}) == 1
    assert all(t["transport"] == "rdt" and not t["recomputed"] for _, t in where.values())
    assert where[0][1]["bytes"] == len(prompt) * per_token
    assert where[1][1]["bytes"] == where[2][1]["bytes"] == (len(prompt) - 48) * per_token


def test_busy_decode_replica_is_avoided(server):
    """Most free KV pages: while a long request holds pages on one replica, the next goes to the
    other."""
    _cfg, url = server
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=60)
    conn.request(
        "POST",
        "/v1/completions",
        headers={"Content-Type": "application/json"},
        body=json.dumps(
            {
                "model": "tiny",
                "prompt": list(range(100, 200)),
                "max_tokens": 600,
                "ignore_eos": True,
                "stream": True,
            }
        ),
    )
    resp = conn.getresponse()
    first = json.loads(resp.readline()[len(b"data: ") :])
    time.sleep(1.2)  # two routing-stats periods: the busy replica's report shows its pages used
    status, body, _ = _post(
        url + "/v1/completions", {"model": "tiny", "prompt": list(range(200, 240)), "max_tokens": 2}
    )
    stats = _decode_stats()
    conn.close()
    assert status == 200

    def owner(req_id):
        return [
            rid
            for rid, st in stats.items()
            if any(t["request_id"].startswith(req_id) for t in st["transfers"])
        ]

    long_on, short_on = owner(first["id"]), owner(body["id"])
    assert len(long_on) == 1 and len(short_on) == 1 and long_on != short_on
    assert stats[long_on[0]]["free_pages"] < stats[short_on[0]]["free_pages"]


def test_bad_requests_get_openai_errors_and_server_keeps_serving(server):
    _cfg, url = server
    status, body, _ = _post(
        url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}
    )
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body, _ = _post(
        url + "/v1/completions", {"model": "tiny", "prompt": "x " * 5000, "max_tokens": 4}
    )
    assert status == 400 and "context" in body["error"]["message"]
    status, body, _ = _post(
        url + "/v1/completions", {"model": "tiny", "prompt": "ok", "max_tokens": 3}
    )
    assert status == 200 and body["usage"]["completion_tokens"] <= 3
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


def test_full_queues_answer_429_with_retry_after_then_serve_again(server):
    cfg, url = server
    port = int(url.rsplit(":", 1)[1])
    n = cfg.max_in_flight + 4
    results: list[tuple[int, str | None]] = [None] * n  # type: ignore[list-item]
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(n)]

    def go(i: int) -> None:
        conns[i].request(
            "POST",
            "/v1/completions",
            headers={"Content-Type": "application/json"},
            body=json.dumps(
                {
                    "model": "tiny",
                    "prompt": [50 + i] * 20,
                    "max_tokens": 500,
                    "ignore_eos": True,
                    "stream": True,
                }
            ),
        )
        r = conns[i].getresponse()
        results[i] = (r.status, r.getheader("Retry-After"))
        if r.status == 200:
            r.readline()  # the first token: the request holds its slot until we hang up

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    for c in conns:
        c.close()  # every client disconnects mid-stream: their requests are cancelled
    statuses = [s for s, _ in results]
    assert statuses.count(200) <= cfg.max_in_flight and 429 in statuses, statuses
    assert all(int(ra) >= 1 for s, ra in results if s == 429)
    deadline = time.monotonic() + 60
    while True:  # slots come back once the disconnects are noticed
        status, _body, _ = _post(
            url + "/v1/completions", {"model": "tiny", "prompt": "ok", "max_tokens": 3}
        )
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200


def test_api_key_from_env_is_required(secure):
    body = {"model": "tiny", "prompt": "def", "max_tokens": 3}
    status, err, _headers = _post(secure + "/v1/completions", body)
    assert status == 401 and err["error"]["message"]
    status, _, _ = _post(secure + "/v1/completions", body, {"Authorization": "Bearer sk-wrong"})
    assert status == 401
    status, ok, _ = _post(secure + "/v1/completions", body, {"Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and ok["usage"]["completion_tokens"] >= 1


def test_disconnect_mid_stream_frees_decode_pages(server):
    cfg, _url = server
    time.sleep(0.5)
    idle = {rid: st["free_pages"] for rid, st in _decode_stats().items()}
    conn = http.client.HTTPConnection(cfg.host, cfg.port, timeout=60)
    conn.request(
        "POST",
        "/v1/completions",
        headers={"Content-Type": "application/json"},
        body=json.dumps(
            {
                "model": "tiny",
                "prompt": "class Point:",
                "max_tokens": 500,
                "stream": True,
                "temperature": 0,
                "ignore_eos": True,
            }
        ),
    )
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(3):
        assert resp.readline().startswith(b"data: ")
        resp.readline()
    assert {rid: st["free_pages"] for rid, st in _decode_stats().items()} != idle
    conn.close()  # the client goes away mid-stream
    for _ in range(100):
        now = {rid: st["free_pages"] for rid, st in _decode_stats().items()}
        if now == idle:
            break
        time.sleep(0.1)
    assert now == idle


@pytest.fixture(scope="module", autouse=True)
def prometheus(ray_local, tmp_path_factory):
    """A real Prometheus scraping the node's metrics export port every second from the module's
    start, so that test_metrics_reach_prometheus_through_rays_endpoint finds it up and scraping
    (its start and first scrapes took ~5 s inside that test); None without the binary. Yields
    (query URL, process)."""
    if shutil.which("prometheus") is None:
        yield None
        return
    (node,) = [n for n in ray_local.nodes() if n["Alive"]]
    target = f"127.0.0.1:{node['MetricsExportPort']}"
    prom_port = _free_port()
    d = tmp_path_factory.mktemp("prometheus")
    (d / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ray\n    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={d / 'prometheus.yml'}",
            f"--storage.tsdb.path={d / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield f"http://127.0.0.1:{prom_port}", proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="`prometheus` binary not installed")
def test_metrics_reach_prometheus_through_rays_endpoint(server, prometheus):
    """TTFT (ingress) and KV transfer bytes/seconds (decode replicas) scraped by a real Prometheus
    from the node's metrics export port."""
    _cfg, _url = server
    prom_url, proc = prometheus

    def query(q: str) -> float | None:
        u = f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        try:
            with urllib.request.urlopen(u, timeout=2) as r:
                res = json.loads(r.read())["data"]["result"]
        except OSError:
            return None
        return sum(float(s["value"][1]) for s in res) if res else None

    want = {
        "ttft": 'sum(ray_moeray_ttft_seconds_count{model="tiny"})',
        "kv_bytes": 'sum(ray_moeray_kv_transfer_bytes_total{transport="rdt"})',
        "kv_seconds": 'sum(ray_moeray_kv_transfer_seconds_count{transport="rdt"})',
        "pages": 'count(ray_moeray_kv_pages_free{deployment="decode"})',
    }
    got: dict[str, float | None] = {}
    deadline = time.monotonic() + 60  # Ray exports every ~10 s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        got = {k: query(q) for k, q in want.items()}
        # Each replica's gauges reach Prometheus on their own export tick: wait for both
        # decode replicas, not only the first series to appear.
        if all(v for v in got.values()) and got["pages"] == 2:
            break
        time.sleep(0.5)
    assert all(got.values()), got
    c = tiny()
    per_token = (c.kv_lora_rank + c.qk_rope_head_dim) * 4 * c.num_hidden_layers
    # Earlier tests in this module sent many requests; every transfer moves whole token rows.
    assert got["ttft"] >= 5 and got["pages"] == 2
    assert got["kv_bytes"] >= per_token and got["kv_bytes"] % per_token == 0


def _decode_replica_actors() -> dict[str, tuple[str, str]]:
    """Replica id -> (actor name, namespace) of every live Decode replica of the P/D app."""
    import ray

    return {
        a["name"].rsplit("#", 1)[-1]: (a["name"], a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "#Decode#" in a["name"] and "moeray" in a["name"]
    }


def test_killed_decode_replica_is_replaced_and_new_requests_succeed(server, model_dir):
    """Last in the module: it kills a decode replica while a request streams from it."""
    import ray

    _cfg, url = server
    before = _decode_replica_actors()
    assert len(before) == 2, before
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
    conn.request(
        "POST",
        "/v1/completions",
        headers={"Content-Type": "application/json"},
        body=json.dumps(
            {
                "model": "tiny",
                "prompt": "import os",
                "max_tokens": 400,
                "ignore_eos": True,
                "stream": True,
            }
        ),
    )
    resp = conn.getresponse()
    assert resp.status == 200
    first = json.loads(resp.readline()[len(b"data: ") :])
    owner = [
        rid
        for rid, st in _decode_stats().items()
        if any(t["request_id"].startswith(first["id"]) for t in st["transfers"])
    ]
    assert len(owner) == 1, owner
    name, namespace = before[owner[0]]
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    # The in-flight stream ends (cut off or with an error event); it must not hang the client.
    t0 = time.monotonic()
    try:
        while resp.readline():
            assert time.monotonic() - t0 < 90, "the stream of the killed replica never ended"
    except (http.client.HTTPException, OSError):
        pass
    conn.close()
    deadline = time.monotonic() + 180
    while True:  # Serve's controller notices the dead replica and starts another
        now = _decode_replica_actors()
        if len(now) == 2 and owner[0] not in now:
            break
        assert time.monotonic() < deadline, f"the killed replica {owner[0]} was not replaced: {now}"
        time.sleep(0.25)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    prompt = "def add(a, b):"
    want = _expected(model_dir, prompt, 8)
    deadline = time.monotonic() + 120
    for i in range(4):  # new requests, spread over both replicas (the new one included)
        while True:
            try:
                r = client.completions.create(
                    model="tiny", prompt=prompt, max_tokens=8, temperature=0
                )
                break
            except (
                openai.APIStatusError
            ) as e:  # the new replica may still be starting: 5xx/429, retried
                assert e.status_code >= 429 and time.monotonic() < deadline, (
                    i,
                    e.status_code,
                    str(e),
                )
                time.sleep(0.25)
        assert r.choices[0].text == want
    stats = _decode_stats()  # both replicas answer, the new one included
    assert len(stats) == 2 and owner[0] not in stats
