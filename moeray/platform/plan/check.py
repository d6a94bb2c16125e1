"""Refuse a training or serving layout that cannot fit, before any worker starts.

`moeray train` and `moeray serve` call these with their configs. The memory is the planner's
(memory.py, serving.py) for what moeray actually runs: fp32 master weights and gradients in training
(bf16 activations under `bf16: true`), AdamW moments in `optim.moments_dtype`, sharded under
`optim.zero_stage: 1`, activations less the `recompute` parts, and the CPU EMA where it shares the
device's memory; the checkpoint's own dtype or FP8 in serving. The budget is one device: the GPU
named by $MOERAY_GPU (h800, h100, h200, b200) or the local CUDA device 0 for GPU work; for CPU work
this host's RAM shared by the workers a local Ray starts here (with $RAY_ADDRESS set, the workers
land on other hosts: one worker per host's RAM). A budget that cannot be known (a GPU job driven
from a host without CUDA and no $MOERAY_GPU) skips the check and says so.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch

from moeray.platform.config import ModelConfig
from moeray.platform.plan.gpus import gpu
from moeray.platform.plan.memory import (
    GB,
    MOERAY_BF16,
    MOERAY_FP32,
    Recipe,
    TrainLayout,
    train_memory,
    worst_rank,
)
from moeray.platform.plan.params import Params

CPU_RESERVE_GB = 0.5  # a worker process's Python, torch and Ray runtime
GPU_RESERVE_GB = 3.0  # as memory.RESERVE_GB


def _host_ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def device_budget_gb(use_gpu: bool, workers_here: int) -> tuple[float, str] | None:
    """(GB one worker may use, where that number comes from), or None when it cannot be known."""
    if use_gpu:
        name = os.environ.get("MOERAY_GPU")
        if name:
            spec = gpu(name)
            return spec.hbm_gb, f"a {spec.name} ($MOERAY_GPU) has {spec.hbm_gb:g} GB"
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.total_memory / GB, f"{props.name} has {props.total_memory / GB:.1f} GB"
        return None
    ram = _host_ram_gb()
    if os.environ.get("RAY_ADDRESS") or workers_here <= 1:
        return ram, f"a host has {ram:.1f} GB of RAM"
    return ram / workers_here, f"this host's {ram:.1f} GB of RAM over {workers_here} workers"


def job_recipe(job: Any) -> Recipe:
    """The bytes a TrainJobConfig's workers keep: moeray's recipe for its precision, with the
    job's ZeRO-1 (optimizer state over the data-parallel ranks), AdamW moment dtype and
    recomputed parts."""
    base = MOERAY_BF16 if job.bf16 else MOERAY_FP32
    moment = 2 if job.optim.moments_dtype == "bfloat16" else 4
    return dataclasses.replace(
        base,
        zero1=job.optim.zero_stage == 1,
        moment_bytes=2 * moment,
        recompute=tuple(job.recompute),
    )


def check_train(job: Any) -> list[str]:
    """ValueError naming what to change when a worker of `job` (a TrainJobConfig) cannot fit;
    returns notes (a check skipped)."""
    cfg: ModelConfig = job.model_config()
    par = job.parallel
    local = job.data.global_batch // par.shards
    microbatches = par.microbatches if par.pp > 1 else 1
    layout = TrainLayout(
        par.pp,
        par.ep,
        par.dp,
        par.schedule if par.pp > 1 else "1f1b",
        seq_len=job.data.seq_len,
        global_batch=job.data.global_batch,
        microbatch_seqs=max(1, local // microbatches),
    )
    budget = device_budget_gb(job.use_gpu, par.world)
    if budget is None:
        return ["memory not checked: no CUDA device here; set MOERAY_GPU=h800|h100|h200|b200"]
    limit, source = budget
    reserve = GPU_RESERVE_GB if job.use_gpu else CPU_RESERVE_GB
    # the EMA's fp32 copy is in host memory: a CPU worker's budget, not a GPU's
    ema = 4.0 if job.ema_decay and not job.use_gpu else 0.0
    mem = worst_rank(train_memory(cfg, layout, job_recipe(job), reserve_gb=reserve, ema_bytes=ema))
    if mem.total <= limit * GB:
        return []
    static = (mem.weights + mem.grads + mem.optimizer) / GB
    hints = []
    if par.ep * 2 <= cfg.n_routed_experts and cfg.n_routed_experts % (par.ep * 2) == 0:
        hints.append(f"parallel.ep={par.ep * 2}")
    if par.pp * 2 <= cfg.num_hidden_layers:
        hints.append(f"parallel.pp={par.pp * 2}")
    hints.append(f"a smaller data.seq_len (now {job.data.seq_len}) or global_batch")
    hints.append("a smaller model")
    raise ValueError(
        f"model {job.model!r} does not fit: a worker of {layout.describe()} needs "
        f"{mem.total / GB:.1f} GB ({static:.1f} GB of fp32 weights, gradients and AdamW state for "
        f"{mem.params / 1e9:.2f}B parameters, {mem.activations / GB:.1f} GB of activations), but "
        f"{source}. Change: {', or '.join(hints)}"
    )


def _dtype_bytes(serve: Any, quantized: bool, on_gpu: bool) -> int:
    if serve.weights == "fp8" and quantized:
        return 1
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(serve.dtype, 2 if on_gpu else 4)


def serve_bytes_per_rank(serve: Any, cfg: ModelConfig) -> tuple[float, float]:
    """(weight bytes, KV bytes) one engine rank holds: dense parts whole, routed experts split
    over `ep` (ServeConfig.ep, 1 when absent), KV as `num_pages` pages when set."""
    on_gpu = serve.gpus_per_replica > 0 and serve.device != "cpu"
    ep = int(getattr(serve, "ep", 1) or 1)
    per = _dtype_bytes(serve, cfg.quantization_config is not None, on_gpu)
    p = Params.of(cfg)
    routed = p.routed_total if serve.num_speculative_tokens else p.n_moe * p.n_routed * p.expert
    whole = p.total + (p.mtp if serve.num_speculative_tokens else 0)
    weights = (whole - routed + math.ceil(routed / ep)) * per
    kv_elem = per if per > 1 else 2  # the latent cache stays bf16 under FP8 weights
    kv = (serve.num_pages or 0) * serve.page_size * cfg.kv_cache_bytes_per_token * kv_elem / 2
    return weights, kv


def check_serve(serve: Any, cfg: ModelConfig) -> list[str]:
    """ValueError naming what to change when an engine rank of `serve` (a ServeConfig) cannot
    hold `cfg`'s weights and requested KV pages; returns notes (a check skipped)."""
    on_gpu = serve.gpus_per_replica > 0 and serve.device != "cpu"
    ep = int(getattr(serve, "ep", 1) or 1)
    replicas = serve.decode_replicas + (serve.prefill_replicas if serve.mode == "pd" else 0)
    budget = device_budget_gb(on_gpu, replicas * ep)
    if budget is None:
        return ["memory not checked: no CUDA device here; set MOERAY_GPU=h800|h100|h200|b200"]
    limit, source = budget
    if on_gpu:  # the replica's share of its GPU, as the engine sizes its cache
        limit *= serve.memory_share() or 1.0
    weights, kv = serve_bytes_per_rank(serve, cfg)
    reserve = (GPU_RESERVE_GB if on_gpu else CPU_RESERVE_GB) * GB
    if weights + kv + reserve <= limit * GB:
        return []
    hints = []
    if cfg.quantization_config is not None and serve.weights != "fp8":
        hints.append("--weights fp8 (half the bytes of bf16)")
    need_ep = ep
    while need_ep < cfg.n_routed_experts:
        need_ep *= 2
        w, _ = serve_bytes_per_rank(_with_ep(serve, need_ep), cfg)
        if w + kv + reserve <= limit * GB:
            hints.append(f"--ep {need_ep} (ServeConfig.ep)")
            break
    if serve.num_pages:
        hints.append(f"fewer num_pages (now {serve.num_pages})")
    hints.append("GPUs with more memory")
    where = "a GPU share" if on_gpu else "a replica"
    raise ValueError(
        f"model does not fit: an engine rank (EP{ep}) needs {(weights + kv + reserve) / GB:.1f} "
        f"GB ({weights / GB:.1f} GB of weights, {kv / GB:.1f} GB of KV pages), but {where} has "
        f"{limit:.1f} GB ({source}). Change: {', or '.join(hints)}"
    )


class _with_ep:
    """`serve` seen with another expert-parallel degree (ServeConfig may not have `ep` yet)."""

    def __init__(self, serve: Any, ep: int) -> None:
        self._serve, self.ep = serve, ep

    def __getattr__(self, name: str) -> Any:
        return getattr(self._serve, name)
