"""What every kernel benchmark shares: timers, the ceilings measured in the same run, and the
uniform result record."""

from __future__ import annotations

import itertools
import time

import torch
import triton
from torch.profiler import ProfilerActivity, profile


def _bench(fn, ms: int = 100) -> float:
    """Median milliseconds of fn over ~ms of repeats, after warm-up."""
    return float(triton.testing.do_bench(fn, warmup=25, rep=ms, return_mode="median"))


def time_us_or_reason(fn) -> float | str:
    """Median microseconds of fn (`_bench`), or why it did not run: a swept tile that does not
    compile (shared memory, registers) is a row of the sweep, not its end."""
    try:
        return round(_bench(fn) * 1e3, 1)
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:100]}"


def _bench_slow(fn, reps: int = 3) -> float:
    """Median ms of a slow host-driven baseline (per-expert loops, reference loops)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def device_ms(fn) -> float | None:
    """ms of GPU time one call of fn takes: its CUDA kernels' own times summed (torch.profiler),
    the host's gaps between them left out. A host-bound baseline (the per-expert loop) runs at the
    host's speed, which differs between machines by up to 1.5x; this does not. None where the
    profiler cannot see the GPU (no CUPTI)."""
    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        us = sum(e.self_device_time_total for e in prof.key_averages())
    except Exception:  # a profiler without CUPTI on this machine
        return None
    return us / 1e3 if us > 0 else None


def _graph_ms(fn, calls: int = 20, reps: int = 10) -> float:
    """Median ms per call of fn replayed from a CUDA graph of `calls` back-to-back calls: the
    host-side launch cost (allocations, argument packing, 2 launches per call) drops out."""
    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del g
    return sorted(times)[len(times) // 2]


def _try(fn) -> float | str:
    try:
        return round(_bench(fn), 4)
    except Exception as e:  # a config that does not compile (shared memory, registers)
        return f"{type(e).__name__}: {str(e)[:120]}"


def _copy_ms(n: int) -> float:
    """ms of a device-to-device copy of n fp32 values."""
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    return _bench(lambda: b.copy_(a))


def ceilings() -> dict:
    dev = "cuda"
    n = 1 << 28  # 1 GiB of fp32: far past L2
    copy_ms = _copy_ms(n)
    copy_tbs = 2 * n * 4 / copy_ms / 1e9
    m = 8192
    x = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    bf16_ms = _bench(lambda: x @ y)
    bf16_tflops = 2 * m**3 / bf16_ms / 1e9
    xf = x.to(torch.float8_e4m3fn)
    yf = y.to(torch.float8_e4m3fn).t().contiguous().t()
    one = torch.ones((), device=dev)
    fp8_ms = _bench(
        lambda: torch._scaled_mm(xf, yf, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    )
    fp8_tflops = 2 * m**3 / fp8_ms / 1e9
    return {
        "copy_TBps": round(copy_tbs, 3),
        "bf16_matmul_TFLOPs": round(bf16_tflops, 1),
        "fp8_matmul_TFLOPs": round(fp8_tflops, 1),
        "how": "copy: 1 GiB fp32 device-to-device, bytes read + written; matmul: 8192^3 random, "
        "bf16 torch.matmul and fp8 tensorwise torch._scaled_mm",
    }


def _rec(
    kernel, shape, ms, ratio_to_ceiling, ceiling, baseline, ratio_to_baseline, target=None
) -> dict:
    rec = {
        "kernel": kernel,
        "shape": shape,
        "time_us": round(ms * 1e3, 2) if ms is not None else None,
        "ratio_to_ceiling": ratio_to_ceiling,
        "ceiling": ceiling,
        "baseline": baseline,
        "ratio_to_baseline": ratio_to_baseline,
    }
    if target is not None:  # issue 4's targets (stated for an H100): {field: minimum}
        rec["target"] = target
        rec["meets_target"] = all(rec[f] is not None and rec[f] >= v for f, v in target.items())
    return rec


# Cold weights for the decode GEMV benches: a decode step reads every layer's weights between two
# calls of one layer, so the weight is never in the 50 MB L2 when its layer runs; cycling over
# copies whose bytes pass 256 MB keeps each graph-captured call reading from HBM.
_COLD_BYTES = 256 << 20
_MAX_COPIES = 24  # _graph_ms captures 20 calls after 2 warm-up calls: 22 distinct copies


def _copies(nbytes: int) -> int:
    """How many copies of an nbytes weight keep the benched calls reading HBM."""
    return min(_MAX_COPIES, -(-_COLD_BYTES // nbytes))


def _cycling(fn, args_list):
    """fn over the copies in turn: each graph-captured call reads a different weight copy."""
    it = itertools.cycle(args_list)
    return lambda: fn(*next(it))


def best_and_chosen(rows: list[dict], group) -> tuple[dict, dict]:
    """Of tile-sweep rows ({"us": float, or the reason it did not run; "chosen": the heuristic's
    tile}), per group(row): the fastest row, and the heuristic's row."""
    best: dict = {}
    chosen: dict = {}
    for r in rows:
        if isinstance(r["us"], float):
            g = group(r)
            if g not in best or r["us"] < best[g]["us"]:
                best[g] = r
            if r["chosen"]:
                chosen[g] = r
    return best, chosen


def print_mode_sweep(name: str, rows: list[dict], keys: tuple[str, ...]) -> None:
    """A tile sweep's table, one row per (shape, mode, tile), then the best tile of each (shape,
    mode) against the default. Rows: "us" (float, or why the tile did not run), "TFLOPs",
    "chosen" (the default tile), the `keys` values, and "speedup" where a torch path was timed."""
    print(f"\n{name + ' sweep':18s} {'mode':10s} " + " ".join(f"{k:>10s}" for k in keys))
    for r in rows:
        if isinstance(r["us"], float):
            us = f"{r['us']:8.1f} us {r['TFLOPs']:5.0f} TFLOP/s"
            us += f" x{r['speedup']}" if r.get("speedup") is not None else ""
        else:
            us = str(r["us"])[:60]
        print(
            f"{r['shape']:18s} {r['mode']:10s} "
            + " ".join(f"{r[k]:10d}" for k in keys)
            + f"  {us}{'  (default)' if r['chosen'] else ''}"
        )
    best, chosen = best_and_chosen(rows, lambda r: (r["shape"], r["mode"]))
    for g, r in best.items():
        c = chosen.get(g)
        vs = f", x{r['speedup']} torch" if r.get("speedup") is not None else ""
        print(
            f"sweep best {name} {g[0]:18s} {g[1]:10s}: "
            + " ".join(f"{k}={r[k]}" for k in keys)
            + f" {r['us']} us ({r['TFLOPs']} TFLOP/s{vs}); default {c['us'] if c else 'n/a'} us"
        )
