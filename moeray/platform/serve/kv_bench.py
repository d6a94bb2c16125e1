"""`moeray bench kv`: KV transfer time per request over the real transports, against raw send/recv.

Legend: L cached layers, T tokens, C kv_lora_rank, R qk_rope_head_dim (see engine/disagg.py).

Two Ray actors on this node play prefill and decode (one GPU each on CUDA, CPU-only on CPU). Each
holds the transports' real Sender / Receiver (`kv_transport.factory.make_sender` / `make_receiver`;
the actor is `KVBenchPeer` in serve/kv_bench_peer.py). Per (transport, T) the decode actor drives
the loop the way a decode replica does in Serve (`DecodeWorker.generate`): it calls
`receiver.expect(request_id)`, then calls the prefill actor with its endpoint; the prefill actor
builds the rows (kv [L, T, C] + rope [L, T, R], bf16, on its device; not timed), reads the clock and
turns them into a ticket with `send`; the ticket rides back in the call's reply; the decode actor
`receive`s it, synchronizes its device and reads the clock again. The channel also pushes the ticket
to a queue in the decode actor's TCPStore, where the receiver posts the receive of an expected
request without waiting for the reply; when the rows arrived that way, the transfer ends when they
landed (the receive thread synchronizes the device and reads the clock), else when `receive`
returned. The transfer time is that end minus the prefill's reading (both CLOCK_MONOTONIC, which is
system-wide on Linux: valid because both actors are pinned to this node); with_reply_p50_ms ends at
`receive` for every transport: what a decode replica waits for, since it also needs the reply's
first token.
Every transfer's rows are checked on the decode side against the pattern the prefill side wrote for
that iteration (exact equality, outside the timed window), so a transport that delivers garbage,
stale rows or the wrong shape fails the run.

In the same run the same two processes measure the raw floor: a bare torch.distributed pair (the
`P2PPeer` of kv_transport/p2p.py, gloo on CPU / nccl on CUDA) ping-pongs the same bytes.

V3 sizes: 61 layers x 4096 tokens x (512 + 64) x 2 bytes = 288 MB per 4K-token prompt; issue #7
asks the fast path (the channel) to move that in under 2 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from moeray.platform.serve.kv_bench_peer import (
    DEFAULT_TRANSPORTS,
    MIN_TIMED,
    V3_KV_LORA_RANK,
    V3_LAYERS,
    V3_ROPE_DIM,
    KVBenchConfig,
    KVBenchPeer,
)
from moeray.platform.serve.kv_transport.base import backend_for
from moeray.platform.serve.kv_transport.factory import TRANSPORTS
from moeray.results import device_slug, write_result

FAST_PATH_TOKENS = 4096  # the 4K-token prompt: 288 MB at the V3 shape
TARGET_MS = 2.0
# On a GPU each actor takes 0.99 of its card, not 1: RDT's relay pair asks for 0.01 GPU per relay,
# and with exactly 0.01 left on each card the two relays land on different cards (NCCL refuses two
# ranks of one communicator on the same GPU; with whole-GPU actors the relays could not be placed).
ACTOR_GPUS = 0.99


def _ms(xs: list[float]) -> dict[str, float]:
    return {
        "p50_ms": 1e3 * statistics.median(xs),
        "mean_ms": 1e3 * statistics.fmean(xs),
        "min_ms": 1e3 * min(xs),
        "max_ms": 1e3 * max(xs),
    }


def _gbps(nbytes: int, seconds: float) -> float | None:
    return nbytes / seconds / 1e9 if seconds > 0 else None


def run_bench(cfg: KVBenchConfig, log=print) -> dict[str, Any]:
    """Run the raw floor and every transport at every size on a started Ray; return the numbers."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        raise ValueError("run_bench needs an initialized Ray (ray.init())")
    if cfg.device == "cuda":
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < 2:
            raise ValueError(f"device=cuda needs 2 GPUs in the Ray cluster, it has {gpus}")
    here = ray.get_runtime_context().get_node_id()
    opts = {
        "num_cpus": 0,
        "num_gpus": ACTOR_GPUS if cfg.device == "cuda" else 0,
        # Both on this node: the one-way time compares the two actors' monotonic clocks.
        "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False),
    }
    peer = ray.remote(KVBenchPeer)

    def pair() -> tuple[Any, Any]:
        return peer.options(**opts).remote("prefill", cfg), peer.options(**opts).remote(
            "decode", cfg
        )

    backend = backend_for(cfg.device)
    out: dict[str, Any] = {
        "what": "KV transfer per request, prefill actor -> decode actor on one node: clock read on "
        "the prefill side just before `send` (rows already built), read again on the decode "
        "side once the rows are there and the device is synchronized: channel with the "
        "receive posted on the store notice (`expect` before the call; early = transfers "
        "that ended so), when the rows landed; otherwise once `receive` of the reply's ticket "
        "returned. with_reply_p50_ms: until both the reply and the rows are in (what a decode "
        "replica waits for); rows_before_reply: transfers whose rows were in before the reply. "
        "Every transfer checked for exact equality with the rows "
        "sent (not timed). call_p50_ms adds the decode -> prefill request hop. Warm-up "
        "transfers (channel / relay setup) excluded. Each transport and the raw floor run on "
        "a fresh actor pair (a transport that kills its process cannot take the others down).",
        "setup": {
            "device": cfg.device,
            "backend": backend,
            "layers": cfg.layers,
            "kv_lora_rank": cfg.kv_lora_rank,
            "rope_dim": cfg.rope_dim,
            "dtype": str(cfg.dtype).removeprefix("torch."),
            "tokens": list(cfg.tokens),
            "warmup": cfg.warmup,
            "iters": cfg.iters,
            "budget_s": cfg.budget_s,
            "timeout_s": cfg.timeout_s,
            "actor_gpus": opts["num_gpus"],
        },
    }
    errors: dict[str, str] = {}
    # The raw floor: a bare pair, same bytes.
    prefill, decode = pair()
    try:
        out["setup"]["actors"] = ray.get(
            [prefill.where.remote(), decode.where.remote()], timeout=cfg.timeout_s
        )
        port = ray.get(decode.store_port.remote(), timeout=cfg.timeout_s)
        ray.get([prefill.join.remote(port), decode.join.remote(port)], timeout=cfg.timeout_s)
        raw: dict[str, Any] = {
            "what": "ping-pong between two actors like the transports' over a bare "
            f"{backend} pair: "
            "rank 0 sends the payload, rank 1 answers with 1 float32, rank 0 times the round "
            "trip (device synchronized). one_way_ms = p50 round trip with the payload - p50 "
            f"round trip with a {cfg.raw_tiny_bytes}-byte payload / 2 (the tiny round trip is "
            "two latency-only hops; half of it is the ack's return).",
            "backend": backend,
        }

        def pingpong(nbytes: int) -> list[float]:
            times, _ = ray.get(
                [
                    prefill.run.remote(nbytes, cfg.iters, cfg.warmup),
                    decode.run.remote(nbytes, cfg.iters, cfg.warmup),
                ],
                timeout=10 * cfg.timeout_s,
            )
            return times

        tiny = pingpong(cfg.raw_tiny_bytes)
        raw["tiny_rtt_p50_ms"] = 1e3 * statistics.median(tiny)
        for t in cfg.tokens:
            nbytes = cfg.nbytes(t)
            rtt = pingpong(nbytes)
            one_way = statistics.median(rtt) - statistics.median(tiny) / 2
            raw[str(t)] = {
                "bytes": nbytes,
                "rtt_p50_ms": 1e3 * statistics.median(rtt),
                "rtt_mean_ms": 1e3 * statistics.fmean(rtt),
                "one_way_ms": 1e3 * one_way,
                "gbps": _gbps(nbytes, one_way),
            }
            log(f"raw {backend} T={t}: one-way {1e3 * one_way:.3f} ms")
        out["raw"] = raw
    finally:
        ray.kill(prefill)
        ray.kill(decode)
    # The transports.
    seed0 = 0
    for transport in cfg.transports:
        # channel: `expect` before the call, the receive posted when the ticket appears in the
        # decode actor's TCPStore; the others can only receive once the reply brought the ticket.
        entry: dict[str, Any] = {
            "receive_posted_on": "store notice" if transport == "channel" else "reply"
        }
        out[transport] = entry
        prefill, decode = pair()
        try:
            ray.get(
                [prefill.open_sender.remote(transport), decode.open_receiver.remote(transport)],
                timeout=cfg.timeout_s,
            )
            for t in cfg.tokens:
                r = ray.get(
                    decode.run_cell.remote(prefill, transport, t, seed0),
                    timeout=(cfg.warmup + cfg.iters + 1) * cfg.timeout_s + cfg.budget_s,
                )
                seed0 += cfg.warmup + cfg.iters
                nbytes = cfg.nbytes(t)
                cell = {
                    "bytes": nbytes,
                    "iters": len(r["transfer_s"]),
                    "verified": r["verified"],
                    "moved_to_device": r["moved_to_device"],
                    **_ms(r["transfer_s"]),
                    "with_reply_p50_ms": 1e3 * statistics.median(r["with_reply_s"]),
                    "call_p50_ms": 1e3 * statistics.median(r["call_s"]),
                    "early": r["early"],
                    "rows_before_reply": r["rows_before_reply"],
                }
                cell["gbps_p50"] = _gbps(nbytes, cell["p50_ms"] / 1e3)
                floor = out["raw"][str(t)]["one_way_ms"]
                cell["x_raw"] = cell["p50_ms"] / floor if floor > 0 else None
                entry[str(t)] = cell
                log(
                    f"{transport} T={t}: p50 {cell['p50_ms']:.3f} ms over {cell['iters']} transfers"
                )
        except Exception as e:
            errors[transport] = f"{type(e).__name__}: {e}"[:2000]
            entry["error"] = errors[transport]
            log(f"{transport}: FAILED {errors[transport]}")
        finally:
            try:
                ray.get(
                    [
                        prefill.close_sender.remote(transport),
                        decode.close_receiver.remote(transport),
                    ],
                    timeout=cfg.timeout_s,
                )
            except Exception as e:
                log(f"{transport}: close failed: {type(e).__name__}: {e}"[:500])
            ray.kill(prefill)
            ray.kill(decode)
    fast = out.get("channel", {}).get(str(FAST_PATH_TOKENS))
    v3 = (cfg.layers, cfg.kv_lora_rank, cfg.rope_dim) == (V3_LAYERS, V3_KV_LORA_RANK, V3_ROPE_DIM)
    out["fast_path_288mb_ms"] = (
        fast["p50_ms"] if fast and v3 and cfg.dtype == torch.bfloat16 else None
    )
    out["target_ms"] = TARGET_MS
    out["errors"] = errors
    return out


