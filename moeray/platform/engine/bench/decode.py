"""The timed decode loops of `moeray bench engine`: the engine's (`engine_decode`: the whole batch
decoding together) and transformers' `generate` (`hf_decode`), and the step outliers the result
reports."""

from __future__ import annotations

import gc
import statistics
import time

import torch

from moeray.platform.engine.sampler import SamplingParams


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_room(batch: int, prompt_len: int, max_num_batched_tokens: int, drafts: int = 0) -> int:
    """Output tokens a request may decode past another of the same batch: prompts that take k
    prefill steps of max_num_batched_tokens start decoding the first requests while the last ones
    prefill (continuous batching), up to 1 + drafts tokens a step. With 64 prompts of 2,048 tokens
    and a 4,096-token budget, k = 32: more than a 32-token timed run."""
    steps = -(-batch * prompt_len // max_num_batched_tokens)
    return (1 + drafts) * (steps + 2)


def engine_decode(
    engine,
    prompts,
    n: int,
    step_seconds: list[float] | None = None,
    temperature: float = 0.0,
    drains: list[int] | None = None,
) -> tuple[float, list[list[int]]]:
    """Decode tokens/s of the whole batch decoding together (greedy, or sampled at `temperature`
    with request i seeded i) and each request's first n+1 output tokens.

    The prompts are added with room (`decode_room`) past n+1 tokens and stepped untimed until
    every one has its first token; the timed steps then run until the request furthest behind has
    n+1 tokens, and the requests are aborted. Without the room, a batch whose prompts take several
    prefill steps would time a shrinking batch: its first requests, ahead by a token a prefill
    step, would end first (and every step would end some, which drains async scheduling). Each
    timed step's seconds are appended to step_seconds; with async scheduling, the count of timed
    steps that drained it (none expected: the whole batch decodes throughout) to `drains`."""
    drafts = engine.config.num_speculative_tokens
    budget = engine.scheduler.config.max_num_batched_tokens
    room = decode_room(len(prompts), max(map(len, prompts)), budget, drafts)
    ids = [
        engine.add_request(
            p,
            SamplingParams(
                temperature=temperature, max_tokens=n + 1 + room, ignore_eos=True, seed=i
            ),
        )
        for i, p in enumerate(prompts)
    ]
    outs: dict[str, list[int]] = {r: [] for r in ids}

    def step() -> int:
        if not engine.has_unfinished():
            raise RuntimeError(
                f"every request ended before each had {n + 1} tokens "
                f"({min(map(len, outs.values()))} at least): max_model_len too short?"
            )
        new = 0
        for o in engine.step():
            if o.request_id in outs:
                outs[o.request_id].extend(o.new_token_ids)
                new += len(o.new_token_ids)
        return new

    while min(map(len, outs.values())) < 1:
        step()
    produced = 0
    drained = engine.metrics()["async_drains"]
    t = last = time.perf_counter()
    while min(map(len, outs.values())) < n + 1:
        produced += step()
        if step_seconds is not None:  # a synchronous step ends with the engine's sync
            now = time.perf_counter()
            step_seconds.append(now - last)
            last = now
    # No sync here: the last step has read back every counted token (async scheduling leaves one
    # more step in flight, uncounted, as one was in flight uncounted when the clock started).
    dt = time.perf_counter() - t
    if drains is not None and engine.async_scheduling:
        drains.append(engine.metrics()["async_drains"] - drained)
    for r in ids:
        engine.abort(r)
    while engine.has_unfinished():  # an abort takes effect at the next step
        engine.step()
    return produced / dt, [outs[r][: n + 1] for r in ids]


# A timed step this many times the batch's median step is reported as an outlier: the mean step
# (tokens/s) carries such stalls, the median and the graph time do not.
OUTLIER_FACTOR = 1.5


def step_outliers(seconds: list[float], factor: float = OUTLIER_FACTOR) -> list[list[float]]:
    """[[step index, ms], ...] of the timed steps longer than `factor` x their median, in order:
    where in the loop a batch's stalls fall (first step, last, or anywhere)."""
    if not seconds:
        return []
    bound = factor * statistics.median(seconds)
    return [[i, round(1e3 * s, 3)] for i, s in enumerate(seconds) if s > bound]


def warm_decode(engine, prompts, n: int, temperature: float) -> tuple[float, list[list[int]]]:
    """engine_decode after a 2-token warm-up of the whole batch (the main loop's order)."""
    engine_decode(engine, prompts, 2, temperature=temperature)
    return engine_decode(engine, prompts, n, temperature=temperature)


def hf_decode(hf, prompts, n: int, device) -> float:
    """transformers generate: (time(n+1 tokens) - time(1 token)) gives n decode steps."""
    ids = torch.tensor(prompts, device=device)
    kw = dict(do_sample=False, pad_token_id=0)

    def timed(k):
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)
        sync(device)
        return time.perf_counter() - t

    timed(2)  # warm up
    t1 = timed(1)
    tn = timed(n + 1)
    return len(prompts) * n / max(tn - t1, 1e-9)


def release_engines() -> None:
    """Free dropped engines' KV caches and graphs before the next engine allocates: engines hold
    reference cycles, which only the collector frees."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
