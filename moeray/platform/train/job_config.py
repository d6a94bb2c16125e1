"""The training job's typed config (`TrainJobConfig`: parallel sizes, data, optimizer, loss), read
from a YAML mapping by `job.py` and handed to every worker of `loop.py` as a dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from moeray.platform import config as mc
from moeray.platform.fp8 import FP8_SCOPES
from moeray.platform.parallel import schedule as sched
from moeray.platform.parallel.node_limited import NodeTopology, check_node_limited
from moeray.platform.parallel.stages import split_layers
from moeray.platform.train.schedules import ScheduleConfig
from moeray.platform.train.step import LossConfig, OptimConfig

# what `recompute` may name (replica.parallelize applies it): every RMSNorm, and MLA's q/kv
# up-projections (with the attention inputs they make)
RECOMPUTE = ("norm", "mla_up")


@dataclass(frozen=True)
class ParallelConfig:
    pp: int = 1
    ep: int = 1
    dp: int = 1
    # with pp > 1: 1f1b | zb1p | dualpipe (even pp); with pp = 1 (no pipeline) it is not used
    schedule: str = "dualpipe"
    microbatches: int = 8  # per step and data shard (DualPipe: both directions together)
    overlap: bool | None = None  # DualPipe F&B slots in two threads/streams; None: on CUDA
    # pp = 1 with ep > 1: node-limited routing, the gate's n_group expert groups being the nodes
    # of the EP group, and two-stage dispatch (parallel/node_limited.py)
    node_limited: bool = False
    # EP ranks per node with node_limited (consecutive ranks); 0: read from the ranks' host names
    ranks_per_node: int = 0

    @property
    def world(self) -> int:
        return self.pp * self.ep * self.dp

    @property
    def shards(self) -> int:
        return self.ep * self.dp


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "stdlib"
    max_bytes: int = 2_000_000
    vocab_size: int = 1024
    seq_len: int = 64
    global_batch: int = 8
    seed: int = 0


@dataclass(frozen=True)
class TrainJobConfig:
    model: str = "tiny"  # preset name, or a path to an HF config.json / model directory
    # fine-tuning: an HF model directory whose weights, router biases and tokenizer training
    # starts from (its config.json must be the model's; `model` defaults to it); "": from scratch
    init_from: str = ""
    name: str = "tiny"
    storage: str = "~/moeray_runs"
    output: str = "out/tiny-model"  # final HF model directory (relative: under the run dir)
    steps: int = 200
    log_every: int = 10
    checkpoint_every: int = 50
    max_failures: int = 3
    fp8: bool = False
    # with fp8: the routed experts only (experts), every MLP (mlp), every projection but MLA's
    # o_proj (all-but-o-proj) or every projection (all, DeepSeek-V3's recipe). Default experts:
    # the one scope whose loss stays within 0.25% of BF16 (Moonlight widths, 80 steps, 2 seeds:
    # experts +0.04%, all +0.73%; benchmarks/notes-train.md), still a faster step than BF16
    fp8_scope: str = "experts"
    bf16: bool = False  # run the other GEMMs under bf16 autocast (master weights stay fp32)
    # replay each step's forward and backward from a CUDA graph (train/graphs.py): the host
    # launches one graph instead of ~8,000 kernels a Moonlight-width step. use_gpu, one rank
    cuda_graphs: bool = False
    seed: int = 0
    use_gpu: bool = False
    router_name: str = ""  # default: moeray-router-<name>
    router_namespace: str = "moeray"
    gamma: float = 0.001  # bias update speed; `schedule.gamma` changes it later in the run
    # run these again in the backward instead of keeping their activations (RECOMPUTE)
    recompute: tuple[str, ...] = ()
    # decay of an EMA of the parameters kept in CPU memory (train/ema.py); 0: none
    ema_decay: float = 0.0
    # tests only: SIGKILL rank `kill_rank` once, right before step `kill_at_step`
    kill_at_step: int = -1
    kill_rank: int = 0
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self):
        p = self.parallel
        if self.fp8_scope not in FP8_SCOPES:
            raise ValueError(
                f"fp8_scope={self.fp8_scope!r}: expected one of {', '.join(FP8_SCOPES)}"
            )
        object.__setattr__(self, "recompute", tuple(self.recompute))
        bad = [r for r in self.recompute if r not in RECOMPUTE]
        if bad:
            raise ValueError(
                f"recompute={list(self.recompute)}: {bad} unknown; accepted: {RECOMPUTE}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1) (0: no EMA)")
        if (self.recompute or self.ema_decay) and p.pp > 1:
            raise ValueError(
                f"recompute={list(self.recompute)} and ema_decay={self.ema_decay} need "
                f"parallel.pp=1 (they apply to the flat replica), got pp={p.pp}"
            )
        if min(p.pp, p.ep, p.dp) < 1:
            raise ValueError(f"parallel sizes must be >= 1, got {p}")
        if self.cuda_graphs and not (self.use_gpu and p.pp == p.ep == p.dp == 1):
            # Expert parallelism's all-to-alls and the pipeline's sends run inside the forward;
            # and a graphed job keeps torch's caching allocator, whose cudaMalloc waits for the
            # GPU to idle, which deadlocks ranks waiting on each other (parallel/distributed.py).
            raise ValueError(
                f"cuda_graphs=true needs use_gpu=true and one rank (parallel.pp=ep=dp=1), got "
                f"use_gpu={self.use_gpu}, pp={p.pp}, ep={p.ep}, dp={p.dp}"
            )
        if self.data.global_batch % p.shards:
            raise ValueError(
                f"data.global_batch={self.data.global_batch} must be a multiple of the "
                f"{p.shards} data shards (ep*dp)"
            )
        if p.schedule not in sched.SCHEDULES:
            raise ValueError(
                f"parallel.schedule={p.schedule!r} is not a schedule; accepted: "
                f"{', '.join(sched.SCHEDULES)}"
            )
        if p.pp > 1:
            if p.schedule == "dualpipe" and p.pp % 2:
                raise ValueError(
                    f"parallel.schedule=dualpipe needs an even parallel.pp, got pp={p.pp}: "
                    "use an even pp, or schedule 1f1b or zb1p (any pp >= 2)"
                )
            sched.build(p.schedule, p.pp, p.microbatches)  # ValueError names the bad sizes
            local = self.data.global_batch // p.shards
            if local % p.microbatches:
                raise ValueError(
                    f"each data shard's {local} sequences (global_batch/(ep*dp)) must split into "
                    f"parallel.microbatches={p.microbatches} equal micro-batches"
                )
        if p.node_limited and (p.pp > 1 or p.ep < 2):
            raise ValueError(
                f"parallel.node_limited needs pp=1 and ep >= 2 (the flat replica's expert "
                f"parallelism), got pp={p.pp}, ep={p.ep}"
            )
        if p.ranks_per_node and (not p.node_limited or p.ep % p.ranks_per_node):
            raise ValueError(
                f"parallel.ranks_per_node={p.ranks_per_node} needs node_limited: true and must "
                f"divide parallel.ep={p.ep}"
            )
        if p.ranks_per_node < 0:
            raise ValueError(f"parallel.ranks_per_node={p.ranks_per_node} must be >= 0")
        if self.optim.zero_stage and p.pp > 1:
            raise ValueError(
                f"optim.zero_stage={self.optim.zero_stage} needs parallel.pp=1 (ZeRO-1 shards "
                f"the flat replica's optimizer state), got pp={p.pp}"
            )
        if self.steps < 1 or self.log_every < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, log_every and checkpoint_every must be >= 1")

    @property
    def router(self) -> str:
        return self.router_name or f"moeray-router-{self.name}"

    def gamma_changes(self) -> tuple[tuple[int, float], ...]:
        """`schedule.gamma` as the RouterConfig's (first step, gamma) pairs."""
        return self.schedule.in_steps("gamma", self.steps)

    def gamma_at(self, step: int) -> float:
        return self.schedule.value("gamma", self.gamma, step, self.steps)

    def loss_at(self, step: int) -> LossConfig:
        """The loss config of `step`: `loss` with this step's MTP weight."""
        lam = self.schedule.value("mtp_lambda", self.loss.mtp_lambda, step, self.steps)
        return replace(self.loss, mtp_lambda=lam)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TrainJobConfig:
        """From a parsed YAML/dict; unknown keys raise ValueError naming them."""
        sections = {
            "parallel": ParallelConfig,
            "data": DataConfig,
            "optim": OptimConfig,
            "loss": LossConfig,
            "schedule": ScheduleConfig,
        }
        top = {f.name for f in fields(TrainJobConfig)}
        unknown = set(d) - top
        if unknown:
            raise ValueError(
                f"unknown train config keys {sorted(unknown)}; accepted: {sorted(top)}"
            )
        kw: dict[str, Any] = {}
        if d.get("init_from") and "model" not in d:
            kw["model"] = d["init_from"]
        for key, value in d.items():
            if key in sections:
                cls = sections[key]
                names = {f.name for f in fields(cls)}
                bad = set(value or {}) - names
                if bad:
                    raise ValueError(
                        f"unknown keys {sorted(bad)} in '{key}'; accepted: {sorted(names)}"
                    )
                value = dict(value or {})
                if "betas" in value:
                    value["betas"] = tuple(value["betas"])
                kw[key] = value if isinstance(value, cls) else cls(**value)
            else:
                kw[key] = value
        if "optim" not in kw or "total_steps" not in (d.get("optim") or {}):
            base = kw.get("optim", OptimConfig())
            kw["optim"] = OptimConfig(
                **{
                    **asdict(base),
                    "total_steps": int(d.get("steps", 200)),
                    "warmup_steps": min(base.warmup_steps, int(d.get("steps", 200))),
                }
            )
        return TrainJobConfig(**kw)

    def model_config(self):
        if self.model in mc.PRESETS:
            return mc.preset(self.model)
        return mc.ModelConfig.from_hf(Path(self.model).expanduser())

    def check_model(self, model_cfg: mc.ModelConfig) -> None:
        """ValueError naming the value when the layout cannot split `model_cfg` (before any
        worker starts): EP must divide the routed experts, PP fit the decoder layers."""
        p = self.parallel
        E = model_cfg.n_routed_experts
        if E % p.ep:
            divisors = [d for d in range(1, E + 1) if E % d == 0]
            raise ValueError(
                f"parallel.ep={p.ep} must divide the model's {E} routed experts; "
                f"accepted: {divisors}"
            )
        split_layers(model_cfg.num_hidden_layers, model_cfg.num_nextn_predict_layers, p.pp)
        if p.node_limited and p.ranks_per_node:
            check_node_limited(model_cfg, NodeTopology(p.ep, p.ranks_per_node))
        if self.init_from:
            start = Path(self.init_from).expanduser()
            if not (start / "config.json").is_file():
                raise ValueError(
                    f"init_from={self.init_from!r} is not an HF model directory (no config.json)"
                )
            theirs = asdict(mc.ModelConfig.from_hf(start))
            differ = sorted(k for k, v in asdict(model_cfg).items() if theirs.get(k) != v)
            if differ:
                raise ValueError(
                    f"init_from={self.init_from!r} holds another model than model="
                    f"{self.model!r}: {differ} differ; leave `model` out to train that one"
                )
        if model_cfg.vocab_size != self.data.vocab_size:
            raise ValueError(
                f"data.vocab_size={self.data.vocab_size} must equal the model's "
                f"vocab_size={model_cfg.vocab_size}"
            )
