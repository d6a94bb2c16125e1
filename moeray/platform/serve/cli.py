"""`moeray serve`: its flags become a ServeConfig, which is checked (the model directory, the
memory it needs) and deployed by serve/app.py, or written as a Serve config file to deploy with
`serve run` / `serve deploy` (--write-config)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moeray.platform.config import (
    DECODE_EXCHANGES,
    KV_TRANSPORTS,
    LOAD_FORMATS,
    TOOL_CALL_PARSERS,
    ModelConfig,
    ServeConfig,
)
from moeray.platform.plan.check import check_serve
from moeray.platform.serve.app import check_model_dir, serve_config_file, start


def _chat_template_arg(value: str) -> str:
    """--chat-template: a file's text, or the value itself when it reads as a template (as vLLM
    takes it). The text goes into the config, so the replicas need no such file."""
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if any(c in value for c in "{}\n"):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is neither a file nor a Jinja template")


def _parser() -> argparse.ArgumentParser:
    d = ServeConfig()
    p = argparse.ArgumentParser(
        prog="moeray serve",
        description="Serve a model directory with Ray Serve behind an OpenAI-compatible API.",
    )
    p.add_argument(
        "--model", default=d.model, help=f"HF model directory (default: {d.model}, from make demo)"
    )
    p.add_argument(
        "--model-id",
        "--served-model-name",
        default=None,
        help="name clients use as `model` (default: directory name)",
    )
    p.add_argument("--mode", choices=("pd", "colocated"), default=d.mode)
    p.add_argument("--prefill-replicas", type=int, default=d.prefill_replicas)
    p.add_argument("--decode-replicas", type=int, default=d.decode_replicas)
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument(
        "--api-key", default=None, help="require this bearer token (or set MOERAY_API_KEY)"
    )
    p.add_argument(
        "--kv-transport",
        choices=KV_TRANSPORTS,
        default=d.kv_transport,
        help="how KV moves from prefill to decode (default: object_store)",
    )
    p.add_argument(
        "--kv-transfer-timeout-s",
        type=float,
        default=d.kv_transfer_timeout_s,
        help="P/D: a KV transfer's set-up, send and receive each; then decode prefills itself",
    )
    p.add_argument(
        "--prefill-timeout-s",
        type=float,
        default=d.prefill_timeout_s,
        help="P/D: decode's wait for the prefill reply; then it cancels it and prefills itself",
    )
    p.add_argument(
        "--routing-stats-period-s",
        type=float,
        default=d.routing_stats_period_s,
        help="P/D: decode replicas report free KV pages to the decode router this often",
    )
    p.add_argument("--gpus-per-replica", type=float, default=d.gpus_per_replica)
    p.add_argument("--cpus-per-replica", type=float, default=d.cpus_per_replica)
    p.add_argument("--num-speculative-tokens", type=int, default=d.num_speculative_tokens)
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=d.async_scheduling,
        help="launch each greedy decode step before the previous one's ids are read back "
        "(default: on for CUDA engines, off on CPU)",
    )
    p.add_argument(
        "--async-scheduling-sampled",
        action=argparse.BooleanOptionalAction,
        default=d.async_scheduling_sampled,
        help="with async scheduling, sampled (temperature > 0) requests run ahead too (default on)",
    )
    p.add_argument(
        "--async-scheduling-prefill",
        action=argparse.BooleanOptionalAction,
        default=d.async_scheduling_prefill,
        help="with async scheduling, steps that admit new requests (prefill chunks beside the "
        "decodes) run ahead too instead of draining (default off)",
    )
    p.add_argument(
        "--async-scheduling-spec",
        action=argparse.BooleanOptionalAction,
        default=d.async_scheduling_spec,
        help="with async scheduling and --num-speculative-tokens 1, MTP steps run ahead too "
        "(sampled ones with --async-scheduling-sampled): the verdict and the next step's ids and "
        "positions computed on the device (default on)",
    )
    p.add_argument(
        "--prefill-graph-tokens",
        type=int,
        default=d.prefill_graph_tokens,
        help="GPU: prefill chunks of up to this many tokens (a power of two, 16-1024) replay CUDA "
        "graphs captured at start instead of running eagerly (default 256; 0: off)",
    )
    p.add_argument(
        "--prefill-graph-seqs",
        type=int,
        default=d.prefill_graph_seqs,
        help="GPU: a step's prefill chunks of one length replay one CUDA graph of up to this "
        "many sequences (a power of two, 1-64; default 8)",
    )
    p.add_argument(
        "--weights",
        choices=("dequantize", "fp8"),
        default=d.weights,
        help="an FP8 checkpoint: dequantize it into --dtype (default) or serve it as FP8",
    )
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=d.dtype)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--page-size", "--block-size", type=int, default=d.page_size)
    p.add_argument(
        "--num-pages", type=int, default=None, help="KV cache pages (default: sized from memory)"
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d.enable_prefix_caching,
        help="reuse the KV pages of a prompt's cached full pages (default on)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="the share of the GPU's memory a replica may hold, weights included (default: "
        "--gpus-per-replica when it is a fraction, else all free memory)",
    )
    p.add_argument(
        "--ep",
        type=int,
        default=None,
        help="expert parallelism: each engine replica is a gang of N rank actors (one per GPU; "
        "--gpus/--cpus-per-replica apply per rank); with --mode pd, KV over object_store",
    )
    p.add_argument(
        "--load-format",
        choices=LOAD_FORMATS,
        default=d.load_format,
        help="dummy: random weights of config.json's shapes (benchmarks; needs --ep)",
    )
    p.add_argument(
        "--ep-placement-period",
        type=float,
        default=d.ep_placement_period_s,
        metavar="S",
        help="live expert placement: replan from the gang's per-expert loads every S seconds "
        "when the GPU MaxVio passes --ep-placement-maxvio (0: off)",
    )
    p.add_argument(
        "--ep-redundant-experts",
        type=int,
        default=d.ep_redundant_experts,
        help="redundant expert replicas of live placement (experts + these, a multiple of --ep)",
    )
    p.add_argument("--ep-placement-maxvio", type=float, default=d.ep_placement_maxvio)
    p.add_argument(
        "--ep-timeout-s",
        type=float,
        default=d.ep_timeout_s,
        help="--ep: how long a gang's collective waits before it fails (a dead rank)",
    )
    p.add_argument(
        "--ep-decode-exchange",
        choices=DECODE_EXCHANGES,
        default=d.ep_decode_exchange,
        help="the gang's decode MoE exchange: auto (fixed-size gather, decode CUDA graphs), "
        "gather (always), all_to_all (no decode graphs)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=d.max_body_bytes,
        help=f"refuse larger request bodies with 413 before parsing (default: {d.max_body_bytes})",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=d.tool_call_parser,
        help="the model's tool-call syntax, parsed into tool_calls (default: deepseek_v3)",
    )
    p.add_argument(
        "--chat-template",
        metavar="FILE|TEMPLATE",
        type=_chat_template_arg,
        default=None,
        help="a Jinja chat template (a file, or the template itself) instead of the model's",
    )
    p.add_argument(
        "--write-config", metavar="FILE", help="write the equivalent Serve config YAML and exit"
    )
    return p


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    try:
        cfg = ServeConfig(
            model=a.model,
            model_id=a.model_id,
            mode=a.mode,
            prefill_replicas=a.prefill_replicas,
            decode_replicas=a.decode_replicas,
            host=a.host,
            port=a.port,
            api_key=a.api_key,
            kv_transport=a.kv_transport,
            kv_transfer_timeout_s=a.kv_transfer_timeout_s,
            prefill_timeout_s=a.prefill_timeout_s,
            routing_stats_period_s=a.routing_stats_period_s,
            gpus_per_replica=a.gpus_per_replica,
            cpus_per_replica=a.cpus_per_replica,
            num_speculative_tokens=a.num_speculative_tokens,
            async_scheduling=a.async_scheduling,
            async_scheduling_sampled=a.async_scheduling_sampled,
            async_scheduling_prefill=a.async_scheduling_prefill,
            async_scheduling_spec=a.async_scheduling_spec,
            prefill_graph_tokens=a.prefill_graph_tokens,
            prefill_graph_seqs=a.prefill_graph_seqs,
            max_model_len=a.max_model_len,
            max_num_seqs=a.max_num_seqs,
            max_num_batched_tokens=a.max_num_batched_tokens,
            page_size=a.page_size,
            num_pages=a.num_pages,
            enable_prefix_caching=a.enable_prefix_caching,
            gpu_memory_utilization=a.gpu_memory_utilization,
            max_body_bytes=a.max_body_bytes,
            weights=a.weights,
            dtype=a.dtype,
            ep=a.ep,
            load_format=a.load_format,
            ep_placement_period_s=a.ep_placement_period,
            ep_redundant_experts=a.ep_redundant_experts,
            ep_placement_maxvio=a.ep_placement_maxvio,
            ep_timeout_s=a.ep_timeout_s,
            ep_decode_exchange=a.ep_decode_exchange,
            tool_call_parser=a.tool_call_parser,
            chat_template=a.chat_template,
        )
    except ValueError as e:
        print(f"moeray serve: {e}", file=sys.stderr)
        return 2
    if a.write_config:
        import yaml

        header = (
            "# Written by `moeray serve --write-config`; "
            "run with `serve run F` or `serve deploy F`.\n"
            "# `args` are ServeConfig fields (moeray/platform/config/serve.py); e.g. autoscaling:\n"
            "#   {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16} "
            "per engine deployment.\n"
            "# The API key is never written here: "
            "set MOERAY_API_KEY in the cluster's environment.\n"
        )
        Path(a.write_config).write_text(
            header + yaml.safe_dump(serve_config_file(cfg), sort_keys=False)
        )
        print(f"wrote {a.write_config}: serve run {a.write_config}")
        if a.api_key:
            print(
                "note: --api-key is not written to the file; set MOERAY_API_KEY where the app runs",
                file=sys.stderr,
            )
        return 0
    try:
        notes = check_model_dir(cfg)
        notes += check_serve(cfg, ModelConfig.from_hf(cfg.model))  # fits before Serve starts
    except ValueError as e:
        print(f"moeray serve: cannot serve {cfg.model}: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"moeray serve: note: {note}", file=sys.stderr)
    print(
        f"serving {cfg.served_model_id} ({cfg.mode}) on http://{cfg.host}:{cfg.port}/v1 ...",
        flush=True,
    )
    start(cfg, blocking=True)
    return 0
