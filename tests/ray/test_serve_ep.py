"""Expert-parallel serving end to end on a local Ray: `moeray serve --ep 2 --mode colocated`, a
gang of 2 rank actors (gloo) behind one Serve replica, real HTTP and the openai client; then ep=4
and a P/D pair of gangs as further apps of the same Serve instance. Greedy answers equal the
single-process engine's; each rank read only its share of the weights; a killed rank is replaced
with its whole gang."""

import concurrent.futures
import os
import signal
import socket
import time

import pytest
from safetensors import safe_open

openai = pytest.importorskip("openai")
yaml = pytest.importorskip("yaml")

from moeray.platform.config import ServeConfig, tiny  # noqa: E402
from moeray.platform.engine.engine import Engine, EngineConfig  # noqa: E402
from moeray.platform.engine.sampler import SamplingParams  # noqa: E402
from moeray.platform.serve.tokenizer import ServeTokenizer  # noqa: E402

PROMPTS = ["def add(a, b):", "class Point:", "    return a", "x: int\n    y"]
EP = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from moeray.platform.serve.app import main as serve_main
    from moeray.platform.serve.app import start

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
    serve.shutdown()


def _expected(model_dir, prompt: str, n: int) -> list[int]:
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


def test_pd_with_ep_on_both_sides(server, tiny_model_dir):
    """A prefill gang and a decode gang (2 ranks each): KV rows move from the prefill rank that
    computed them to the decode rank that took the request; answers equal the plain engine's."""
    from moeray.platform.serve.app import start

    cfg, url = server
    start(cfg.replace(mode="pd"), name="ep-pd", route_prefix="/pd")
    client = openai.OpenAI(base_url=url + "/pd/v1", api_key="unused", timeout=60)
    got = _complete_all(client, 8)
    assert got == [_expected(tiny_model_dir, p, 8) for p in PROMPTS]
    decode = _stats("Decode", "ep-pd")
    transfers = [t for r in decode["ranks"] for t in r["transfers"]]
    assert len(transfers) == len(PROMPTS)
    assert not any(t["recomputed"] for t in transfers) and all(t["bytes"] > 0 for t in transfers)
    prefill = _stats("Prefill", "ep-pd")
    assert sum(prefill["routed_to"]) == len(PROMPTS)
    assert all(n > 0 for n in decode["routed_to"]), decode["routed_to"]


def test_ep4_serves_what_the_single_process_engine_serves(server, tiny_model_dir):
    from moeray.platform.serve.app import start

    cfg, url = server
    start(cfg.replace(ep=4), name="ep4", route_prefix="/ep4")
    client = openai.OpenAI(base_url=url + "/ep4/v1", api_key="unused", timeout=60)
    assert _complete_all(client, 8) == [_expected(tiny_model_dir, p, 8) for p in PROMPTS]
    stats = _stats("EP", "ep4")
    assert [r["rank"] for r in stats["ranks"]] == [0, 1, 2, 3]
    assert sum(n > 0 for n in stats["routed_to"]) >= 2, stats["routed_to"]


def test_a_killed_rank_takes_the_gang_down_and_serve_brings_it_back(server, tiny_model_dir):
    """Kill one rank's process: the replica's health check fails, Serve replaces the replica with
    a new gang, and requests succeed again with the same answers. Nothing waits unbounded: each
    attempt has a client timeout, the whole recovery a deadline."""
    _cfg, url = server
    before = [r["pid"] for r in _stats()["ranks"]]
    assert len(before) == EP
    os.kill(before[1], signal.SIGKILL)
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
            time.sleep(1.0)
    assert r.choices[0].text == _expected(tiny_model_dir, PROMPTS[1], 10)
    after = [r["pid"] for r in _stats()["ranks"]]
    assert len(after) == EP and not set(after) & set(before)  # a whole new gang
