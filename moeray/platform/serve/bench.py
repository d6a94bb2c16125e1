"""`moeray bench serve`: an OpenAI-API load generator.

Sends streaming requests to one or more targets (e.g. the colocated and the prefill/decode-split
deployments), with Poisson arrivals at `--rate` requests/s or a fixed `--concurrency`, prompt and
output lengths drawn from distributions, and reports per target:
    throughput (output tokens/s, requests/s), TTFT, TPOT, ITL and end-to-end p50/p90/p99 (ms),
    goodput: requests/s that met both the TTFT and the TPOT target (DistServe's definition),
    failures (429 rejections separately).
Results go to `benchmarks/results/serve-<device>.json` (one key per target label; labels already in
the file from an earlier run are kept), e.g.

    moeray bench serve --target colocated=http://localhost:8000 --target pd=http://localhost:8001 \\
        --model tiny --rate 4 --num-requests 200 --input-len uniform:64:512 --output-len 128

With `--launch` it deploys the setups itself on a local Ray (one at a time, so each has the
machine to itself) and benchmarks each: "colocated" (2 replicas that prefill and decode), "pd"
(1 prefill + 1 decode, KV through the object store) and "pd_<transport>" for every other
`--transports` entry; the "kv_transfer" key then holds, per transport, the bytes and seconds of
each request's KV transfer as the decode replica recorded them, next to a raw send/recv
ping-pong of the same bytes between two bare actors in the same run ("raw_send_recv": gloo on
CPU, nccl on GPU):

    moeray bench serve --launch --model-dir artifacts/demo-model --num-requests 64 --concurrency 8

The load generator itself (prompts, timings, the summary) is `serve/loadgen.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from moeray.platform.checkpoint import save_model
from moeray.platform.config import DEFAULT_DEMO_MODEL, ServeConfig, tiny
from moeray.platform.model.transformer import Transformer
from moeray.platform.serve.app import build_serve_app
from moeray.platform.serve.kv_transport.base import backend_for
from moeray.platform.serve.kv_transport.p2p import raw_p2p_seconds
from moeray.platform.serve.loadgen import (
    BenchConfig,
    LengthDist,
    percentiles,
    run_load,
    summarize,
)
from moeray.platform.train.data import save_tokenizer, train_tokenizer
from moeray.results import RESULTS_DIR, device_slug, write_result


def _parse_target(spec: str) -> tuple[str, str]:
    label, sep, url = spec.partition("=")
    if not sep or not label or not url.startswith(("http://", "https://")):
        raise ValueError(f"--target {spec!r}: expected LABEL=http://host:port (e.g. colocated=...)")
    return label, url


def run(
    targets: list[tuple[str, str]],
    cfg: BenchConfig,
    *,
    out_name: str | None = None,
    directory: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """Benchmark every target in turn and write the merged result file."""

    name = out_name or f"serve-{device_slug()}"
    path = (Path(directory) if directory is not None else RESULTS_DIR) / f"{name}.json"
    results: dict[str, Any] = {}
    if path.exists():  # keep the other targets' numbers from an earlier run
        old = json.loads(path.read_text())
        results.update(
            {k: v for k, v in old.items() if isinstance(v, dict) and "throughput_tokens_per_s" in v}
        )
    for label, url in targets:
        records, wall = asyncio.run(run_load(url, cfg))
        results[label] = {"base_url": url, **summarize(records, wall, cfg)}
    return results, write_result(name, results, directory=directory)


# --launch: deploy each setup on a local Ray, bench it, take it down.
LAUNCH_TRANSPORTS = ("object_store", "rdt", "channel")


def _transfer_summary(transfers: list[dict[str, Any]]) -> dict[str, Any]:
    moved = [t for t in transfers if not t["recomputed"]]
    secs = [t["seconds"] for t in moved]
    out: dict[str, Any] = {
        "requests": len(transfers),
        "recomputed": len(transfers) - len(moved),
        "bytes_per_request_mean": (sum(t["bytes"] for t in moved) / len(moved)) if moved else None,
    }
    out.update({f"seconds_{k}_ms": v for k, v in percentiles(secs).items()})
    out.update(
        {
            f"receive_{k}_ms": v
            for k, v in percentiles([t.get("receive_seconds", 0.0) for t in moved]).items()
        }
    )
    out["what"] = (
        "seconds: prefill call wall time minus the prefill's compute, plus the receive "
        "(Serve reply included); receive: the receive after the ticket arrived"
    )
    return out


def random_tiny_model(directory: Path) -> Path:
    """A random-init tiny model with a byte-level BPE tokenizer: same shapes and speed as the
    one `make demo` trains (serving cost does not depend on the weights with ignore_eos). Also the
    served model of the Ray-tier tests (tests/ray/conftest.py)."""
    import torch

    torch.manual_seed(0)
    save_model(Transformer(tiny()), tiny(), directory)
    text = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int\n    y: int\n"] * 50
    save_tokenizer(train_tokenizer(text, vocab_size=400), directory)
    return directory


def launch(
    model_dir: str,
    cfg: BenchConfig,
    *,
    transports: tuple[str, ...] = LAUNCH_TRANSPORTS,
    port: int = 8123,
    cpus_per_replica: float = 0.5,
    gpus_per_replica: float = 0.0,
    warmup: int = 4,
    raw_iters: int = 20,
) -> dict[str, Any]:
    """Deploy colocated (2 replicas) and pd (1+1, per transport) in turn on a local Ray (or
    $RAY_ADDRESS) and benchmark each through its HTTP API. Returns the result dict."""
    import dataclasses
    import os
    import statistics

    import ray
    from ray import serve

    for t in transports:
        if t not in LAUNCH_TRANSPORTS:
            raise ValueError(f"transport {t!r}; accepted: {LAUNCH_TRANSPORTS}")
    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"),
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}},
        )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = ServeConfig(
        model=model_dir,
        model_id=cfg.model,
        cpus_per_replica=cpus_per_replica,
        gpus_per_replica=gpus_per_replica,
        max_in_flight=max(256, 2 * cfg.concurrency),
    )
    setups = [("colocated", base.replace(mode="colocated", decode_replicas=2))]
    for t in transports:
        setups.append(
            (
                "pd" if t == "object_store" else f"pd_{t}",
                base.replace(mode="pd", prefill_replicas=1, decode_replicas=1, kv_transport=t),
            )
        )
    results: dict[str, Any] = {"kv_transfer": {}}
    device = None
    try:
        for label, scfg in setups:
            serve.run(build_serve_app(scfg), name=label, route_prefix=f"/{label}")
            url = f"http://127.0.0.1:{port}/{label}"
            # Warm-up (first forward, KV channel/relay setup), excluded from the numbers.
            asyncio.run(
                run_load(
                    url,
                    dataclasses.replace(
                        cfg,
                        num_requests=warmup,
                        rate=None,
                        concurrency=min(2, warmup),
                        seed=cfg.seed + 99,
                    ),
                )
            )
            seen = 0
            if scfg.mode == "pd":
                h = serve.get_deployment_handle("Decode", app_name=label)
                seen = len(h.stats.remote(last=1000).result(timeout_s=60)["transfers"])
            records, wall = asyncio.run(run_load(url, cfg))
            results[label] = {
                "base_url": url,
                "setup": {
                    "mode": scfg.mode,
                    "prefill_replicas": scfg.prefill_replicas if scfg.mode == "pd" else 0,
                    "decode_replicas": scfg.decode_replicas,
                    "kv_transport": scfg.kv_transport if scfg.mode == "pd" else None,
                    "cpus_per_replica": scfg.cpus_per_replica,
                    "gpus_per_replica": scfg.gpus_per_replica,
                },
                **summarize(records, wall, cfg),
            }
            if scfg.mode == "pd":
                st = h.stats.remote(last=1000).result(timeout_s=60)
                results["kv_transfer"][scfg.kv_transport] = _transfer_summary(
                    st["transfers"][seen:]
                )
                device = device or ("cuda" if scfg.gpus_per_replica > 0 else "cpu")
            serve.delete(label)
        moved = [
            v["bytes_per_request_mean"]
            for v in results["kv_transfer"].values()
            if v["bytes_per_request_mean"]
        ]
        if moved:
            nbytes = int(statistics.mean(moved))
            backend = backend_for(device or "cpu")
            try:
                times = raw_p2p_seconds(nbytes, backend=backend, iters=raw_iters)
            except (ValueError, TimeoutError) as e:  # e.g. one GPU: no nccl pair; never a hang
                results["kv_transfer"]["raw_send_recv"] = {"backend": backend, "skipped": str(e)}
            else:
                results["kv_transfer"]["raw_send_recv"] = {
                    "backend": backend,
                    "bytes": nbytes,
                    "iters": raw_iters,
                    "what": "ping-pong round trip (payload + 1-element ack) between two bare "
                    "actors, same bytes as the mean request",
                    **{f"seconds_{k}_ms": v for k, v in percentiles(times).items()},
                }
    finally:
        serve.shutdown()
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeray bench serve", description=__doc__.split("\n")[0])
    p.add_argument(
        "--target",
        action="append",
        default=[],
        help="LABEL=URL, repeatable: e.g. colocated=http://127.0.0.1:8000",
    )
    p.add_argument(
        "--launch",
        action="store_true",
        help="deploy colocated (2 replicas) and pd "
        "(1+1 per --transports) on a local Ray and bench each instead of --target",
    )
    p.add_argument(
        "--model-dir",
        default=None,
        help="--launch: model directory (default: the "
        "`make demo` model; a random-init tiny model when that is missing)",
    )
    p.add_argument(
        "--transports", default=",".join(LAUNCH_TRANSPORTS), help="--launch: KV transports for pd"
    )
    p.add_argument("--cpus-per-replica", type=float, default=0.5)
    p.add_argument(
        "--gpus-per-replica",
        type=float,
        default=0.0,
        help="--launch: GPUs per engine "
        "replica (> 0: engines on CUDA, KV over nccl for rdt/channel, raw baseline over nccl)",
    )
    p.add_argument("--port", type=int, default=8123, help="--launch: HTTP port")
    p.add_argument(
        "--model",
        default="tiny",
        help="model id sent in requests (--launch serves it under this id)",
    )
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--num-requests", type=int, default=100)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rate", type=float, help="Poisson arrivals, requests/s")
    g.add_argument("--concurrency", type=int, default=8, help="fixed number of requests in flight")
    p.add_argument(
        "--input-len",
        default="128",
        help="N | uniform:LO:HI | normal:MEAN:STD | lognormal:MEDIAN:SIGMA",
    )
    p.add_argument("--output-len", default="128")
    p.add_argument("--max-len", type=int, default=1 << 20, help="clip sampled lengths to this")
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    p.add_argument("--tpot-slo-ms", type=float, default=100.0)
    p.add_argument("--api-key", default=None, help="bearer token (default $MOERAY_API_KEY)")
    p.add_argument("--token-range", default="32:127", help="LO:HI token ids for prompts")
    p.add_argument("--no-ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="result name (default serve-<device>)")
    p.add_argument("--results-dir", default=None)
    return p


def main(argv: list[str]) -> int:
    import os

    args = _parser().parse_args(argv)
    try:
        lo, hi = (int(x) for x in args.token_range.split(":"))
        cfg = BenchConfig(
            model=args.model,
            endpoint=args.endpoint,
            num_requests=args.num_requests,
            rate=args.rate,
            concurrency=args.concurrency,
            input_len=LengthDist.parse(args.input_len, args.max_len),
            output_len=LengthDist.parse(args.output_len, args.max_len),
            ttft_slo_ms=args.ttft_slo_ms,
            tpot_slo_ms=args.tpot_slo_ms,
            api_key=args.api_key or os.environ.get("MOERAY_API_KEY") or None,
            token_range=(lo, hi),
            ignore_eos=not args.no_ignore_eos,
            temperature=args.temperature,
            seed=args.seed,
        )
        targets = [_parse_target(t) for t in args.target]
        if bool(targets) == args.launch:
            raise ValueError("give either --target LABEL=URL (repeatable) or --launch")
    except ValueError as e:
        print(f"moeray bench serve: {e}", file=sys.stderr)
        return 2
    directory = Path(args.results_dir) if args.results_dir else None
    if args.launch:
        return _main_launch(args, cfg, directory)
    results, path = run(targets, cfg, out_name=args.out, directory=directory)

    def f(x: float | None, d: int = 1) -> str:
        return "-" if x is None else f"{x:.{d}f}"

    for label, _ in targets:
        r = results[label]
        print(
            f"{label:>10}: {f(r['throughput_tokens_per_s'])} tok/s  {f(r['requests_per_s'], 2)} "
            f"req/s  TTFT p50/p99 {f(r['ttft_p50_ms'])}/{f(r['ttft_p99_ms'])} ms  TPOT p50/p99 "
            f"{f(r['tpot_p50_ms'], 2)}/{f(r['tpot_p99_ms'], 2)} ms  ITL p50 "
            f"{f(r['itl_p50_ms'], 2)} ms  goodput {f(r['goodput'], 2)} req/s  "
            f"({r['completed']}/{r['num_requests']} ok, {r['rejected_429']} rejected)"
        )
    print(f"wrote {path}")
    return 0 if all(results[label]["completed"] > 0 for label, _ in targets) else 1


def _main_launch(args: argparse.Namespace, cfg: BenchConfig, directory: Path | None) -> int:
    import tempfile

    model_dir = args.model_dir or DEFAULT_DEMO_MODEL
    note = f"model: {model_dir}"
    tmp = None
    if not (Path(model_dir) / "config.json").exists():
        if args.model_dir:
            print(f"moeray bench serve: no model at {model_dir!r}", file=sys.stderr)
            return 2
        tmp = tempfile.TemporaryDirectory(prefix="moeray-bench-")
        model_dir = str(random_tiny_model(Path(tmp.name)))
        note = (
            "model: tiny config, random init "
            "(`make demo` output not found; timing does not depend on weights)"
        )
    try:
        transports = tuple(t for t in args.transports.split(",") if t)
        results = launch(
            model_dir,
            cfg,
            transports=transports,
            port=args.port,
            cpus_per_replica=args.cpus_per_replica,
            gpus_per_replica=args.gpus_per_replica,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
    results["model"] = note
    path = write_result(args.out or f"serve-{device_slug()}", results, directory=directory)

    def f(x: float | None, d: int = 1) -> str:
        return "-" if x is None else f"{x:.{d}f}"

    for label, r in results.items():
        if isinstance(r, dict) and "throughput_tokens_per_s" in r:
            print(
                f"{label:>12}: {f(r['throughput_tokens_per_s'])} tok/s  "
                f"TTFT p50 {f(r['ttft_p50_ms'])} ms  "
                f"TPOT p50 {f(r['tpot_p50_ms'], 2)} ms  ({r['completed']}/{r['num_requests']} ok)"
            )
    for name, r in results["kv_transfer"].items():
        if "skipped" in r:
            print(f"  kv {name:>14}: skipped: {r['skipped']}")
            continue
        print(
            f"  kv {name:>14}: p50 {f(r['seconds_p50_ms'], 2)} ms  "
            f"mean {f(r['seconds_mean_ms'], 2)} ms"
        )
    print(f"wrote {path}")
    return (
        0
        if all(
            r["completed"] > 0 for r in results.values() if isinstance(r, dict) and "completed" in r
        )
        else 1
    )
