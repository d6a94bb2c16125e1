"""`moeray demo`: the main job end to end on an embedded default, on this machine.

1. train the tiny DeepSeek-V3 model (MLA, DeepSeekMoE with aux-loss-free routing, MTP) on the
   Python standard library's sources through the Ray Train job (2 workers, expert parallel);
2. serve the trained HF directory with Ray Serve: an OpenAI-compatible ingress, a prefill and a
   decode deployment, the prompt's KV cache moving from prefill to decode;
3. send completion, streaming and chat requests over HTTP and print what comes back.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
import urllib.request
from pathlib import Path

import moeray

TRAIN_CONFIG = Path(moeray.__file__).resolve().parent.parent / "configs" / "train" / "tiny.yaml"
PROMPTS = ["def __init__(self, ", "import os\nimport sys\n\n\ndef main(", "    for i in range("]


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _post(url: str, body: dict, *, stream: bool = False):
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    resp = urllib.request.urlopen(req, timeout=120)
    if not stream:
        with resp:
            return json.loads(resp.read())
    return resp


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="moeray demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--out", default="artifacts/demo-model", help="where the trained model goes")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--skip-train", action="store_true", help="serve an existing --out directory")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from moeray.platform.config import ServeConfig
    from moeray.platform.serve.app import start
    from moeray.platform.train.job import load_config, run

    out = Path(args.out).resolve()
    t0 = time.perf_counter()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    try:
        if not args.skip_train:
            job = load_config(
                TRAIN_CONFIG,
                {
                    "steps": args.steps,
                    "name": "demo",
                    "storage": str(out.parent / "runs"),
                    "output": str(out),
                },
            )
            print(
                f"[1/3] training {job.model} ({job.steps} steps, "
                f"PP={job.parallel.pp} x EP={job.parallel.ep} "
                f"x DP={job.parallel.dp}, corpus: {job.data.corpus}) with Ray Train ...",
                flush=True,
            )
            run(job)
            history = out.parent / "runs" / "demo" / "history.jsonl"
            if history.exists():
                lines = [json.loads(x) for x in history.read_text().splitlines() if x.strip()]
                first, last = lines[0], lines[-1]
                print(
                    f"      loss {first.get('loss', float('nan')):.3f} -> "
                    f"{last.get('loss', float('nan')):.3f} "
                    f"over {len(lines)} steps; model written to {out}",
                    flush=True,
                )
        cfg = ServeConfig(
            model=str(out),
            model_id="moeray-tiny",
            mode="pd",
            port=_free_port(args.port),
            cpus_per_replica=0.5,
            num_pages=256,
            page_size=16,
        )
        print(
            f"[2/3] serving {out.name} with Ray Serve: Ingress -> Decode <- KV from Prefill "
            f"on http://{cfg.host}:{cfg.port}/v1 ...",
            flush=True,
        )
        start(cfg)
        base = f"http://{cfg.host}:{cfg.port}/v1"
        print("[3/3] requests:", flush=True)
        for prompt in PROMPTS:
            t = time.perf_counter()
            r = _post(
                base + "/completions",
                {"model": cfg.model_id, "prompt": prompt, "max_tokens": 24, "temperature": 0},
            )
            print(
                f"      completion ({(time.perf_counter() - t) * 1e3:.0f} ms) {prompt!r} -> "
                f"{r['choices'][0]['text']!r}",
                flush=True,
            )
        t = time.perf_counter()
        resp = _post(
            base + "/completions",
            {
                "model": cfg.model_id,
                "prompt": PROMPTS[0],
                "max_tokens": 24,
                "temperature": 0.8,
                "seed": 1,
                "stream": True,
            },
            stream=True,
        )
        pieces, first_at = [], None
        with resp:
            for line in resp:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    first_at = first_at or time.perf_counter()
                    pieces.append(json.loads(line[6:])["choices"][0]["text"])
        if first_at is None:
            raise RuntimeError("the streamed completion sent no data event")
        print(
            f"      streamed {len(pieces)} chunks, first after {(first_at - t) * 1e3:.0f} ms: "
            f"{''.join(pieces)!r}",
            flush=True,
        )
        chat = _post(
            base + "/chat/completions",
            {
                "model": cfg.model_id,
                "max_tokens": 16,
                "temperature": 0,
                "messages": [{"role": "user", "content": "Write a loop."}],
            },
        )
        print(f"      chat -> {chat['choices'][0]['message']['content']!r}", flush=True)
        stats = serve.get_deployment_handle("Decode", app_name="moeray").stats.remote().result()
        moved = [x for x in stats["transfers"] if not x["recomputed"]]
        if moved:
            kb = sum(x["bytes"] for x in moved) / len(moved) / 1024
            ms = sum(x["seconds"] for x in moved) / len(moved) * 1e3
            print(
                f"      KV prefill -> decode: {len(moved)} transfers, {kb:.1f} KiB and {ms:.1f} ms "
                f"(prefill included) per request over the object store",
                flush=True,
            )
        print(f"done in {time.perf_counter() - t0:.0f}s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
