"""`moeray bench train`: training throughput and MFU, pipeline bubbles, FP8 vs BF16.

    moeray bench train                                   # CPU: tiny, PP=2, gloo, ~2-3 minutes
    moeray bench train --device cuda --pp 1 --model moonlight_16b_a3b --layers auto \\
        --seq-len 4096 --micro-batch-size 1 --microbatches 4 --steps 12   # one GPU (bench_one.py)
    moeray bench train --model small --device cuda --pp 2 --ep 2 --seq-len 1024 \\
        --micro-batch-size 2 --microbatches 8 --steps 30        # 4 GPUs, NCCL
    moeray bench train ... --no-overlap   # DualPipe F&B slots run sequentially (no helper thread)

With --pp 1 --ep 1 the bench is `bench_one.py`: one process trains the whole model (a preset or
an HF config.json, `--layers N|auto` decoder layers) in BF16 then FP8 and reports tokens/s, MFU
against the datasheet and a measured GEMM rate, GPU kernels per step, peak memory and the FP8 vs
BF16 loss gap (`train-1gpu-<device>.json`). Otherwise the pipeline bench runs:

Spawns PP x EP worker processes (torch.multiprocessing; gloo on CPU, NCCL on CUDA, one GPU per
process) and runs three trainings of the same steps on the same batches, each from the same
initial weights (`runs`):
  dualpipe-fp8   DualPipe, FP8 projections (`fp8.py`), other GEMMs under bf16 autocast;
  1f1b-fp8       1F1B, FP8: the baseline schedule's bubble and step time;
  dualpipe-bf16  DualPipe, every GEMM under bf16 autocast.
DualPipe needs an even PP; with an odd PP the main schedule is 1F1B, so the runs are 1f1b-fp8
and 1f1b-bf16.
A failed run other than the main FP8 run leaves its numbers null (listed in `failed_runs`); the
result is still written and the command exits 1.
Each step is a full training step: the pipeline schedule, the gradient sync, clipping, AdamW and
the aux-loss-free bias update (gamma 0.001, done locally from the all-reduced expert loads).

Data: a synthetic sparse-bigram stream (each token has 4 equally likely successors drawn once
from a seeded generator): learnable (the loss falls from log V towards log 4 = 1.39) and the same
on every machine, without a tokenizer or corpus.

Numbers (the first `--warmup` steps excluded from timings):
  step_time_s       rank 0's wall time of a whole step, mean;
  tokens_per_s      global tokens per step / step_time_s;
  mfu               training FLOPs per token x tokens_per_s / (workers x measured matmul rate):
                    the rate is measured here, per worker (CPU: fp32 GEMM on the worker's thread;
                    CUDA: bf16 GEMM, 8192^3), so MFU is against what this device delivers, not
                    the datasheet; FLOPs = 3 x forward (matmuls with the activated experts, the
                    head for the main and each MTP depth, causal attention);
  bubble_fraction_* per step: max over ranks of (wall - busy) / wall, mean over steps, where busy
                    is the time a rank spends computing after its inputs arrived (CUDA: events);
                    `simulated_bubble_fraction_*` feeds the measured mean F, B, W, F&B times to
                    `parallel/simulate.py` for comparison;
  fp8_bf16_loss_rel_diff    |loss_fp8 - loss_bf16| / loss_bf16 at the final step (same batch);
  fp8_bf16_step_time_ratio  step_time(<main>-fp8) / step_time(<main>-bf16).

Hangs. Rank 0 prints one flushed line when the process group is up, when each run's groups are
checked, and after every step, so a stuck run shows where it stopped. Every collective and p2p op
fails after MOERAY_DIST_TIMEOUT_S seconds (default 600), and each worker dumps the Python stacks of
all its threads to stderr when one step (or a run's set-up) takes that long, or when it is
terminated (after another worker failed), so a hang ends as an error with a stack per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeray.platform.fp8 import FP8_SCOPES
from moeray.platform.parallel.distributed import CUDA_ENV, dist_timeout_s, init_distributed
from moeray.platform.parallel.pipeline import PipelineModel, PipelineSpec
from moeray.platform.parallel.simulate import Costs, simulate
from moeray.platform.routing.balance import bias_update
from moeray.platform.train import bench_one
from moeray.platform.train import step as tstep
from moeray.platform.train.bench_common import (
    GRAPHS_SUFFIX,
    RUN_NAMES,
    SCOPE_SEP,
    BenchConfig,
    bigram_stream,
    measure_matmul_rate,
    runs,
    train_flops_per_token,
)
from moeray.results import device_slug, write_result


def _say(rank: int, text: str) -> None:
    """A progress line from rank 0, flushed at once (stdout of spawned workers is a pipe)."""
    if rank == 0:
        print(f"[bench train] {text}", flush=True)


# When set, each worker writes its watchdog's thread dump to <dir>/stacks-<run>-rank<r>.txt instead
# of stderr, where the dumps of all ranks and threads interleave character by character.
STACKS_ENV = "MOERAY_STACKS_DIR"


def _arm_watchdog(seconds: float, file) -> None:
    """Dump every thread's Python stack to `file` and exit if not re-armed within `seconds`."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=file)


