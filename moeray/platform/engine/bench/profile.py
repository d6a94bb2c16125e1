"""Where a decode step's time goes: torch.profiler over a few engine decode steps (CUDA graph
replays on a GPU), kernels per step and GPU time by category.

On CUDA the unit is a GPU activity (kernel, memcpy, memset), including the kernels a graph replay
launches; on CPU it is a leaf operator (an aten op with no child op), so the same fields exist
there. Categories come from the name, first matching rule wins (`CATEGORY_RULES`).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from moeray.platform.engine.bench.decode import sync
from moeray.platform.engine.sampler import SamplingParams

# (category, name fragments), lowercase. The router before the MoE (its Triton kernel is
# `_moe_gate_kernel`), quantization before GEMMs (`_act_quant_kernel`), the sort that aligns
# tokens to experts counted as MoE. cuBLAS on Hopper names its GEMMs `nvjet_*` and `sm90_xmma_*`.
CATEGORY_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("router", ("moe_gate_kernel", "topk", "sigmoid")),
    ("moe", ("moe", "sort", "bincount", "histogram")),
    ("attention", ("mla", "attn", "attention", "flash", "softmax")),
    ("quant", ("quant",)),
    (
        "gemm",
        (
            "gemm",
            "gemv",
            "cutlass",
            "xmma",
            "nvjet",
            "cublas",
            "matmul",
            "splitk",
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::baddbmm",
        ),
    ),
    (
        "copy/index",
        (
            "copy",
            "memcpy",
            "memset",
            "index",
            "gather",
            "scatter",
            "cat",
            "fill",
            "embedding",
            "arange",
            "where",
            "masked",
        ),
    ),
    (
        "norm/elementwise",
        (
            "elementwise",
            "vectorized",
            "reduce",
            "norm",
            "rsqrt",
            "pow",
            "mean",
            "silu",
            "mul",
            "add",
            "sub",
            "div",
            "exp",
            "neg",
            "triton_",
        ),
    ),
)
CATEGORIES = (*(c for c, _ in CATEGORY_RULES), "other")
# CPU ops that move no data (views, allocations, dtype no-ops): not counted as work, and an op whose
# children are only these counts as a leaf (aten::mm allocates its output through aten::empty).
METADATA_OPS = frozenset(
    "aten::" + n
    for n in (
        "view",
        "as_strided",
        "empty",
        "empty_strided",
        "empty_like",
        "to",
        "_to_copy_noop",
        "reshape",
        "_reshape_alias",
        "_unsafe_view",
        "expand",
        "t",
        "transpose",
        "permute",
        "slice",
        "select",
        "unsqueeze",
        "squeeze",
        "detach",
        "alias",
        "resolve_conj",
        "resolve_neg",
        "lift_fresh",
        "contiguous",
        "narrow",
        "split",
        "unbind",
        "flatten",
        "result_type",
        "item",
        "_local_scalar_dense",
        "is_nonzero",
    )
)


def categorize(name: str) -> str:
    low = name.lower()
    for category, fragments in CATEGORY_RULES:
        if any(f in low for f in fragments):
            return category
    return "other"


def exclusive_us(intervals: list[tuple[float, float]]) -> list[float]:
    """Each interval's (start_us, end_us) share of the timeline that no earlier-starting interval
    covers: with programmatic dependent launch a kernel starts while its predecessor runs and
    waits, so its own duration double-counts the predecessor's tail. The shares sum to the time
    anything ran (the union of the intervals); input in any order, output in the input's order."""
    order = sorted(range(len(intervals)), key=lambda i: intervals[i][0])
    out = [0.0] * len(intervals)
    covered = float("-inf")
    for i in order:
        start, end = intervals[i]
        out[i] = max(0.0, end - max(start, covered))
        covered = max(covered, end)
    return out


def summarize(events, steps: int, source: str, top: int = 15) -> dict:
    """Per-step totals of (name, duration_us) pairs, or (name, duration_us, exclusive_us) triples
    (`exclusive_us`): kernels and time per category, top names. With exclusive times the record
    also has `busy_ms_per_step` (their sum) and `exclusive_*` fields, and names rank by them."""
    by_cat: dict[str, list[float]] = {c: [0, 0.0, 0.0] for c in CATEGORIES}
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    has_excl = False
    for name, us, *rest in events:
        excl = rest[0] if rest else 0.0
        has_excl = has_excl or bool(rest)
        for entry in (by_cat[categorize(name)], by_name[name]):
            entry[0] += 1
            entry[1] += us
            entry[2] += excl
    n = sum(c[0] for c in by_cat.values())
    total_us = sum(c[1] for c in by_cat.values())
    rank = 2 if has_excl else 1
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][rank])[:top]

    def cat_entry(k: float, us: float, excl: float) -> dict:
        entry = {"kernels_per_step": k / steps, "ms_per_step": us / steps / 1e3}
        if has_excl:
            entry["exclusive_ms_per_step"] = excl / steps / 1e3
        return entry

    def top_entry(name: str, k: float, us: float, excl: float) -> dict:
        entry = {
            "name": name[:160],
            "category": categorize(name),
            "calls_per_step": k / steps,
            "us_per_step": us / steps,
        }
        if has_excl:
            entry["exclusive_us_per_step"] = excl / steps
        return entry

    out = {
        "steps": steps,
        "source": source,
        "kernels_per_step": n / steps,
        "device_ms_per_step": total_us / steps / 1e3,
        "by_category": {c: cat_entry(*v) for c, v in by_cat.items() if v[0]},
        "top": [top_entry(name, *v) for name, v in ranked],
    }
    if has_excl:
        out["busy_ms_per_step"] = sum(c[2] for c in by_cat.values()) / steps / 1e3
    return out


