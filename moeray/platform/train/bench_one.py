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
`loss_rel_diff_vs_bf16`, |loss - loss_bf16| / loss_bf16 at the final step, and
`loss_rel_diff_vs_bf16_mean_last<N>`, the same of the mean loss of the last N steps
(`tail_steps`: a tenth of the run, at least 5); the `fp8` run's are also
`fp8_bf16_step_time_ratio` and `fp8_bf16_loss_rel_diff`. With `--seeds K` each run trains K times
from seeds seed .. seed + K - 1 (other random weights and batches each): `losses` and the
profile are the first seed's, `losses_by_seed` all, `step_time_s` the mean of
`step_time_s_by_seed`; the loss differences are |mean over seeds| of the signed per-seed ones
(`..._by_seed`), each seed against BF16 from the same seed. On a run this short, BF16 against
itself (eager against graphed: the same arithmetic, atomics in another order) differs by a few
tenths of a percent at lr 1e-3: the seeds average that noise out.

`--layers auto` (CUDA): the most decoder layers that fit the device (`fit_layers`: weights,
gradients and AdamW moments in fp32, or bf16 moments with `--moments-dtype bfloat16`, FP8's
cached expert weights, activations and logits of one micro-batch (2 B a token and vocab entry
a head with the fused cross-entropy of CUDA runs, `platform/loss.py`; 16 with PyTorch's), a
workspace). If a run still runs out of memory, both runs restart with fewer layers
(`layer_retries` in the result).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from moeray.platform.config import ModelConfig
from moeray.platform.loss import fused_cross_entropy_planned
from moeray.platform.train import step as tstep
from moeray.platform.train.bench_common import (
    GRAPHS_SUFFIX,
    BenchConfig,
    bigram_stream,
    measure_matmul_rate,
    split_run_name,
    train_flops_per_token,
)
from moeray.platform.train.bench_run import RunSpec, one_run, run_specs
from moeray.results import device_name, device_slug, write_result

# Datasheet dense BF16 tensor-core FLOP/s (no sparsity), by a name fragment of the device.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12}
WORKSPACE_BYTES = 3 << 30  # cuBLAS / cuDNN workspaces, the CUDA context's share, kernel scratch
USABLE_FRACTION = 0.9  # of the device's memory: allocator rounding and fragmentation
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
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    n_tokens = cfg.steps * cfg.microbatches * cfg.micro_batch_size * (cfg.seq_len + 1)
    data = {s: bigram_stream(base.vocab_size, n_tokens, s) for s in seeds}
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
                got[name] = seeded_runs(cfg, model_cfg, spec, data, device)
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


def seeded_runs(
    cfg: BenchConfig,
    model_cfg: ModelConfig,
    spec: RunSpec,
    data: dict[int, torch.Tensor],
    device: torch.device,
) -> dict:
    """`one_run` from each seed of `data` (seed -> its batches); the first seed's numbers, with
    `losses_by_seed` and `step_time_s_by_seed` ({seed: ...}) and `step_time_s` their mean. Only
    the first seed's last step is profiled (the others' counts would be the same)."""
    out: dict = {}
    for i, (seed, tokens) in enumerate(data.items()):
        r = one_run(replace(cfg, seed=seed), model_cfg, spec, tokens, device, profile=i == 0)
        if not out:
            out = {**r, "losses_by_seed": {}, "step_time_s_by_seed": {}}
        out["losses_by_seed"][seed] = r["losses"]
        out["step_time_s_by_seed"][seed] = r["step_time_s"]
        if i + 1 < len(data):  # the run's model and optimizer go before the next seed's
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    times = out["step_time_s_by_seed"].values()
    out["step_time_s"] = sum(times) / len(times)
    return out


def tail_steps(steps: int) -> int:
    """How many last steps the losses are averaged over: a tenth of the run, at least 5 (steps
    to step the loss moves by more than the bar on these short runs)."""
    return min(steps, max(5, steps // 10))


def base_run(name: str, got: dict) -> str | None:
    """The BF16 run that `name` is compared with: the one on the same host path (graphed with
    graphed) where it ran, else the other; graphed BF16 with eager BF16; None for eager BF16 or
    where none ran."""
    graphed = f"bf16{GRAPHS_SUFFIX}"
    if name in ("bf16", graphed):
        return "bf16" if name == graphed and "bf16" in got else None
    run = split_run_name(name)[0]
    order = (graphed, "bf16") if run.endswith(GRAPHS_SUFFIX) else ("bf16", graphed)
    return next((n for n in order if n in got), None)


def summarize(
    cfg: BenchConfig,
    model_cfg: ModelConfig,
    got: dict[str, dict],
    failed: dict[str, str],
    rate: float,
    plan: MemoryPlan | None,
    retries: list[dict],
) -> dict:
    """The result from the finished runs `got` (name -> seeded_runs' numbers); comparisons with
    a run not (yet) finished are None. Each run is compared with BF16 (`vs_run`, `base_run`),
    its losses seed by seed."""
    tokens_per_step = cfg.microbatches * cfg.micro_batch_size * cfg.seq_len
    flops = train_flops_per_token(model_cfg, cfg.seq_len)
    peak = datasheet_peak(device_name()) if cfg.device == "cuda" else None
    last = tail_steps(cfg.steps)
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
        if name.startswith("fp8"):
            out["fp8_scope"] = split_run_name(name)[1] or cfg.fp8_scope
        base_name = base_run(name, got)
        base = got.get(base_name) if base_name is not None else None
        if base is not None:
            seeds = [s for s in r["losses_by_seed"] if s in base["losses_by_seed"]]
            pairs = [(r["losses_by_seed"][s], base["losses_by_seed"][s]) for s in seeds]
            final = [(a[-1] - b[-1]) / b[-1] for a, b in pairs]
            tail = [(sum(a[-last:]) - sum(b[-last:])) / sum(b[-last:]) for a, b in pairs]
            out["vs_run"] = base_name
            out["step_time_vs_bf16"] = r["step_time_s"] / base["step_time_s"]
            # |mean over seeds| of the signed relative differences; per seed signed
            out["loss_rel_diff_vs_bf16"] = abs(sum(final) / len(final))
            out[f"loss_rel_diff_vs_bf16_mean_last{last}"] = abs(sum(tail) / len(tail))
            out[f"loss_rel_diff_vs_bf16_mean_last{last}_by_seed"] = dict(
                zip(seeds, tail, strict=True)
            )
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
        "seeds": [cfg.seed + i for i in range(cfg.seeds)],
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
        f"fastest_fp8_loss_rel_diff_mean_last{last}": None
        if best is None
        else runs_out[best][f"loss_rel_diff_vs_bf16_mean_last{last}"],
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
    tail = f"fastest_fp8_loss_rel_diff_mean_last{tail_steps(cfg.steps)}"
    for k in (*keys, "fastest_fp8_run", "fastest_fp8_step_time_ratio", tail):
        print(f"{k:<36} {numbers[k]}")
    print(f"written to {path}")
    if numbers["failed_runs"]:
        print(f"moeray bench train: failed: {numbers['failed_runs']}", file=sys.stderr)
        return 1
    return 0
