"""The runs of `moeray bench train --pp 1` (bench_one.py): which runs (`RunSpec`, `run_specs`),
each run's model (`build_model`) and its training loop with the numbers it measures (`one_run`;
the fields are listed in bench_one.py's docstring)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace

import torch
from torch.autograd import DeviceType

from moeray.platform.config import ModelConfig
from moeray.platform.fp8 import enable_fp8_training
from moeray.platform.parallel.experts_mlp import enable_grouped_experts
from moeray.platform.parallel.weight_grad import enable_split_linears
from moeray.platform.rank_weights import dummy_model
from moeray.platform.routing.balance import bias_update
from moeray.platform.train import step as tstep
from moeray.platform.train import zero
from moeray.platform.train.bench_common import GRAPHS_SUFFIX, BenchConfig, split_run_name
from moeray.platform.train.graphs import MicrobatchGraph

# Host calls that launch a GPU kernel: torch's (CUDA runtime) and Triton's (driver).
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
TOP_KERNELS = 15  # kernel names kept per profiled span, longest summed duration first


@dataclass(frozen=True)
class RunSpec:
    """One run: its name, FP8 or not, and how FP8 layers make their weight gradients
    (`kgrouped`: the grouped experts' one FP8 k-grouped GEMM per projection; `bf16_wgrad`: every
    FP8 layer's from bf16 operands, the experts' through BF16's grouped_wgrad; neither: one FP8
    GEMM per expert and per layer)."""

    name: str
    fp8: bool
    kgrouped: bool = False
    bf16_wgrad: bool = False
    graphs: bool = False  # each micro-batch replayed from a CUDA graph (train/graphs.py)
    scope: str | None = None  # FP8 runs: their FP8 scope (fp8.FP8_SCOPES); None: the bench's


def run_specs(cfg: BenchConfig, device: torch.device) -> list[RunSpec]:
    """Each run, in order: BF16, FP8, and where grouped FP8 applies (CUDA by default) FP8 with
    the k-grouped weight-gradient GEMM (`--kgrouped-wgrad`) and FP8 with BF16 expert weight
    gradients; `cfg.runs` picks a subset by name (RUN_NAMES; BenchConfig checks it), each name
    with `-graphs` appended the same run with its micro-batches replayed from a CUDA graph, and
    an FP8 name with `@<scope>` appended the same run with that FP8 scope."""
    grouped_fp8 = device.type == "cuda" if cfg.grouped_fp8 is None else cfg.grouped_fp8
    kgrouped = device.type == "cuda" if cfg.kgrouped_wgrad is None else cfg.kgrouped_wgrad
    specs = [RunSpec("bf16", False), RunSpec("fp8", True)]
    if grouped_fp8:
        if kgrouped:
            specs.append(RunSpec("fp8-kgrouped", True, kgrouped=True))
        if device.type == "cuda" or cfg.runs is not None:
            specs.append(RunSpec("fp8-bf16wgrad", True, bf16_wgrad=True))
    if cfg.runs is not None:
        named = cfg.runs.split(",")
        wanted = [split_run_name(n)[0] for n in named]
        graphed = [
            replace(s, name=f"{s.name}{GRAPHS_SUFFIX}", graphs=True)
            for s in specs
            if f"{s.name}{GRAPHS_SUFFIX}" in wanted
        ]
        specs += graphed
        missing = [n for n in wanted if n not in {s.name for s in specs}]
        if missing:
            raise ValueError(
                f"runs={cfg.runs!r}: {', '.join(missing)} not available here (grouped FP8 "
                f"{grouped_fp8}, k-grouped {kgrouped}); available: "
                f"{', '.join(s.name for s in specs)}"
            )
        by_name = {s.name: s for s in specs}
        specs = [
            replace(by_name[run], name=n, scope=scope)
            for n, (run, scope) in zip(named, map(split_run_name, named), strict=True)
        ]
    return specs


def _count_profile(prof) -> dict:
    """GPU kernels (memcpy/memset apart), copies and host launch calls of a profiled span, the
    kernels' summed duration (`gpu_time_s`) and the `TOP_KERNELS` longest kernel names by summed
    duration ([name, count, seconds]); None for each when the span ran nothing on a GPU."""
    kernels = copies = launches = 0
    by_name: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            if e.name.startswith(("Memcpy", "Memset")):
                copies += 1
                continue
            kernels += 1
            row = by_name.setdefault(e.name[:120], [e.name[:120], 0, 0.0])
            row[1] += 1
            row[2] += e.time_range.elapsed_us() * 1e-6
        elif e.name in LAUNCH_CALLS:
            launches += 1
    if kernels + copies + launches == 0:
        return dict.fromkeys(("gpu_kernels", "copies", "launch_calls", "gpu_time_s", "top"))
    top = sorted(by_name.values(), key=lambda r: -r[2])[:TOP_KERNELS]
    return {
        "gpu_kernels": kernels,
        "copies": copies,
        "launch_calls": launches,
        "gpu_time_s": sum(r[2] for r in by_name.values()),
        "top": top,
    }


@contextlib.contextmanager
def _profiled(on: bool, device: torch.device, into: dict, key: str):
    """torch.profiler around the span when `on`, its counts into `into[key]`. GPU activity only:
    the CPU op events of a step (tens of thousands of aten calls at real widths) would cost
    seconds of Python each time to build, and are not counted."""
    if not on:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        yield
        torch.cuda.synchronize(device)
    into[key] = _count_profile(prof)


def build_model(
    cfg: BenchConfig,
    model_cfg: ModelConfig,
    fp8: bool,
    kgrouped: bool,
    device: torch.device,
    bf16_wgrad: bool = False,
    scope: str | None = None,
):
    """The run's model on `device`: the same random weights for every run with `cfg.seed`, FP8
    projections for `fp8` (those of `scope`, default `cfg.fp8_scope`), routed experts grouped
    (FP8 weight gradients k-grouped for `kgrouped`, from bf16 operands for `bf16_wgrad`), the
    other linear layers split linears (FP8 ones stay FP8, their weight gradients from bf16
    operands too with `bf16_wgrad`)."""
    model = dummy_model(
        model_cfg, list(range(model_cfg.n_routed_experts)), device=device, seed=cfg.seed
    )
    if fp8:
        enable_fp8_training(model, scope or cfg.fp8_scope)
    grouped_fp8 = device.type == "cuda" if cfg.grouped_fp8 is None else cfg.grouped_fp8
    enable_grouped_experts(
        model, grouped_fp8=grouped_fp8, kgrouped_wgrad=kgrouped, bf16_wgrad=bf16_wgrad
    )
    enable_split_linears(model, bf16_wgrad=bf16_wgrad)
    return model.train()


def one_run(
    cfg: BenchConfig,
    model_cfg: ModelConfig,
    spec: RunSpec,
    tokens: torch.Tensor,
    device,
    profile: bool = True,
) -> dict:
    """Train `cfg.steps` steps from `cfg.seed`; the run's numbers (bench_one.py's docstring), the
    last step profiled on CUDA where `profile`."""
    model = build_model(
        cfg, model_cfg, spec.fp8, spec.kgrouped, device, spec.bf16_wgrad, spec.scope
    )
    loss_cfg = tstep.LossConfig()
    graphed = MicrobatchGraph(model, loss_cfg, cfg.microbatches, device) if spec.graphs else None
    # on the device once: a copy from pageable memory per micro-batch waits for the GPU
    tokens = tokens.to(device)
    label = spec.name
    optim = tstep.OptimConfig(
        lr=cfg.lr,
        warmup_steps=max(cfg.steps // 10, 1),
        total_steps=cfg.steps,
        moments_dtype=cfg.moments_dtype,
    )
    opt = zero.build_optimizer(model, optim)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    n_moe = len(tstep.moe_layers(model))
    bias_LE = torch.zeros(n_moe, model_cfg.n_routed_experts)
    S1, mbs = cfg.seq_len + 1, cfg.micro_batch_size
    cuda = device.type == "cuda"
    losses: list[float] = []
    walls: list[float] = []
    peaks: list[int] = []
    retries: list[int] = []  # the caching allocator's cumulative count, after each step
    counts: dict = {}
    for step in range(cfg.steps):
        # CUDA: the last step under torch.profiler (its event tables cost seconds to build; on the
        # CPU, with no kernels to count, the step is not profiled)
        profiled = profile and cuda and step == cfg.steps - 1
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        # summed on the device and read once a step: a read per micro-batch made the host wait
        # for the GPU after every forward
        loads_LE = torch.zeros(n_moe, model_cfg.n_routed_experts, dtype=torch.int64, device=device)
        loss_t = torch.zeros((), device=device)
        if graphed is not None:
            graphed.start_step()
            loss_t, loads_LE = graphed.loss_3[0], graphed.loads_LE
        with _profiled(profiled, device, counts, "forward_backward"):
            for mb in range(cfg.microbatches):
                first = ((step * cfg.microbatches + mb) * mbs) * S1
                batch = tokens[first : first + mbs * S1].view(mbs, S1).to(device)
                if graphed is not None:
                    graphed.run(batch)
                    continue
                with autocast:
                    parts = tstep.compute_loss(model, batch, loss_cfg)
                (parts.total / cfg.microbatches).backward()
                loss_t += parts.values_3[0] / cfg.microbatches
                loads_LE += tstep.expert_loads_on_device(model)
        loss, loads_LE = float(loss_t), loads_LE.cpu()
        with _profiled(profiled, device, counts, "optimizer"):
            tstep.apply_update(model, opt, step, optim, keep_grads=graphed is not None)
            if graphed is not None:
                graphed.refresh()
        bias_LE = bias_update(bias_LE, loads_LE, 0.001)
        tstep.set_biases(model, bias_LE)
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        losses.append(loss)
        if cuda:
            peaks.append(torch.cuda.max_memory_allocated(device))
            stats = torch.cuda.memory_stats(device)
            retries.append(stats.get("num_alloc_retries", 0))
        note = " (warm-up)" if step < cfg.warmup else " (profiled)" if profiled else ""
        print(
            f"[bench train] {label}: step {step + 1}/{cfg.steps} loss "
            f"{loss:.4f} step {wall:.3f} s{note}",
            flush=True,
        )
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss {loss} at step {step + 1} (losses so far {losses})")
        if step >= cfg.warmup and not profiled:
            walls.append(wall)
    none = dict.fromkeys(("gpu_kernels", "copies", "launch_calls", "gpu_time_s", "top"))
    fb, op = counts.get("forward_backward", none), counts.get("optimizer", none)
    # fp32 moments: torch's fused AdamW; bf16: the fused kernel where `zero.use_fused_adamw` says
    fused = bool(opt.defaults.get("fused")) and (
        cfg.moments_dtype == "float32" or zero.use_fused_adamw(device)
    )
    optimizer = f"{type(opt).__name__}(fused={fused}, moments={cfg.moments_dtype})"

    def total(key: str):
        return None if fb[key] is None else fb[key] + (op[key] or 0)

    return {
        "losses": losses,
        "step_time_s": sum(walls) / len(walls),
        "peak_memory_bytes": max(peaks) if peaks else None,
        "peak_memory_bytes_per_step": peaks or None,
        # Allocations that found no cached block and retried after freeing the cache: each
        # synchronizes the device, so a step near the memory limit turns host-bound
        "alloc_retries_per_step": retries or None,
        "gpu_kernels_per_step": total("gpu_kernels"),
        "gpu_kernels_forward_backward": fb["gpu_kernels"],
        "gpu_kernels_optimizer": op["gpu_kernels"],
        "launch_calls_per_step": total("launch_calls"),
        "copies_per_step": total("copies"),
        # the kernels' summed time in the profiled step over the unprofiled step time: well
        # under 1 means the GPU waits for the host (launches, syncs)
        "gpu_time_s_per_step": None if fb["gpu_time_s"] is None else total("gpu_time_s"),
        "top_kernels_forward_backward": fb["top"],
        "top_kernels_optimizer": op["top"],
        "optimizer": optimizer,
    }
