"""Where a training step's GPU time goes, by the source that launched it: `moeray bench train
--pp 1`'s model and step (`train/bench_one.py`: random weights, bf16 autocast, grouped experts,
fused AdamW) at a given width and layer count, one step under torch.profiler with Python stacks.

Each GPU kernel is attributed to the op that launched it and to its source: the innermost moeray
frame of the op's Python stack, or, for ops the autograd engine runs without Python (the backward
of built-in ops), the backward node (`bwd:MmBackward0`). The table lists (source, op) rows by GPU
time with calls, the most common input shapes and the kernel names; the totals line gives the step's
summed kernel time against its wall time.

    python scripts/train_step_profile.py --model moonlight_16b_a3b --layers 4 --device cuda \
        --seq-len 4096 --microbatches 2 --out $OUT                    # one H200, ~1 minute
    .venv/bin/python scripts/train_step_profile.py --model tiny --device cpu   # CPU smoke run
"""

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeray.platform.routing.balance import bias_update
from moeray.platform.train import step as tstep
from moeray.platform.train import zero
from moeray.platform.train.bench_common import BenchConfig, bigram_stream
from moeray.platform.train.bench_run import build_model
from moeray.profile_sources import launching_source
from moeray.results import device_slug, write_result


def _work(evt, cuda: bool) -> list[tuple[str, float]]:
    """(name, us) of what the op ran: its GPU kernels, or on the CPU the op itself when it is a
    leaf aten op (its self time)."""
    if cuda:
        return [(k.name, k.duration) for k in getattr(evt, "kernels", None) or []]
    if evt.name.startswith("aten::") and not any(
        c.name.startswith("aten::") for c in evt.cpu_children
    ):
        return [(evt.name, evt.self_cpu_time_total)]
    return []


def kernel_table(prof, rows: int, cuda: bool) -> tuple[list[dict], float, int]:
    """(rows by GPU time, summed kernel seconds, kernel count) of a profile with stacks; on the
    CPU leaf aten ops stand for kernels."""
    by: dict[tuple[str, str], dict] = {}
    total_us, count = 0.0, 0
    for evt in prof.events():
        work = _work(evt, cuda)
        if not work:
            continue
        row = by.setdefault(
            (launching_source(evt, "train_step_profile"), evt.name),
            {"kernels": 0, "us": 0.0, "shapes": Counter(), "names": Counter()},
        )
        us = sum(d for _, d in work)
        row["kernels"] += len(work)
        row["us"] += us
        row["shapes"][str(evt.input_shapes)[:160]] += 1
        for name, _ in work:
            row["names"][name[:70]] += 1
        total_us += us
        count += len(work)
    ranked = sorted(by.items(), key=lambda kv: -kv[1]["us"])[:rows]
    out = [
        {
            "source": src,
            "op": op,
            "kernels": r["kernels"],
            "ms": r["us"] / 1e3,
            "shapes": r["shapes"].most_common(2),
            "kernel_names": r["names"].most_common(2),
        }
        for (src, op), r in ranked
    ]
    return out, total_us * 1e-6, count


