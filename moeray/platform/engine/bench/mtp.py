"""`moeray bench engine`'s MTP section: decode with and without the MTP drafter on the training
text's prompts, at batch 1 and 16 (or the largest batch the run has, if smaller), against the
same plain baseline. Arms: plain decoding, synchronous MTP steps (`async_scheduling_spec` off),
and MTP steps under async scheduling (`engine/spec_overlap.py`, the default). Greedy always; with
`--temperature T > 0` the same three arms sampled at T too (request i seeded i), under
`mtp.<batch>.sampled`: the two MTP arms draw the same uniforms (their tokens must be equal), plain
decoding draws one a token (its tokens differ; speed only). With `--mtp-drafts 2,3` arms of that
many drafts a step too: greedy with the engine's defaults (`mtp.<batch>.drafts.<k>`: on CUDA run
ahead under async scheduling, one whole-step graph a step), and with `--temperature` the sampled
pair of synchronous and ahead arms (`mtp.<batch>.sampled.drafts.<k>`)."""

from __future__ import annotations

import argparse

import torch

from moeray.platform.engine.bench.decode import engine_decode, release_engines
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.spec_step import SpecGraph
from moeray.platform.engine.speculative import SpecStats


def parted_at(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    """Per sequence, the index of the first token where `a` and `b` differ (the shorter one's
    length where one is a prefix of the other), None where they are equal."""
    out: list[int | None] = []
    for sa, sb in zip(a, b, strict=True):
        first = next((j for j, (x, y) in enumerate(zip(sa, sb, strict=False)) if x != y), None)
        if first is None and len(sa) != len(sb):
            first = min(len(sa), len(sb))
        out.append(first)
    return out


def cycle_speedup(acceptance: float, drafts: int, plain_ms: float, cycle_ms: float) -> float:
    """MTP's tokens/s over plain decoding's where each draft is accepted with probability
    `acceptance` once the drafts before it were (a geometric chain: 1 + a + ... + a^K tokens a
    cycle), from a measured plain step and MTP cycle. A cycle costs the same whatever its verdict
    (its forwards have fixed shapes), so random weights time it; real checkpoints accept later
    drafts less often than the first, so at a given first-draft rate this bounds K > 1 from
    above."""
    if not 0.0 <= acceptance <= 1.0 or drafts < 1 or min(plain_ms, cycle_ms) <= 0:
        raise ValueError(
            f"acceptance {acceptance} (0..1), drafts {drafts} (>= 1), plain_ms {plain_ms} and "
            f"cycle_ms {cycle_ms} (> 0)"
        )
    tokens = sum(acceptance**i for i in range(drafts + 1))
    return tokens * plain_ms / cycle_ms


def _arm(model, ecfg: dict, prompts, n: int, temperature: float, **kw) -> dict:
    """One arm: an engine of `ecfg` + kw for this batch, warmed on 8 tokens, then timed on n
    (`engine_decode`). -> tokens/s, the outputs, the drafter's counts of the timed run and what
    the engine says of its graphs and of the speculative overlap (None where they do not
    apply)."""
    release_engines()  # the arm before's
    # max_num_seqs = B: the engine captures its decode graphs up to B at start
    eng = Engine(model, EngineConfig(**{**ecfg, "max_num_seqs": len(prompts), **kw}))
    # Warm-ups of 8 tokens: with MTP a step can emit 1 + k tokens, and the warm-up must reach
    # steps of S = 1 .. 1 + k so that every CUDA graph (main and MTP) is captured outside the
    # timed loop.
    engine_decode(eng, prompts, 8, temperature=temperature)
    if eng.drafter is not None:
        eng.drafter.stats = SpecStats()  # count the timed run only
    spec = eng._overlap.spec if eng._overlap is not None else None
    launched = spec.overlapped_steps if spec is not None else 0
    whole = [g for g in eng.runner.graphs.values() if isinstance(g, SpecGraph)]
    replayed = sum(g.replays for g in whole)
    drained: list[int] = []
    rate, outs = engine_decode(eng, prompts, n, temperature=temperature, drains=drained)
    return {
        "rate": rate,
        "outs": outs,
        "stats": eng.drafter.stats if eng.drafter is not None else None,
        "cuda_graphs": eng.runner.graph_status,
        "graph_keys": sorted(f"{k[0]}x{k[1]}:{k[2]}" for k in eng.runner.graphs),
        # steps launched while another was in flight, and timed steps that drained the overlap
        "overlapped": spec.overlapped_steps - launched if spec is not None else None,
        "drained": drained[0] if drained else None,
        # timed steps that ran as one whole-step graph (spec_step.SpecGraph)
        "spec_graph_steps": sum(g.replays for g in whole) - replayed,
    }


def _sampled_row(plain: dict, sync: dict, ahead: dict) -> dict:
    """Sampled MTP, synchronous and ahead, against sampled plain decoding (speed only: plain
    draws one uniform a token, so its tokens differ), and whether the two MTP arms' tokens are
    equal (they draw the same uniforms in the same order)."""
    return {
        "tokens_per_s": sync["rate"],
        "speedup": sync["rate"] / plain["rate"],
        "acceptance": sync["stats"].acceptance_rate,
        "async_spec_tokens_per_s": ahead["rate"],
        "async_spec_speedup": ahead["rate"] / plain["rate"],
        "async_spec_acceptance": ahead["stats"].acceptance_rate,
        "async_spec_overlapped_steps": ahead["overlapped"],
        "async_spec_graph_steps": ahead["spec_graph_steps"],  # whole-step replays
        "async_spec_outputs_equal_sync": ahead["outs"] == sync["outs"],
        "async_spec_parts_sync_at": parted_at(sync["outs"], ahead["outs"]),
    }


def _mtp_row(arm: dict, base: dict) -> dict:
    st = arm["stats"]
    return {
        "tokens_per_s": arm["rate"],
        "speedup": arm["rate"] / base["rate"],
        "acceptance": st.acceptance_rate,
        "mean_accepted_length": st.mean_accepted_length,
        # accepted / verified drafts at each draft position of a step (0: the first)
        "acceptance_by_position": [
            a / d if d else 0.0
            for d, a in zip(st.drafted_per_position, st.accepted_per_position, strict=True)
        ],
        "outputs_identical": base["outs"] == arm["outs"],
        # where each sequence's tokens first differ from the baseline's (None: never): a
        # flipped near-tie parts them once and for all, a bug usually early
        "outputs_part_at": parted_at(base["outs"], arm["outs"]),
        "cuda_graphs": arm["cuda_graphs"],
    }


def mtp_speedup(
    model, cycle: torch.Tensor, ecfg: dict, a: argparse.Namespace, g: torch.Generator, max_b: int
) -> dict[str, dict]:
    """MTP on the training text (module docstring), per batch size: the synchronous arm's row
    (tokens_per_s, speedup, acceptance, outputs against plain greedy), `async_spec` (the same for
    MTP under async scheduling, with its overlapped and drained steps and those that replayed a
    whole-step graph, `spec_graph_steps`), `drafts` (a row per a.mtp_drafts count) and, with
    a.temperature > 0, `sampled` (plain / synchronous / async tokens/s at that temperature, the
    speedups, and whether the two MTP arms' tokens are equal)."""
    out: dict[str, dict] = {}
    n, cycle_len = a.decode_tokens, len(cycle)
    temps = [0.0] + ([a.temperature] if a.temperature > 0 else [])
    for B in sorted({1, min(16, max_b)}):
        starts = torch.randint(0, cycle_len, (B,), generator=g)
        prompts = [cycle[(s + torch.arange(a.prompt_len)) % cycle_len].tolist() for s in starts]
        for t in temps:
            plain = _arm(model, ecfg, prompts, n, t)
            sync = _arm(model, ecfg, prompts, n, t, num_speculative_tokens=1,
                        async_scheduling_spec=False)  # fmt: skip
            ahead = _arm(model, ecfg, prompts, n, t, num_speculative_tokens=1,
                         async_scheduling=True, async_scheduling_spec=True)  # fmt: skip
            if t == 0:
                row = _mtp_row(sync, plain)
                row["baseline_tokens_per_s"] = plain["rate"]
                row["graph_keys"] = sync["graph_keys"]
                row["async_spec"] = _mtp_row(ahead, plain)
                row["async_spec"]["overlapped_steps"] = ahead["overlapped"]
                row["async_spec"]["drained_steps"] = ahead["drained"]
                row["async_spec"]["spec_graph_steps"] = ahead["spec_graph_steps"]
                row["drafts"] = {}
                for k in a.mtp_drafts:
                    arm = _arm(model, ecfg, prompts, n, t, num_speculative_tokens=k)
                    row["drafts"][str(k)] = _mtp_row(arm, plain)
                    row["drafts"][str(k)]["overlapped_steps"] = arm["overlapped"]
                    row["drafts"][str(k)]["spec_graph_steps"] = arm["spec_graph_steps"]
                out[str(B)] = row
            else:
                sampled = _sampled_row(plain, sync, ahead)
                sampled["temperature"] = t
                sampled["baseline_tokens_per_s"] = plain["rate"]
                sampled["drafts"] = {}
                for k in a.mtp_drafts:  # the same pair of arms at k drafts a step
                    sync_k = _arm(model, ecfg, prompts, n, t, num_speculative_tokens=k,
                                  async_scheduling_spec=False)  # fmt: skip
                    ahead_k = _arm(model, ecfg, prompts, n, t, num_speculative_tokens=k,
                                   async_scheduling=True, async_scheduling_spec=True)  # fmt: skip
                    sampled["drafts"][str(k)] = _sampled_row(plain, sync_k, ahead_k)
                out[str(B)]["sampled"] = sampled
    return out
