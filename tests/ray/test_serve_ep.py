"""Expert-parallel serving end to end on a local Ray: `moeray serve --ep 2 --mode colocated`, a
gang of 2 rank actors (gloo) behind one Serve replica, real HTTP and the openai client; then ep=4,
a P/D pair of gangs (live expert placement on in both) and an ep=2 gang drafting with MTP as
further apps of the same Serve instance. Greedy answers equal the single-process engine's, the P/D
streams across a placement change too; each rank read only its share of the weights; a killed rank
ends the requests in flight with a 503 error body (an error event in a stream) and is replaced with
its whole gang."""

import concurrent.futures
import functools
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from safetensors import safe_open

openai = pytest.importorskip("openai")
yaml = pytest.importorskip("yaml")

from moeray.platform.config import ServeConfig, tiny  # noqa: E402
from moeray.platform.engine.engine import Engine, EngineConfig  # noqa: E402
from moeray.platform.engine.sampler import SamplingParams  # noqa: E402
from moeray.platform.serve.tokenizer import ServeTokenizer  # noqa: E402
from tests.unit.test_openai_schemas import httpx  # noqa: E402  (httpx or httpx2)

PROMPTS = ["def add(a, b):", "class Point:", "    return a", "x: int\n    y"]
EP = 2
PD_TOKENS = 40  # long enough that the decode gang's first placement change lands mid-stream


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, serve_shutdowns, tiny_model_dir, tmp_path_factory):
    from moeray.platform.serve.app import start
    from moeray.platform.serve.cli import main as serve_main

    serve_shutdowns.wait()  # test_serve_app's Serve instance is gone
    port = _free_port()
    f = tmp_path_factory.mktemp("cfg") / "serve.yaml"
    argv = ["--model", str(tiny_model_dir), "--model-id", "tiny", "--mode", "colocated"]
    # 1/8 CPU per rank: this module runs 10 ranks (ep=2, ep=4, and a P/D pair of ep=2) on 2 CPUs.
    argv += ["--ep", str(EP), "--cpus-per-replica", "0.125", "--port", str(port)]
    assert serve_main([*argv, "--write-config", str(f)]) == 0
    (app,) = yaml.safe_load(f.read_text())["applications"]
    assert app["args"]["ep"] == EP and app["args"]["load_format"] == "safetensors"
    cfg = ServeConfig.from_dict(app["args"]).replace(
        num_pages=64, page_size=16, max_num_batched_tokens=256, routing_stats_period_s=0.2
    )
    start(cfg, name="ep", route_prefix="/")
    yield cfg, f"http://127.0.0.1:{port}"
    serve_shutdowns.start()  # serve.shutdown() on a thread, overlapping the next module


@pytest.fixture
def start_app(server):
    """`start_app(cfg, name, route_prefix)`: one more app on the module's Serve instance, deleted
    when the test ends. An idle gang keeps stepping (every rank every 50 ms, `EngineLoop`), so
    the 8 ranks of the ep=4, P/D and MTP apps left running would compete with the later tests
    for the 2 CPUs. The deletion is not waited for: each app's graceful shutdown takes ~3 s."""
    from ray import serve

    from moeray.platform.serve.app import start

    names = []

    def run(cfg: ServeConfig, name: str, route_prefix: str) -> None:
        names.append(name)
        start(cfg, name=name, route_prefix=route_prefix)

    yield run
    for name in names:
        serve.delete(name, _blocking=False)


@functools.cache
def _expected(model_dir, prompt: str, n: int) -> list[int]:
    """The single-process engine's greedy answer (a fresh engine per answer), computed once per
    (prompt, n) for the module: the apps asked the same are compared with the same answer."""
    tok = ServeTokenizer(model_dir)
    engine = Engine.from_pretrained(
        model_dir, EngineConfig(num_pages=64, page_size=16, use_cuda_graphs=False)
    )
    out = engine.generate([tok.encode(prompt)], SamplingParams(temperature=0.0, max_tokens=n))
    return tok.decode(out[0].output_token_ids)


def _stats(deployment: str = "EP", app: str = "ep") -> dict:
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    return handle.stats.remote().result(timeout_s=30)


def _complete_all(client, max_tokens: int) -> list[str]:
    """Greedy completions of all PROMPTS, sent at once."""

    def complete(prompt: str) -> str:
        r = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0
        )
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(complete, PROMPTS))


def test_ep_gang_serves_what_the_single_process_engine_serves(server, tiny_model_dir):
    _cfg, url = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60)
    # Concurrently: the front spreads them over both ranks, which then step together.
    got = _complete_all(client, 10)
    assert got == [_expected(tiny_model_dir, p, 10) for p in PROMPTS]

    chunks = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == got[0]

    stats = _stats()
    assert stats["strategy"] == "STRICT_PACK"
    assert all(n > 0 for n in stats["routed_to"]), stats["routed_to"]
    ranks = stats["ranks"]
    assert [r["rank"] for r in ranks] == list(range(EP))
    assert all(r["generated_tokens"] > 0 for r in ranks)


