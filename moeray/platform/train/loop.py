"""The training loop of one worker (a Ray Train worker process), and the job's typed config.

World layout: rank = (pp_rank * DP + dp_rank) * EP + ep_rank (`parallel/distributed.Topology`).
With PP = 1 that is dp_rank * EP + ep_rank: ranks [d*EP, (d+1)*EP) form one expert-parallel group
(they split the routed experts); ranks with the same ep_rank form a data-parallel group (they hold
the same expert shard). Every (dp, ep) coordinate is one data shard that reads its own slice of
each global batch, so all EP x DP shards are data-parallel for the replicated parameters.
With PP > 1 each shard is a pipeline of PP ranks that all read the shard's slice (stage 0 needs
the tokens, the last stage the targets and the MTP's future tokens); the slice is cut into
`parallel.microbatches` micro-batches run by `parallel.schedule` (`parallel/pipeline.py`).

Per step: forward and backward on the local batch (PP > 1: all micro-batches through the
pipeline schedule); all-reduce gradients (replicated parameters over the world, expert shards
over their DP group, pipeline copies over their holders; divided by the EP x DP shards);
clip by the global norm; AdamW; report this rank's expert loads to the RouterActor and load the
new biases it returns (so every rank routes the next step with the same biases).

Checkpoint (every `checkpoint_every` steps, through `ray.train.report`): rank{r}.pt per rank
(model shard, optimizer, data position, step) plus router.pt (RouterActor state) and meta.json.
On (re)start a worker restores from `ray.train.get_checkpoint()`, so a killed worker costs at
most the steps since the last checkpoint, which are recomputed on the same batches.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moeray.platform.train.step import LossConfig, OptimConfig


@dataclass(frozen=True)
class ParallelConfig:
    pp: int = 1
    ep: int = 1
    dp: int = 1
    schedule: str = "dualpipe"  # with pp > 1: 1f1b | zb1p | dualpipe
    microbatches: int = 8  # per step and data shard (DualPipe: both directions together)
    overlap: bool | None = None  # DualPipe F&B slots in two threads/streams; None: on CUDA

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
    name: str = "tiny"
    storage: str = "~/moeray_runs"
    output: str = "out/tiny-model"  # final HF model directory (relative: under the run dir)
    steps: int = 200
    log_every: int = 10
    checkpoint_every: int = 50
    max_failures: int = 3
    fp8: bool = False
    bf16: bool = False  # run the other GEMMs under bf16 autocast (master weights stay fp32)
    seed: int = 0
    use_gpu: bool = False
    router_name: str = ""  # default: moeray-router-<name>
    router_namespace: str = "moeray"
    gamma: float = 0.001
    # tests only: SIGKILL rank `kill_rank` once, right before step `kill_at_step`
    kill_at_step: int = -1
    kill_rank: int = 0
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self):
        p = self.parallel
        if min(p.pp, p.ep, p.dp) < 1:
            raise ValueError(f"parallel sizes must be >= 1, got {p}")
        if self.data.global_batch % p.shards:
            raise ValueError(
                f"data.global_batch={self.data.global_batch} must be a multiple of the "
                f"{p.shards} data shards (ep*dp)"
            )
        if p.pp > 1:
            from moeray.platform.parallel.schedule import build

            build(p.schedule, p.pp, p.microbatches)  # ValueError names the bad schedule/sizes
            local = self.data.global_batch // p.shards
            if local % p.microbatches:
                raise ValueError(
                    f"each data shard's {local} sequences (global_batch/(ep*dp)) must split into "
                    f"parallel.microbatches={p.microbatches} equal micro-batches"
                )
        if self.use_gpu and p.pp == 1:
            # The PP = 1 replica keeps its model and gradient sync on the CPU; under use_gpu Ray
            # Train would make an NCCL group that cannot carry its CPU tensors.
            raise ValueError(
                f"use_gpu=true needs parallel.pp >= 2 (got pp={p.pp}): the PP = 1 "
                "path trains on the CPU; set use_gpu: false, or pp >= 2"
            )
        if self.steps < 1 or self.log_every < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, log_every and checkpoint_every must be >= 1")

    @property
    def router(self) -> str:
        return self.router_name or f"moeray-router-{self.name}"

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
        }
        top = {f.name for f in fields(TrainJobConfig)}
        unknown = set(d) - top
        if unknown:
            raise ValueError(
                f"unknown train config keys {sorted(unknown)}; accepted: {sorted(top)}"
            )
        kw: dict[str, Any] = {}
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
        from moeray.platform import config as mc

        if self.model in mc.PRESETS:
            return mc.preset(self.model)
        return mc.ModelConfig.from_hf(Path(self.model).expanduser())


# ----------------------------------------------------------------------------------------------
# distributed helpers


@dataclass
class Groups:
    rank: int
    world: int
    ep_rank: int
    ep_size: int
    dp_rank: int
    ep_group: Any  # this rank's EP process group (None when EP = 1)
    dp_group: Any  # ranks holding the same expert shard


def make_groups(rank: int, world: int, ep: int) -> Groups:
    import torch.distributed as dist

    ep_group = dp_group = None
    # every rank must create every group, in the same order
    for d in range(world // ep):
        g = dist.new_group(list(range(d * ep, (d + 1) * ep))) if ep > 1 else None
        if d == rank // ep:
            ep_group = g
    for e in range(ep):
        g = dist.new_group(list(range(e, world, ep)))
        if e == rank % ep:
            dp_group = g
    return Groups(rank, world, rank % ep, ep, rank // ep, ep_group, dp_group)


def _is_expert_param(name: str) -> bool:
    from moeray.platform.parallel.expert import is_expert_param

    return is_expert_param(name)


def sync_gradients(model, groups: Groups) -> float:
    """Average gradients over the world; returns the global gradient norm (before clipping)."""
    import torch
    import torch.distributed as dist

    replicated, experts = [], []
    for name, p in model.named_parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (experts if _is_expert_param(name) else replicated).append(p)
    for params, group in ((replicated, None), (experts, groups.dp_group)):
        if not params:
            continue
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        if groups.world > 1:
            dist.all_reduce(flat, group=group)
        flat /= groups.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n
    rep_sq = sum(float(p.grad.float().pow(2).sum()) for p in replicated)
    exp_sq = torch.tensor(
        [sum(float(p.grad.float().pow(2).sum()) for p in experts)], dtype=torch.float64
    )
    if groups.ep_size > 1:
        dist.all_reduce(exp_sq, group=groups.ep_group)  # shards of one EP group add up
    return math.sqrt(rep_sq + float(exp_sq))


def gather_full_state(model, groups: Groups) -> dict | None:
    """The full (EP=1) state dict on rank 0; other ranks return None."""
    import torch
    import torch.distributed as dist

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if groups.ep_size > 1:
        for k in list(state):
            if _is_expert_param(k):
                parts = [torch.empty_like(state[k]) for _ in range(groups.ep_size)]
                dist.all_gather(parts, state[k].contiguous(), group=groups.ep_group)
                state[k] = torch.cat(parts)
    return state if groups.rank == 0 else None


# ----------------------------------------------------------------------------------------------
# the worker


def _save_checkpoint(
    directory: Path,
    rank: int,
    model,
    optimizer,
    loader,
    step: int,
    router_state: dict | None,
    meta: dict,
) -> None:
    import torch

    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "data": loader.state.to_dict(),
            "step": step,
        },
        directory / f"rank{rank}.pt",
    )
    if rank == 0:
        torch.save(router_state, directory / "router.pt")
        (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _checkpoint_step(d: Path, run_id: str, world: int) -> int:
    """The step of a complete checkpoint directory of this run, else -1."""
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return -1
    complete = (
        all((d / f"rank{r}.pt").exists() for r in range(world)) and (d / "router.pt").exists()
    )
    return int(meta["step"]) if complete and meta.get("run_id") == run_id else -1


def _latest_checkpoint(reported, run_dir: Path, run_id: str, world: int) -> Path | None:
    """The newer of Ray Train's latest checkpoint and the newest complete one in the run dir.

    Ray Train registers a reported checkpoint asynchronously; a worker killed right after
    reporting can restart without it (seen with Ray 2.58: the restarted group got no checkpoint
    although the files were persisted). Checkpoints are persisted before `report` returns, so
    scanning the run directory (only this run's, by run id) loses nothing that was written.
    """
    candidates: list[tuple[int, Path]] = []
    if reported is not None:
        local = Path(reported.path)
        if local.is_dir():
            candidates.append((_checkpoint_step(local, run_id, world), local))
    for d in run_dir.glob("step_*"):
        candidates.append((_checkpoint_step(d, run_id, world), d))
    candidates = [c for c in candidates if c[0] >= 0]
    return max(candidates)[1] if candidates else None


@dataclass
class _StepParts:
    main: float  # this rank's share: summed over ranks and divided by the shards it is the loss
    mtp: float
    balance: float
    norm: float
    loads_LE: Any


class _FlatReplica:
    """PP = 1: the whole model (experts sharded over EP) on this rank."""

    def __init__(self, job: TrainJobConfig, rank: int, world: int, device) -> None:
        import torch

        from moeray.platform.model.transformer import Transformer
        from moeray.platform.parallel.expert import enable_expert_parallel

        self.job, self.device = job, device
        self.groups = make_groups(rank, world, job.parallel.ep)
        model = Transformer(job.model_config())
        model.reset_parameters(seed=job.seed)  # identical initial weights on every rank
        if job.fp8:
            from moeray.platform.fp8 import enable_fp8_training

            enable_fp8_training(model)
        if self.groups.ep_size > 1:
            enable_expert_parallel(
                model, self.groups.ep_group, self.groups.ep_rank, self.groups.ep_size
            )
        self.module = model
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.bf16)

    def step(self, batch) -> _StepParts:
        from moeray.platform.train import step as tstep

        with self.autocast:
            parts = tstep.compute_loss(self.module, batch, self.job.loss)
        parts.total.backward()
        norm = sync_gradients(self.module, self.groups)
        return _StepParts(
            parts.main, parts.mtp, parts.balance, norm, tstep.expert_loads(self.module)
        )

    def set_biases(self, bias_LE) -> None:
        from moeray.platform.train import step as tstep

        tstep.set_biases(self.module, bias_LE)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)

    def full_state(self) -> dict | None:
        return gather_full_state(self.module, self.groups)

    def close(self) -> None:
        pass


class _PipelineReplica:
    """PP > 1: this rank's pipeline stages (`parallel/pipeline.PipelineModel`)."""

    def __init__(self, job: TrainJobConfig, rank: int, world: int, device) -> None:
        import torch

        from moeray.platform.parallel.pipeline import PipelineModel, PipelineSpec

        p = job.parallel
        self.job = job
        self.pm = PipelineModel(
            job.model_config(),
            PipelineSpec(p.pp, p.dp, p.ep, p.schedule, p.microbatches),
            rank,
            seed=job.seed,
            fp8=job.fp8,
            device=device,
            overlap=p.overlap,
            autocast_dtype=torch.bfloat16 if job.bf16 else None,
            seq_len=job.data.seq_len,
        )
        self.module = self.pm.modules

    def step(self, batch) -> _StepParts:
        out = self.pm.forward_backward(batch, self.job.loss)
        norm = self.pm.sync_gradients()
        return _StepParts(out.main_sum, out.mtp_sum, out.balance_sum, norm, out.loads_LE)

    def set_biases(self, bias_LE) -> None:
        self.pm.set_biases(bias_LE)

    def state_dict(self) -> dict:
        return self.pm.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pm.load_state_dict(state)

    def full_state(self) -> dict | None:
        return self.pm.full_state()

    def close(self) -> None:
        self.pm.close()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: `config` = {"job": TrainJobConfig.to_dict(), "run_dir", "run_id",
    "tokens", "tokenizer"} from `job.py`."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from moeray.platform import routing
    from moeray.platform.metrics import (
        TRAIN_LOSS,
        TRAIN_LR,
        TRAIN_MAXVIO,
        TRAIN_MTP_LOSS,
        TRAIN_STEP,
        TRAIN_TOKENS_PER_S,
        Metrics,
    )
    from moeray.platform.model.transformer import Transformer
    from moeray.platform.parallel.distributed import Topology
    from moeray.platform.train import data as tdata
    from moeray.platform.train import step as tstep

    job = TrainJobConfig.from_dict(config["job"])
    run_dir = Path(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != job.parallel.world:
        raise ValueError(f"{world} workers, but the config asks for pp*ep*dp={job.parallel.world}")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    p = job.parallel
    topology = Topology(p.pp, p.dp, p.ep)
    device = torch.device("cpu")
    if job.use_gpu:  # pp >= 2 (TrainJobConfig): the PP = 1 path runs on the CPU
        import ray.train.torch

        device = ray.train.torch.get_device()
        # current before any sub-group is made (PipelineGroups.create checks each group with a
        # CUDA all-reduce, and a thread's NCCL calls take the current device): Ray Train's own
        # set_device runs in a context manager this must not depend on. Ray Train's
        # init_process_group binds no device, so communicators are built at each group's first
        # op, which the group check orders the same on every rank (parallel/distributed.py).
        torch.cuda.set_device(device)
    replica = (_PipelineReplica if p.pp > 1 else _FlatReplica)(job, rank, world, device)
    model_cfg = job.model_config()
    optimizer = tstep.build_optimizer(replica.module, job.optim)

    tokens = torch.load(config["tokens"])
    dataset = tdata.PackedDataset(tokens, job.data.seq_len)
    state = tdata.DataState()
    start = 0
    router = ray.get_actor(job.router, namespace=job.router_namespace)
    ckpt_dir = _latest_checkpoint(
        ray.train.get_checkpoint(), run_dir, config.get("run_id", ""), world
    )
    if ckpt_dir is not None:
        saved = torch.load(ckpt_dir / f"rank{rank}.pt", weights_only=False)
        replica.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = tdata.DataState.from_dict(saved["data"])
        start = saved["step"] + 1
        router_state = torch.load(ckpt_dir / "router.pt", weights_only=False) if rank == 0 else None
        if rank == 0:
            print(f"resuming from {ckpt_dir} at step {start}", flush=True)
    else:
        router_state = None
        if rank == 0:  # a fresh run: forget whatever a previous run with this name left behind
            fresh = routing.RouterState(
                routing.RouterConfig.from_model(model_cfg, num_reporters=world, gamma=job.gamma)
            )
            router_state = fresh.state_dict()
    if rank == 0:
        ray.get(router.load_state_dict.remote(router_state))
    dist.barrier()
    replica.set_biases(ray.get(router.biases.remote())["bias_LE"])
    # every pipeline rank of a data shard reads the shard's slice
    loader = tdata.BatchLoader(
        dataset,
        job.data.global_batch,
        dp_rank=topology.shard(rank),
        dp_size=topology.shards,
        seed=job.data.seed,
        state=state,
    )

    metrics = (
        Metrics(
            "ray",
            defs=(
                TRAIN_STEP,
                TRAIN_LOSS,
                TRAIN_MTP_LOSS,
                TRAIN_TOKENS_PER_S,
                TRAIN_MAXVIO,
                TRAIN_LR,
            ),
        )
        if rank == 0
        else None
    )
    history = run_dir / "history.jsonl"
    kill_marker = run_dir / f"killed-rank{job.kill_rank}"
    tokens_per_step = job.data.global_batch * job.data.seq_len
    replica.module.train()
    for step in range(start, job.steps):
        if step == job.kill_at_step and rank == job.kill_rank and not kill_marker.exists():
            kill_marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dies mid-run (tests)
        t0 = time.perf_counter()
        position = loader.state
        batch = loader.next_batch()
        parts = replica.step(batch)
        _, lr = tstep.apply_update(
            replica.module, optimizer, step, job.optim, total_norm=parts.norm
        )
        loads = parts.loads_LE
        ray.get(router.report.remote(step, rank, loads))
        replica.set_biases(ray.get(router.biases.remote(min_step=step))["bias_LE"])
        # PP = 1: every rank holds its shard's whole loss; PP > 1: the ranks of a pipeline hold
        # parts of it (the loss on the last stage, balance terms on every stage); either way the
        # sum over the world divided by the shards is the mean over shards
        stats = torch.tensor([parts.main, parts.mtp, parts.balance], dtype=torch.float64)
        dist.all_reduce(stats)
        stats /= topology.shards
        global_loads = loads.clone()
        dist.all_reduce(global_loads)
        maxvio = float(routing.maxvio(global_loads).mean())
        norm = parts.norm
        dt = time.perf_counter() - t0
        if rank == 0:
            rec = {
                "step": step,
                "loss": float(stats[0]),
                "mtp_loss": float(stats[1]),
                "balance": float(stats[2]),
                "lr": lr,
                "grad_norm": norm,
                "maxvio": maxvio,
                "tokens_per_s": tokens_per_step / dt,
                "epoch": position.epoch,
                "position": position.position,
                "pid": os.getpid(),
            }
            with history.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            metrics.set(TRAIN_STEP.name, step)
            metrics.set(TRAIN_LOSS.name, rec["loss"])
            metrics.set(TRAIN_MTP_LOSS.name, rec["mtp_loss"])
            metrics.set(TRAIN_TOKENS_PER_S.name, rec["tokens_per_s"])
            metrics.set(TRAIN_MAXVIO.name, maxvio)
            metrics.set(TRAIN_LR.name, lr)
            if step % job.log_every == 0 or step == job.steps - 1:
                print(
                    f"step {step:>5} | loss {rec['loss']:.4f} | mtp {rec['mtp_loss']:.4f} | "
                    f"{rec['tokens_per_s']:,.0f} tok/s | maxvio {maxvio:.3f} | lr {lr:.2e}",
                    flush=True,
                )
        last = step == job.steps - 1
        if (step + 1) % job.checkpoint_every == 0 or last:
            router_state = ray.get(router.state_dict.remote()) if rank == 0 else None
            with tempfile.TemporaryDirectory() as tmp:
                _save_checkpoint(
                    Path(tmp),
                    rank,
                    replica,
                    optimizer,
                    loader,
                    step,
                    router_state,
                    {
                        "step": step,
                        "world": world,
                        "parallel": asdict(job.parallel),
                        "run_id": config.get("run_id", ""),
                    },
                )
                ray.train.report(
                    {"step": step, "loss": float(stats[0])},
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"step_{step:07d}",
                )

    full = replica.full_state()
    replica.close()
    if rank == 0:
        from moeray.platform.checkpoint import save_model

        ref = Transformer(model_cfg)
        ref.load_state_dict(full)
        out = Path(job.output).expanduser()
        out = out if out.is_absolute() else run_dir / out
        save_model(ref, model_cfg, out, tokenizer=config["tokenizer"])
        print(f"final model written to {out}", flush=True)
    dist.barrier()