def table(res: dict[str, Any]) -> str:
    tokens = res["setup"]["tokens"]
    lines = [
        f"KV transfer, {res['setup']['layers']} layers x T x ({res['setup']['kv_lora_rank']}+"
        f"{res['setup']['rope_dim']}) {res['setup']['dtype']}, {res['setup']['backend']}",
        f"{'path':<14}{'T':>6}{'MB':>9}{'p50 ms':>10}{'mean ms':>10}{'GB/s':>9}{'x raw':>8}{'n':>4}"
        f"{'+reply ms':>11}{'early':>7}",
    ]
    raw = res.get("raw", {})
    for t in tokens:
        r = raw.get(str(t))
        if r:
            lines.append(
                f"{'raw one-way':<14}{t:>6}{r['bytes'] / 1e6:>9.1f}{r['one_way_ms']:>10.3f}{'':>10}"
                f"{(r['gbps'] or 0):>9.2f}{1.0:>8.1f}{'':>4}"
            )
    for name in TRANSPORTS:
        entry = res.get(name)
        if entry is None:
            continue
        if "error" in entry:
            lines.append(f"{name:<14} FAILED: {entry['error'][:100]}")
        for t in tokens:
            c = entry.get(str(t))
            if c:
                xr = f"{c['x_raw']:.1f}" if c["x_raw"] is not None else "-"
                lines.append(
                    f"{name:<14}{t:>6}{c['bytes'] / 1e6:>9.1f}{c['p50_ms']:>10.3f}"
                    f"{c['mean_ms']:>10.3f}"
                    f"{(c['gbps_p50'] or 0):>9.2f}{xr:>8}{c['iters']:>4}"
                    f"{c['with_reply_p50_ms']:>11.3f}{c['early']:>7}"
                )
    lines.append(
        "p50: send -> rows on the decode device (channel: early = transfers received on the "
        "store notice, before the reply); +reply: until the reply is in too"
    )
    fp = res.get("fast_path_288mb_ms")
    lines.append(
        "fast path (channel, 4096 tokens, 288 MB): "
        + (
            f"{fp:.3f} ms vs target {res['target_ms']} ms"
            if fp is not None
            else "not measured (needs --tokens with 4096 at 61 layers)"
        )
    )
    return "\n".join(lines)


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--tokens {s!r}: comma-separated integers, e.g. 64,512,4096") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeray bench kv", description=__doc__.split("\n")[0])
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda when 2 GPUs are visible, else cpu",
    )
    p.add_argument(
        "--tokens",
        default=None,
        help="comma-separated T (default 64,512,4096 on cuda, 16,128 on cpu)",
    )
    p.add_argument(
        "--layers", type=int, default=None, help=f"default {V3_LAYERS} on cuda (V3), 4 on cpu"
    )
    p.add_argument("--transports", default=",".join(DEFAULT_TRANSPORTS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--budget-s",
        type=float,
        default=20.0,
        help="per (transport, T): stop timing after this many seconds "
        f"(at least {MIN_TIMED} transfers)",
    )
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--out", default=None, help="result name (default kv-<device>)")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results")
    return p


def main(argv: list[str]) -> int:
    import os

    a = _parser().parse_args(argv)
    try:
        device = a.device or ("cuda" if torch.cuda.device_count() >= 2 else "cpu")
        cuda = device == "cuda"
        cfg = KVBenchConfig(
            device=device,
            tokens=_ints(a.tokens) if a.tokens else ((64, 512, 4096) if cuda else (16, 128)),
            layers=a.layers if a.layers is not None else (V3_LAYERS if cuda else 4),
            transports=tuple(t for t in a.transports.split(",") if t),
            warmup=a.warmup,
            iters=a.iters,
            budget_s=a.budget_s,
            timeout_s=a.timeout_s,
        )
    except ValueError as e:
        print(f"moeray bench kv: {e}", file=sys.stderr)
        return 2
    import ray

    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"),
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}},
        )
    res = run_bench(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    path = write_result(
        a.out or f"kv-{device_slug()}", res, directory=Path(a.out_dir) if a.out_dir else None
    )
    print(f"wrote {path}")
    print(table(res))
    return 1 if res["errors"] else 0
