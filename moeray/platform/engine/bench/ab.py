"""`moeray bench engine --ab NAME,...`: fast-path switches flipped one at a time in the same run.

Every fast path of the decode step has a switch, the environment variable MOERAY_FUSED_<NAME>
(read where the path is chosen: kernels/common.py `switched_on` / `switched_off`): on unless "0",
or, for the opt-in ones, off unless "1". An A/B of one of them used to be two runs of the bench,
each building the model again and each against its own clock drift. With `--ab`, after the main
decode runs, each named switch gets a fresh Engine on the same weights with that one variable
flipped (the decode graphs are captured under it), timed on the same prompts at the same batches;
then the switches as shipped once more (`as_run_again`), which gives the run's own noise. Each row
records tokens/s, the GPU time of one decode-graph replay and its ratio to the main run, and the
fraction of greedy tokens equal to the main run's (random weights: a path that rounds once in
another order may flip near-ties, so this is information, not a check)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any
from unittest import mock

from moeray.platform.engine.bench.decode import release_engines

# Every MOERAY_FUSED_<NAME> the decode path reads (kernels/gate.py, norm.py's NORM and NORM_W_EARLY,
# rope.py, moe_align.py, swiglu.py, router_logits.py, gemv.py's GEMV, head_gemv.py's
# HEAD_GEMV, HEAD_BMM and HEAD_TILE, moe.py's MOE_GEMV, moe_gemv.py's MOE_GEMV_PAIR and
# MOE_GEMV_FEW, MOE_SUM_FOLD and MOE_DOWN_EARLY, mla_decode.py's MLA_WUV,
# MLA_WGMMA, MLA_WS and MLA_WIDE, mla_launch.py's MLA_SUBPAGE, mla_write_absorb.py's MLA_WUK,
# MLA_WUK_SPLIT and MLA_WUK_SPLIT_WIDE, norm_router.py's NORM_ROUTER
# and NORM_ROUTER_WIDE, moe.py's MOE_H128 and ALIGN_QUANT, common.py's PDL and ROUTE_BATCH,
# fp8/gemv_wide.py's FP8_GEMV_WIDE and FP8_GEMV_ONE_STEP; engine/sampler.py's ARGMAX;
# engine/speculative.py's MTP_CHAIN and engine.py's SPEC_GRAPH and SPEC_GRAPH_SAMPLED (MTP steps
# only: the decode A/B runs none); paged_positions.py's PAGED_POSITIONS (read by
# engine/paged_view.py), model/merge.py's PROJ, shared_fuse.py's SHARED and SHARED_EARLY,
# shared_stream.py's SHARED_STREAM and SHARED_SUM, quant.py's FP8_GEMV_ACT, FP8_GEMV_BATCH,
# FP8_AS_BF16 and FP8_AS_BF16_SMALL).
SWITCHES = (
    *("GATE", "NORM", "ROPE", "ALIGN", "SWIGLU", "GATE_LOGITS", "GEMV", "HEAD_GEMV"),
    *("FP8_GEMV_ACT", "PROJ", "SHARED", "PDL", "MOE_GEMV", "MOE_SUM_FOLD"),
    *("ROUTE_BATCH", "FP8_GEMV_BATCH", "ARGMAX", "FP8_AS_BF16", "SHARED_EARLY"),
    *("FP8_GEMV_WIDE", "MOE_DOWN_EARLY", "MLA_WUV", "MLA_WUK", "FP8_GEMV_ONE_STEP"),
    *("SHARED_STREAM", "FP8_AS_BF16_SMALL", "HEAD_BMM", "MLA_WGMMA", "MLA_WS"),
    *("HEAD_TILE", "MLA_WIDE", "NORM_W_EARLY", "MLA_SUBPAGE", "PAGED_POSITIONS", "NORM_ROUTER"),
    *("MOE_H128", "SHARED_SUM", "ALIGN_QUANT", "NORM_ROUTER_WIDE", "MTP_CHAIN", "MOE_GEMV_PAIR"),
    *("SPEC_GRAPH", "MLA_WUK_SPLIT", "SPEC_GRAPH_SAMPLED", "MOE_GEMV_FEW", "MLA_WUK_SPLIT_WIDE"),
)
# Off unless set to "1" (not yet shown to win on a GPU); every other switch is on unless "0".
OPT_IN = (
    *("HEAD_GEMV", "FP8_GEMV_ACT", "FP8_GEMV_BATCH", "ARGMAX"),
    *("FP8_GEMV_WIDE", "MOE_DOWN_EARLY", "HEAD_TILE"),
    *("NORM_W_EARLY", "MLA_SUBPAGE", "MOE_H128", "MTP_CHAIN", "SPEC_GRAPH_SAMPLED"),
    *("MOE_GEMV_FEW", "MLA_WUK_SPLIT_WIDE"),
)
AGAIN = "as_run_again"


def switch_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """MOERAY_FUSED_<NAME> -> its value for this run, the default filled in ("0" opt-in, else
    "1"), as the result JSON records it."""
    env = os.environ if environ is None else environ
    return {
        f"MOERAY_FUSED_{k}": env.get(f"MOERAY_FUSED_{k}", "0" if k in OPT_IN else "1")
        for k in SWITCHES
    }


def parse_ab(text: str) -> list[str]:
    """The arms of `--ab` ("ARGMAX,HEAD_TILE+HEAD_GEMV"; the MOERAY_FUSED_ prefix optional), in
    order, each once: an arm is one switch, or several joined by "+" flipped together (gains of
    ~1% each can sum past a run's noise where alone none does). ValueError naming an unknown
    switch and the accepted names."""
    arms = []
    for raw in text.split(","):
        names = []
        for part in raw.split("+"):
            name = part.strip().upper().removeprefix("MOERAY_FUSED_")
            if not name:
                continue
            if name not in SWITCHES:
                raise ValueError(
                    f"--ab {part.strip()!r}: not a switch; accepted: {', '.join(SWITCHES)}"
                )
            if name not in names:
                names.append(name)
        arm = "+".join(names)
        if arm and arm not in arms:
            arms.append(arm)
    return arms


def arm_env(arm: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables that run arm `arm` ("A" or "A+B"): each of its switches flipped from this
    run's value; none for AGAIN."""
    if arm == AGAIN:
        return {}
    return {f"MOERAY_FUSED_{name}": flipped(name, environ) for name in arm.split("+")}


def flipped(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The value that turns switch `name` the other way from this run's."""
    value = switch_env(environ)[f"MOERAY_FUSED_{name}"]
    on = value == "1" if name in OPT_IN else value != "0"
    return "0" if on else "1"


def run_ab(
    names: list[str],
    make_engine: Callable[[], Any],
    decode: Callable[[Any, list[list[int]]], tuple[float, list[list[int]]]],
    graph_ms: Callable[[Any, int], float | None],
    prompts: Mapping[int, list[list[int]]],
    main_rates: Mapping[str, float],
    main_graph_ms: Mapping[str, float],
    main_outputs: Mapping[str, list[list[int]]],
    roofline_rates: Mapping[str, float] | None = None,
) -> dict[str, dict]:
    """One row per arm (then AGAIN, unflipped): a fresh engine from `make_engine()` built and
    timed with only that arm's switches flipped (`arm_env`); a row whose engine fails holds the
    error instead. `decode(engine, prompts)` -> (tokens/s, outputs) after its own warm-up;
    `graph_ms(engine, batch)` -> one replay's GPU ms or None; the main run's prompts, rates,
    graph times and outputs by batch size (str keys but `prompts`); `roofline_rates`, the
    roofline's tokens/s by batch size, gives each row its fraction of it."""
    rows: dict[str, dict] = {}
    for name in [*names, AGAIN]:
        env = arm_env(name)
        try:
            rows[name] = _ab_row(env, make_engine, decode, graph_ms, prompts, main_outputs)
        except (
            Exception
        ) as e:  # one path that fails (to build, capture or run) is a row, not the end
            rows[name] = {"env": env, "error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        r = rows[name]
        r["tokens_per_s_vs_main"] = {
            k: v / main_rates[k] for k, v in r["decode_tokens_per_s"].items()
        }
        r["graph_ms_vs_main"] = {k: v / main_graph_ms[k] for k, v in r["decode_graph_ms"].items()}
        if roofline_rates:
            r["roofline_fraction"] = {
                k: v / roofline_rates[k]
                for k, v in r["decode_tokens_per_s"].items()
                if k in roofline_rates
            }
    return rows


def _ab_row(env, make_engine, decode, graph_ms, prompts, main_outputs) -> dict:
    """One engine built, warmed and timed under `env` (the rest of the environment as run)."""
    with mock.patch.dict(os.environ, env):
        release_engines()  # the engine before (the main run's first): its KV cache and graphs
        engine = make_engine()
        rates: dict[str, float] = {}
        graphs: dict[str, float] = {}
        equal: dict[str, float] = {}
        for B, batch_prompts in prompts.items():
            k = str(B)
            rates[k], outs = decode(engine, batch_prompts)
            replay = graph_ms(engine, B)
            if replay is not None:
                graphs[k] = replay
            equal[k] = _equal_fraction(outs, main_outputs[k])
        del engine
    return {
        "env": env,
        "decode_tokens_per_s": rates,
        "decode_graph_ms": graphs,
        "tokens_equal_to_main": equal,
    }


def _equal_fraction(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for sa, sb in zip(a, b, strict=True) for x, y in zip(sa, sb, strict=True)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def ab_table(rows: Mapping[str, dict]) -> list[str]:
    """Printable lines: per row and batch, tokens/s and graph ms against the main run, and the
    fraction of the roofline where the row has it."""
    out = [
        f"{'ab':22s} {'batch':>5s} {'tok/s':>9s} {'vs main':>8s} {'graph ms':>9s} {'vs main':>8s}"
        f" {'roofline':>8s}"
    ]
    for name, r in rows.items():
        if "error" in r:
            out.append(f"{name:22s} failed: {r['error'][:90]}")
            continue
        for k, rate in r["decode_tokens_per_s"].items():
            g = r["decode_graph_ms"].get(k)
            gv = r["graph_ms_vs_main"].get(k)
            roof = r.get("roofline_fraction", {}).get(k)
            out.append(
                f"{name:22s} {k:>5s} {rate:9.1f} {r['tokens_per_s_vs_main'][k]:8.3f} "
                + (f"{g:9.3f} {gv:8.3f}" if g is not None and gv is not None else f"{'-':>18s}")
                + (f" {roof:8.1%}" if roof is not None else "")
            )
    return out