@contextlib.contextmanager
def _step_profiler(cfg: BenchConfig, rank: int, on: bool, into: list):
    """torch.profiler around one step's forward-backward on rank 0 when `on`; the stopped profiler
    is appended to `into`. Its table (`write_profile`) is made after the run's last collective:
    made here, between the step and its gradient all-reduce, it keeps the peers waiting in that
    collective while it is built (rank 0's profiled step with the table: ~55 s on 4x H200,
    benchmarks/notes-train.md)."""
    if not on or rank != 0:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.device == "cuda" else [])
    with profile(activities=acts) as prof:
        yield
    into.append(prof)


def write_profile(cfg: BenchConfig, name: str, rank: int, prof) -> Path:
    """The profiled step as a table: where the host time goes (a step here is launch- and
    Python-bound: notes-train.md), self CPU time per op and the launch counts (cudaLaunchKernel
    for torch, cuLaunchKernelEx for Triton)."""
    if cfg.profile_dir is None:
        raise ValueError("write_profile needs cfg.profile_dir (the directory to write into)")
    table = prof.key_averages()
    path = Path(cfg.profile_dir, f"profile-{name}-rank{rank}.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# {name}, step {cfg.steps} of {cfg.steps}, rank {rank}, torch {torch.__version__}\n\n"
        "## by self CPU time\n"
        + table.table(sort_by="self_cpu_time_total", row_limit=40)
        + "\n\n## by count\n"
        + table.table(sort_by="count", row_limit=40)
        + "\n"
    )
    _say(rank, f"{name}: profile of the last step written to {path}")
    return path


