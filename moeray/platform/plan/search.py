"""Training layouts on a GPU budget: every PP x EP x DP x schedule that the model, the batch and
the schedules admit, scored by memory, pipeline bubble and exposed all-to-all time."""

from __future__ import annotations

from dataclasses import dataclass, replace

from moeray.platform.config import ModelConfig
from moeray.platform.parallel.schedule import SCHEDULES
from moeray.platform.parallel.simulate import Costs
from moeray.platform.plan.comm import AllToAll, training_all_to_all
from moeray.platform.plan.gpus import GpuSpec
from moeray.platform.plan.memory import (
    DEEPSEEK_V3,
    GB,
    RankMemory,
    Recipe,
    TrainLayout,
    schedule_stats,
    train_memory,
    worst_rank,
)
from moeray.platform.plan.params import Params
from moeray.platform.plan.serving import prefill_flops_per_token

# Achieved training throughput as a share of the FP8 peak, for the compute side of the
# comm/compute ratio: DeepSeek-V3 trains at 432 TFLOP/s per H800 (docs/deepseek-v3.md), 0.22 of
# its 1979 TFLOP/s.
TRAIN_FP8_MFU = 0.22
# Chunk costs for the bubble simulation: the zero-bubble papers' F = W = B - W (docs/deepseek-v3.md
# "Pipeline schedules"), where the report's formulas are exact for all three schedules.
COSTS = Costs(1.0, 2.0, 1.0)


@dataclass(frozen=True)
class Scored:
    layout: TrainLayout
    memory: RankMemory  # the fullest rank
    fits: bool
    bubble_fraction: float  # idle share of a step on the most idle rank (simulated)
    all_to_all: AllToAll
    comm_to_compute: float  # IB (or NVLink) time over compute time, per token and MoE layer

    @property
    def exposed_comm(self) -> float:
        """All-to-all time not hidden, as a share of compute: DualPipe overlaps a forward with a
        backward chunk and hides communication up to equal time; the others hide none."""
        if self.layout.schedule == "dualpipe":
            return max(0.0, self.comm_to_compute - 1.0)
        return self.comm_to_compute

    @property
    def efficiency(self) -> float:
        """Useful share of a step: (1 - bubble) / (1 + exposed communication)."""
        return (1.0 - self.bubble_fraction) / (1.0 + self.exposed_comm)

    def as_dict(self) -> dict[str, object]:
        lay = self.layout
        return {
            "pp": lay.pp,
            "ep": lay.ep,
            "dp": lay.dp,
            "schedule": lay.schedule,
            "microbatches": lay.microbatches,
            "memory_per_gpu_gb": self.memory.total / GB,
            "fits": self.fits,
            "bubble_fraction": self.bubble_fraction,
            "comm_to_compute": self.comm_to_compute,
            "efficiency": self.efficiency,
        }


def bubble_fraction(layout: TrainLayout) -> float:
    return schedule_stats(layout.schedule, layout.pp, layout.microbatches, COSTS)[0]


def comm_to_compute(cfg: ModelConfig, gpu: GpuSpec, a2a: AllToAll, seq_len: int) -> float:
    """Per token and MoE layer, forward and backward: two all-to-alls each way against
    6 x the block's activated parameters plus attention (3 x its forward)."""
    p = Params.of(cfg)
    routed, other = p.moe_block
    activated = other + routed * p.top_k // p.n_routed
    attn = prefill_flops_per_token(cfg, seq_len) - 2 * p.activated
    flops = 6 * activated + 3 * attn / cfg.num_hidden_layers
    compute = flops / (TRAIN_FP8_MFU * gpu.fp8_tflops * 1e12)
    return 2 * a2a.seconds(gpu, 1) / compute


def score(
    cfg: ModelConfig,
    gpu: GpuSpec,
    layout: TrainLayout,
    gpus_per_node: int = 8,
    recipe: Recipe = DEEPSEEK_V3,
) -> Scored:
    """ValueError when the layout is impossible (schedule, batch split, expert split)."""
    mem = worst_rank(train_memory(cfg, layout, recipe))
    a2a = training_all_to_all(cfg, layout.ep, gpus_per_node)
    return Scored(
        layout=layout,
        memory=mem,
        fits=mem.total <= gpu.hbm_gb * GB,
        bubble_fraction=bubble_fraction(layout),
        all_to_all=a2a,
        comm_to_compute=comm_to_compute(cfg, gpu, a2a, layout.seq_len),
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(
    cfg: ModelConfig,
    gpu: GpuSpec,
    gpus: int,
    base: TrainLayout,
    gpus_per_node: int = 8,
    recipe: Recipe = DEEPSEEK_V3,
) -> list[Scored]:
    """Every admissible layout of exactly `gpus` GPUs, best first: those that fit, by efficiency,
    then by all-to-all load, then by memory; then those that do not, by memory."""
    out = []
    for pp in _divisors(gpus):
        if pp > cfg.num_hidden_layers:
            break
        for ep in _divisors(gpus // pp):
            if cfg.n_routed_experts % ep:
                continue
            for schedule in SCHEDULES if pp > 1 else ("1f1b",):
                try:
                    layout = replace(base, pp=pp, ep=ep, dp=gpus // (pp * ep), schedule=schedule)
                    out.append(score(cfg, gpu, layout, gpus_per_node, recipe))
                except ValueError:
                    continue
    return sorted(
        out,
        key=lambda s: (
            not s.fits,
            -round(s.efficiency, 4) if s.fits else 0.0,
            s.comm_to_compute if s.fits else 0.0,
            s.memory.total,
        ),
    )
