"""Serving capacity: KV cache per token and per decode GPU, the decode step bound, and a suggested
prefill/decode split with expert-parallel degrees.

The decode step bound is the larger of the all-to-all time (comm.py, DeepSeek's ISCA'25 analysis)
and the time to read the weights and the batch's KV from HBM once. Both phases run attention
data-parallel and experts expert-parallel (DeepSeek-V3 report section
3.4): every GPU of an EP group holds the dense weights and the MTP module, and its share of the
routed experts plus redundant copies of hot ones (EPLB). Weights are served as stored: FP8 e4m3
for a checkpoint with an FP8 `quantization_config` (embedding and head stay BF16), else BF16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeray.platform.config import ModelConfig
from moeray.platform.plan.comm import decode_all_to_all_layers, decode_tpot_bound_s
from moeray.platform.plan.gpus import GpuSpec
from moeray.platform.plan.memory import GB, RESERVE_GB
from moeray.platform.plan.params import Params

# Redundant expert copies per EP group: DeepSeek-V3 deploys 32 for 256 routed experts (report
# section 3.4.1), one eighth.
REDUNDANT_FRACTION = 1 / 8
# Decode wants few experts per GPU so each sees a large batch from the whole group: the production
# system runs 288 expert copies on EP144 (2 per GPU), the report 1 per GPU on 320 GPUs.
DECODE_EXPERTS_PER_GPU = 2
# Prefill keeps this much of HBM for weights; the rest holds the activations of its token chunks
# and the KV it writes before the transfer (at EP32 V3's weights take 53% of an H800).
PREFILL_WEIGHT_FRACTION = 0.6
# Model FLOP utilisation of FP8 prefill; 0.4 of an H800's 1979 TFLOP/s gives about 10k tokens/s
# per GPU at V3's 37B activated parameters, the order of DeepSeek's published 73.7k per node.
PREFILL_MFU = 0.4


@dataclass(frozen=True)
class Workload:
    input_tokens: int = 2000  # per request, after prefix-cache hits
    output_tokens: int = 500
    decode_batch_per_gpu: int = 32  # the ISCA'25 bound's batch

    def __post_init__(self) -> None:
        for name in ("input_tokens", "output_tokens", "decode_batch_per_gpu"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    return cfg.kv_cache_bytes_per_token


def weight_bytes_per_gpu(cfg: ModelConfig, ep: int) -> float:
    """Dense weights, MTP module and this GPU's share of routed experts (redundant included)."""
    p = Params.of(cfg)
    per = 1 if cfg.quantization_config is not None else 2
    copies = p.n_routed + (round(p.n_routed * REDUNDANT_FRACTION) if ep > 1 else 0)
    per_gpu = math.ceil(copies / ep)
    routed_layers = p.n_moe + p.mtp_depth
    routed = per_gpu * routed_layers * p.expert
    tables = p.embedding + p.head
    other = p.total + p.mtp - tables - p.routed_total
    return (routed + other) * per + tables * 2