def _one_run(
    cfg: BenchConfig,
    rank: int,
    name: str,
    schedule: str,
    fp8: bool,
    tokens,
    device,
    stacks,
    profiles: list,
) -> dict | None:
    model_cfg = cfg.model_config()
    spec = PipelineSpec(cfg.pp, 1, cfg.ep, schedule, cfg.microbatches)
    timeout = dist_timeout_s()
    _arm_watchdog(timeout, stacks)
    pm = PipelineModel(
        model_cfg,
        spec,
        rank,
        seed=cfg.seed,
        fp8=fp8,
        device=device,
        autocast_dtype=torch.bfloat16,
        seq_len=cfg.seq_len,
        overlap=cfg.overlap,
        grouped_fp8=cfg.grouped_fp8,
    )
    _say(
        rank,
        f"{name}: {len(pm.groups.made)} process groups made and checked, stages "
        f"{sorted(pm.stages)} built, overlap={pm.executor.overlap}, grouped_fp8={pm.grouped_fp8}",
    )
    optim = tstep.OptimConfig(
        lr=cfg.lr, warmup_steps=max(cfg.steps // 10, 1), total_steps=cfg.steps
    )
    loss_cfg = tstep.LossConfig()
    opt = tstep.build_optimizer(pm.modules, optim)
    bias_LE = torch.zeros(len(pm.moe_names), model_cfg.n_routed_experts)
    rows = cfg.micro_batch_size * cfg.microbatches
    shard = spec.topology.shard(rank)
    S1 = cfg.seq_len + 1
    losses, walls, bubbles = [], [], []
    costs: dict[str, list[float]] = {}
    pm.train()
    for step in range(cfg.steps):
        _arm_watchdog(timeout, stacks)
        t0 = time.perf_counter()
        first = (step * cfg.global_batch + shard * rows) * S1
        batch = tokens[first : first + rows * S1].view(rows, S1)
        profiled = cfg.profile_dir is not None and step == cfg.steps - 1
        with _step_profiler(cfg, rank, profiled, profiles):
            out = pm.forward_backward(batch, loss_cfg)
        norm = pm.sync_gradients()
        tstep.apply_update(pm.modules, opt, step, optim, total_norm=norm)
        loads = out.loads_LE.to(device)
        dist.all_reduce(loads)
        bias_LE = bias_update(bias_LE, loads.cpu(), 0.001)
        pm.set_biases(bias_LE)
        stats = torch.tensor(
            [out.main_sum, out.timings.wall, out.timings.idle], dtype=torch.float64, device=device
        )
        every = [torch.zeros_like(stats) for _ in range(cfg.world)]
        dist.all_gather(every, stats)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        losses.append(sum(float(s[0]) for s in every) / cfg.ep)
        _say(
            rank,
            f"{name}: step {step + 1}/{cfg.steps} loss {losses[-1]:.4f} "
            f"step {wall:.3f} s{' (warm-up)' if step < cfg.warmup else ''}",
        )
        if not math.isfinite(losses[-1]):
            # every rank saw the same all-gathered losses, so all stop here together
            raise FloatingPointError(
                f"{name}: loss {losses[-1]} at step {step + 1} (losses so far {losses})"
            )
        if step >= cfg.warmup and not profiled:  # the profiler's overhead stays out of the timings
            walls.append(wall)
            bubbles.append(max(float(s[2]) for s in every) / max(float(s[1]) for s in every))
            for kind in ("F", "B", "BI", "W", "F&B"):
                c = out.timings.mean_cost(kind)
                if c is not None:
                    costs.setdefault(kind, []).append(c)
    pm.close()
    faulthandler.cancel_dump_traceback_later()
    if rank != 0:
        return None
    mean = {k: sum(v) / len(v) for k, v in costs.items()}
    f, b = mean["F"], mean.get("B", mean.get("BI", 0.0) + mean.get("W", 0.0))
    w = min(mean.get("W", 0.0), b)
    sim = simulate(pm.schedule, Costs(f, b, w, mean.get("F&B")))
    return {
        "losses": losses,
        "step_time_s": sum(walls) / len(walls),
        "bubble_fraction": sum(bubbles) / len(bubbles),
        "simulated_bubble_fraction": sim.bubble() / sim.makespan,
        "op_costs_s": mean,
    }


def _worker(
    rank: int, cfg: BenchConfig, init_file: str, out_dir: str, run: tuple[str, str, bool]
) -> None:
    """One rank of one of `runs` (name, schedule, fp8); rank 0 writes bench-<name>.json."""
    stacks_dir = os.environ.get(STACKS_ENV)
    stacks = (
        open(Path(stacks_dir, f"stacks-{run[0]}-rank{rank}.txt"), "w") if stacks_dir else sys.stderr
    )
    # terminated by mp.spawn after another worker failed: print where this one was first
    faulthandler.register(signal.SIGTERM, file=stacks, all_threads=True, chain=True)
    torch.set_num_threads(cfg.threads)
    # one node: the local rank is the global rank; the device is current before any group exists
    device = torch.device("cuda", rank) if cfg.device == "cuda" else torch.device("cpu")
    init_distributed(rank, cfg.world, f"file://{init_file}", device)
    _say(
        rank,
        f"process group up: {dist.get_backend()}, world {cfg.world}, device {device}, "
        f"timeout {dist_timeout_s():g} s, overlap {cfg.overlap}",
    )
    try:
        vocab = cfg.model_config().vocab_size
        tokens = bigram_stream(vocab, cfg.steps * cfg.global_batch * (cfg.seq_len + 1), cfg.seed)
        rate = measure_matmul_rate(device)
        _say(rank, f"matmul rate {rate / 1e12:.3g} TFLOP/s per worker")
        results: dict[str, Any] = {"matmul_flops_per_s": rate}
        name, schedule, fp8 = run
        profiles: list = []
        results[name] = _one_run(cfg, rank, name, schedule, fp8, tokens, device, stacks, profiles)
        dist.barrier()
        for prof in profiles:  # no collective follows: nobody waits on the table
            write_profile(cfg, name, rank, prof)
        if rank == 0:
            Path(out_dir, f"bench-{name}.json").write_text(json.dumps(results))
            # the log keeps each finished run's numbers even if a later run fails
            r = results[name]
            _say(
                rank,
                f"{name} done: "
                + json.dumps(
                    {
                        "step_time_s": r["step_time_s"],
                        "bubble_fraction": r["bubble_fraction"],
                        "simulated_bubble_fraction": r["simulated_bubble_fraction"],
                        "final_loss": r["losses"][-1],
                        "matmul_flops_per_s": rate,
                    }
                ),
            )
    finally:
        dist.destroy_process_group()


def _worker_env(device: str):
    """The environment spawned CUDA workers start with: distributed.CUDA_ENV (its allocator choice
    must precede the workers' `import torch`)."""
    from unittest import mock

    return mock.patch.dict(os.environ, CUDA_ENV) if device == "cuda" else contextlib.nullcontext()


def run(cfg: BenchConfig) -> dict:
    raw: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        # One set of worker processes per run: on NCCL a second run in the same processes can hang
        # in its first step (benchmarks/notes-train.md), and fresh processes also keep one run's
        # cached memory, communicators and compiled kernels out of the next's timings.
        failed: dict[str, str] = {}
        for i, run_ in enumerate(runs(cfg)):
            try:
                with _worker_env(cfg.device):
                    mp.spawn(
                        _worker,
                        args=(cfg, os.path.join(tmp, f"pg{i}"), tmp, run_),
                        nprocs=cfg.world,
                        join=True,
                    )
            except Exception as err:
                if run_[0] == f"{cfg.schedule}-fp8":
                    raise  # the main run: nothing to report without it
                failed[run_[0]] = f"{type(err).__name__}: {err}"
                print(f"[bench train] {run_[0]} failed: {failed[run_[0]]}", flush=True)
                continue
            raw.update(json.loads(Path(tmp, f"bench-{run_[0]}.json").read_text()))
    return summarize(cfg, raw, failed)


def summarize(cfg: BenchConfig, raw: dict, failed: dict[str, str]) -> dict:
    """The result from the runs' raw numbers (`raw[name]` per finished run, and the measured
    `matmul_flops_per_s`); numbers of the runs in `failed` are None."""
    s = cfg.schedule
    main, bf16, base = raw[f"{s}-fp8"], raw.get(f"{s}-bf16"), raw.get("1f1b-fp8")
    dual = main if s == "dualpipe" else None  # the DualPipe numbers, where it ran
    model_cfg = cfg.model_config()
    tokens_per_step = cfg.global_batch * cfg.seq_len
    tokens_per_s = tokens_per_step / main["step_time_s"]
    flops = train_flops_per_token(model_cfg, cfg.seq_len)
    rate = raw["matmul_flops_per_s"]
    last = min(5, len(main["losses"]))
    fp8_final = main["losses"][-1]
    tail_fp8 = sum(main["losses"][-last:]) / last
    bf16_final = bf16["losses"][-1] if bf16 else None
    tail_bf16 = sum(bf16["losses"][-last:]) / last if bf16 else None

    def of(run: dict | None, key: str):
        return None if run is None else run[key]

    return {
        "failed_runs": failed,  # run -> error; its numbers below are null
        "config": asdict(cfg),
        "workers": cfg.world,
        "schedule": s,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_s,
        "mfu": flops * tokens_per_s / (cfg.world * rate),
        "train_flops_per_token": flops,
        "matmul_flops_per_s_per_worker": rate,
        "step_time_s": main["step_time_s"],
        "step_time_s_1f1b": of(base, "step_time_s"),
        "step_time_s_bf16": of(bf16, "step_time_s"),
        "bubble_fraction_dualpipe": of(dual, "bubble_fraction"),
        "bubble_fraction_1f1b": of(base, "bubble_fraction"),
        "simulated_bubble_fraction_dualpipe": of(dual, "simulated_bubble_fraction"),
        "simulated_bubble_fraction_1f1b": of(base, "simulated_bubble_fraction"),
        "op_costs_s_dualpipe": of(dual, "op_costs_s"),
        "op_costs_s_1f1b": of(base, "op_costs_s"),
        "fp8_bf16_step_time_ratio": main["step_time_s"] / bf16["step_time_s"] if bf16 else None,
        "fp8_final_loss": fp8_final,
        "bf16_final_loss": bf16_final,
        "fp8_bf16_loss_rel_diff": abs(fp8_final - bf16_final) / bf16_final if bf16 else None,
        f"fp8_bf16_loss_rel_diff_mean_last{last}": (
            abs(tail_fp8 - tail_bf16) / tail_bf16 if bf16 else None
        ),
        "first_loss": main["losses"][0],
        "losses_fp8": main["losses"],
        "losses_bf16": of(bf16, "losses"),
    }


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        prog="moeray bench train",
        description="\n\n".join(doc[:3]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = BenchConfig()
    p.add_argument(
        "--model",
        default=d.model,
        help="a preset (tiny, small, moonlight_16b_a3b, ...) or an HF config.json",
    )
    p.add_argument(
        "--layers",
        default=d.layers,
        help="decoder layers: N, or auto (--pp 1 on CUDA: the most that fit, printed with why)",
    )
    p.add_argument(
        "--moments-dtype", default=d.moments_dtype, help="--pp 1: AdamW moments, float32|bfloat16"
    )
    p.add_argument(
        "--fp8-scope",
        choices=FP8_SCOPES,
        default=d.fp8_scope,
        help="--pp 1 FP8 runs: every projection (all, DeepSeek-V3's recipe) or the routed "
        "experts only (experts; the other linears stay BF16)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--pp", type=int, default=d.pp)
    p.add_argument("--ep", type=int, default=d.ep)
    p.add_argument(
        "--microbatches",
        type=int,
        default=d.microbatches,
        help="per step and pipeline, both DualPipe directions together",
    )
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--warmup", type=int, default=d.warmup, help="steps left out of the timings")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--seed", type=int, default=d.seed, help="random weights and batches (the first seed)"
    )
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads per worker")
    p.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=d.overlap,
        help="DualPipe F&B slots in two host threads and CUDA streams (default: on "
        "CUDA only); --no-overlap runs them one after the other",
    )
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    p.add_argument(
        "--grouped-fp8",
        action=argparse.BooleanOptionalAction,
        default=d.grouped_fp8,
        help="FP8 runs: routed experts through the grouped FP8 GEMM (one launch per "
        "projection for all experts; default: on CUDA only); --no-grouped-fp8 "
        "runs one GEMM per expert",
    )
    p.add_argument(
        "--kgrouped-wgrad",
        action=argparse.BooleanOptionalAction,
        default=d.kgrouped_wgrad,
        help="--pp 1: a third run, FP8 with the experts' weight gradients in one k-grouped GEMM "
        "per projection (default: on CUDA only)",
    )
    p.add_argument(
        "--runs",
        default=d.runs,
        help="--pp 1: the runs to make, comma-separated, among "
        f"{', '.join(RUN_NAMES)}, each optionally with {GRAPHS_SUFFIX} (micro-batches replayed "
        "from a CUDA graph; default: every one that applies, none graphed); bf16 or "
        f"bf16{GRAPHS_SUFFIX} among them; an FP8 run may end in {SCOPE_SEP}<scope> (one of "
        f"{', '.join(FP8_SCOPES)}): that run with its own --fp8-scope",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=d.seeds,
        help="--pp 1: train each run from this many seeds (other weights and batches each) and "
        "compare its loss with BF16's seed by seed",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="profile each run's last step on rank 0 (left out of the timings) and "
        "write DIR/profile-<run>-rank0.txt: ops by self CPU time and by count. "
        "The profiled step runs ~15x slower (4x H200): keep MOERAY_DIST_TIMEOUT_S "
        "above it",
    )
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = BenchConfig(
            args.model,
            args.device,
            args.pp,
            args.ep,
            args.microbatches,
            args.micro_batch_size,
            args.seq_len,
            args.steps,
            args.warmup,
            args.lr,
            seed=args.seed,
            threads=args.threads,
            overlap=args.overlap,
            profile_dir=args.profile,
            grouped_fp8=args.grouped_fp8,
            layers=args.layers,
            moments_dtype=args.moments_dtype,
            kgrouped_wgrad=args.kgrouped_wgrad,
            fp8_scope=args.fp8_scope,
            runs=args.runs,
            seeds=args.seeds,
        )
        if cfg.one_device and cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible")
        dist_timeout_s()  # a bad MOERAY_DIST_TIMEOUT_S fails here, not in every worker
        if cfg.device == "cuda":
            if torch.cuda.device_count() < cfg.world:
                raise ValueError(
                    f"{cfg.world} workers need {cfg.world} GPUs, found {torch.cuda.device_count()}"
                )
    except ValueError as e:
        print(f"moeray bench train: {e}", file=sys.stderr)
        return 2
    if cfg.one_device:
        return bench_one.main(cfg, Path(args.out) if args.out else None)
    numbers = run(cfg)
    slug = device_slug() if cfg.device == "cuda" else "cpu"
    path = write_result(f"train-{slug}", numbers, directory=Path(args.out) if args.out else None)
    keys = (
        "tokens_per_s",
        "mfu",
        "step_time_s",
        "bubble_fraction_dualpipe",
        "bubble_fraction_1f1b",
        "simulated_bubble_fraction_dualpipe",
        "simulated_bubble_fraction_1f1b",
        "fp8_bf16_step_time_ratio",
        "fp8_bf16_loss_rel_diff",
        "fp8_final_loss",
        "bf16_final_loss",
    )
    for k in keys:
        print(f"{k:<36} {'-' if numbers[k] is None else format(numbers[k], '.6g')}")
    print(f"written to {path}")
    if numbers["failed_runs"]:
        print(
            f"moeray bench train: runs failed: {', '.join(numbers['failed_runs'])} (their numbers "
            f"are null in {path})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
