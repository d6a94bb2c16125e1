"""The Serve application end to end on a local Ray: real HTTP, the real openai client, P/D split.

One tiny random model with a byte-level BPE tokenizer; prefill and decode deployments with one
replica each; greedy answers compared with an in-process engine on the same directory."""

import http.client
import json
import socket
import time
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")

from moeray.platform.checkpoint import save_model  # noqa: E402
from moeray.platform.config import ServeConfig, tiny  # noqa: E402
from moeray.platform.engine.engine import Engine, EngineConfig  # noqa: E402
from moeray.platform.engine.sampler import SamplingParams  # noqa: E402
from moeray.platform.model.transformer import Transformer  # noqa: E402
from moeray.platform.serve.tokenizer import ServeTokenizer  # noqa: E402
from moeray.platform.train.data import save_tokenizer, train_tokenizer  # noqa: E402

TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int\n    y: int\n"] * 50


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    save_model(Transformer(tiny()), tiny(), d)
    save_tokenizer(train_tokenizer(TEXT, vocab_size=400), d)
    return d


@pytest.fixture(scope="module")
def server(ray_local, model_dir):
    from ray import serve

    from moeray.platform.serve.app import start

    cfg = ServeConfig(model=str(model_dir), model_id="tiny", mode="pd", port=_free_port(),
                      num_pages=64, page_size=16, max_num_batched_tokens=256, max_in_flight=8,
                      cpus_per_replica=0.5)
    start(cfg)
    yield cfg, f"http://{cfg.host}:{cfg.port}"
    serve.shutdown()


def _expected(model_dir, prompt: str, n: int) -> str:
    tok = ServeTokenizer(model_dir)
    engine = Engine.from_pretrained(model_dir, EngineConfig(num_pages=64, page_size=16, use_cuda_graphs=False))
    out = engine.generate([tok.encode(prompt)], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=False))
    return tok.decode(out[0].output_token_ids)


def test_completions_through_prefill_and_decode(server, model_dir):
    cfg, url = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    prompt = "def add(a, b):"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == _expected(model_dir, prompt, 12)
    assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"

    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_kv_moved_from_prefill_to_decode(server):
    from ray import serve

    stats = serve.get_deployment_handle("Decode", app_name="moeray").stats.remote().result()
    moved = [t for t in stats["transfers"] if not t["recomputed"]]
    assert moved and all(t["bytes"] > 0 for t in moved)


def test_bad_requests_get_openai_errors_and_server_keeps_serving(server):
    cfg, url = server
    status, body = _post(url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = _post(url + "/v1/completions", {"model": "tiny", "prompt": "x " * 5000, "max_tokens": 4})
    assert status == 400 and "context" in body["error"]["message"]
    status, body = _post(url + "/v1/completions", {"model": "tiny", "prompt": "ok", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] <= 3
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


def test_disconnect_mid_stream_frees_decode_pages(server):
    from ray import serve

    cfg, url = server
    handle = serve.get_deployment_handle("Decode", app_name="moeray")
    idle = handle.stats.remote().result()["free_pages"]
    conn = http.client.HTTPConnection(cfg.host, cfg.port, timeout=60)
    conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                 body=json.dumps({"model": "tiny", "prompt": "class Point:", "max_tokens": 500,
                                  "stream": True, "temperature": 0}))
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(3):
        assert resp.readline().startswith(b"data: ")
        resp.readline()
    conn.close()  # the client goes away mid-stream
    for _ in range(100):
        if handle.stats.remote().result()["free_pages"] == idle:
            break
        time.sleep(0.1)
    assert handle.stats.remote().result()["free_pages"] == idle
