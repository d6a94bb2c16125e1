"""Live expert placement through a Ray gang: `moeray serve --ep 2` with the placement loop on (two
redundant expert slots, any imbalance replans), real HTTP and the openai client. Streams that are
in flight while the gang switches placement answer exactly what the single-process engine does,
and both ranks switched after the same gang step, with the newly held experts read from the
checkpoint. The decision is the gang's RouterActor's: it saw every token the ranks routed."""

import concurrent.futures
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from moeray.platform.config import ServeConfig  # noqa: E402
from moeray.platform.engine.engine import Engine, EngineConfig  # noqa: E402
from moeray.platform.engine.sampler import SamplingParams  # noqa: E402
from moeray.platform.serve.gang import free_tcp_address  # noqa: E402
from moeray.platform.serve.tokenizer import ServeTokenizer  # noqa: E402

PROMPTS = ["def add(a, b):", "class Point:", "    return a", "x: int\n    y"]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def server(ray_local, tiny_model_dir):
    from ray import serve

    from moeray.platform.serve.app import start

    port = int(free_tcp_address("127.0.0.1").rsplit(":", 1)[1])
    cfg = ServeConfig(
        model=str(tiny_model_dir),
        model_id="tiny",
        mode="colocated",
        ep=2,
        cpus_per_replica=0.25,
        port=port,
        num_pages=64,
        page_size=16,
        max_num_batched_tokens=256,
        ep_placement_period_s=0.1,
        ep_redundant_experts=2,
        ep_placement_maxvio=0.0,
    )
    start(cfg, name="ep-place", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _expected(model_dir) -> list[str]:
    tok = ServeTokenizer(model_dir)
    engine = Engine.from_pretrained(
        model_dir, EngineConfig(num_pages=64, page_size=16, use_cuda_graphs=False)
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outs = engine.generate([tok.encode(p) for p in PROMPTS], params)
    return [tok.decode(o.output_token_ids) for o in outs]


def test_streams_across_a_placement_change_equal_the_single_process_engine(server, tiny_model_dir):
    from ray import serve

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=120)

    def stream(prompt: str) -> str:
        chunks = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in chunks)

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(stream, PROMPTS))
    assert got == _expected(tiny_model_dir)
    handle = serve.get_deployment_handle("EP", app_name="ep-place")
    stats = handle.stats.remote().result(timeout_s=30)
    assert stats["placement_version"] >= 1
    r0, r1 = stats["ranks"]
    assert r0["placement_switches"] == r1["placement_switches"]
    (version, step), *_ = r0["placement_switches"]
    # The first switch came while the streams ran: the gang still had work after that step.
    assert version == 1 and 0 < step < r0["last_busy_gang_step"] == r1["last_busy_gang_step"]
    # The router decided it from the ranks' counts: once the gang is idle (the loop reports
    # every 0.1 s), it has seen every (token, expert) pair the ranks routed.
    router = stats["router"]
    assert router["name"].startswith("moeray-ep-router-colocated-")
    assert router["version"] == stats["placement_version"] and router["changes"] >= 1
    deadline = time.monotonic() + 30
    while True:
        stats = handle.stats.remote().result(timeout_s=30)
        routed = sum(sum(map(sum, r["expert_loads"])) for r in stats["ranks"])
        if stats["router"]["tokens_seen"] == routed:
            break
        assert time.monotonic() < deadline, (stats["router"], routed)
        time.sleep(0.2)
    assert routed > 0 and stats["router"]["reports"] > 1
    # The change is in the router's log (its Ray worker's stderr file).
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    pid = stats["router"]["pid"]
    text = "".join(f.read_text(errors="replace") for f in logs.glob(f"worker-*-{pid}.err"))
    assert "expert placement v1 at step" in text and "GPU MaxVio" in text, text[-2000:]
