"""`moeray bench wide-ep`: expert-parallel decoding over 1..N GPUs in one command.

For each GPU count G (--gpus, default every power of two up to the GPUs present), G processes
(torch.multiprocessing, NCCL on GPU, gloo on CPU) each build one rank of the model with dummy
weights of the preset's shapes (rank_weights.dummy_model: no checkpoint needed, only the rank's
experts allocated), run an ExpertParallelEngine over --batch prompts of their own, and time the
decode; the same processes then time torch.distributed.all_to_all_single on --a2a-mib MiB per
rank. Then, without devices, the expert placement (platform/placement.py) under a skewed
(Zipf) expert load: the busiest GPU's load over the mean, with the redundant-expert placement
and without it (contiguous experts, no replicas).

When G = 1 is among the counts, the plain Engine (no gang, no lockstep) decodes the same model and
prompts in one more process of the same environment, and `ep1_over_plain` is the ep=1 gang's
tokens/s over its: `--ep 1` goes through the gang's code and is held to within 5% (0.95).

Writes benchmarks/results/wide-ep-<device>[-<tag>].json: tokens_per_s (the median of --repeats
timed decode windows, each in tokens_per_s_repeats), alltoall_gbps and cuda_graphs (the runner's
graph status) keyed by G, plain_tokens_per_s(_repeats) and ep1_over_plain (of the medians),
max_gpu_load_ratio_placed / _unplaced keyed by G.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeray.platform import config as presets
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.ep import ExpertParallelEngine
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.parallel.distributed import GRAPHS_CUDA_ENV, init_distributed
from moeray.platform.parallel.serve_ep import DECODE_EXCHANGES, check_decode_exchange
from moeray.platform.placement import gpu_loads, identity_placement, place_experts
from moeray.platform.rank_weights import dummy_model, rank_experts
from moeray.results import device_slug, write_result

PRESETS = ("tiny", "small", "deepseek_v3")


@dataclass(frozen=True)
class WideEPConfig:
    preset: str = "small"
    gpus: tuple[int, ...] = (1,)
    batch: int = 32  # requests per rank
    prompt_len: int = 64
    decode_tokens: int = 64
    # Timed decode windows per engine: tokens/s is their median (one window of the plain engine
    # read 12,223 and 14,640 tok/s in two runs of the same code on an H200).
    repeats: int = 3
    a2a_mib: float = 64.0
    zipf_s: float = 1.2  # skew of the synthetic expert load (placement ratios)
    device: str = "auto"
    # e4m3 projections with 128x128 block scales (DeepSeek-V3's own format; V3 fits 8 GPUs only so)
    fp8: bool = False
    layers: int | None = None  # fewer decoder layers than the preset (a V3-shaped run on 1 GPU)
    # The gang's decode exchange (serve_ep.DECODE_EXCHANGES): "all_to_all" times decode without
    # graphs, against "auto"'s gathered graph replays.
    decode_exchange: str = "auto"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}: accepted {PRESETS}")
        if not self.gpus or min(self.gpus) < 1:
            raise ValueError(f"gpus={self.gpus}: accepted positive counts")
        for name in ("batch", "prompt_len", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"layers={self.layers} must be >= 1")
        check_decode_exchange(self.decode_exchange)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: accepted auto, cpu, cuda")


def model_config(cfg: WideEPConfig) -> presets.ModelConfig:
    mc = getattr(presets, cfg.preset)().replace(eos_token_id=None, num_nextn_predict_layers=0)
    if cfg.layers is not None:
        mc = mc.replace(
            num_hidden_layers=cfg.layers,
            first_k_dense_replace=min(mc.first_k_dense_replace, cfg.layers - 1),
        )
    return mc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine_config(cfg: WideEPConfig) -> EngineConfig:
    page = 64
    pages = cfg.batch * -(-(cfg.prompt_len + cfg.decode_tokens) // page) + 1
    return EngineConfig(page_size=page, num_pages=pages, max_num_seqs=cfg.batch)


def _time_decode(engine: Engine, cfg: WideEPConfig, rank: int) -> dict:
    """Decode --batch prompts of this rank to --decode-tokens tokens each, --repeats times (fresh
    prompts each time); -> per repeat the seconds and tokens of its decode window (from the step
    where every request has its first token), and the runner's graph status. An EP rank keeps
    stepping until its whole gang is done (steps are collective)."""
    dev = engine.device
    mc = engine.model_config
    g = torch.Generator().manual_seed(rank)
    warm = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    params = SamplingParams(temperature=0, max_tokens=cfg.decode_tokens, ignore_eos=True)
    seconds, decoded = [], []
    for r in range(cfg.repeats):
        prompts = torch.randint(0, mc.vocab_size, (cfg.batch, cfg.prompt_len), generator=g)
        if r == 0:
            engine.generate(prompts[:2].tolist(), warm)  # Triton compiles outside the timing
        for p in prompts.tolist():
            engine.add_request(p, params)
        start = engine.stats.generated_tokens
        t0 = before = None
        while True:
            engine.step()
            if t0 is None and engine.stats.generated_tokens - start >= cfg.batch:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0, before = time.perf_counter(), engine.stats.generated_tokens
            if not engine.has_unfinished():  # an EP rank: until no rank of the gang has work
                break
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        assert t0 is not None and before is not None  # the loop ran until every request finished
        seconds.append(time.perf_counter() - t0)
        decoded.append(engine.stats.generated_tokens - before)
    return {"seconds": seconds, "decoded": decoded, "cuda_graphs": engine.runner.graph_status}


def _median_rate(ranks: list[dict]) -> tuple[float, list[float]]:
    """(median, each) over the repeats of the gang's tokens/s: every rank's tokens over the
    slowest rank's window."""
    rates = [
        sum(r["decoded"][i] for r in ranks) / max(r["seconds"][i] for r in ranks)
        for i in range(len(ranks[0]["seconds"]))
    ]
    return statistics.median(rates), rates


