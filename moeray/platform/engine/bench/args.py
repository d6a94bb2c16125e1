"""`moeray bench engine`'s command line: the flags, checked, with the model config resolved."""

from __future__ import annotations

import argparse

from moeray.platform.config import PRESETS, ModelConfig, preset
from moeray.platform.config.graphs import (
    MAX_SPECULATIVE_TOKENS,
    check_chunk_seqs,
    check_chunk_tokens,
)
from moeray.platform.engine.bench.ab import parse_ab
from moeray.platform.engine.engine_config import EngineConfig

DESCRIPTION = "`moeray bench engine`: decode and prefill throughput of the engine"

SECTIONS = ("prefill", "router-ab", "hf", "mtp")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moeray bench engine", description=DESCRIPTION)
    p.add_argument("--preset", default=None, help=f"one of {sorted(PRESETS)} (default small)")
    p.add_argument("--config", default=None, help="an HF config.json (or its directory)")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument(
        "--dense-layers",
        type=int,
        default=None,
        help="override first_k_dense_replace (default: the config's, at most --layers)",
    )
    p.add_argument("--weights", default="bf16", choices=("bf16", "fp8"))
    p.add_argument("--batch-sizes", default="1,16,64,256")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=None, help="default: 8 x --prompt-len")
    p.add_argument("--hf-max-batch", type=int, default=256, help="skip transformers above this")
    p.add_argument(
        "--hf-max-weight-gib",
        type=float,
        default=8.0,
        help="skip transformers for larger models (it needs a saved copy and a second model)",
    )
    p.add_argument("--cycle-len", type=int, default=512)
    p.add_argument(
        "--mtp-train-steps",
        type=int,
        default=150,
        help="0: random weights made on the device, no MTP (speed runs)",
    )
    p.add_argument(
        "--mtp-drafts",
        default="",
        help="comma-separated draft counts past 1 (2 .. MAX_SPECULATIVE_TOKENS) for the MTP "
        "section's arms of several drafts a step (greedy; with --temperature, sampled too)",
    )
    p.add_argument("--profile-steps", type=int, default=0, help="decode steps profiled per batch")
    p.add_argument("--skip", default="", help=f"comma-separated sections of {list(SECTIONS)}")
    p.add_argument("--tag", default=None, help="result file engine-<device>-<tag>.json")
    p.add_argument("--device", default=None)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="launch each greedy decode step before the previous one's ids are read back "
        "(default: the engine's, on with CUDA)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="decode runs sample at this temperature (request i seeded i); 0: greedy",
    )
    p.add_argument(
        "--async-sampled",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with async scheduling, sampled requests run ahead too "
        "(EngineConfig.async_scheduling_sampled; default on)",
    )
    p.add_argument(
        "--ab",
        default="",
        help="comma-separated fast-path switches (MOERAY_FUSED_<NAME>), each flipped alone after "
        "the main decode runs and timed on the same weights and prompts (bench/ab.py); A+B flips "
        "several together in one arm",
    )
    p.add_argument(
        "--arrivals",
        type=int,
        default=0,
        help="N requests arriving one every --arrival-every step calls, timed without async "
        "scheduling, then with async_scheduling_prefill off and on (bench/arrivals.py); 0: skip",
    )
    p.add_argument("--arrival-every", type=int, default=2, help="step calls between arrivals")
    p.add_argument(
        "--arrival-burst",
        type=int,
        default=1,
        help="requests that arrive together at each arrival (default 1)",
    )
    p.add_argument(
        "--arrival-prompt-lens",
        default=None,
        help="LO,HI: --arrivals' prompts of lengths drawn uniformly from LO..HI (seeded; the warm "
        "run gets the same lengths) instead of --prompt-len each",
    )
    p.add_argument(
        "--arrival-graph-tokens",
        type=int,
        default=EngineConfig.prefill_graph_tokens,
        help="--arrivals: prefill chunks of up to this many tokens replay CUDA graphs "
        "(EngineConfig.prefill_graph_tokens) in every run, and two more synchronous runs chunk "
        "eagerly (expanded, absorbed MLA) to compare; 0: every chunk eagerly, no extra runs",
    )
    p.add_argument(
        "--arrival-graph-seqs",
        type=int,
        default=EngineConfig.prefill_graph_seqs,
        help="--arrivals: a step's same-length chunks replay one graph of up to this many "
        "(EngineConfig.prefill_graph_seqs); past 1, one more synchronous run replays one chunk "
        "a graph to compare (`single`)",
    )
    p.add_argument("--out-dir", default=None)
    p.add_argument(
        "--note",
        default=None,
        help="free text stored in the result (what was special about the run)",
    )
    a = p.parse_args(argv)
    try:
        a.batch_sizes = [int(x) for x in a.batch_sizes.split(",") if x]
    except ValueError:
        p.error(f"--batch-sizes {a.batch_sizes!r}: expected comma-separated integers")
    if not a.batch_sizes or min(a.batch_sizes) < 1:
        p.error(f"--batch-sizes {a.batch_sizes}: expected positive integers")
    try:
        a.ab = parse_ab(a.ab)
    except ValueError as e:
        p.error(str(e))
    raw = a.mtp_drafts
    try:
        a.mtp_drafts = [int(x) for x in raw.split(",") if x]
    except ValueError:
        a.mtp_drafts = [0]
    if not all(2 <= k <= MAX_SPECULATIVE_TOKENS for k in a.mtp_drafts):
        p.error(
            f"--mtp-drafts {raw!r}: expected comma-separated integers from 2 to "
            f"{MAX_SPECULATIVE_TOKENS}"
        )
    a.skip = {x for x in a.skip.split(",") if x}
    if a.skip - set(SECTIONS):
        p.error(f"--skip {sorted(a.skip - set(SECTIONS))}: accepted sections are {list(SECTIONS)}")
    if a.preset is not None and a.config is not None:
        p.error("--preset and --config both given: pass one")
    if a.arrival_prompt_lens is not None:
        try:
            lo, hi = (int(x) for x in a.arrival_prompt_lens.split(","))
        except ValueError:
            lo = hi = 0
        if not 1 <= lo <= hi:
            p.error(
                f"--arrival-prompt-lens {a.arrival_prompt_lens!r}: expected LO,HI with "
                "1 <= LO <= HI"
            )
        a.arrival_prompt_lens = (lo, hi)
    try:
        check_chunk_tokens(a.arrival_graph_tokens, "--arrival-graph-tokens")
        check_chunk_seqs(a.arrival_graph_seqs, "--arrival-graph-seqs")
    except ValueError as e:
        p.error(str(e))
    if a.arrival_every < 1:
        p.error(f"--arrival-every {a.arrival_every}: expected an integer >= 1")
    if a.arrival_burst < 1:
        p.error(f"--arrival-burst {a.arrival_burst}: expected an integer >= 1")
    for name in ("layers", "dense_layers", "profile_steps", "mtp_train_steps", "arrivals"):
        v = getattr(a, name)
        low = 1 if name == "layers" else 0
        if v is not None and v < low:
            p.error(f"--{name.replace('_', '-')} {v}: expected an integer >= {low}")
    if a.tag is not None and not a.tag.replace("-", "").replace("_", "").isalnum():
        p.error(f"--tag {a.tag!r}: expected letters, digits, '-' and '_'")
    try:
        a.model_config = ModelConfig.from_hf(a.config) if a.config else preset(a.preset or "small")
    except ValueError as e:
        p.error(str(e))
    return a
