"""Pipeline parallelism: one rank of a pipeline-parallel model (`PipelineModel`), built from the
modules of this package:

  stages.py       the layer split and one stage as a module (`PipelineStage`);
  weight_grad.py  the weight-gradient GEMMs deferred to the schedule's W op (`split_linear`);
  experts_mlp.py  the routed experts as one autograd node with a deferrable weight gradient;
  grouped_experts.py  their grouped GEMMs' layout (each expert's rows aligned, one GEMM for all);
  distributed.py  rank layout (`Topology`), process groups, a worker's CUDA environment;
  executor.py     one rank's ops of a schedule (`schedule.py`) for one step, with p2p messages;
  expert.py       expert parallelism (all-to-all dispatch and combine).

Shared weights. Every parameter's *holders* are the pipeline ranks that hold a copy of it (1F1B:
embedding on ranks 0 and PP-1, everything else once; DualPipe: stage s on ranks s and PP-1-s,
i.e. every parameter twice). After the backward pass the gradients of all copies are summed (and
averaged over the EP x DP data shards) in one all-reduce per holder set, so every copy takes the
same AdamW step and the copies never drift apart. On one rank two stages share a single embedding
module (DualPipe: rank 0 holds stages 0 and PP-1), so the sum over copies counts each
contribution once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moeray.platform.fp8 import enable_fp8_training
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel import schedule as sched
from moeray.platform.parallel.distributed import PipelineGroups, Topology
from moeray.platform.parallel.executor import PipelineExecutor, StepOutput
from moeray.platform.parallel.expert import enable_expert_parallel, is_expert_param
from moeray.platform.parallel.stages import (
    PipelineStage,
    enable_weight_grad_split,
    moe_layer_names,
    split_layers,
)


@dataclass(frozen=True)
class PipelineSpec:
    pp: int
    dp: int = 1
    ep: int = 1
    schedule: str = "dualpipe"
    microbatches: int = 8

    @property
    def topology(self) -> Topology:
        return Topology(self.pp, self.dp, self.ep)


class PipelineModel:
    """This rank's stages of the model, their optimizer-visible parameters, gradient sync.

    Build it on every rank of a `PipelineSpec.topology` world (torch.distributed initialized):
    every rank builds the full model from `seed` (identical weights everywhere), keeps its stages,
    optionally switches them to FP8 and expert parallelism, and defers weight grads.
    """

    def __init__(
        self,
        model_cfg,
        spec: PipelineSpec,
        rank: int,
        *,
        seed: int = 0,
        fp8: bool = False,
        fp8_scope: str = "experts",
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        overlap: bool | None = None,
        seq_len: int,
        full_init: Callable | None = None,
        grouped_fp8: bool | None = None,
    ) -> None:
        self.spec, self.rank = spec, rank
        self.topology = spec.topology
        self.pp_rank, self.dp_rank, self.ep_rank = self.topology.coords(rank)
        self.schedule = sched.build(spec.schedule, spec.pp, spec.microbatches)
        self.device = torch.device(device)
        # FP8 experts through the grouped GEMM by default on CUDA: 4x H200, small(), PP=2 x EP=2,
        # DualPipe: 2.18 s/step vs 3.69 per expert (benchmarks/notes-train.md). On CPU the
        # per-expert path, which the grouped one is tested against, stays the default.
        self.grouped_fp8 = self.device.type == "cuda" if grouped_fp8 is None else grouped_fp8
        full = Transformer(model_cfg)
        full.reset_parameters(seed=seed)
        if full_init is not None:
            full_init(full)  # tests: e.g. nonzero router biases
        full.to(self.device)
        self.layout = split_layers(
            model_cfg.num_hidden_layers, model_cfg.num_nextn_predict_layers, spec.pp
        )
        self.moe_names = moe_layer_names(full)
        # holders of every parameter name, from the names of every stage
        stage_names = [
            set(n for n, _ in PipelineStage(full, self.layout, s).named_parameters())
            for s in range(spec.pp)
        ]
        self.holders: dict[str, tuple[int, ...]] = {}
        for s, names in enumerate(stage_names):
            for direction in range(self.schedule.directions):
                p = self.schedule.rank_of(s, direction)
                for n in names:
                    self.holders[n] = tuple(sorted(set(self.holders.get(n, ())) | {p}))
        self.groups = PipelineGroups.create(
            self.topology,
            rank,
            self.schedule.directions,
            list(set(self.holders.values())),
            device=self.device,
        )
        self.stages: dict[tuple[int, int], PipelineStage] = {}
        for st in self.schedule.stages_of(self.pp_rank):
            for direction in range(self.schedule.directions):
                if self.schedule.rank_of(st, direction) == self.pp_rank:
                    self.stages[(direction, st)] = PipelineStage(full, self.layout, st)
        for (direction, _), stage in self.stages.items():
            if fp8:
                enable_fp8_training(stage, fp8_scope)
            if spec.ep > 1:
                enable_expert_parallel(stage, self.groups.ep[direction], self.ep_rank, spec.ep)
            enable_weight_grad_split(stage, stage.store, grouped_fp8=self.grouped_fp8)
        del full
        self.modules = nn.ModuleList(self.stages.values())  # parameters() counts shared ones once
        self.executor = PipelineExecutor(
            self.schedule,
            self.pp_rank,
            self.stages,
            self.groups,
            device=self.device,
            act_dtype=torch.float32,
            seq_len=seq_len,
            hidden=model_cfg.hidden_size,
            autocast_dtype=autocast_dtype,
            overlap=overlap,
        )

    def named_parameters(self) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        for stage in self.stages.values():
            for n, p in stage.named_parameters():
                assert out.get(n, p) is p, f"two different copies of {n} on one rank"
                out[n] = p
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for stage in self.stages.values():
            out.update(stage.state_dict())
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for stage in self.stages.values():
            own = stage.state_dict()
            missing = [k for k in own if k not in state]
            if missing:
                raise ValueError(f"checkpoint lacks {missing[:3]}... for stage {stage.index}")
            stage.load_state_dict({k: state[k] for k in own})

    def moe_layers(self):
        """(row, MoE module) of every MoE layer on this rank (each once)."""
        seen = {}
        for stage in self.stages.values():
            for name, row in stage.moe_rows.items():
                seen[row] = stage.get_submodule(name)
        return sorted(seen.items())

    @torch.no_grad()
    def set_biases(self, bias_LE: torch.Tensor) -> None:
        if bias_LE.shape[0] != len(self.moe_names):
            raise ValueError(
                f"bias_LE has {bias_LE.shape[0]} rows for {len(self.moe_names)} MoE layers"
            )
        for row, moe in self.moe_layers():
            moe.gate.e_score_correction_bias.copy_(
                bias_LE[row].to(moe.gate.e_score_correction_bias)
            )

    def train(self) -> None:
        self.modules.train()

    def zero_grad(self) -> None:
        for p in self.modules.parameters():
            p.grad = None

    def forward_backward(self, tokens_BS1: torch.Tensor, loss_cfg) -> StepOutput:
        return self.executor.run(tokens_BS1, loss_cfg)

    def sync_gradients(self) -> float:
        """Sum every parameter's gradient over its copies and average over the data shards, in
        one all-reduce per holder set; returns the global gradient norm (each parameter counted
        once: on its lowest holder, data shard 0, and for experts once per EP rank)."""
        # (parameter, its gradient) by (holders, is an expert parameter)
        buckets: dict[tuple[tuple[int, ...], bool], list[tuple[nn.Parameter, torch.Tensor]]] = {}
        sq = torch.zeros((), dtype=torch.float64)
        # sorted by name: the ranks of a holder set hold their stages in different orders
        for name, p in sorted(self.named_parameters().items()):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            buckets.setdefault((self.holders[name], is_expert_param(name)), []).append((p, p.grad))
        for key in sorted(buckets):
            params = buckets[key]
            group = self.groups.sync[key]
            flat = torch.cat([g.reshape(-1).float() for _, g in params])
            if group is not None:
                dist.all_reduce(flat, group=group)
            flat /= self.topology.shards
            offset = 0
            for p, g in params:
                n = p.numel()
                g.copy_(flat[offset : offset + n].view_as(p))
                offset += n
            holders, expert = key
            if self.pp_rank == holders[0] and self.dp_rank == 0 and (expert or self.ep_rank == 0):
                sq += float(flat.detach().double().pow(2).sum())
        if self.topology.world > 1:
            sq = sq.to(self.device) if self.device.type == "cuda" else sq
            dist.all_reduce(sq)
        return float(sq) ** 0.5

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The whole (EP=1, all stages) state dict on global rank 0, CPU tensors; None elsewhere.
        Collective: every rank must call it."""
        state = {k: v.detach() for k, v in self.state_dict().items()}
        if self.spec.ep > 1:
            group = self.groups.ep[0]
            for k in sorted(state):
                if is_expert_param(k):
                    parts = [torch.empty_like(state[k]) for _ in range(self.spec.ep)]
                    dist.all_gather(parts, state[k].contiguous(), group=group)
                    state[k] = torch.cat(parts)
        mine = (
            {k: v.cpu() for k, v in state.items()}
            if self.dp_rank == 0 and self.ep_rank == 0
            else None
        )
        gathered: list[dict[str, torch.Tensor] | None] | None = (
            [None] * self.topology.world if self.rank == 0 else None
        )
        dist.gather_object(mine, gathered, dst=0)
        if gathered is None:  # not rank 0
            return None
        full: dict[str, torch.Tensor] = {}
        for part in gathered:
            if part:
                full.update(part)
        return full

    def close(self) -> None:
        self.executor.close()
