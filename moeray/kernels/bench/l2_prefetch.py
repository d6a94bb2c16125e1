"""Benchmark of l2_prefetch (moeray/kernels/l2_prefetch.py): how much faster a batch-1 gemv reads
its weight after the weight was prefetched into L2, at Moonlight-16B-A3B's o_proj (2048 x 2048,
8.4 MB bf16) and its two shared experts' gate + up (5632 x 2048, 23 MB), per mode.

Each case is one CUDA graph of repetitions of: write a 192 MB buffer (L2 flushed of the weight),
the prefetch (or none), a spin of `gap_us` (the latency-bound kernels of a decode layer, during
which DRAM idles), the gemv. Times are each kernel's own GPU time (torch.profiler over graph
replays), so the flush and the spin drop out: `gemv_us` with and without the prefetch, and the
prefetch launch's own time. TB/s counts the weight bytes; `frac_hbm` is against the H200's
4.8 TB/s datasheet rate (a gemv reading from L2 can pass it)."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from moeray.kernels.bench.common import _rec
from moeray.kernels.gemv import gemv
from moeray.kernels.l2_prefetch import MODES, l2_prefetch, region_table

HBM_TBPS = 4.8  # H200 datasheet
WEIGHTS = (("o_proj", 2048, 2048), ("shared_gate_up", 5632, 2048))
GAPS_US = (0, 20)
FLUSH_BYTES = 192 * 2**20  # past the 50 MB L2 several times over
REPS = 8


def _spin_cycles(gap_us: float) -> int:
    clock_khz = torch.cuda.get_device_properties(0).clock_rate  # (may report 0: assume 1.98 GHz)
    return int(gap_us * (clock_khz / 1e3 if clock_khz else 1980))


def _kernel_us(fn, names: tuple[str, ...]) -> dict[str, float]:
    """Per-call GPU time of the kernels whose names contain each of `names`, fn replayed from a
    CUDA graph of REPS calls."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn()
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            g.replay()
        torch.cuda.synchronize()
    out = {}
    for key in names:
        us = sum(e.self_device_time_total for e in prof.key_averages() if key in e.key)
        out[key] = us / (4 * REPS)
    return out


def bench_l2_prefetch(ceil: dict) -> list[dict]:
    """gemv time after a flush, with and without each prefetch mode, per weight and gap."""
    rows: list[dict] = []
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for name, n, k in WEIGHTS:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        table, base = region_table([w], w.device)
        nbytes = w.numel() * w.element_size()
        for gap in GAPS_US:
            cycles = _spin_cycles(gap)
            base_us = None
            for mode in (None, *MODES):

                def step(mode=mode, cycles=cycles, table=table, base=base, x=x, w=w):
                    flush.fill_(1)
                    if mode is not None:
                        l2_prefetch(table, base, mode)
                    if cycles:
                        torch.cuda._sleep(cycles)
                    gemv(x, w)

                try:
                    t = _kernel_us(step, ("gemv", "l2_prefetch"))
                except Exception as e:  # a mode this GPU cannot run (BULK before sm_90)
                    rows.append({"weight": name, "mode": mode, "gap_us": gap, "error": repr(e)})
                    continue
                us = t["gemv"]
                base_us = us if mode is None else base_us
                rows.append(
                    {
                        "kernel": "l2_prefetch",
                        "weight": name,
                        "N": n,
                        "K": k,
                        "bytes": nbytes,
                        "mode": mode or "none",
                        "gap_us": gap,
                        "gemv_us": round(us, 2),
                        "gemv_TBps": round(nbytes / us / 1e6, 3),
                        "frac_hbm": round(nbytes / us / 1e6 / HBM_TBPS, 3),
                        "frac_copy": round(nbytes / us / 1e6 / ceil["copy_TBps"], 3),
                        "prefetch_us": round(t["l2_prefetch"], 2),
                        "gemv_speedup_vs_none": round(base_us / us, 3) if base_us else None,
                    }
                )
    return rows


def print_l2_prefetch(rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"l2_prefetch {r['weight']} {r['mode']} gap {r['gap_us']}: {r['error']}")
            continue
        print(
            f"l2_prefetch {r['weight']:15s} {r['mode']:6s} gap {r['gap_us']:3d} us: gemv "
            f"{r['gemv_us']:6.2f} us ({r['gemv_TBps']:.2f} TB/s, x{r['gemv_speedup_vs_none']} "
            f"none), prefetch launch {r['prefetch_us']:5.2f} us"
        )


def l2_prefetch_records(rows: list[dict]) -> list[dict]:
    """The flat `results` records (runner.flat_results): the gemv after each prefetch mode against
    the copy bandwidth and against the same gemv without a prefetch."""
    return [
        _rec(
            "gemv after l2_prefetch (CUDA graph)",
            f"{r['weight']} N{r['N']} K{r['K']} {r['mode']} gap {r['gap_us']} us",
            r["gemv_us"] / 1e3,
            r["frac_copy"],
            "copy bandwidth",
            "the gemv without a prefetch",
            r["gemv_speedup_vs_none"],
        )
        for r in rows
        if "error" not in r and r["mode"] != "none"
    ]
