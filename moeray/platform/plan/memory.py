"""Training memory per GPU for a PP x EP x DP layout.

Placement (as moeray's trainer and DeepSeek-V3's run place it): the decoder blocks split into PP
stages, the embedding on the first stage, final norm, output head and MTP modules on the last.
Under DualPipe rank r holds stage r and stage PP-1-r (the schedule's two parameter copies; the
first rank thus holds both embedding and head, which MTP shares). Routed experts split over the EP
ranks of a stage; everything else is replicated on its EP x DP ranks. ZeRO-1 shards the optimizer
state (master weights and moments) over the ranks that replicate a parameter: EP x DP for dense
parameters, DP for an expert.

Activations: the peak number of micro-batches whose activations a rank holds (the schedule
simulator's count: PP for 1F1B/ZB1P, PP+1 for DualPipe on the first rank) times what one
micro-batch stores for one stage. Per token and block that is, with DeepSeek-V3's recipe (report
section 3.3: RMSNorm and MLA up-projections recomputed, expert inputs cached in FP8):
  block input and post-attention residual  2 x D x hidden_bytes
  q and kv latents (up-projection inputs)  (q_lora + kv_lora + rope) x hidden_bytes
  attention output (+ fp32 log-sum-exp)    H x v_head x attn_out_bytes + 4H (the o_proj input,
                                           which the report caches in an FP8 format)
  router scores (fp32)                     4 x n_routed
  per expert a token visits (top-k+shared) (D + 2 x I_moe) x act_bytes: the GEMM input and the
                                           SwiGLU input, whose output is recomputed
What a recipe does not recompute it stores too (Recipe.recompute names the parts, as the job
config's `recompute` does): "norm" the normed block inputs and latents ((2 D + latents) x
hidden_bytes), "mla_up" the per-head q, k, v (H (2 qk_head + v_head) x hidden_bytes), "swiglu" the
SwiGLU outputs (width x act_bytes per expert copy). The last stage adds its logits (V per token per
head) once, as a transient: the loss and its gradient are computed before the next micro-batch's
forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from moeray.platform.config import ModelConfig
from moeray.platform.parallel.schedule import SCHEDULES, build
from moeray.platform.parallel.simulate import Costs, peak_activations, simulate
from moeray.platform.plan.params import Params

GB = 1e9


@dataclass(frozen=True)
class Recipe:
    """Bytes per parameter and per cached activation element of a training recipe."""

    name: str
    weight_bytes: float  # compute copy of a projection weight
    table_bytes: float  # embedding and output head
    grad_bytes: float
    master_bytes: float  # master copy when it differs from the compute copy (0: it is the same)
    moment_bytes: float  # both AdamW moments together
    zero1: bool  # optimizer state sharded over the ranks that replicate a parameter
    act_bytes: float  # cached expert / FFN activations
    hidden_bytes: float  # residual stream, latents, logits
    attn_out_bytes: float  # attention output (o_proj input)
    recompute: tuple[str, ...]  # parts recomputed in the backward: of RECOMPUTE_PARTS

    def __post_init__(self) -> None:
        bad = [r for r in self.recompute if r not in RECOMPUTE_PARTS]
        if bad:
            raise ValueError(
                f"recompute={list(self.recompute)}: {bad} unknown; accepted: {RECOMPUTE_PARTS}"
            )


RECOMPUTE_PARTS = ("norm", "mla_up", "swiglu")
# DeepSeek-V3 report section 3.3: FP8 GEMM weights and cached activations, BF16 embedding, head
# and activations elsewhere, FP32 master weights and gradients, BF16 AdamW moments, ZeRO-1.
DEEPSEEK_V3 = Recipe("deepseek-v3", 1, 2, 4, 4, 2 + 2, True, 1, 2, 1, RECOMPUTE_PARTS)
# moeray's trainer by default (train/step.py, replica.py): fp32 parameters and gradients, torch
# AdamW's fp32 moments, no optimizer sharding, no recomputation; FP8 GEMMs quantize on the fly (no
# copy). A job's optim.zero_stage, optim.moments_dtype and recompute change these
# (plan/check.py, job_recipe).
MOERAY_FP32 = Recipe("moeray-fp32", 4, 4, 4, 0, 4 + 4, False, 4, 4, 4, ())
MOERAY_BF16 = Recipe("moeray-bf16", 4, 4, 4, 0, 4 + 4, False, 2, 2, 2, ())
RECIPES = {r.name: r for r in (DEEPSEEK_V3, MOERAY_FP32, MOERAY_BF16)}

# CUDA context, NCCL/DeepEP communication buffers and allocator slack, per GPU (DeepEP's default
# buffers take about 1-2 GB; the CUDA context about 0.5 GB).
RESERVE_GB = 3.0


@dataclass(frozen=True)
class TrainLayout:
    """PP x EP x DP ranks; a step of `global_batch` sequences in micro-batches of
    `microbatch_seqs` per data shard (EP x DP shards). Defaults: DeepSeek-V3's pre-training
    (4K sequences, 15360 per step; one sequence per micro-batch is this planner's assumption)."""

    pp: int
    ep: int
    dp: int
    schedule: str = "dualpipe"
    seq_len: int = 4096
    global_batch: int = 15360
    microbatch_seqs: int = 1

    def __post_init__(self) -> None:
        for name in ("pp", "ep", "dp", "seq_len", "global_batch", "microbatch_seqs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if self.global_batch % (self.shards * self.microbatch_seqs):
            raise ValueError(
                f"global_batch={self.global_batch} must split into ep*dp={self.shards} shards of "
                f"micro-batches of {self.microbatch_seqs} sequences"
            )

    @property
    def world(self) -> int:
        return self.pp * self.ep * self.dp

    @property
    def shards(self) -> int:
        return self.ep * self.dp

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.shards * self.microbatch_seqs)

    @property
    def microbatch_tokens(self) -> int:
        return self.microbatch_seqs * self.seq_len

    def stages_of(self, rank: int) -> tuple[int, ...]:
        if self.schedule == "dualpipe" and self.pp > 1:
            return (rank, self.pp - 1 - rank)
        return (rank,)

    def describe(self) -> str:
        return f"PP{self.pp} x EP{self.ep} x DP{self.dp} ({self.schedule})"


# Beyond this many micro-batches per pipeline rank a schedule is in its steady state: every
# further micro-batch adds the same slots to every rank, so the bubble (idle time) no longer grows
# and the makespan grows linearly; schedule_stats extrapolates instead of simulating thousands.
STEADY_PER_RANK = 4


@cache
def schedule_stats(
    name: str, pp: int, microbatches: int, costs: Costs
) -> tuple[float, tuple[int, ...]]:
    """(bubble share of a step, live micro-batches per rank) of a schedule. Long steps are
    simulated at 4 x PP and 8 x PP micro-batches and extrapolated linearly (tests check the
    extrapolation against a full simulation)."""
    if pp == 1:
        return 0.0, (1,)
    m1, m2 = STEADY_PER_RANK * pp, 2 * STEADY_PER_RANK * pp
    if microbatches <= m2:
        s = build(name, pp, microbatches)
        t = simulate(s, costs)
        return t.bubble() / t.makespan, tuple(peak_activations(s, r) for r in range(pp))
    # the schedules constrain only the parity and a minimum of micro-batches: the full count is
    # valid exactly when a count past the minimum with its parity is
    build(name, pp, m2 + microbatches % 2)
    s1, s2 = build(name, pp, m1), build(name, pp, m2)
    t1, t2 = simulate(s1, costs), simulate(s2, costs)
    per_mb = (t2.makespan - t1.makespan) / (m2 - m1)
    makespan = t2.makespan + (microbatches - m2) * per_mb
    return t2.bubble() / makespan, tuple(peak_activations(s2, r) for r in range(pp))


def stage_blocks(n_blocks: int, pp: int) -> list[range]:
    """Blocks per stage: equal shares, the remainder to the middle stages (the first and last
    also hold the embedding and the head)."""
    if pp > n_blocks:
        raise ValueError(f"pp={pp} exceeds the model's {n_blocks} blocks")
    counts = [n_blocks // pp] * pp
    middle = list(range(1, pp - 1)) or list(range(pp))
    for i in range(n_blocks % pp):
        counts[middle[i % len(middle)]] += 1
    starts = [sum(counts[:i]) for i in range(pp)]
    return [range(s, s + c) for s, c in zip(starts, counts, strict=True)]


def activation_bytes_per_token(cfg: ModelConfig, recipe: Recipe, moe: bool) -> float:
    """What one token stores in one block for its backward (module docstring)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    hb, ab = recipe.hidden_bytes, recipe.act_bytes
    latents = (cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.qk_rope_head_dim
    out = 2 * D * hb + latents * hb + H * cfg.v_head_dim * recipe.attn_out_bytes + 4 * H
    if moe:
        copies, width = cfg.num_experts_per_tok + cfg.n_shared_experts, cfg.moe_intermediate_size
        out += 4 * cfg.n_routed_experts
    else:
        copies, width = 1, cfg.intermediate_size
    out += copies * (D + 2 * width) * ab
    if "norm" not in recipe.recompute:
        out += (2 * D + latents) * hb
    if "mla_up" not in recipe.recompute:
        out += H * (2 * cfg.qk_head_dim + cfg.v_head_dim) * hb
    if "swiglu" not in recipe.recompute:
        out += copies * width * ab
    return out


@dataclass(frozen=True)
class RankMemory:
    rank: int
    stages: tuple[int, ...]
    params: int  # parameters held (both DualPipe copies)
    weights: float  # bytes
    grads: float
    optimizer: float
    activations: float
    reserve: float
    live_microbatches: int
    ema: float = 0.0  # the parameter EMA, when it lives in this memory (a CPU worker's)

    @property
    def total(self) -> float:
        return (
            self.weights + self.grads + self.optimizer + self.activations + self.reserve + self.ema
        )

    def as_dict(self) -> dict[str, float | int | list[int]]:
        return {
            "rank": self.rank,
            "stages": list(self.stages),
            "params": self.params,
            "weights_gb": self.weights / GB,
            "grads_gb": self.grads / GB,
            "optimizer_gb": self.optimizer / GB,
            "activations_gb": self.activations / GB,
            "reserve_gb": self.reserve / GB,
            "ema_gb": self.ema / GB,
            "live_microbatches": self.live_microbatches,
            "total_gb": self.total / GB,
        }


def train_memory(
    cfg: ModelConfig,
    layout: TrainLayout,
    recipe: Recipe = DEEPSEEK_V3,
    reserve_gb: float = RESERVE_GB,
    ema_bytes: float = 0.0,
) -> list[RankMemory]:
    """Memory of every pipeline rank (all EP x DP ranks of a pipeline rank hold the same).
    `ema_bytes` per parameter held: the parameter EMA when it shares this memory (0 on a GPU,
    whose EMA is in host memory)."""
    p = Params.of(cfg)
    if p.n_routed % layout.ep:
        raise ValueError(
            f"ep={layout.ep} must divide n_routed_experts={p.n_routed} (each rank holds whole "
            "experts)"
        )
    blocks = stage_blocks(cfg.num_hidden_layers, layout.pp)
    _, live_per_rank = schedule_stats(layout.schedule, layout.pp, layout.microbatches, Costs())
    tokens = layout.microbatch_tokens
    per_token = {moe: activation_bytes_per_token(cfg, recipe, moe) for moe in (False, True)}
    opt_bytes = recipe.master_bytes + recipe.moment_bytes
    out = []
    for rank in range(layout.pp):
        stages = layout.stages_of(rank)
        routed = other = tables = 0
        act_per_mb = transient = 0.0
        for s in stages:
            stage_act = 0.0
            for b in blocks[s]:
                moe = cfg.is_moe_layer(b)
                r, o = p.moe_block if moe else p.dense_block
                routed, other = routed + r, other + o
                stage_act += tokens * per_token[moe]
            if s == 0:
                tables += p.embedding
            if s == layout.pp - 1:
                r, o = p.mtp_module
                routed += p.mtp_depth * r
                other += p.mtp_depth * o + p.final_norm
                tables += p.head
                stage_act += p.mtp_depth * tokens * per_token[True]
                # transient logits of the main head and each MTP head
                transient = (1 + p.mtp_depth) * tokens * cfg.vocab_size * recipe.hidden_bytes
            act_per_mb = max(act_per_mb, stage_act)
        routed_here = routed // layout.ep
        dense = other + tables
        live = live_per_rank[rank]
        dense_shards = layout.shards if recipe.zero1 else 1
        expert_shards = layout.dp if recipe.zero1 else 1
        out.append(
            RankMemory(
                rank=rank,
                stages=stages,
                params=routed_here + dense,
                weights=(routed_here + other) * recipe.weight_bytes + tables * recipe.table_bytes,
                grads=(routed_here + dense) * recipe.grad_bytes,
                optimizer=opt_bytes * (routed_here / expert_shards + dense / dense_shards),
                activations=live * act_per_mb + transient,
                reserve=reserve_gb * GB,
                live_microbatches=live,
                ema=ema_bytes * (routed_here + dense),
            )
        )
    return out


def worst_rank(ranks: list[RankMemory]) -> RankMemory:
    return max(ranks, key=lambda m: m.total)