def host_report(step, device: torch.device, rows: int) -> None:
    """Run `step` under cProfile, with torch's sync debug mode warning at each op that makes the
    host wait for the GPU (.item(), nonzero, a D2H copy): the step is host-bound when its wall
    time exceeds its kernel time, and these say where the host spends it."""
    prof = cProfile.Profile()
    cuda = device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        t = time.perf_counter()
        prof.enable()
        try:
            step()
        finally:
            prof.disable()
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        wall = time.perf_counter() - t
    syncs = Counter(
        f"{w.filename.split('moeray/', 1)[-1]}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message)
    )
    print(f"## host: step wall {wall * 1e3:.0f} ms under cProfile, {sum(syncs.values())} syncs")
    for where, n in syncs.most_common(rows):
        print(f"{n:8d}  sync at {where}")
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(rows)
    print("\n".join(line[:200] for line in buf.getvalue().splitlines() if line.strip()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--layers", default=None, help="decoder layers (default: the model's)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--kgrouped", action="store_true", help="FP8 k-grouped weight gradients")
    p.add_argument(
        "--bf16-wgrad", action="store_true", help="FP8 experts' weight gradients from bf16"
    )
    p.add_argument("--fp8-scope", default="all", help="FP8 runs: all or experts")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--out", type=Path, default=None, help="directory for the JSON table")
    p.add_argument(
        "--host",
        action="store_true",
        help="one more step under cProfile with CUDA sync warnings: the host's top functions "
        "and every line that made the host wait for the GPU",
    )
    a = p.parse_args(argv)
    cfg = BenchConfig(
        model=a.model,
        device=a.device,
        pp=1,
        seq_len=a.seq_len,
        micro_batch_size=a.micro_batch_size,
        microbatches=a.microbatches,
        steps=a.warmup + 3,
        warmup=a.warmup,
        layers=a.layers,
        fp8_scope=a.fp8_scope,
    )
    device = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    model_cfg = cfg.model_config(None if a.layers is None else int(a.layers))
    model = build_model(cfg, model_cfg, a.fp8, a.kgrouped, device, a.bf16_wgrad)
    optim = tstep.OptimConfig(lr=1e-3, warmup_steps=1, total_steps=cfg.steps)
    opt = zero.build_optimizer(model, optim)
    S1, mbs = a.seq_len + 1, a.micro_batch_size
    data = bigram_stream(model_cfg.vocab_size, cfg.steps * a.microbatches * mbs * S1, 0).to(device)
    bias_LE = torch.zeros(len(tstep.moe_layers(model)), model_cfg.n_routed_experts)

    def one_step(step: int) -> None:
        nonlocal bias_LE
        loads = torch.zeros_like(bias_LE, dtype=torch.int64, device=device)
        for mb in range(a.microbatches):
            first = (step * a.microbatches + mb) * mbs * S1
            batch = data[first : first + mbs * S1].view(mbs, S1).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                parts = tstep.compute_loss(model, batch, tstep.LossConfig())
            (parts.total / a.microbatches).backward()
            loads += tstep.expert_loads_on_device(model)
        tstep.apply_update(model, opt, step, optim)
        bias_LE = bias_update(bias_LE, loads.cpu(), 0.001)
        tstep.set_biases(model, bias_LE)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for s in range(a.warmup):
        one_step(s)
    t = time.perf_counter()
    one_step(a.warmup)
    wall = time.perf_counter() - t
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, with_stack=True, record_shapes=True) as prof:
        one_step(a.warmup + 1)
    table, gpu_s, n = kernel_table(prof, a.rows, device.type == "cuda")
    label = (
        "fp8-kgrouped"
        if a.kgrouped
        else "fp8-bf16wgrad"
        if a.bf16_wgrad
        else "fp8"
        if a.fp8
        else "bf16"
    )
    print(
        f"## {label} {a.model} layers={model_cfg.num_hidden_layers} seq={a.seq_len} x "
        f"{mbs} x {a.microbatches}: step wall {wall * 1e3:.0f} ms (unprofiled), "
        f"{n} kernels {gpu_s * 1e3:.0f} ms"
    )
    print(f"{'ms':>8} {'kern':>6}  {'op':28.28s} source / shapes / kernels")
    for r in table:
        print(f"{r['ms']:8.2f} {r['kernels']:6d}  {r['op']:28.28s} {r['source']}")
        print(f"{'':16}{r['shapes'][0][0][:150]}  |  {r['kernel_names'][0][0]}")
    if a.host:
        host_report(lambda: one_step(a.warmup + 2), device, a.rows)
    if a.out is not None:
        slug = device_slug() if device.type == "cuda" else "cpu"
        numbers = {
            "model": a.model,
            "layers": model_cfg.num_hidden_layers,
            "tokens_per_step": a.seq_len * mbs * a.microbatches,
            "run": label,
            "step_wall_s_unprofiled": wall,
            "gpu_kernel_s": gpu_s,
            "gpu_kernels": n,
            "rows": json.loads(json.dumps(table, default=str)),
        }
        command = "python scripts/train_step_profile.py " + " ".join(sys.argv[1:])
        name = f"train-step-sources-{slug}-{label}"
        write_result(name, numbers, directory=a.out, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