def _model(cfg: WideEPConfig, dev: torch.device, rank: int, world: int):
    mc = model_config(cfg)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dummy_model(mc, rank_experts(mc, rank, world), device=dev, dtype=dtype, fp8=cfg.fp8)


def _device(device: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")


def _plain(rank: int, world: int, cfg: WideEPConfig, device: str, port: int, out: str) -> None:
    """The plain engine on one device over the same dummy model (`world` is 1; `port` unused)."""
    dev = _device(device, rank)
    engine = Engine(_model(cfg, dev, 0, 1), _engine_config(cfg))
    Path(out, "plain.json").write_text(json.dumps(_time_decode(engine, cfg, rank)))


def _rank(rank: int, world: int, cfg: WideEPConfig, device: str, port: int, out: str) -> None:
    dev = _device(device, rank)
    init_distributed(rank, world, f"tcp://127.0.0.1:{port}", dev, GRAPHS_CUDA_ENV)
    try:
        engine = ExpertParallelEngine(
            _model(cfg, dev, rank, world),
            _engine_config(cfg),
            decode_exchange=cfg.decode_exchange,
        )
        timed = _time_decode(engine, cfg, rank)
        n = int(cfg.a2a_mib * 2**20 / 4) // world * world
        x = torch.ones(n, dtype=torch.float32, device=dev)
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x)  # warm-up: NCCL connects
        iters = 10
        dist.barrier()
        t1 = time.perf_counter()
        for _ in range(iters):
            dist.all_to_all_single(y, x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        a2a_s = (time.perf_counter() - t1) / iters
        Path(out, f"{rank}.json").write_text(
            json.dumps({**timed, "a2a_s": a2a_s, "a2a_bytes": n * 4})
        )
    finally:
        dist.destroy_process_group()
    # The numbers are written: leave without the interpreter's teardown, in which a native thread
    # still joinable aborted the process ("terminate called without an active exception") in 2 of
    # 3 gloo runs of this bench on torch 2.13 CPU, failing a run that had measured everything.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def placement_ratios(
    num_layers: int, num_experts: int, num_gpus: int, s: float, seed: int = 0
) -> tuple[float, float]:
    """(placed, unplaced) busiest-GPU load over the mean under a Zipf(s) expert load with a
    random expert order per layer; placed: one redundant expert slot per GPU."""
    g = torch.Generator().manual_seed(seed)
    zipf_E = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    load_LE = torch.stack(
        [zipf_E[torch.randperm(num_experts, generator=g)] for _ in range(num_layers)]
    )
    placed = place_experts(load_LE, num_experts + num_gpus, 1, 1, num_gpus)
    plain = identity_placement(num_layers, num_experts, num_gpus)

    def ratio(loads_LG: torch.Tensor) -> float:
        return float((loads_LG.max(1).values / loads_LG.mean(1)).max())

    return ratio(gpu_loads(load_LE, placed)), ratio(gpu_loads(load_LE, plain))