def test_each_rank_read_only_its_share_of_the_weights(server, tiny_model_dir):
    total = experts = 0
    for f in tiny_model_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                total += t.numel() * t.element_size()
                experts += t.numel() * t.element_size() if ".mlp.experts." in k else 0
    E = tiny().n_routed_experts
    loads = [r["load"] for r in _stats()["ranks"]]
    assert [tuple(ld["experts"]) for ld in loads] == [
        (r * E // EP, (r + 1) * E // EP) for r in range(EP)
    ]
    assert all(ld["bytes_read"] == total - experts + experts // EP for ld in loads)


def test_pd_with_ep_on_both_sides_across_a_placement_change(server, start_app, tiny_model_dir):
    """A prefill gang and a decode gang (2 ranks each), each with live expert placement (two
    redundant slots, any imbalance replans): KV rows move from the prefill rank that computed
    them to the decode rank that took the request; streams that cross the decode gang's
    placement switch answer what the plain engine does. Decode forwards take the fixed-size
    gathered exchange (`ep_decode_exchange="gather"`; on a GPU "auto" picks it for graphs)."""
    cfg, url = server
    placed = dict(ep_placement_period_s=0.1, ep_redundant_experts=2, ep_placement_maxvio=0.0)
    start_app(cfg.replace(mode="pd", ep_decode_exchange="gather", **placed), "ep-pd", "/pd")
    client = openai.OpenAI(base_url=url + "/pd/v1", api_key="unused", timeout=120)

    def stream(prompt: str) -> str:
        chunks = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=PD_TOKENS, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in chunks)

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(stream, PROMPTS))
    tok = ServeTokenizer(tiny_model_dir)
    engine = Engine.from_pretrained(
        tiny_model_dir, EngineConfig(num_pages=64, page_size=16, use_cuda_graphs=False)
    )
    params = SamplingParams(temperature=0.0, max_tokens=PD_TOKENS)
    outs = engine.generate([tok.encode(p) for p in PROMPTS], params)
    assert got == [tok.decode(o.output_token_ids) for o in outs]
    decode = _stats("Decode", "ep-pd")
    transfers = [t for r in decode["ranks"] for t in r["transfers"]]
    assert len(transfers) == len(PROMPTS)
    assert not any(t["recomputed"] for t in transfers) and all(t["bytes"] > 0 for t in transfers)
    prefill = _stats("Prefill", "ep-pd")
    assert sum(prefill["routed_to"]) == len(PROMPTS)
    assert all(n > 0 for n in decode["routed_to"]), decode["routed_to"]
    # The decode gang switched placement while the streams ran, both ranks after the same step;
    # each gang's own router saw its ranks' loads.
    r0, r1 = decode["ranks"]
    assert decode["placement_version"] >= 1 and r0["placement_switches"] == r1["placement_switches"]
    (version, step), *_ = r0["placement_switches"]
    assert version == 1 and 0 < step < r0["last_busy_gang_step"]
    assert decode["router"]["version"] == decode["placement_version"]
    # Each gang's router labels its metrics with the gang (role and replica id).
    assert prefill["router"]["gang"].startswith("prefill-")
    assert decode["router"]["gang"].startswith("decode-")
    assert prefill["router"]["name"] == "moeray-ep-router-" + prefill["router"]["gang"]
    assert prefill["router"]["tokens_seen"] > 0
    # Once the gang is idle (the loop reports every 0.1 s) the decode router has seen every
    # (token, expert) pair its ranks routed, and the change is in its log (its Ray worker's
    # stderr file).
    deadline = time.monotonic() + 30
    while True:
        decode = _stats("Decode", "ep-pd")
        routed = sum(sum(map(sum, r["expert_loads"])) for r in decode["ranks"])
        if decode["router"]["tokens_seen"] == routed:
            break
        assert time.monotonic() < deadline, (decode["router"], routed)
        time.sleep(0.2)
    assert routed > 0 and decode["router"]["changes"] >= 1
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    pid = decode["router"]["pid"]
    text = "".join(f.read_text(errors="replace") for f in logs.glob(f"worker-*-{pid}.err"))
    assert "expert placement v1 at step" in text and "GPU MaxVio" in text, text[-2000:]


def test_ep4_serves_what_the_single_process_engine_serves(server, start_app, tiny_model_dir):
    cfg, url = server
    start_app(cfg.replace(ep=4), "ep4", "/ep4")
    client = openai.OpenAI(base_url=url + "/ep4/v1", api_key="unused", timeout=60)
    assert _complete_all(client, 8) == [_expected(tiny_model_dir, p, 8) for p in PROMPTS]
    stats = _stats("EP", "ep4")
    assert [r["rank"] for r in stats["ranks"]] == [0, 1, 2, 3]
    assert sum(n > 0 for n in stats["routed_to"]) >= 2, stats["routed_to"]


