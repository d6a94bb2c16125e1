"""The training loop of one worker (a Ray Train worker process); its config is
`job_config.TrainJobConfig`, its share of the model a `replica.py` replica.

World layout: rank = (pp_rank * DP + dp_rank) * EP + ep_rank (`parallel/distributed.Topology`).
With PP = 1 that is dp_rank * EP + ep_rank: ranks [d*EP, (d+1)*EP) form one expert-parallel group
(they split the routed experts); ranks with the same ep_rank form a data-parallel group (they hold
the same expert shard). Every (dp, ep) coordinate is one data shard that reads its own slice of
each global batch, so all EP x DP shards are data-parallel for the replicated parameters.
With PP > 1 each shard is a pipeline of PP ranks that all read the shard's slice (stage 0 needs
the tokens, the last stage the targets and the MTP's future tokens); the slice is cut into
`parallel.microbatches` micro-batches run by `parallel.schedule` (`parallel/executor.py`).

Per step: forward and backward on the local batch (PP > 1: all micro-batches through the
pipeline schedule); all-reduce gradients (replicated parameters over the world, expert shards
over their DP group, pipeline copies over their holders; divided by the EP x DP shards);
clip by the global norm; AdamW; fold the parameters into the CPU EMA (`ema_decay`, on a thread);
report this rank's expert loads to the RouterActor and load the new biases it returns (so every
rank routes the next step with the same biases). The step's MTP weight and the router's gamma
follow `schedule` (train/schedules.py); history.jsonl records both.

Checkpoint (every `checkpoint_every` steps, through `ray.train.report`, which copies it to the
run's storage): rank{r}.pt per rank (model shard, optimizer, data position, step, EMA shard) plus
router.pt (RouterActor state) and meta.json. On (re)start a worker restores from the latest
checkpoint, so a killed worker costs at most the steps since the last checkpoint, which are
recomputed on the same batches.

Files: the run directory is a `storage.Storage` (a shared path or an object-store URI). A worker
reads the tokens, its checkpoint file and the tokenizer from it (downloaded into a worker-local
scratch directory unless the storage is the local filesystem) and writes the history, the kill
markers and the final HF directory (and its `ema/`) through it; no path of the driver's node is
used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moeray.platform import config as mc
from moeray.platform.checkpoint import save_model
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
from moeray.platform.routing import balance
from moeray.platform.routing.state import RouterConfig, RouterState
from moeray.platform.train import data as tdata
from moeray.platform.train import step as tstep
from moeray.platform.train import zero
from moeray.platform.train.ema import EMA_DIR, ParamEMA
from moeray.platform.train.history import History, console, step_line
from moeray.platform.train.job_config import TrainJobConfig
from moeray.platform.train.replica import (
    FlatReplica,
    PipelineReplica,
    load_start,
    start_biases,
)
from moeray.platform.train.storage import Storage, scratch_dir


def _save_checkpoint(
    directory: Path,
    rank: int,
    model,
    optimizer,
    loader,
    step: int,
    router_state: dict | None,
    meta: dict,
    ema: ParamEMA | None = None,
) -> None:
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "data": loader.state.to_dict(),
            "step": step,
            "ema": None if ema is None else ema.state_dict(),
        },
        directory / f"rank{rank}.pt",
    )
    if rank == 0:
        torch.save(router_state, directory / "router.pt")
        (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _checkpoint_step(d: Storage, run_id: str, world: int) -> int:
    """The step of a complete checkpoint directory of this run, else -1."""
    try:
        meta = json.loads(d.join("meta.json").read_text())
    except (OSError, ValueError):
        return -1
    complete = (
        all(d.join(f"rank{r}.pt").exists() for r in range(world)) and d.join("router.pt").exists()
    )
    return int(meta["step"]) if complete and meta.get("run_id") == run_id else -1


def _latest_checkpoint(reported, run_dir: Storage, run_id: str, world: int) -> Storage | None:
    """The newer of Ray Train's latest checkpoint and the newest complete one in the run dir.

    Ray Train registers a reported checkpoint asynchronously; a worker killed right after
    reporting can restart without it (seen with Ray 2.58: the restarted group got no checkpoint
    although the files were persisted). Checkpoints are persisted before `report` returns, so
    scanning the run directory (only this run's, by run id) loses nothing that was written.
    Ray Train persists checkpoints to <storage>/<name>/<checkpoint_dir_name>, the run directory.
    """
    dirs = run_dir.children("step_*")
    if reported is not None:
        dirs.append(run_dir.join(Path(reported.path).name))
    candidates = [(_checkpoint_step(d, run_id, world), d.path, d) for d in dirs]
    best = max((c for c in candidates if c[0] >= 0), default=None, key=lambda c: c[:2])
    return None if best is None else best[2]


def _local_model(job: TrainJobConfig, run_dir: Storage, scratch: Path) -> TrainJobConfig:
    """`job` with `model` (unless a preset) read from the run's copy of its config.json
    (job.prepare_data), not from the driver's path."""
    if job.model in mc.PRESETS:
        return job
    cfg = run_dir.join("data", "model", "config.json").local_copy(scratch / "model-config")
    return dataclasses.replace(job, model=str(cfg))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: `config` = {"job": TrainJobConfig.to_dict(), "run_dir" (a
    Storage), "run_id"} from `job.py`."""
    import ray
    import ray.train

    run_dir: Storage = config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not run_dir.join("data", "data.json").exists():  # the driver wrote it before the trainer
        raise RuntimeError(
            f"the run storage {run_dir} is not visible on node {socket.gethostname()} (no "
            "data/data.json, which the driver wrote): on a cluster, use a path mounted on every "
            "node or an object-store URI (s3://bucket/prefix)"
        )
    # downloads of this rank (the same directory on a restart: replaced, not accumulated)
    scratch = scratch_dir(f"{config.get('run_id', '')}-rank{rank}")
    job = _local_model(TrainJobConfig.from_dict(config["job"]), run_dir, scratch)
    if world != job.parallel.world:
        raise ValueError(f"{world} workers, but the config asks for pp*ep*dp={job.parallel.world}")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    p = job.parallel
    topology = Topology(p.pp, p.dp, p.ep)
    device = torch.device("cpu")
    if job.use_gpu:  # every layout: each worker trains on its own GPU
        import ray.train.torch

        device = ray.train.torch.get_device()
        # current before any sub-group is made (PipelineGroups.create checks each group with a
        # CUDA all-reduce, and a thread's NCCL calls take the current device): Ray Train's own
        # set_device runs in a context manager this must not depend on. Ray Train's
        # init_process_group binds no device, so communicators are built at each group's first
        # op, which the group check orders the same on every rank (parallel/distributed.py).
        torch.cuda.set_device(device)
    start_model = load_start(job)  # fine-tuning: the checkpoint's weights, else None
    replica = (PipelineReplica if p.pp > 1 else FlatReplica)(job, rank, world, device, start_model)
    start_bias_LE = None if start_model is None else start_biases(start_model)
    del start_model  # the replica holds its share
    model_cfg = job.model_config()
    optimizer = zero.build_optimizer(
        replica.module, job.optim, replica.groups if isinstance(replica, FlatReplica) else None
    )

    # the parameter EMA in CPU memory (pp = 1, job_config checks), folded in on a thread
    ema = ParamEMA(replica.module, job.ema_decay) if job.ema_decay else None

    tokens = torch.load(run_dir.join("data", "tokens.pt").local_copy(scratch))
    dataset = tdata.PackedDataset(tokens, job.data.seq_len)
    state = tdata.DataState()
    start = 0
    # Any: Ray types ActorHandle.__getattr__ as returning Never, so every method call on the
    # handle would type as Never and mypy would skip the rest of this function as unreachable.
    router: Any = ray.get_actor(job.router, namespace=job.router_namespace)
    ckpt_dir = _latest_checkpoint(
        ray.train.get_checkpoint(), run_dir, config.get("run_id", ""), world
    )
    if ckpt_dir is not None:
        saved = torch.load(
            ckpt_dir.join(f"rank{rank}.pt").local_copy(scratch / "ckpt"), weights_only=False
        )
        replica.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = tdata.DataState.from_dict(saved["data"])
        if ema is not None and saved.get("ema") is not None:
            ema.load_state_dict(saved["ema"])
        start = saved["step"] + 1
        router_state = (
            torch.load(ckpt_dir.join("router.pt").local_copy(scratch / "ckpt"), weights_only=False)
            if rank == 0
            else None
        )
        if rank == 0:
            console(f"resuming from {ckpt_dir} at step {start}")
    else:
        router_state = None
        if rank == 0:  # a fresh run: forget whatever a previous run with this name left behind
            fresh = RouterState(
                RouterConfig.from_model(
                    model_cfg,
                    num_reporters=world,
                    gamma=job.gamma,
                    gamma_changes=job.gamma_changes(),
                )
            )
            router_state = fresh.state_dict()
            if start_bias_LE is not None:  # fine-tuning routes with the checkpoint's biases
                router_state["bias_LE"] = start_bias_LE
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
    history = History(run_dir.join("history.jsonl"))
    if rank == 0:
        # Steps from `start` on ran before a failure and run again: one record each (history.py).
        history.resume(start, config.get("run_id", ""))
    kill_marker = run_dir.join(f"killed-rank{job.kill_rank}")
    tokens_per_step = job.data.global_batch * job.data.seq_len
    replica.module.train()
    for step in range(start, job.steps):
        if step == job.kill_at_step and rank == job.kill_rank and not kill_marker.exists():
            kill_marker.write_text(str(os.getpid()))  # through the storage: any node sees it
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dies mid-run (tests)
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        position = loader.state
        batch = loader.next_batch()
        loss_cfg = job.loss_at(step)  # this step's MTP weight (schedule.mtp_lambda)
        parts = replica.step(batch, loss_cfg)
        _, lr = tstep.apply_update(
            replica.module,
            optimizer,
            step,
            job.optim,
            total_norm=parts.norm,
            keep_grads=replica.keep_grads,
        )
        replica.after_update()
        if ema is not None:
            ema.update()  # copies the new parameters to the CPU, folds them in on a thread
        loads = parts.loads_LE
        ray.get(router.report.remote(step, rank, loads))
        routed = ray.get(router.biases.remote(min_step=step))
        replica.set_biases(routed["bias_LE"])
        # PP = 1: every rank holds its shard's whole loss; PP > 1: the ranks of a pipeline hold
        # parts of it (the loss on the last stage, balance terms on every stage); either way the
        # sum over the world divided by the shards is the mean over shards
        # on the worker's device: under use_gpu the default group is NCCL, which has no CPU path
        stats = torch.tensor(
            [parts.main, parts.mtp, parts.balance], dtype=torch.float64, device=device
        )
        dist.all_reduce(stats)
        stats = stats.cpu() / topology.shards
        global_loads = loads.to(device)
        dist.all_reduce(global_loads)
        global_loads = global_loads.cpu()
        maxvio = float(balance.maxvio(global_loads).mean())
        norm = parts.norm
        # per rank: optimizer-state bytes and peak device memory of this step (-1: on the CPU)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else -1
        memory = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(world)]
        mine = torch.tensor([zero.state_bytes(optimizer), peak], dtype=torch.int64, device=device)
        dist.all_gather(memory, mine)
        dt = time.perf_counter() - t0
        if rank == 0:
            rec = {
                "step": step,
                "loss": float(stats[0]),
                "mtp_loss": float(stats[1]),
                "balance": float(stats[2]),
                "lr": lr,
                "mtp_lambda": loss_cfg.mtp_lambda,
                "gamma": routed["applied_gamma"],  # the router's, for this step's bias update
                "grad_norm": norm,
                "optim_state_bytes": [int(m[0]) for m in memory],
                "peak_mem_bytes": [int(m[1]) if m[1] >= 0 else None for m in memory],
                "maxvio": maxvio,
                "tokens_per_s": tokens_per_step / dt,
                "epoch": position.epoch,
                "position": position.position,
                "pid": os.getpid(),
                "run_id": config.get("run_id", ""),
            }
            rec = history.write(rec)
            assert metrics is not None  # made on rank 0
            metrics.set(TRAIN_STEP.name, step)
            metrics.set(TRAIN_LOSS.name, rec["loss"])
            metrics.set(TRAIN_MTP_LOSS.name, rec["mtp_loss"])
            metrics.set(TRAIN_TOKENS_PER_S.name, rec["tokens_per_s"])
            metrics.set(TRAIN_MAXVIO.name, maxvio)
            metrics.set(TRAIN_LR.name, lr)
            if step % job.log_every == 0 or step == job.steps - 1:
                console(step_line(rec))
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
                    ema,
                )
                ray.train.report(
                    {"step": step, "loss": float(stats[0])},
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"step_{step:07d}",
                )

    full = replica.full_state()
    ema_full = None
    if ema is not None:
        assert isinstance(replica, FlatReplica)  # job_config: the EMA needs pp = 1
        ema_full = replica.full_state(ema.averaged_state(replica.module))
        ema.close()
    replica.close()
    if rank == 0:
        if full is None:
            raise RuntimeError("rank 0 got no full state dict from its replica")
        ref = Transformer(model_cfg)
        ref.load_state_dict(full)
        out = run_dir.resolve(job.output)
        tokenizer = run_dir.join("data", "tokenizer").local_copy(scratch)
        # written in place on a shared path; else in scratch, then uploaded
        save_model(ref, model_cfg, out.local_path or scratch / "model", tokenizer=tokenizer)
        out.upload(out.local_path or scratch / "model")
        console(f"final model written to {out}")
        if ema_full is not None:  # an HF directory of its own, beside the weights
            ref.load_state_dict(ema_full)
            ema_out = out.join(EMA_DIR)
            local = ema_out.local_path or scratch / EMA_DIR
            save_model(ref, model_cfg, local, tokenizer=tokenizer)
            ema_out.upload(local)
            console(f"parameter EMA written to {ema_out}")
    dist.barrier()
    shutil.rmtree(scratch, ignore_errors=True)