def _spawn(world: int, cfg: WideEPConfig, device: str, tmp: str, fn=_rank) -> None:
    """Run the `world` rank processes (fn: _rank, or _plain with world 1). On CUDA they start
    with GRAPHS_CUDA_ENV (parallel/distributed.py: read at CUDA's start); this process's
    environment is put back after the start, since its own CUDA may have read the old values."""
    saved = {k: os.environ.get(k) for k in GRAPHS_CUDA_ENV}
    if device == "cuda":
        os.environ.update(GRAPHS_CUDA_ENV)
    try:
        mp.spawn(fn, args=(world, cfg, device, _free_port(), tmp), nprocs=world, join=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_bench(cfg: WideEPConfig) -> dict:
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and max(cfg.gpus) > torch.cuda.device_count():
        raise ValueError(f"gpus={cfg.gpus}: this machine has {torch.cuda.device_count()} GPUs")
    mc = model_config(cfg)
    out: dict = {
        "config": asdict(cfg),
        "tokens_per_s": {},
        "tokens_per_s_repeats": {},
        "alltoall_gbps": {},
        "cuda_graphs": {},
    }
    for G in cfg.gpus:
        with tempfile.TemporaryDirectory() as tmp:
            _spawn(G, cfg, device, tmp)
            ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(G)]
        out["tokens_per_s"][str(G)], out["tokens_per_s_repeats"][str(G)] = _median_rate(ranks)
        out["cuda_graphs"][str(G)] = ranks[0]["cuda_graphs"]
        # Bytes each rank sends to the others per second (its own slice stays local).
        sent = ranks[0]["a2a_bytes"] * (G - 1) / G
        out["alltoall_gbps"][str(G)] = (
            sent / max(r["a2a_s"] for r in ranks) / 1e9 if G > 1 else None
        )
    if 1 in cfg.gpus:
        with tempfile.TemporaryDirectory() as tmp:
            _spawn(1, cfg, device, tmp, _plain)
            plain = json.loads(Path(tmp, "plain.json").read_text())
        out["plain_tokens_per_s"], out["plain_tokens_per_s_repeats"] = _median_rate([plain])
        out["plain_cuda_graphs"] = plain["cuda_graphs"]
        out["ep1_over_plain"] = out["tokens_per_s"]["1"] / out["plain_tokens_per_s"]
    placed, unplaced = {}, {}
    for G in cfg.gpus:
        if mc.n_routed_experts % G == 0:
            layers = mc.num_hidden_layers - mc.first_k_dense_replace
            p, u = placement_ratios(layers, mc.n_routed_experts, G, cfg.zipf_s)
            placed[str(G)], unplaced[str(G)] = p, u
    out["max_gpu_load_ratio_placed"] = placed
    out["max_gpu_load_ratio_unplaced"] = unplaced
    return out


def main(argv: list[str]) -> int:
    d = WideEPConfig()
    p = argparse.ArgumentParser(prog="moeray bench wide-ep", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=PRESETS, default=d.preset)
    p.add_argument(
        "--gpus", default=None, help="GPU counts, e.g. 1,2,4,8 (default: powers of 2 present)"
    )
    p.add_argument("--batch", type=int, default=d.batch, help="requests per rank")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens)
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed windows (median)")
    p.add_argument("--a2a-mib", type=float, default=d.a2a_mib)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    p.add_argument("--fp8", action="store_true", help="e4m3 weights + block scales, as V3 ships")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: preset's)")
    p.add_argument(
        "--decode-exchange",
        choices=DECODE_EXCHANGES,
        default=d.decode_exchange,
        help="EP decode MoE exchange: auto (gathered, graphs), gather, all_to_all (no graphs)",
    )
    p.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    p.add_argument("--tag", default="", help="result name suffix: wide-ep-<device>-<tag>.json")
    a = p.parse_args(argv)
    if a.gpus is None:
        n = max(torch.cuda.device_count(), 1)
        gpus = tuple(2**k for k in range(n.bit_length()) if 2**k <= n)
    else:
        try:
            gpus = tuple(int(x) for x in a.gpus.split(","))
        except ValueError:
            print(f"moeray bench wide-ep: --gpus {a.gpus!r}: expected e.g. 1,2,4", file=sys.stderr)
            return 2
    try:
        cfg = WideEPConfig(
            a.preset,
            gpus,
            a.batch,
            a.prompt_len,
            a.decode_tokens,
            a2a_mib=a.a2a_mib,
            repeats=a.repeats,
            device=a.device,
            fp8=a.fp8,
            layers=a.layers,
            decode_exchange=a.decode_exchange,
        )
        numbers = run_bench(cfg)
    except ValueError as e:
        print(f"moeray bench wide-ep: {e}", file=sys.stderr)
        return 2
    name = f"wide-ep-{device_slug()}" + (f"-{a.tag}" if a.tag else "")
    path = write_result(name, numbers, directory=a.out_dir)
    print(json.dumps({k: v for k, v in numbers.items() if k != "config"}))
    print(f"wrote {path}")
    return 0
