"""`moeray bench train --pp 1`: training speed on one device at real widths, BF16 then FP8.

    moeray bench train --pp 1 --steps 6 --warmup 2          # CPU: tiny, a few seconds
    moeray bench train --device cuda --pp 1 --model moonlight_16b_a3b --layers auto \\
        --seq-len 4096 --micro-batch-size 1 --microbatches 4 --steps 12 --warmup 3

One process, no process group, no pipeline: the plain model (`model/transformer.py`, random
weights made on the device, `rank_weights.dummy_model`) trained by the training step's own parts
(`step.compute_loss` under bf16 autocast, backward, `step.apply_update`: clipping and AdamW, then
the aux-loss-free bias update). Per step `--microbatches` micro-batches of `--micro-batch-size` x
`--seq-len` tokens, gradients accumulated. Runs of the same steps on the same batches from the
same weights (seed): `bf16` (every GEMM under bf16 autocast), `fp8` (the DeepSeek-V3 recipe of
`platform/fp8.py`: the projections' three GEMMs in e4m3) and, on CUDA (`--kgrouped-wgrad`),
`fp8-kgrouped`: FP8 with the routed experts' weight gradients in one k-grouped GEMM per projection
(`kernels/fp8/kgrouped.py`) instead of one GEMM per expert, and `fp8-bf16wgrad`: FP8 forward and
input-grad GEMMs, weight gradients from bf16 operands. Any run name with `-graphs` appended (CUDA)
replays each micro-batch's forward and backward from a CUDA graph (`train/graphs.py`) and is
compared with `bf16-graphs` where that ran. Fast paths: the routed experts as one
autograd node with grouped GEMMs (`experts_mlp.enable_grouped_experts`: `torch._grouped_mm` for
BF16, the grouped FP8 kernel for FP8's forward and input-grad GEMMs on CUDA), the other linear
layers as split linears (`weight_grad.enable_split_linears`: the bf16 weight cast once per step,
the weight gradient written in fp32 by the GEMM on CUDA; MOERAY_FUSED_LINEAR_WGRAD=0 keeps
nn.Linear), AdamW fused on CUDA (`step.adamw_impl`). A failed `fp8-kgrouped` run leaves its error
in `failed_runs` (exit 1); the result file is rewritten after every finished run.

Numbers per run (the first `--warmup` steps and the profiled last step left out of timings):
  step_time_s, tokens_per_s   wall time of a whole step (synchronized), mean; tokens / that;
  mfu_datasheet               model FLOPs/s over the datasheet dense BF16 peak (`PEAK_BF16`;
                              null for a device not in it, the CPU);
  mfu_measured                over the rate of a large bf16 GEMM timed in this process
                              (`bench_common.measure_matmul_rate`; CPU: fp32 512^3);
  peak_memory_bytes           torch.cuda.max_memory_allocated in a step, max over steps (CPU:
                              null); alloc_retries_per_step the allocator's cumulative retries
                              (each frees the cache and synchronizes) after each step;
  gpu_kernels_per_step        GPU kernels of the last step (torch.profiler), split into
                              forward-backward and optimizer, and the host's launch calls
                              (CUDA runtime and driver); CPU: null (not profiled);
  gpu_time_s_per_step         the profiled step's summed kernel time (against step_time_s: how
                              much the GPU waits for the host), and its longest kernels.
Model FLOPs per token: `bench_common.train_flops_per_token` (6 x active matmul parameters +
causal attention). Per FP8 run `step_time_vs_bf16` (< 1: faster than BF16) and
`loss_rel_diff_vs_bf16`, |loss - loss_bf16| / loss_bf16 at the final step; the `fp8` run's are
also `fp8_bf16_step_time_ratio` and `fp8_bf16_loss_rel_diff`.

`--layers auto` (CUDA): the most decoder layers that fit the device (`fit_layers`: weights,
gradients and AdamW moments in fp32, or bf16 moments with `--moments-dtype bfloat16`, FP8's
cached expert weights, activations and logits of one micro-batch (2 B a token and vocab entry
a head with the fused cross-entropy of CUDA runs, `platform/loss.py`; 16 with PyTorch's), a
workspace). If a run still runs out of memory, both runs restart with fewer layers
(`layer_retries` in the result).
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.autograd import DeviceType

from moeray.platform.config import ModelConfig
from moeray.platform.fp8 import enable_fp8_training
from moeray.platform.loss import fused_cross_entropy_planned
from moeray.platform.parallel.experts_mlp import enable_grouped_experts
from moeray.platform.parallel.weight_grad import enable_split_linears
from moeray.platform.rank_weights import dummy_model
from moeray.platform.routing.balance import bias_update
from moeray.platform.train import step as tstep
from moeray.platform.train import zero
from moeray.platform.train.bench_common import (
    GRAPHS_SUFFIX,
    BenchConfig,
    bigram_stream,
    measure_matmul_rate,
    train_flops_per_token,
)
from moeray.platform.train.graphs import MicrobatchGraph
from moeray.results import device_name, device_slug, write_result

# Datasheet dense BF16 tensor-core FLOP/s (no sparsity), by a name fragment of the device.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12}
# Host calls that launch a GPU kernel: torch's (CUDA runtime) and Triton's (driver).
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
WORKSPACE_BYTES = 3 << 30  # cuBLAS / cuDNN workspaces, the CUDA context's share, kernel scratch
USABLE_FRACTION = 0.9  # of the device's memory: allocator rounding and fragmentation
TOP_KERNELS = 15  # kernel names kept per profiled span, longest summed duration first
SUMMARY = (
    "tokens_per_s",
    "step_time_s",
    "mfu_datasheet",
    "mfu_measured",
    "peak_memory_bytes",
    "gpu_kernels_per_step",
    "gpu_time_s_per_step",
    "final_loss",
)


def datasheet_peak(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


@dataclass(frozen=True)
class MemoryPlan:
    """What `--layers auto` picked and the estimate behind it (bytes)."""

    layers: int
    budget: int  # USABLE_FRACTION of the device's memory
    fixed: int  # embedding, head, final norm, the dense first layers, logits, workspace
    per_moe_layer: int
    state_bytes_per_param: int  # weight + gradient + AdamW moments
    dense: int  # the model's dense first layers (in `layers`)

    def reason(self) -> str:
        gib = 1 << 30
        return (
            f"{self.layers} layers: {self.fixed / gib:.1f} GiB fixed (embedding, head, dense "
            f"layers, logits, workspace) + {self.layers - self.dense} MoE layers x "
            f"{self.per_moe_layer / gib:.2f} GiB ({self.state_bytes_per_param} B/param of weight, "
            f"gradient and moments, FP8 expert cache, activations) <= {self.budget / gib:.1f} GiB "
            f"({USABLE_FRACTION:.0%} of the device)"
        )


def activation_bytes_per_token(cfg: ModelConfig, tokens: int) -> int:
    """Bytes one decoder layer keeps for the backward per token of a micro-batch of `tokens`
    (an upper estimate): the fp32 residual stream and norms, MLA's bf16 queries, keys, values and
    outputs, the routed experts' rows (K per token plus up to 128 padding rows per expert: the
    grouped layout) with their gate/up/SwiGLU outputs and FP8 copies, the shared experts, the
    router's fp32 scores."""
    D, H, E, K = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.n_routed_experts,
        cfg.num_experts_per_tok,
    )
    inner = max(cfg.moe_intermediate_size, cfg.intermediate_size // max(K, 1))
    attn = 2 * (
        4 * D
        + H * (3 * cfg.qk_head_dim + 3 * cfg.v_head_dim)
        + 3 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + 2 * (cfg.q_lora_rank or 0)
    )
    rows = K + E * 128 / max(tokens, 1)
    experts = 2 * rows * (3 * D + 4 * inner)
    shared = 2 * (3 * cfg.n_shared_experts * cfg.moe_intermediate_size + 2 * D)
    return int(attn + experts + shared + 4 * 6 * D + 4 * 3 * E)


def fit_layers(cfg: BenchConfig, model: ModelConfig, device_bytes: int) -> MemoryPlan:
    """The most decoder layers (at most the model's) whose training state and one micro-batch's
    activations fit `device_bytes`, for both runs (the estimate in the module docstring)."""
    state = 8 + 2 * tstep.MOMENTS_DTYPES[cfg.moments_dtype].itemsize  # fp32 weight + grad
    dense = model.first_k_dense_replace
    one = model.replace(num_hidden_layers=dense + 1).num_parameters(include_mtp=True)
    per_params = model.replace(num_hidden_layers=dense + 2).num_parameters(include_mtp=True) - one
    fixed_params = one - per_params
    D, V = model.hidden_size, model.vocab_size
    tokens = cfg.micro_batch_size * cfg.seq_len
    act = activation_bytes_per_token(model, tokens) * tokens
    expert_params = 3 * model.n_routed_experts * D * model.moe_intermediate_size
    # FP8: the WeightCache's e4m3 experts and their transposes; BF16: autocast's bf16 copies
    extra = max(2 * expert_params, 2 * (per_params - expert_params))
    # logits of the main head and each MTP depth (all alive from their forward to their
    # backward), bytes a token and vocab entry: PyTorch's loss keeps the bf16 logits, their fp32
    # copy and softmax, fp32 and bf16 grads (16); the fused kernel (CUDA, platform/loss.py) writes
    # the bf16 grad over the bf16 logits and makes no other [T, V] tensor (2; the head stays
    # bf16 under FP8 too, and its backward's dW is [V, D], counted below)
    per_entry = 2 if fused_cross_entropy_planned(cfg.device) else 16
    logits = tokens * V * per_entry * (1 + model.num_nextn_predict_layers)
    fixed = fixed_params * state + 2 * V * D + logits + dense * act + WORKSPACE_BYTES
    per_layer = per_params * state + extra + act
    budget = int(device_bytes * USABLE_FRACTION)
    moe_layers = min((budget - fixed) // per_layer, model.num_hidden_layers - dense)
    if moe_layers < 1:
        raise ValueError(
            f"{cfg.model} does not fit {device_bytes / (1 << 30):.1f} GiB with one MoE layer: "
            f"{(fixed + per_layer) / (1 << 30):.1f} GiB estimated; lower --seq-len or "
            "--micro-batch-size, or --moments-dtype bfloat16"
        )
    return MemoryPlan(dense + int(moe_layers), budget, fixed, per_layer, state, dense)


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
):
    """The run's model on `device`: the same random weights for every run with `cfg.seed`, FP8
    projections for `fp8`, routed experts grouped (FP8 weight gradients k-grouped for
    `kgrouped`, from bf16 operands for `bf16_wgrad`), the other linear layers split linears (FP8
    ones stay FP8, their weight gradients from bf16 operands too with `bf16_wgrad`)."""
    model = dummy_model(
        model_cfg, list(range(model_cfg.n_routed_experts)), device=device, seed=cfg.seed
    )
    if fp8:
        enable_fp8_training(model, cfg.fp8_scope)
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
) -> dict:
    """Train `cfg.steps` steps; the run's numbers (module docstring)."""
    model = build_model(cfg, model_cfg, spec.fp8, spec.kgrouped, device, spec.bf16_wgrad)
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
        profiled = cuda and step == cfg.steps - 1
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