def _start_decoding(engine, prompts: list[list[int]], steps: int) -> list[str]:
    """Add the prompts and step until every one has decoded twice past its prefill, with room for
    `steps` more decode steps; returns the request ids (for `_stop_decoding`)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: expected >= 1")
    # Room to spare: a batch whose prefill spans several steps starts decoding some requests early.
    params = SamplingParams(temperature=0, max_tokens=steps + 64, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    requests = engine.scheduler.requests
    while any(len(requests[r].output_token_ids) < 3 for r in ids if r in requests):
        engine.step()
    sync(engine.device)
    return ids


def _stop_decoding(engine, ids: list[str]) -> None:
    for r in ids:
        engine.abort(r)
    while engine.has_unfinished():  # an abort takes effect at the next step
        engine.step()


HOST_PHASES = (
    "schedule",
    "inputs and launch",
    "forward and sampling",
    "update and outputs",
    "step",
)


def host_phases(engine, prompts: list[list[int]], steps: int) -> dict[str, float]:
    """Milliseconds of host time by phase of a decode step, medians over `steps` plain steps (no
    syncs added) of every prompt decoding: "schedule" (up to the model call), "inputs and launch"
    (the model call up to the return of its decode graph's launch: input copies, the launch; the
    whole eager forward without a graph), "forward and sampling" (from there to the sampler's
    return: on a GPU the wait for the forward, then sampling and the ids' read-back), "update and
    outputs" (the scheduler's update, outputs, the closing sync), and "step". The GPU idles
    through "schedule" and "inputs and launch"."""
    ids = _start_decoding(engine, prompts, steps)
    runner = engine.runner
    marks: dict[str, float] = {}
    execute, sampler = runner.execute, engine.sampler
    runs = {k: g.run for k, g in runner.graphs.items()}

    def mark(name, fn):
        """fn, recording when each call starts (name_in) and returns (name_out)."""

        def wrapped(*args, **kwargs):
            marks[name + "_in"] = time.perf_counter()
            out = fn(*args, **kwargs)
            marks[name + "_out"] = time.perf_counter()
            return out

        return wrapped

    class _MarkedSampler:  # the sampler, its calls marked (async scheduling calls .tokens)
        __call__ = staticmethod(mark("sample", sampler))

        def __getattr__(self, name):
            return getattr(sampler, name)

    runner.execute = mark("execute", execute)
    engine.sampler = _MarkedSampler()
    for k, g in runner.graphs.items():
        g.run = mark("graph", runs[k])
    rows: dict[str, list[float]] = {name: [] for name in HOST_PHASES}
    try:
        for _ in range(steps):
            marks.clear()
            t0 = time.perf_counter()
            engine.step()
            t1 = time.perf_counter()
            if "execute_in" not in marks:
                continue  # no forward (async scheduling resolving the step in flight)
            launched = marks.get("graph_out", marks["execute_out"])
            sampled = marks.get("sample_out", t1)  # a step of drafts only samples in `verify`
            parts = (
                marks["execute_in"] - t0,
                launched - marks["execute_in"],
                sampled - launched,
                t1 - sampled,
                t1 - t0,
            )
            for name, v in zip(HOST_PHASES, parts, strict=True):
                rows[name].append(v)
    finally:
        runner.execute, engine.sampler = execute, sampler
        for k, g in runner.graphs.items():
            g.run = runs[k]
    _stop_decoding(engine, ids)
    return {name: statistics.median(v) * 1e3 if v else 0.0 for name, v in rows.items()}


def profile_decode(engine, prompts: list[list[int]], steps: int) -> dict:
    """Profile `steps` engine steps in which every prompt decodes one token (the prompts are
    prefilled and decoded twice first, outside the profile), then abort the requests."""
    ids = _start_decoding(engine, prompts, steps)
    device = engine.device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    wall = time.perf_counter() - t
    _stop_decoding(engine, ids)
    pairs: list[tuple]  # (name, duration_us[, exclusive_us])
    if cuda:
        gpu = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        excl = exclusive_us([(e.time_range.start, e.time_range.end) for e in gpu])
        pairs = [(e.name, e.time_range.elapsed_us(), x) for e, x in zip(gpu, excl, strict=True)]
        source = (
            "GPU activities (kernels, memcpy, memset), graph replays included; exclusive: the "
            "time no earlier-starting activity covers (PDL overlap counted once)"
        )
    else:
        pairs = [
            (e.name, e.time_range.elapsed_us())
            for e in prof.events()
            if e.device_type == DeviceType.CPU
            and e.name.startswith("aten::")
            and e.name not in METADATA_OPS
            and all(c.name in METADATA_OPS for c in e.cpu_children)
        ]
        source = "CPU leaf aten ops (views and allocations left out)"
    # 40 names: a whole Moonlight layer's kernels at batch 64 (~46 a layer) rank in the top list
    out = summarize(pairs, steps, source, top=40)
    out["wall_ms_per_step"] = wall / steps * 1e3
    return out


def decode_graph_ms(engine, batch: int, replays: int = 50) -> float | None:
    """GPU milliseconds of one replay of the main decode graph that serves `batch` rows: the model
    forward alone, without scheduling, input copies, sampling or the read-back of the sampled ids
    that a step adds. CUDA events around `replays` back-to-back replays (the host queues them
    faster than they run, so no launch gap is counted). None without a captured graph (CPU,
    --no-cuda-graphs). A replay re-runs the graph's last inputs and rewrites the latent its last
    row wrote: call it between batches, when no request is running."""
    runner = engine.runner
    sizes = [bs for bs, S, kind in runner.graphs if S == 1 and kind == "main" and bs >= batch]
    if not sizes:
        return None
    graph = runner.graphs[(min(sizes), 1, "main")].graph
    graph.replay()
    torch.cuda.synchronize(engine.device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays
