"""`serve deploy` of the written Serve config, and a full decode queue answering 429, on a Ray
cluster of this module's own.

`serve deploy` talks to the Ray dashboard's REST API, which the session-wide `ray_local` fixture
does not start; so this module starts its own head with the dashboard (`ray start --head --block`
in a new session, private ports and --temp-dir) and never calls ray.init: the test process only
runs CLIs and speaks HTTP, so modules using `ray_local` before or after it are unaffected. The
cluster is stopped by signalling its session's processes, never with `ray stop` (that stops every
local cluster, other tests' too).

The app runs 1 prefill + 1 decode replica with max_num_seqs=1 and max_waiting=1, so one long
request fills the decode batch and a second fills its waiting queue; one cluster start (~20 s on
2 shared cores) and one deploy (~20 s) serve both tests."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from moeray.platform.engine.engine import Engine, EngineConfig  # noqa: E402
from moeray.platform.engine.sampler import SamplingParams  # noqa: E402
from moeray.platform.serve.tokenizer import ServeTokenizer  # noqa: E402

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def _post(url: str, body: dict) -> tuple[int, dict, dict]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def _session_pids(sid: int) -> list[int]:
    """Processes of session `sid`: the head started with start_new_session, and everything Ray
    spawned under it (workers set their own process group but stay in the session)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                # /proc/PID/stat after the command name: state, ppid, pgrp, session. Zombies are
                # already dead (the head's is reaped by Popen).
                state, _, _, session = (p / "stat").read_text().rsplit(")", 1)[1].split()[:4]
                if int(session) == sid and state != "Z":
                    pids.append(int(p.name))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def _stop_session(head: subprocess.Popen) -> None:
    # `ray start --block` shuts its node down on SIGTERM, but takes >15 s here with Serve up; the
    # rest of its session is killed after a short grace (its temp dir is deleted anyway).
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while (left := _session_pids(head.pid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    if head.poll() is None:
        head.wait(timeout=5)


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray with the dashboard, in subprocesses; yields the dashboard URL."""
    if not (BIN / "ray").exists() or not (BIN / "serve").exists():
        pytest.skip(f"the `ray`/`serve` CLIs are not in {BIN}")
    # Short temp dir: Ray's unix sockets live under it (108-byte path limit).
    tmp = tempfile.mkdtemp(prefix="mrd", dir="/tmp")
    dash_port = _free_port()
    # Every port explicit: the defaults (client server 10001, agent 52365) would collide with
    # another local cluster. OS-picked free ports lie outside Ray's worker range 10002-19999.
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus",
        "2",
        "--temp-dir",
        tmp,
        "--port",
        str(_free_port()),
        "--include-dashboard=true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash_port),
        "--ray-client-server-port",
        str(_free_port()),
        "--dashboard-agent-listen-port",
        str(_free_port()),
        "--disable-usage-stats",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"OMP_NUM_THREADS": "1"}
    log = open(Path(tmp) / "head.log", "w+")
    head = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.monotonic() + 60  # ~20 s here
        while _get_json(url + "/api/version") is None:
            if head.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.skip(
                    f"the Ray dashboard did not start on this machine: {log.read()[-1500:]}"
                )
            time.sleep(0.2)
        yield url, env, Path(tmp)
    finally:
        _stop_session(head)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def deployed(cluster, model_dir):
    """`moeray serve --write-config F`, edit F's args, `serve deploy F`; yields (args, API URL)."""
    from moeray.platform.serve.cli import main as serve_main

    dash, env, tmp = cluster
    port = _free_port()
    f = tmp / "serve.yaml"
    assert (
        serve_main(
            [
                "--model",
                str(model_dir),
                "--model-id",
                "tiny",
                "--port",
                str(port),
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
    app["args"].update(
        max_num_seqs=1,
        max_waiting=1,
        max_in_flight=64,
        num_pages=64,
        page_size=16,
        max_num_batched_tokens=256,
    )
    f.write_text(yaml.safe_dump(conf, sort_keys=False))
    # /api/version answers before the dashboard's Serve module (a subprocess of its own) does.
    deadline = time.monotonic() + 60
    while _get_json(dash + "/api/serve/applications/") is None:
        assert time.monotonic() < deadline, "the dashboard's Serve REST API never answered"
        time.sleep(0.2)
    run = subprocess.run(
        [str(BIN / "serve"), "deploy", str(f), "--address", dash],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    deadline = time.monotonic() + 120  # ~20 s here: build the app, start 3 replicas, load the model
    while True:
        apps = (_get_json(dash + "/api/serve/applications/") or {}).get("applications") or {}
        status = apps.get("moeray", {}).get("status")
        if status == "RUNNING":
            break
        assert status != "DEPLOY_FAILED", apps["moeray"].get("message")
        assert time.monotonic() < deadline, f"`serve deploy` app never ran: {apps}"
        time.sleep(0.25)
    yield app["args"], f"http://127.0.0.1:{port}", apps["moeray"]


def test_serve_deploy_runs_the_written_config(deployed, model_dir):
    _args, url, status = deployed
    assert status["deployed_app_config"]["import_path"] == "moeray.platform.serve.app:build"
    assert {k: v["status"] for k, v in status["deployments"].items()} == {
        "Prefill": "HEALTHY",
        "Decode": "HEALTHY",
        "Ingress": "HEALTHY",
    }
    prompt = "def add(a, b):"
    code, body, _ = _post(
        url + "/v1/completions",
        {"model": "tiny", "prompt": prompt, "max_tokens": 9, "temperature": 0},
    )
    assert code == 200, body
    # The deployed app ran this directory's weights: greedy text equals an in-process engine's.
    tok = ServeTokenizer(model_dir)
    engine = Engine.from_pretrained(
        model_dir, EngineConfig(num_pages=64, page_size=16, use_cuda_graphs=False)
    )
    out = engine.generate([tok.encode(prompt)], SamplingParams(temperature=0.0, max_tokens=9))
    assert body["choices"][0]["text"] == tok.decode(out[0].output_token_ids)
    assert body["usage"]["prompt_tokens"] == len(tok.encode(prompt))


class _Call:
    """One streaming completion on its own connection and thread: status, headers, body."""

    def __init__(self, port: int, prompt: list[int], max_tokens: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
        self.body = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self.status: int | None = None
        self.retry_after: str | None = None
        self.error: dict | None = None
        self.tokens = 0
        self.finish_reason: str | None = None
        self.answered = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.conn.request(
                "POST",
                "/v1/completions",
                body=json.dumps(self.body),
                headers={"Content-Type": "application/json"},
            )
            r = self.conn.getresponse()
            self.status, self.retry_after = r.status, r.getheader("Retry-After")
            self.answered.set()
            if r.status != 200:
                self.error = json.loads(r.read())["error"]
                return
            for line in r:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[len(b"data: ") :])
                    for choice in chunk["choices"]:
                        self.finish_reason = choice["finish_reason"] or self.finish_reason
                    if chunk.get("usage"):
                        self.tokens = chunk["usage"]["completion_tokens"]
        except OSError:
            pass  # closed by the test
        finally:
            self.answered.set()


def test_full_decode_queue_answers_429_with_retry_after_then_serves_again(deployed):
    args, url, _ = deployed
    _full_queue_checks(args, url)


def _full_queue_checks(args: dict, url: str) -> None:
    assert args["max_num_seqs"] == 1 and args["max_waiting"] == 1
    port = int(url.rsplit(":", 1)[1])
    long = _Call(port, [60] * 20, 300)  # holds the only decode slot for ~10 s
    assert long.answered.wait(30) and long.status == 200
    waiter = _Call(port, [61] * 20, 4)  # fills the waiting queue (its first token needs the slot)
    time.sleep(1.0)  # its prefill (~0.1 s) and KV import done, it waits in the decode engine
    extra = []
    for i in range(3):
        extra.append(_Call(port, [62 + i] * 20, 4))
        time.sleep(0.2)
    try:
        deadline = time.monotonic() + 15
        while not any(c.status == 429 for c in extra) and time.monotonic() < deadline:
            time.sleep(0.1)
        rejected = [c for c in extra if c.status == 429]
        assert rejected, [c.status for c in extra]
        for c in rejected:
            assert int(c.retry_after) >= 1
            assert (
                c.error["type"] == "rate_limit_error" and c.error["code"] == "rate_limit_exceeded"
            )
            assert "Traceback" not in c.error["message"] and "ray::" not in c.error["message"], (
                c.error
            )
        # The long request and the one that waited behind it both finish.
        long.thread.join(60)
        assert long.finish_reason == "length" and long.tokens == 300
        waiter.thread.join(60)
        assert waiter.status == 200 and waiter.finish_reason == "length" and waiter.tokens == 4
    finally:
        for c in [long, waiter, *extra]:
            c.conn.close()
    code, body, _ = _post(
        url + "/v1/completions", {"model": "tiny", "prompt": "ok", "max_tokens": 3}
    )
    assert code == 200 and body["usage"]["completion_tokens"] >= 1