def run_specs(cfg: BenchConfig, device: torch.device) -> list[RunSpec]:
    """Each run, in order: BF16, FP8, and where grouped FP8 applies (CUDA by default) FP8 with
    the k-grouped weight-gradient GEMM (`--kgrouped-wgrad`) and FP8 with BF16 expert weight
    gradients; `cfg.runs` picks a subset by name (RUN_NAMES; BenchConfig checks it), each name
    with `-graphs` appended the same run with its micro-batches replayed from a CUDA graph."""
    grouped_fp8 = device.type == "cuda" if cfg.grouped_fp8 is None else cfg.grouped_fp8
    kgrouped = device.type == "cuda" if cfg.kgrouped_wgrad is None else cfg.kgrouped_wgrad
    specs = [RunSpec("bf16", False), RunSpec("fp8", True)]
    if grouped_fp8:
        if kgrouped:
            specs.append(RunSpec("fp8-kgrouped", True, kgrouped=True))
        if device.type == "cuda" or cfg.runs is not None:
            specs.append(RunSpec("fp8-bf16wgrad", True, bf16_wgrad=True))
    if cfg.runs is not None:
        wanted = cfg.runs.split(",")
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
        specs = [by_name[n] for n in wanted]
    return specs


def run(cfg: BenchConfig, save: Callable[[dict], object] | None = None) -> dict:
    """All runs at the same layer count; the result (module docstring). `save` gets the result so
    far after each finished run (a later run that hangs or dies leaves the earlier numbers)."""
    device = torch.device("cuda", 0) if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    base = cfg.model_config()
    plan = None
    if cfg.layers == "auto" and device.type == "cuda":
        plan = fit_layers(cfg, base, torch.cuda.mem_get_info(device)[1])
        layers = plan.layers
        print(f"[bench train] --layers auto: {plan.reason()}", flush=True)
    else:
        layers = base.num_hidden_layers
        if cfg.layers == "auto":
            print(f"[bench train] --layers auto on CPU: the model's {layers} layers", flush=True)
    rate = measure_matmul_rate(device)
    print(f"[bench train] matmul rate {rate / 1e12:.3g} TFLOP/s", flush=True)
    data = bigram_stream(
        base.vocab_size,
        cfg.steps * cfg.microbatches * cfg.micro_batch_size * (cfg.seq_len + 1),
        cfg.seed,
    )
    specs = run_specs(cfg, device)
    retries: list[dict] = []
    while True:
        model_cfg = cfg.model_config(layers)
        got: dict[str, dict] = {}
        failed: dict[str, str] = {}
        oom = None
        for spec in specs:
            name = spec.name
            try:
                got[name] = one_run(cfg, model_cfg, spec, data, device)
            except torch.OutOfMemoryError as err:
                if plan is None or layers <= model_cfg.first_k_dense_replace + 1:
                    raise
                oom = str(err).splitlines()[0][:300]
                break
            except Exception as err:
                if name == "bf16":
                    raise  # nothing to compare without it
                failed[name] = f"{type(err).__name__}: {err}"[:500]
                print(f"[bench train] {name} failed: {failed[name]}", flush=True)
            # the run's model and optimizer state go before the next one's (after an error: out
            # of the except block, so the traceback's frames are released too)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if save is not None and name in got:
                save(summarize(cfg, model_cfg, got, failed, rate, plan, retries))
        if oom is None:
            break
        gc.collect()
        torch.cuda.empty_cache()
        fewer = max(model_cfg.first_k_dense_replace + 1, layers - max(1, layers // 8))
        retries.append({"layers": layers, "error": oom})
        print(f"[bench train] out of memory at {layers} layers: retrying at {fewer}", flush=True)
        layers = fewer
    return summarize(cfg, model_cfg, got, failed, rate, plan, retries)


def summarize(
    cfg: BenchConfig,
    model_cfg: ModelConfig,
    got: dict[str, dict],
    failed: dict[str, str],
    rate: float,
    plan: MemoryPlan | None,
    retries: list[dict],
) -> dict:
    """The result from the finished runs `got` (name -> one_run's numbers); comparisons with a
    run not (yet) finished are None. Each run is compared with BF16 (`vs_run`): a graphed one
    with graphed BF16 where that ran."""
    tokens_per_step = cfg.microbatches * cfg.micro_batch_size * cfg.seq_len
    flops = train_flops_per_token(model_cfg, cfg.seq_len)
    peak = datasheet_peak(device_name()) if cfg.device == "cuda" else None
    last = min(5, cfg.steps)
    runs_out = {}
    for name, r in got.items():
        tps = tokens_per_step / r["step_time_s"]
        out = {
            **{k: v for k, v in r.items() if k != "losses"},
            "tokens_per_s": tps,
            "mfu_datasheet": None if peak is None else flops * tps / peak,
            "mfu_measured": flops * tps / rate,
            "final_loss": r["losses"][-1],
            "losses": r["losses"],
        }
        # a graphed run against graphed BF16 where there is one: the same host path
        base_name = "bf16"
        if name.endswith(GRAPHS_SUFFIX) and name != f"bf16{GRAPHS_SUFFIX}":
            base_name = f"bf16{GRAPHS_SUFFIX}" if f"bf16{GRAPHS_SUFFIX}" in got else "bf16"
        base = got.get(base_name)
        if base is not None and name != base_name:
            tail, tail_bf16 = (sum(x["losses"][-last:]) / last for x in (r, base))
            out["vs_run"] = base_name
            out["step_time_vs_bf16"] = r["step_time_s"] / base["step_time_s"]
            out["loss_rel_diff_vs_bf16"] = (
                abs(r["losses"][-1] - base["losses"][-1]) / base["losses"][-1]
            )
            out[f"loss_rel_diff_vs_bf16_mean_last{last}"] = abs(tail - tail_bf16) / tail_bf16
        runs_out[name] = out
    fp8 = runs_out.get("fp8", {})
    ratio = fp8.get("step_time_vs_bf16")
    # the fastest FP8 run: the issue's bar is an FP8 step faster than BF16's at the same loss
    fp8_runs = [n for n in runs_out if n.startswith("fp8") and "step_time_vs_bf16" in runs_out[n]]
    best = min(fp8_runs, key=lambda n: runs_out[n]["step_time_vs_bf16"], default=None)
    return {
        "failed_runs": failed,
        "config": asdict(cfg),
        "model": cfg.model,
        "layers": model_cfg.num_hidden_layers,
        "layers_plan": None if plan is None else {**asdict(plan), "reason": plan.reason()},
        "layer_retries": retries,
        "parameters": model_cfg.num_parameters(include_mtp=True),
        "active_parameters": model_cfg.num_parameters(activated=True, include_mtp=True),
        "tokens_per_step": tokens_per_step,
        "train_flops_per_token": flops,
        "flops_formula": "6 * active matmul params + 3 * (L + mtp) * H * (d_qk + d_v) * (S + 1)",
        "peak_bf16_flops_per_s_datasheet": peak,
        "matmul_flops_per_s_measured": rate,
        "runs": runs_out,
        "fp8_bf16_step_time_ratio": ratio,
        "fp8_faster": None if ratio is None else ratio < 1,
        "fp8_bf16_loss_rel_diff": fp8.get("loss_rel_diff_vs_bf16"),
        f"fp8_bf16_loss_rel_diff_mean_last{last}": fp8.get(
            f"loss_rel_diff_vs_bf16_mean_last{last}"
        ),
        "fastest_fp8_run": best,
        "fastest_fp8_step_time_ratio": None
        if best is None
        else runs_out[best]["step_time_vs_bf16"],
        "fastest_fp8_loss_rel_diff": None
        if best is None
        else runs_out[best]["loss_rel_diff_vs_bf16"],
    }


def main(cfg: BenchConfig, out: Path | None = None) -> int:
    """Run, write `train-1gpu-<device>.json` (CPU: `train-1gpu-cpu.json`) after every finished
    run, print the numbers. 1 when an optional run failed (its error in `failed_runs`)."""
    slug = device_slug() if cfg.device == "cuda" else "cpu"

    def save(numbers: dict) -> Path:
        return write_result(f"train-1gpu-{slug}", numbers, directory=out)

    numbers = run(cfg, save)
    path = save(numbers)
    for name, r in numbers["runs"].items():
        for k in SUMMARY:
            v = r.get(k)
            print(f"{name + ' ' + k:<36} {'-' if v is None else format(v, '.6g')}")
    keys = ("layers", "fp8_bf16_step_time_ratio", "fp8_faster", "fp8_bf16_loss_rel_diff")
    for k in (*keys, "fastest_fp8_run", "fastest_fp8_step_time_ratio"):
        print(f"{k:<36} {numbers[k]}")
    print(f"written to {path}")
    if numbers["failed_runs"]:
        print(f"moeray bench train: failed: {numbers['failed_runs']}", file=sys.stderr)
        return 1
    return 0
