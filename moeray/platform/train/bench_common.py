"""What both `moeray bench train` paths share: the bench's config, the synthetic data, the model
FLOPs per token and the measured matmul rate. The pipeline bench is `bench.py` (PP x EP worker
processes), the one-device bench `bench_one.py` (PP = EP = 1: one process, no process group)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moeray.platform.config import PRESETS, ModelConfig, preset
from moeray.platform.fp8 import FP8_SCOPES
from moeray.platform.parallel import schedule as sched
from moeray.platform.parallel.stages import split_layers
from moeray.platform.train.step import MOMENTS_DTYPES

# the one-device bench's runs (bench_run.run_specs); each also with GRAPHS_SUFFIX, its
# micro-batches replayed from a CUDA graph (train/graphs.py, CUDA only)
RUN_NAMES = ("bf16", "fp8", "fp8-kgrouped", "fp8-bf16wgrad")
GRAPHS_SUFFIX = "-graphs"
# an FP8 run's name may end in SCOPE_SEP and an FP8 scope (fp8.FP8_SCOPES): that run with its own
# scope, so that several scopes share one BF16 base run ("fp8-bf16wgrad-graphs@mlp")
SCOPE_SEP = "@"


def split_run_name(name: str) -> tuple[str, str | None]:
    """A run name's run and FP8 scope: ("fp8-graphs", "mlp") for "fp8-graphs@mlp", the scope None
    where the name has none."""
    run, sep, scope = name.partition(SCOPE_SEP)
    return run, (scope if sep else None)


@dataclass(frozen=True)
class BenchConfig:
    model: str = "tiny"  # a preset name or an HF config.json (or its directory)
    device: str = "cpu"
    pp: int = 2
    ep: int = 1
    microbatches: int = 8
    micro_batch_size: int = 2
    seq_len: int = 64
    steps: int = 40
    warmup: int = 3
    lr: float = 3e-3
    seed: int = 0
    threads: int = 1  # CPU: torch threads per worker
    overlap: bool | None = None  # DualPipe F&B slots in two threads/streams; None: on CUDA only
    profile_dir: str | None = None  # rank 0 profiles each run's last step into this directory
    grouped_fp8: bool | None = (
        None  # FP8 runs: routed experts through the grouped FP8 GEMM; None: on CUDA only
    )
    # decoder layers: None the model's, a number, or "auto" (one device: the most that fit, see
    # bench_one.fit_layers)
    layers: str | None = None
    moments_dtype: str = "float32"  # one device: AdamW's moments (step.MOMENTS_DTYPES)
    fp8_scope: str = "experts"  # FP8 runs: what runs in FP8 (fp8.FP8_SCOPES; job_config's default)
    # one device: a third run, FP8 with k-grouped expert weight gradients; None: on CUDA only
    kgrouped_wgrad: bool | None = None
    # one device: the runs to make, comma-separated names (bench_run.run_specs); None: all that
    # apply. "bf16" or "bf16-graphs" is required: every FP8 run is compared with BF16. An FP8
    # run may name its own scope ("fp8-bf16wgrad-graphs@mlp", SCOPE_SEP); else fp8_scope.
    runs: str | None = None
    # one device: each run trained from this many seeds (seed, seed + 1, ...: other weights and
    # batches each), its loss compared with BF16's of the same seed
    seeds: int = 1

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: expected cpu or cuda")
        if self.steps <= self.warmup + 1 or self.warmup < 0:
            raise ValueError(f"steps={self.steps} must exceed warmup={self.warmup} + 1")
        if min(self.pp, self.ep, self.microbatches, self.micro_batch_size, self.seq_len) < 1:
            raise ValueError("pp, ep, microbatches, micro_batch_size and seq_len must be >= 1")
        if self.layers is not None and self.layers != "auto":
            if not self.layers.isdigit() or int(self.layers) < 1:
                raise ValueError(f"layers={self.layers!r}: expected a number >= 1 or 'auto'")
        if self.layers == "auto" and not self.one_device:
            raise ValueError("layers='auto' needs one device (--pp 1 --ep 1)")
        if self.fp8_scope not in FP8_SCOPES:
            raise ValueError(
                f"fp8_scope={self.fp8_scope!r}: expected one of {', '.join(FP8_SCOPES)}"
            )
        if self.runs is not None:
            parsed = [(n, *split_run_name(n)) for n in self.runs.split(",")]
            names = [run for _, run, _ in parsed]
            bad = [n for n in names if n.removesuffix(GRAPHS_SUFFIX) not in RUN_NAMES]
            bad_scopes = [
                n
                for n, run, scope in parsed
                if scope is not None and (scope not in FP8_SCOPES or not run.startswith("fp8"))
            ]
            if bad_scopes:
                raise ValueError(
                    f"runs={self.runs!r}: {', '.join(bad_scopes)}: a scope ({SCOPE_SEP}<scope>) "
                    f"goes on an FP8 run and is one of {', '.join(FP8_SCOPES)}"
                )
            graphs_off_cuda = self.device != "cuda" and any(
                n.endswith(GRAPHS_SUFFIX) for n in names
            )
            if f"fp8{GRAPHS_SUFFIX}" in names:
                raise ValueError(
                    f"runs={self.runs!r}: fp8{GRAPHS_SUFFIX} cannot be captured: its per-expert "
                    "FP8 weight gradients read the token counts on the host; graph "
                    f"fp8-bf16wgrad{GRAPHS_SUFFIX} or fp8-kgrouped{GRAPHS_SUFFIX}"
                )
            no_bf16 = "bf16" not in names and f"bf16{GRAPHS_SUFFIX}" not in names
            if bad or no_bf16 or not self.one_device or graphs_off_cuda:
                raise ValueError(
                    f"runs={self.runs!r}: expected comma-separated names from "
                    f"{', '.join(RUN_NAMES)} (each may end in {GRAPHS_SUFFIX!r}, CUDA only) "
                    f"including bf16 or bf16{GRAPHS_SUFFIX}, on one device (--pp 1 --ep 1)"
                )
        if self.seeds < 1 or (self.seeds > 1 and not self.one_device):
            raise ValueError(
                f"seeds={self.seeds}: expected >= 1, and 1 unless on one device (--pp 1 --ep 1)"
            )
        if self.moments_dtype not in MOMENTS_DTYPES:
            raise ValueError(
                f"moments_dtype={self.moments_dtype!r}: expected one of {', '.join(MOMENTS_DTYPES)}"
            )
        if not self.one_device:
            for _, schedule, _ in runs(self):
                sched.build(schedule, self.pp, self.microbatches)  # ValueError names bad sizes
        model_cfg = self.model_config()
        if model_cfg.n_routed_experts % self.ep:
            raise ValueError(
                f"ep={self.ep} must divide the {model_cfg.n_routed_experts} routed experts of "
                f"{self.model}"
            )
        split_layers(model_cfg.num_hidden_layers, model_cfg.num_nextn_predict_layers, self.pp)

    @property
    def one_device(self) -> bool:
        """PP = EP = 1: the one-process bench (`bench_one.py`), no pipeline machinery."""
        return self.pp == 1 and self.ep == 1

    def model_config(self, layers: int | None = None) -> ModelConfig:
        """The preset or HF config.json named by `model`, with `layers` decoder layers (default:
        this config's `layers` when a number, else the model's own)."""
        if self.model in PRESETS:
            cfg = preset(self.model)
        elif Path(self.model).expanduser().exists():
            cfg = ModelConfig.from_hf(Path(self.model).expanduser())
        else:
            raise ValueError(
                f"model={self.model!r} is neither a preset ({', '.join(PRESETS)}) nor an HF "
                "config.json or model directory"
            )
        if layers is None and self.layers not in (None, "auto"):
            layers = int(self.layers)
        if layers is not None:
            if layers <= cfg.first_k_dense_replace and cfg.first_k_dense_replace > 0:
                raise ValueError(
                    f"layers={layers}: {self.model} has {cfg.first_k_dense_replace} dense first "
                    "layer(s); give at least one MoE layer more"
                )
            cfg = cfg.replace(num_hidden_layers=layers)
        return cfg

    @property
    def schedule(self) -> str:
        """The main schedule: DualPipe where it applies (even PP), else 1F1B."""
        return "dualpipe" if self.pp % 2 == 0 else "1f1b"

    @property
    def world(self) -> int:
        return self.pp * self.ep

    @property
    def global_batch(self) -> int:
        return self.ep * self.microbatches * self.micro_batch_size


def runs(cfg: BenchConfig) -> tuple[tuple[str, str, bool], ...]:
    """(name, schedule, fp8) of each pipeline run, in order: the main schedule in FP8, the 1F1B
    baseline in FP8 (when the main one is not 1F1B already), the main schedule in BF16. The BF16
    run last, the one most likely to fail (benchmarks/notes-train.md): when it does, the others
    still give the throughput and bubble numbers."""
    main = cfg.schedule
    base = (("1f1b-fp8", "1f1b", True),) if main != "1f1b" else ()
    return ((f"{main}-fp8", main, True), *base, (f"{main}-bf16", main, False))


def bigram_stream(vocab: int, n: int, seed: int):
    """n tokens of a random sparse bigram chain (4 successors per token)."""
    g = torch.Generator().manual_seed(seed)
    succ_V4 = torch.randint(0, vocab, (vocab, 4), generator=g)
    pick = torch.randint(0, 4, (n,), generator=g).tolist()
    out = [int(torch.randint(0, vocab, (1,), generator=g))]
    table = succ_V4.tolist()
    for i in range(n - 1):
        out.append(table[out[-1]][pick[i]])
    return torch.tensor(out, dtype=torch.int64)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward), the MFU numerator:

        6 * N_active  +  3 * A,     A = (L + n_mtp) * H * (d_qk + d_v) * (S + 1)

    N_active: the parameters of every matmul a token passes through, each counted once per use
    (2 FLOPs per weight forward, 4 backward: the input and the weight gradient): the attention
    projections, dense MLPs, shared experts and the K activated routed experts of each layer, the
    router gates, the output head once for the main model and once per MTP depth, MTP's eh_proj;
    not the embedding (a lookup). Norm weights are in `num_parameters` and stay in (L x 2D, under
    1e-3 of N_active at any preset's widths). A: causal attention's two matmuls (QK^T over d_qk,
    PV over d_v) of H heads against (S + 1) / 2 keys on average, 2 FLOPs a product, forward; x 3
    for the training step. Recompute is not counted (model FLOPs, not hardware FLOPs)."""
    V, D = cfg.vocab_size, cfg.hidden_size
    n_mtp = cfg.num_nextn_predict_layers
    matmul_params = cfg.num_parameters(activated=True, include_mtp=True) - V * D + n_mtp * V * D
    attn = (
        (cfg.num_hidden_layers + n_mtp)
        * cfg.num_attention_heads
        * (cfg.qk_head_dim + cfg.v_head_dim)
        * (seq_len + 1)
    )
    return 6.0 * matmul_params + 3.0 * attn


def measure_matmul_rate(device) -> float:
    """FLOP/s of a square GEMM on this worker: CPU fp32 n=512, CUDA bf16 n=8192."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 20 if device.type == "cuda" else 5
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - t0)
