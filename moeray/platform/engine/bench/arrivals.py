"""`moeray bench engine --arrivals N`: decode throughput while requests keep arriving, with async
scheduling through admissions (`EngineConfig.async_scheduling_prefill`) off and on.

N greedy requests of the bench's prompt length and --decode-tokens outputs, one (or a burst of
--arrival-burst) added every --arrival-every step calls (a steady arrival rate counted in steps,
so both engines see the same schedule of arrivals against their own steps), stepped until all
end. A burst of same-length prompts is what an eager step batches into one forward per length;
the chunk graphs replay them together too, up to `graph_seqs` a graph, and a `single` run
replays them one chunk a graph (prefill_graph_seqs=1), which lost to eager chunks there.

Off, each admission drains the step in flight and runs its prefill step synchronously: two host
gaps with the GPU idle; on, the admission's prefill runs in the step launched ahead. Each engine is
built on the same weights and warmed by the whole arrival run on other prompts of the same lengths,
then timed: the mixed steps' token counts meet kernel variants that compile on first use (seconds
on a GPU), and without that warm run the arm timed first would pay them for the others. The result
gives output tokens/s, steps, the steps that drained the overlap, and whether the runs' tokens
agree.

Off and on batch different requests together at the same step call (a drain step prefills
without decoding), so at real shapes their greedy tokens part where a near-tied logit rounds
differently at another batch size (`outputs_equal`). A third run without async scheduling
(`sync`) steps exactly as `on` does, one step a call, the same requests in each step: on a
GPU its tokens equal `on`'s bit for bit unless the step launched ahead computes something else
(`on_equals_sync`), and its steps' times split into those with a prefill chunk and the rest
(`sync.mixed_step_ms`, `sync.decode_step_ms`): on an H100 at Moonlight the former ran eagerly at
~50-110 ms (benchmarks/notes-engine.md). Every run replays prefill chunks of up to
`graph_tokens` tokens from CUDA graphs (EngineConfig.prefill_graph_tokens, engine/step_graphs.py;
0: all eagerly); with `graph_tokens` > 0 two more runs are `sync` with every chunk eager:
`eager` through MLA's expanded path (what chunks past the graphs run), `absorbed` through the
absorbed one, which the graphs run. `sync_vs_eager` is the graphs' tokens/s against eager
chunks'; `sync_equals_absorbed` the share of requests with the same tokens as the absorbed run
(1.0 unless a graph computes something else), `sync_equals_eager` the same against `eager`
(near-tied logits part between the two MLA paths' rounding). With `graph_seqs` > 1, `single` is
`sync` with one chunk a graph: `sync_vs_single`, `sync_equals_single`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from moeray.platform.engine.bench.decode import sync
from moeray.platform.engine.engine import Engine
from moeray.platform.engine.sampler import SamplingParams


def arrivals_run(
    engine: Engine, prompts: list[list[int]], max_tokens: int, every: int, burst: int = 1
) -> tuple[dict[str, float], list[list[int]]]:
    """One timed arrival run on a warmed engine: (numbers, each request's output ids). Without
    async scheduling each call is one whole step (the engine synchronizes before returning), so
    the numbers also split the calls' wall time between steps that computed prompt tokens
    (`mixed_step_ms`, a prefill chunk beside the decodes) and decode-only steps
    (`decode_step_ms`); under async scheduling a call's prompt tokens are counted a step late,
    when that step resolves, and no split is given."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    drains0 = engine.metrics().get("async_drains", 0)
    steps, ids, final = 0, list[str](), dict[str, list[int]]()
    calls: dict[bool, list[float]] = {True: [], False: []}  # wall seconds by "computed a prompt"
    sync(engine.device)
    t0 = time.perf_counter()
    while len(ids) < len(prompts) or engine.has_unfinished():
        if steps % every == 0:
            for p in prompts[len(ids) : len(ids) + burst]:
                ids.append(engine.add_request(p, params))
        prompt0, t_call = engine.stats.prompt_tokens, time.perf_counter()
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o.output_token_ids
        calls[engine.stats.prompt_tokens > prompt0].append(time.perf_counter() - t_call)
        steps += 1
    sync(engine.device)
    seconds = time.perf_counter() - t0
    outputs = [final[r] for r in ids]
    numbers = {
        "tokens_per_s": sum(map(len, outputs)) / seconds,
        "seconds": seconds,
        "step_calls": steps,
        "async_drains": engine.metrics().get("async_drains", 0) - drains0,
    }
    if not engine.async_scheduling:
        for key, mixed in (("mixed", True), ("decode", False)):
            numbers[f"{key}_steps"] = len(calls[mixed])
            numbers[f"{key}_step_ms"] = 1e3 * sum(calls[mixed]) / max(1, len(calls[mixed]))
    return numbers, outputs


def arrivals_ab(
    make_engine: Callable[..., Engine],
    prompts: list[list[int]],
    warm_prompts: list[list[int]],
    max_tokens: int,
    every: int,
    graph_tokens: int = 0,
    burst: int = 1,
    graph_seqs: int = 1,
) -> dict[str, Any]:
    """The arrival run without async scheduling (`sync`), then with async_scheduling_prefill off
    and on, all with prefill_graph_tokens=`graph_tokens` and prefill_graph_seqs=`graph_seqs`;
    with `graph_tokens` > 0 also `sync`'s eager references (`eager`: chunks through the expanded
    path; `absorbed`: through the absorbed one, as the graphs), and with `graph_seqs` > 1
    `single` (one chunk a graph). Each arm on a fresh engine (`make_engine(**settings)`) warmed
    by the same run on `warm_prompts` (other tokens, the same lengths: no prefix-cache hits when
    timed). Each arm's `build_s`: the seconds its engine took to build, graph captures included."""
    if every < 1:
        raise ValueError(f"arrival every {every} step calls: expected >= 1")
    if burst < 1:
        raise ValueError(f"arrival burst {burst}: expected >= 1 requests at a time")
    if list(map(len, warm_prompts)) != list(map(len, prompts)):
        raise ValueError("warm_prompts must have the lengths of prompts, one for one")
    result: dict[str, Any] = {"requests": len(prompts), "every": every, "burst": burst}
    result["max_tokens"] = max_tokens
    result["prompt_lens"] = [min(map(len, prompts)), max(map(len, prompts))]
    result["prefill_graph_tokens"] = graph_tokens
    result["prefill_graph_seqs"] = graph_seqs
    outputs = {}
    graphs = {"prefill_graph_tokens": graph_tokens, "prefill_graph_seqs": graph_seqs}
    sync_settings = {"async_scheduling": False, **graphs}
    arms: list[tuple[str, dict[str, Any]]] = [
        ("sync", sync_settings),
        ("off", {"async_scheduling": True, "async_scheduling_prefill": False, **graphs}),
        ("on", {"async_scheduling": True, "async_scheduling_prefill": True, **graphs}),
    ]
    if graph_tokens:
        eager = {"async_scheduling": False, "prefill_graph_tokens": 0}
        arms += [("eager", eager), ("absorbed", {**eager, "prefill_attention": "absorbed"})]
        if graph_seqs > 1:
            arms.append(("single", {**sync_settings, "prefill_graph_seqs": 1}))
    for name, settings in arms:
        t0 = time.perf_counter()
        engine = make_engine(**settings)
        build_s = time.perf_counter() - t0  # with the graphs captured at the start
        arrivals_run(engine, warm_prompts, max_tokens, every, burst)
        result[name], outputs[name] = arrivals_run(engine, prompts, max_tokens, every, burst)
        result[name]["build_s"] = build_s
        del engine
    result["on_vs_off"] = result["on"]["tokens_per_s"] / result["off"]["tokens_per_s"]
    result["on_vs_sync"] = result["on"]["tokens_per_s"] / result["sync"]["tokens_per_s"]
    pairs = [("outputs_equal", "on", "off"), ("on_equals_sync", "on", "sync")]
    if graph_tokens:
        result["sync_vs_eager"] = result["sync"]["tokens_per_s"] / result["eager"]["tokens_per_s"]
        pairs.append(("sync_equals_eager", "sync", "eager"))
        pairs.append(("sync_equals_absorbed", "sync", "absorbed"))
    if "single" in result:
        result["sync_vs_single"] = result["sync"]["tokens_per_s"] / result["single"]["tokens_per_s"]
        pairs.append(("sync_equals_single", "sync", "single"))
    for key, arm, other in pairs:
        same = sum(a == b for a, b in zip(outputs[arm], outputs[other], strict=True))
        result[key] = same / len(prompts)
    return result
