"""The serving application's settings: `ServeConfig` (the `moeray serve` flags, or the `args` of a
Serve config file) and the values its choice settings accept."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeray.platform.config.graphs import (
    check_chunk_seqs,
    check_chunk_tokens,
    check_speculative_tokens,
)

# The ingress' request body limit (413 above it). 8 MiB: a full 128K-token context is ~0.5 MB of
# English text, ~1 MB as a JSON list of token ids, ~3 MB as \uXXXX-escaped CJK; 8 MiB leaves room
# for a batch of prompts, while a body that would take tens of seconds to tokenize (20 MB: 34 s)
# is refused before it is read.
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
DEFAULT_DEMO_MODEL = "artifacts/demo-model"  # where `make demo` leaves the trained tiny model


@dataclass(frozen=True)
class ServeConfig:
    """The serving application: `moeray serve` flags, or the `args` of a Serve config file."""

    model: str = DEFAULT_DEMO_MODEL  # HF model directory
    model_id: str | None = None  # the name clients send as `model`; default: the directory name
    mode: str = "pd"  # "pd": prefill and decode deployments; "colocated": one engine does both
    prefill_replicas: int = 1
    decode_replicas: int = 1
    # {"min_replicas", "max_replicas", "target_ongoing_requests"} per engine deployment; overrides
    # the fixed replica counts when set.
    autoscaling: dict[str, Any] | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_in_flight: int = 256  # admitted choices at the ingress before 429
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies: 413, never parsed
    max_waiting: int = 64  # requests queued per engine replica before 429
    kv_transport: str = "object_store"
    kv_transfer_timeout_s: float = 30.0  # rdt/channel setup and each send/recv; then recompute
    # A decode replica waits this long for the prefill replica's reply (its queue and prefill
    # included), then cancels the call and prefills the request itself.
    prefill_timeout_s: float = 300.0
    # Decode replicas report free KV pages to the decode router this often (Serve routing stats).
    routing_stats_period_s: float = 1.0
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    device: str = "auto"  # "auto": cuda when a GPU is assigned, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on GPU, float32 on CPU
    # An FP8 checkpoint's weights: "dequantize" into dtype, or "fp8": keep e4m3 + block scales
    # (load_model(keep_fp8=True); the FP8 GEMMs on a GPU, half the weight memory of bf16).
    weights: str = "dequantize"
    # engine
    page_size: int = 64
    num_pages: int | None = None  # None: sized from memory (gpu_memory_utilization)
    enable_prefix_caching: bool = True  # a prompt's cached full pages are reused, not recomputed
    # The share of its GPU's total memory an engine replica (or EP rank) may hold, weights
    # included, as vLLM's gpu_memory_utilization. None: gpus_per_replica when that is a
    # fraction (replicas that share a GPU each keep to their share), else all free memory.
    gpu_memory_utilization: float | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    num_speculative_tokens: int = 0
    # EngineConfig.async_scheduling: None is on for CUDA engines, off on CPU
    async_scheduling: bool | None = None
    # EngineConfig.async_scheduling_sampled: sampled requests run ahead too under async scheduling
    async_scheduling_sampled: bool = True
    # EngineConfig.async_scheduling_prefill: steps that admit requests run ahead too (opt-in)
    async_scheduling_prefill: bool = False
    # EngineConfig.async_scheduling_spec: MTP speculative steps run ahead too
    async_scheduling_spec: bool = True
    # EngineConfig.prefill_graph_tokens: prefill chunks up to this many tokens replay CUDA graphs
    prefill_graph_tokens: int = 256
    # EngineConfig.prefill_graph_seqs: a step's same-length chunks replay one graph of up to this
    prefill_graph_seqs: int = 8
    # Expert parallelism: None serves each engine replica from one process; N makes it a gang of
    # N Ray actors (one per GPU), each running attention for its own requests and holding 1/N of
    # the routed experts (serve/gang.py). gpus/cpus_per_replica then apply per rank.
    ep: int | None = None
    # "safetensors": the model directory's weights (shard-wise under ep); "dummy": random weights
    # of config.json's shapes, for benchmarks of models whose weights are not here (needs ep).
    load_format: str = "safetensors"
    # How long a gang's collective may wait before it fails (a dead rank), in seconds.
    ep_timeout_s: float = 120.0
    ep_placement_period_s: float = 0.0  # live expert placement (serve/gang.py) period; 0: off
    ep_redundant_experts: int = 0  # its extra expert slots (experts + these: a multiple of ep)
    ep_placement_maxvio: float = 0.25  # it replans above this GPU MaxVio (worst MoE layer)
    ep_decode_exchange: str = "auto"  # the gang's decode exchange (DECODE_EXCHANGES)
    # The model's tool-call syntax: "deepseek_v3" (its special tokens) or "json" (a JSON object)
    tool_call_parser: str = "deepseek_v3"
    # A Jinja chat template (its text) used instead of the model directory's: vLLM's
    # --chat-template, which `moeray serve` reads from a file or takes as written.
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("pd", "colocated"):
            raise ValueError(f"mode={self.mode!r}: accepted 'pd' or 'colocated'")
        if self.ep is not None:
            if self.ep < 1:
                raise ValueError(f"ep={self.ep}: accepted None (no gang) or an integer >= 1")
            if self.mode == "pd" and self.kv_transport != "object_store":
                raise ValueError(
                    f"ep={self.ep} with kv_transport={self.kv_transport!r}: P/D gangs move KV "
                    "rows through the object store for now (kv_transport='object_store')"
                )
        for name in ("ep_placement_period_s", "ep_redundant_experts", "ep_placement_maxvio"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name, accepted in (
            ("load_format", LOAD_FORMATS),
            ("kv_transport", KV_TRANSPORTS),
            ("tool_call_parser", TOOL_CALL_PARSERS),
            ("ep_decode_exchange", DECODE_EXCHANGES),
        ):
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name}={getattr(self, name)!r}: accepted {accepted}")
        if self.load_format == "dummy" and self.ep is None:
            raise ValueError("load_format='dummy' builds the ranks of a gang: set ep (1 or more)")
        for name in (
            "prefill_replicas",
            "decode_replicas",
            "max_in_flight",
            "max_body_bytes",
            "max_waiting",
            "page_size",
            "max_num_seqs",
            "max_num_batched_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in (
            "kv_transfer_timeout_s",
            "prefill_timeout_s",
            "routing_stats_period_s",
            "ep_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not self.model:
            raise ValueError("model='': give the model directory")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages={self.num_pages} must be >= 1 or None (sized from memory)")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 1 or None")
        if self.cpus_per_replica < 0:
            raise ValueError(f"cpus_per_replica={self.cpus_per_replica} must be >= 0")
        g = self.gpus_per_replica
        if g < 0 or (g > 1 and g != int(g)):  # Ray: a fraction of one GPU, or whole GPUs
            raise ValueError(f"gpus_per_replica={g}: accepted 0, a fraction below 1, or whole GPUs")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1] or None"
            )
        check_chunk_tokens(self.prefill_graph_tokens)
        check_chunk_seqs(self.prefill_graph_seqs)
        check_speculative_tokens(self.num_speculative_tokens)
        if not 0 < self.port < 65536:
            raise ValueError(f"port={self.port} must be in 1..65535")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: accepted auto, float32, bfloat16, float16")
        if self.weights not in ("dequantize", "fp8"):
            raise ValueError(f"weights={self.weights!r}: accepted 'dequantize' or 'fp8'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: accepted auto, cpu, cuda")
        if self.autoscaling is not None:
            unknown = set(self.autoscaling) - {
                "min_replicas",
                "max_replicas",
                "target_ongoing_requests",
                "initial_replicas",
                "upscale_delay_s",
                "downscale_delay_s",
            }
            if unknown:
                raise ValueError(f"autoscaling keys {sorted(unknown)} are not accepted")

    def memory_share(self) -> float | None:
        """The engine's gpu_memory_utilization: the one set, else gpus_per_replica when it is a
        fraction (replicas packed on one GPU each size their cache from their own share)."""
        if self.gpu_memory_utilization is None and 0 < self.gpus_per_replica < 1:
            return self.gpus_per_replica
        return self.gpu_memory_utilization

    @property
    def served_model_id(self) -> str:
        return self.model_id or Path(self.model).name

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown serve settings {sorted(unknown)}; accepted: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ServeConfig:
        return dataclasses.replace(self, **changes)


# How KV rows move from prefill to decode (serve/kv_transport/): the reply of the prefill call
# (object store), Ray Direct Transport through relay actors, or a persistent pairwise
# torch.distributed channel between the replica processes.
KV_TRANSPORTS = ("object_store", "rdt", "channel")
# Where a serving rank's weights come from (rank_weights.py).
LOAD_FORMATS = ("safetensors", "dummy")
# An EP gang's decode exchange (parallel/serve_ep.py: "auto" gathers when graphs replay).
DECODE_EXCHANGES = ("auto", "gather", "all_to_all")
# How a chat's output becomes tool_calls (serve/http/tool_parsers/): `--tool-call-parser`.
TOOL_CALL_PARSERS = ("deepseek_v3", "json", "kimi_k2")