def kv_capacity_tokens(cfg: ModelConfig, gpu: GpuSpec, ep: int) -> int:
    free = gpu.hbm_gb * GB - weight_bytes_per_gpu(cfg, ep) - RESERVE_GB * GB
    return max(0, int(free // kv_bytes_per_token(cfg)))


def _node_multiples(gpus_per_node: int, limit: int) -> list[int]:
    return [1, *range(gpus_per_node, max(limit, gpus_per_node) + 1, gpus_per_node)]


def decode_ep(cfg: ModelConfig, gpu: GpuSpec, gpus_per_node: int) -> int:
    """1 when the model leaves half of HBM for KV on one GPU; else the smallest whole-node EP
    with at most DECODE_EXPERTS_PER_GPU expert copies per GPU."""
    if weight_bytes_per_gpu(cfg, 1) <= 0.5 * gpu.hbm_gb * GB:
        return 1
    copies = cfg.n_routed_experts * (1 + REDUNDANT_FRACTION)
    need = math.ceil(copies / DECODE_EXPERTS_PER_GPU)
    return math.ceil(need / gpus_per_node) * gpus_per_node


def prefill_ep(cfg: ModelConfig, gpu: GpuSpec, gpus_per_node: int) -> int:
    """The smallest EP (1, or whole nodes) whose weights stay within PREFILL_WEIGHT_FRACTION."""
    budget = PREFILL_WEIGHT_FRACTION * gpu.hbm_gb * GB
    for ep in _node_multiples(gpus_per_node, 4 * cfg.n_routed_experts):
        if weight_bytes_per_gpu(cfg, ep) <= budget:
            return ep
    raise ValueError(
        f"the model's dense weights alone ({weight_bytes_per_gpu(cfg, 10**9) / GB:.1f} GB) "
        f"exceed {PREFILL_WEIGHT_FRACTION:.0%} of a {gpu.name}'s {gpu.hbm_gb:g} GB"
    )


def prefill_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """2 x activated parameters plus attention scores and values over half the context (causal)."""
    p = Params.of(cfg)
    attn = (
        2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (context / 2)
    ) * cfg.num_hidden_layers
    return 2 * p.activated + attn


@dataclass(frozen=True)
class ServingPlan:
    kv_bytes_per_token: int
    prefill_ep: int
    decode_ep: int
    decode_weights_gb: float
    kv_capacity_tokens: int  # per decode GPU
    decode_tpot_bound_ms: float  # the larger of the two below
    decode_all_to_all_ms: float  # the ISCA'25 bound (0 without expert parallelism)
    decode_memory_ms: float  # reading the GPU's weights and its batch's KV once per step
    decode_tokens_per_s_per_gpu: float
    prefill_tokens_per_s_per_gpu: float
    prefill_groups: int
    decode_groups: int

    @property
    def prefill_gpus(self) -> int:
        return self.prefill_groups * self.prefill_ep

    @property
    def decode_gpus(self) -> int:
        return self.decode_groups * self.decode_ep

    def as_dict(self) -> dict[str, float | int]:
        return {
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "prefill_ep": self.prefill_ep,
            "decode_ep": self.decode_ep,
            "decode_weights_gb": self.decode_weights_gb,
            "kv_capacity_tokens_per_decode_gpu": self.kv_capacity_tokens,
            "decode_tpot_bound_ms": self.decode_tpot_bound_ms,
            "decode_all_to_all_ms": self.decode_all_to_all_ms,
            "decode_memory_ms": self.decode_memory_ms,
            "decode_tokens_per_s_per_gpu": self.decode_tokens_per_s_per_gpu,
            "prefill_tokens_per_s_per_gpu": self.prefill_tokens_per_s_per_gpu,
            "prefill_groups": self.prefill_groups,
            "decode_groups": self.decode_groups,
            "prefill_gpus": self.prefill_gpus,
            "decode_gpus": self.decode_gpus,
        }


def plan_serving(
    cfg: ModelConfig,
    gpu: GpuSpec,
    *,
    gpus: int | None = None,
    gpus_per_node: int = 8,
    workload: Workload = Workload(),
) -> ServingPlan:
    """Suggested EP degrees and prefill/decode groups for `gpus` GPUs (default: the smallest
    deployment, one group of each phase scaled to the workload's ratio)."""
    p_ep, d_ep = prefill_ep(cfg, gpu, gpus_per_node), decode_ep(cfg, gpu, gpus_per_node)
    a2a = 0.0
    if d_ep > 1:
        a2a = decode_tpot_bound_s(
            gpu,
            hidden=cfg.hidden_size,
            experts_per_token=cfg.num_experts_per_tok + cfg.n_shared_experts,
            layers=decode_all_to_all_layers(cfg),
            tokens_per_gpu=workload.decode_batch_per_gpu,
        )
    # each step reads this GPU's weights and its sequences' latent KV (mean context: the prompt
    # plus half the output) from HBM at least once
    context = workload.input_tokens + workload.output_tokens / 2
    kv = workload.decode_batch_per_gpu * context * kv_bytes_per_token(cfg)
    memory = (weight_bytes_per_gpu(cfg, d_ep) + kv) / (gpu.hbm_tbs * 1e12)
    tpot = max(a2a, memory)
    decode_rate = workload.decode_batch_per_gpu / tpot
    flops = prefill_flops_per_token(cfg, workload.input_tokens)
    prefill_rate = PREFILL_MFU * gpu.fp8_tflops * 1e12 / flops
    # GPU-seconds per request in each phase set the ratio of prefill to decode GPUs
    p_need = workload.input_tokens / prefill_rate
    d_need = workload.output_tokens / decode_rate
    if gpus is None:
        groups_p = max(1, round(d_ep * p_need / (p_ep * d_need)))
        groups_d = max(1, round(p_ep * d_need / (d_ep * p_need)))
    else:
        if gpus < p_ep + d_ep:
            raise ValueError(
                f"gpus={gpus} is fewer than one prefill group (EP{p_ep}) plus one decode group "
                f"(EP{d_ep}) = {p_ep + d_ep}"
            )
        share = p_need / (p_need + d_need)
        groups_p = max(1, round(gpus * share / p_ep))
        groups_p = min(groups_p, (gpus - d_ep) // p_ep)
        groups_d = max(1, (gpus - groups_p * p_ep) // d_ep)
    return ServingPlan(
        kv_bytes_per_token=kv_bytes_per_token(cfg),
        prefill_ep=p_ep,
        decode_ep=d_ep,
        decode_weights_gb=weight_bytes_per_gpu(cfg, d_ep) / GB,
        kv_capacity_tokens=kv_capacity_tokens(cfg, gpu, d_ep),
        decode_tpot_bound_ms=tpot * 1e3,
        decode_all_to_all_ms=a2a * 1e3,
        decode_memory_ms=memory * 1e3,
        decode_tokens_per_s_per_gpu=decode_rate,
        prefill_tokens_per_s_per_gpu=prefill_rate,
        prefill_groups=groups_p,
        decode_groups=groups_d,
    )
