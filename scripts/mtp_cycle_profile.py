"""Where an MTP cycle's time goes under async scheduling (engine/spec_overlap.py) against plain
decoding's step: per engine call, the wall time, the host's launch and resolve (and of the
resolve, the wait for the read-back), and from a profile of a few calls the GPU's busy time and
its kernels (graph replays count their kernels). A GPU busy for the whole call is the work itself;
a wait of ~0 with launch + resolve ~ the wall is the host. Random weights: the cycle's forwards
are [B, 1 + K] main + [B, 1 + K] MTP (and K - 1 MTP forwards of one position: --drafts K) whatever
the drafts' verdict, so acceptance does not change its cost (the tokens a cycle does: 1 +
accepted).

    python scripts/mtp_cycle_profile.py --preset small --batch 1 --device cuda
    .venv/bin/python scripts/mtp_cycle_profile.py --preset tiny --device cpu --calls 8   # smoke
    python scripts/mtp_cycle_profile.py --batch 1 --temperature 1.0 --top-p 0.9   # sampled rows
    python scripts/mtp_cycle_profile.py --batch 1 --drafts 3   # 3 drafts a step
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeray.platform.config import preset
from moeray.platform.config.graphs import MAX_SPECULATIVE_TOKENS
from moeray.platform.engine.bench.ab import switch_env
from moeray.platform.engine.bench.model import random_model
from moeray.platform.engine.bench.mtp import cycle_speedup
from moeray.platform.engine.bench.profile import exclusive_us
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.results import device_slug, write_result

# Draft acceptances the cycle's speedup is given at: issue 19's 0.78 (one draft, a real
# checkpoint), DeepSeek-V3's report's 0.85-0.9 for its first draft, and 1 (the ceiling).
ACCEPT = (0.6, 0.78, 0.9, 1.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine(model, a, spec: bool, device: torch.device) -> Engine:
    total = 4 * a.calls + 64
    return Engine(
        model,
        EngineConfig(
            page_size=64,
            num_pages=a.batch * ((a.prompt_len + total) // 64 + 2) + 8,
            max_num_seqs=a.batch,
            max_num_batched_tokens=max(4096, a.batch * a.prompt_len),
            enable_prefix_caching=False,
            use_cuda_graphs=device.type == "cuda",
            max_model_len=a.prompt_len + total + 8,
            async_scheduling=True,
            num_speculative_tokens=a.drafts if spec else 0,
            async_scheduling_spec=spec,
        ),
    )


def _timers(engine: Engine, spec: bool) -> dict[str, list[float]]:
    """Wrap the overlap's launch and resolve (and the resolve's wait on the read-back's event)
    to record their host seconds per call."""
    ov = engine._overlap
    assert ov is not None
    target = ov.spec if spec else ov
    assert target is not None
    rec: dict[str, list[float]] = {"launch": [], "resolve": [], "wait": []}
    launch, resolve = target._launch, target._resolve

    def timed(fn, key):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            rec[key].append(time.perf_counter() - t)
            return out

        return wrapper

    def timed_resolve(p):
        if p.copied is not None:
            t = time.perf_counter()
            p.copied.synchronize()
            rec["wait"].append(time.perf_counter() - t)
        else:
            rec["wait"].append(0.0)
        return timed(resolve, "resolve")(p)

    target._launch = timed(launch, "launch")
    target._resolve = timed_resolve
    return rec


def run_arm(model, a, spec: bool, device: torch.device) -> dict:
    engine = _engine(model, a, spec, device)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (a.prompt_len,), generator=g).tolist()]
    prompts *= a.batch
    params = SamplingParams(
        temperature=a.temperature, top_p=a.top_p, max_tokens=4 * a.calls + 32, ignore_eos=True
    )
    for p in prompts:
        engine.add_request(p, params)
    for _ in range(8):  # prefill, the first steps, graph captures (lazy ones too)
        engine.step()
    _sync(device)
    rec = _timers(engine, spec)
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(a.calls):
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    wall = (time.perf_counter() - t0) / a.calls
    timed = {k: statistics.median(v) * 1e3 if v else 0.0 for k, v in rec.items()}
    busy_ms, kernels = 0.0, 0.0
    by_name: dict[str, float] = {}  # kernel name -> exclusive us per call
    if device.type == "cuda":
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(a.profile_calls):
                engine.step()
            _sync(device)
        evts = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        shares = exclusive_us([(e.time_range.start, e.time_range.end) for e in evts])
        busy_ms = sum(shares) / 1e3 / a.profile_calls
        kernels = len(evts) / a.profile_calls
        for e, us in zip(evts, shares, strict=True):
            by_name[e.name] = by_name.get(e.name, 0.0) + us / a.profile_calls
    for r in list(engine.scheduler.requests):
        engine.abort(r)
    while engine.has_unfinished():
        engine.step()
    return {
        "arm": "mtp async" if spec else "plain async",
        "wall_ms": wall * 1e3,
        "tokens_per_call": tokens / a.calls / a.batch,
        "gpu_busy_ms": busy_ms,
        "kernels": kernels,
        "launch_ms": timed["launch"],
        "resolve_ms": timed["resolve"],
        "wait_ms": timed["wait"],
        "kernel_us": dict(sorted(by_name.items(), key=lambda kv: -kv[1])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--calls", type=int, default=64, help="engine calls timed per arm")
    p.add_argument("--profile-calls", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="directory for mtp-cycle-<device>-b<batch>.json")
    p.add_argument("--temperature", type=float, default=0.0, help="> 0: sampled requests")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--drafts", type=int, default=1, help="MTP drafts a step (1 .. 4)")
    a = p.parse_args(argv)
    if min(a.batch, a.calls, a.profile_calls) < 1:
        p.error(f"--batch {a.batch}, --calls {a.calls}, --profile-calls {a.profile_calls}: >= 1")
    if not 1 <= a.drafts <= MAX_SPECULATIVE_TOKENS:
        p.error(f"--drafts {a.drafts}: accepted 1 to {MAX_SPECULATIVE_TOKENS}")
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = preset(a.preset).replace(eos_token_id=None)
    if not cfg.num_nextn_predict_layers:
        p.error(f"--preset {a.preset} has no MTP module (num_nextn_predict_layers=0)")
    model = random_model(cfg, device, dtype)
    rows = [run_arm(model, a, spec, device) for spec in (False, True)]
    how = f"temperature {a.temperature}, top-p {a.top_p}" if a.temperature > 0 else "greedy"
    print(
        f"preset {a.preset}, batch {a.batch}, {how}, {a.drafts} drafts a step, {a.calls} calls "
        "timed, medians per call"
    )
    head = ("arm", "wall ms", "tok/row", "gpu busy", "kernels", "launch", "resolve", "wait")
    print("{:12} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8} {:>6}".format(*head))
    for r in rows:
        print(
            f"{r['arm']:12} {r['wall_ms']:8.3f} {r['tokens_per_call']:8.2f} "
            f"{r['gpu_busy_ms']:9.3f} {r['kernels']:8.0f} {r['launch_ms']:7.3f} "
            f"{r['resolve_ms']:8.3f} {r['wait_ms']:6.3f}"
        )
    # what the measured cycle gives at a draft acceptance (bench/mtp.py's geometric chain)
    at = {a_: cycle_speedup(a_, a.drafts, rows[0]["wall_ms"], rows[1]["wall_ms"]) for a_ in ACCEPT}
    print("x plain at acceptance " + ", ".join(f"{a_:.2f}: {x:.3f}" for a_, x in at.items()))
    # where the cycle's extra GPU time goes: kernels by name, the MTP cycle's us less plain's
    plain, spec = rows[0]["kernel_us"], rows[1]["kernel_us"]
    diff = {k: spec.get(k, 0.0) - plain.get(k, 0.0) for k in set(plain) | set(spec)}
    print("us per call, mtp async - plain async, by kernel (largest 12):")
    for k, v in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:12]:
        print(f"  {v:+8.1f}  {k[:100]}")
    if a.out is not None:
        numbers = {"preset": a.preset, "batch": a.batch, "calls": a.calls, "arms": rows}
        numbers["speedup_at_acceptance"] = {f"{a_:.2f}": x for a_, x in at.items()}
        numbers |= {"temperature": a.temperature, "top_p": a.top_p, "drafts": a.drafts}
        numbers["fast_path_env"] = switch_env()  # every switch, as `bench engine` records it
        name = f"mtp-cycle-{device_slug()}-b{a.batch}" + ("-sampled" if a.temperature > 0 else "")
        name += f"-k{a.drafts}" if a.drafts > 1 else ""
        print(write_result(name, numbers, directory=Path(a.out), command=" ".join(sys.argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