def test_ep_gang_with_mtp_serves_what_the_single_process_engine_serves(
    server, start_app, tiny_model_dir, tmp_path
):
    """`moeray serve --ep 2 --num-speculative-tokens 1`: the flag reaches the gang's engines, which
    draft with the MTP depth (its MoE layer expert-parallel too) and serve the greedy answers."""
    from moeray.platform.serve.cli import main as serve_main

    cfg, url = server
    f = tmp_path / "serve.yaml"
    argv = ["--model", str(tiny_model_dir), "--model-id", "tiny", "--mode", "colocated"]
    argv += ["--ep", "2", "--num-speculative-tokens", "1", "--write-config", str(f)]
    assert serve_main(argv) == 0
    (app,) = yaml.safe_load(f.read_text())["applications"]
    assert app["args"]["ep"] == 2 and app["args"]["num_speculative_tokens"] == 1
    start_app(cfg.replace(num_speculative_tokens=1), "epmtp", "/epmtp")
    client = openai.OpenAI(base_url=url + "/epmtp/v1", api_key="unused", timeout=60)
    assert _complete_all(client, 8) == [_expected(tiny_model_dir, p, 8) for p in PROMPTS]
    ranks = _stats("EP", "epmtp")["ranks"]
    assert sum(r["mtp"]["draft_tokens"] for r in ranks) > 0, ranks
    # One MTP forward per rank in every MTP round, real or empty.
    assert len({r["mtp_forwards"] for r in ranks}) == 1 and ranks[0]["mtp_forwards"] > 0


def _in_flight(url: str, prompt: str, stream: bool, started: threading.Event) -> dict:
    """One long greedy request over raw HTTP; returns its status, the chunks streamed before the
    error, the error body (or {}) and whether [DONE] came last."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 400, "temperature": 0}
    body |= {"ignore_eos": True, "stream": stream}
    chunks, error, done = 0, {}, False
    with httpx.Client(timeout=60) as h, h.stream("POST", url + "/v1/completions", json=body) as r:
        if not stream:
            started.set()
            return {"status": r.status_code, "error": json.loads(r.read())["error"]}
        for line in r.iter_lines():
            if not line:
                continue
            assert not done, f"an event after [DONE]: {line}"
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
            elif "error" in (event := json.loads(data)):
                error = event["error"]
            else:
                assert not error, f"a chunk after the error: {line}"
                chunks += 1
                started.set()
        return {"status": r.status_code, "chunks": chunks, "error": error, "done": done}


def test_a_killed_rank_takes_the_gang_down_and_serve_brings_it_back(server, tiny_model_dir):
    """Kill one rank's process while requests run on both ranks: each ends within seconds (not
    the gloo timeout) with an OpenAI-style 503 body, inside the stream (an error event, then
    [DONE]) or as the response; the replica's health check fails, Serve replaces the replica
    with a new gang, and requests succeed again with the same answers. Nothing waits unbounded:
    each attempt has a client timeout, the whole recovery a deadline."""
    _cfg, url = server
    before = [r["pid"] for r in _stats()["ranks"]]
    assert len(before) == EP
    kinds = [True, True, False]  # two streams and a plain request, spread over both ranks
    started = [threading.Event() for _ in kinds]
    routed_before = _stats()["routed_to"]
    with concurrent.futures.ThreadPoolExecutor(len(kinds)) as pool:
        futures = [
            pool.submit(_in_flight, url, PROMPTS[i], stream, started[i])
            for i, stream in enumerate(kinds)
        ]
        for ev in started[:2]:
            assert ev.wait(60), "the streams did not start"
        routed = [b - a for a, b in zip(routed_before, _stats()["routed_to"], strict=True)]
        killed = time.monotonic()
        os.kill(before[1], signal.SIGKILL)
        results = [f.result(timeout=90) for f in futures]
    assert time.monotonic() - killed < 30  # the front fails them, not the collectives' timeout
    assert all(n > 0 for n in routed), routed
    for stream, r in zip(kinds, results, strict=True):
        assert r["error"]["code"] == "service_unavailable", r
        assert r["error"]["type"] == "server_error" and "retry" in r["error"]["message"]
        if stream:
            assert r["status"] == 200 and r["chunks"] and r["done"], r  # error event, [DONE]
        else:
            assert r["status"] == 503, r
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=20, max_retries=0)
    deadline = time.monotonic() + 240
    while True:
        try:
            r = client.completions.create(
                model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0
            )
            break
        except openai.APIError:
            assert time.monotonic() < deadline, "the gang never came back"
            time.sleep(0.25)
    assert r.choices[0].text == _expected(tiny_model_dir, PROMPTS[1], 10)
    after = [r["pid"] for r in _stats()["ranks"]]
    assert len(after) == EP and not set(after) & set(before)  # a whole new gang
