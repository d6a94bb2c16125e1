"""Where a decode step's time goes: the engine at one batch size, random weights, CUDA graphs as
`moeray bench engine` runs them. The H200 bench of 2026-11-27 decoded small() at batch 1 in 3.5 ms
per step against an 87 us bandwidth floor (notes-engine.md); this splits a step into the model
call (a graph replay on GPU) and everything around it, then profiles a few steps (self CPU time,
CUDA kernel time, and the calls that wait for the GPU).

    python scripts/engine_step_profile.py --preset small --batch 1 --device cuda --out $OUT
    .venv/bin/python scripts/engine_step_profile.py --preset tiny --device cpu     # CPU smoke run
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeray.platform.config import preset
from moeray.platform.engine.bench.model import random_model
from moeray.platform.engine.bench.profile import host_phases
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer
from moeray.profile_sources import launching_source


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_sources(prof, steps: int, rows: int = 60) -> str:
    """Kernels per step by the innermost moeray source line (outside this script) that launched
    them, with the launching op's name. Needs a profile taken with `with_stack=True`."""
    by: dict[tuple[str, str], list[float]] = {}
    for evt in prof.events():
        kernels = getattr(evt, "kernels", None) or []
        if not kernels:
            continue
        key = (launching_source(evt, "engine_step_profile"), evt.name)
        n_us = by.setdefault(key, [0.0, 0.0])
        n_us[0] += len(kernels)
        n_us[1] += sum(k.duration for k in kernels)
    top = sorted(by.items(), key=lambda kv: -kv[1][0])[:rows]
    lines = [f"## kernels per step by launching source line ({steps} eager steps)"]
    lines += [
        f"{n / steps:7.1f} {us / steps:9.1f}us  {op:32.32s} {src}" for (src, op), (n, us) in top
    ]
    lines.append(f"total kernels per step: {sum(v[0] for v in by.values()) / steps:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64, help="decode steps timed")
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="directory for the profile tables")
    p.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers")
    p.add_argument(
        "--weights",
        choices=("bf16", "fp8"),
        default="bf16",
        help="fp8: e4m3 projections and experts with 128x128 scales, as `serve --weights fp8`",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="no CUDA graphs, and attribute each kernel to the moeray source line that launched it",
    )
    a = p.parse_args(argv)
    if a.batch < 1 or a.steps < 1 or a.profile_steps < 1:
        p.error(
            f"--batch {a.batch}, --steps {a.steps}, --profile-steps {a.profile_steps}: "
            f"expected positive integers"
        )
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = preset(a.preset).replace(eos_token_id=None)
    if a.layers is not None:
        cfg = cfg.replace(num_hidden_layers=a.layers)
    torch.manual_seed(0)
    if a.weights == "fp8":
        model = random_model(cfg, device, dtype, fp8=True)
    else:
        model = Transformer(cfg).to(device=device, dtype=dtype)
    total = 2 * a.steps + a.profile_steps + 8  # decode steps the request must last
    engine = Engine(
        model,
        EngineConfig(
            page_size=64,
            num_pages=a.batch * ((a.prompt_len + total) // 64 + 2) + 8,
            max_num_seqs=a.batch,
            max_num_batched_tokens=max(4096, a.batch * a.prompt_len),
            enable_prefix_caching=False,
            use_cuda_graphs=device.type == "cuda" and not a.eager,
            max_model_len=a.prompt_len + total + 8,
        ),
    )

    # Time the model call inside each step by wrapping the runner's model (graph replay on GPU).
    runner = engine.runner
    inner: list[float] = []
    execute = runner.execute

    def timed_execute(*args, **kwargs):
        _sync(device)
        t = time.perf_counter()
        out = execute(*args, **kwargs)
        _sync(device)
        inner.append(time.perf_counter() - t)
        return out

    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, cfg.vocab_size, (a.prompt_len,), generator=g).tolist()
        for _ in range(a.batch)
    ]
    phases = host_phases(engine, prompts, a.steps)  # its own requests, aborted after
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=total, ignore_eos=True))
    for _ in range(4):  # prefill and the first decodes
        engine.step()
    _sync(device)

    def timed_steps() -> list[float]:
        out = []
        for _ in range(a.steps):
            t = time.perf_counter()
            engine.step()
            _sync(device)
            out.append(time.perf_counter() - t)
        return out

    walls = timed_steps()
    runner.execute = timed_execute
    synced = timed_steps()
    synced_ms = statistics.median(synced) * 1e3
    runner.execute = execute
    model_ms = statistics.median(inner) * 1e3

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, with_stack=a.eager) as prof:
        for _ in range(a.profile_steps):
            engine.step()
        _sync(device)
    table = prof.key_averages()
    text = (
        "## by self CPU time\n"
        + table.table(sort_by="self_cpu_time_total", row_limit=30)
        + (
            "\n\n## by CUDA time\n" + table.table(sort_by="self_cuda_time_total", row_limit=30)
            if device.type == "cuda"
            else ""
        )
    )
    if a.eager:
        text = kernel_sources(prof, a.profile_steps) + "\n\n" + text
    if a.out:
        path = Path(a.out, f"engine-step-profile-{a.preset}-b{a.batch}.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"# {a.preset} batch {a.batch} on {device}, graphs {runner.graph_status}\n\n" + text
        )
    print(text[:6000])
    step_ms = statistics.median(walls) * 1e3
    print(
        f"\n{a.preset} batch {a.batch} on {device} (graphs: {runner.graph_status}):\n"
        f"  step (median of {a.steps})                   {step_ms:8.3f} ms\n"
        f"  step with a sync around the model call       {synced_ms:8.3f} ms\n"
        f"  model call (runner.execute, synced), median   {model_ms:8.3f} ms\n"
        f"  everything else in the step                   {synced_ms - model_ms:8.3f} ms\n"
        f"host time by phase (bench.profile.host_phases: medians of unsynced steps):\n"
        + "\n".join(f"  {name:45s} {ms:8.3f} ms" for name, ms in phases.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
