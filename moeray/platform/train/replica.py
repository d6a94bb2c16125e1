"""A training worker's share of the model, behind one interface (`step`, `set_biases`, state
dicts, `full_state`): the whole model with its routed experts sharded over EP (`FlatReplica`,
PP = 1: one device, data parallel, expert parallel, or both), or this rank's pipeline stages
(`PipelineReplica`, PP > 1, `parallel/pipeline.py`). Either lives on the worker's device (CPU
under gloo, its GPU under NCCL); batches come from the loader on the CPU and move there.

PP = 1 process groups (`make_groups`): ranks [d*EP, (d+1)*EP) form one expert-parallel group (they
split the routed experts); ranks with the same ep_rank form a data-parallel group (they hold the
same expert shard). Replicated parameters are averaged over the world, expert shards over their
DP group (`sync_gradients`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.utils import get_total_norm

from moeray.platform.checkpoint import load_model
from moeray.platform.fp8 import enable_fp8_training
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.expert import enable_expert_parallel, is_expert_param
from moeray.platform.parallel.experts_mlp import enable_grouped_experts
from moeray.platform.parallel.node_limited import enable_node_limited, node_topology
from moeray.platform.parallel.pipeline import PipelineModel, PipelineSpec
from moeray.platform.parallel.weight_grad import enable_split_linears
from moeray.platform.train import step as tstep
from moeray.platform.train.graphs import MicrobatchGraph
from moeray.platform.train.job_config import TrainJobConfig
from moeray.platform.train.recompute import apply_recompute


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


def _sq_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The summed squares of `grads`, fp64 on `device`, with no host read (a read per parameter
    made each job step wait on the GPU once per parameter)."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return get_total_norm(grads).double().square()


def sync_gradients(model, groups: Groups) -> float:
    """Average gradients over the world; returns the global gradient norm (before clipping)."""
    # (parameter, its gradient)
    replicated: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    experts: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for name, p in model.named_parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (experts if is_expert_param(name) else replicated).append((p, p.grad))
    for params, group in ((replicated, None), (experts, groups.dp_group)):
        if not params or groups.world == 1:  # one rank: its gradients are the average
            continue
        flat = torch.cat([g.reshape(-1) for _, g in params])
        dist.all_reduce(flat, group=group)
        flat /= groups.world
        offset = 0
        for p, g in params:
            n = p.numel()
            g.copy_(flat[offset : offset + n].view_as(p))
            offset += n
    device = replicated[0][1].device  # NCCL carries no CPU tensor
    exp_sq = _sq_norm([g for _, g in experts], device)
    if groups.ep_size > 1:
        dist.all_reduce(exp_sq, group=groups.ep_group)  # shards of one EP group add up
    return math.sqrt(float(_sq_norm([g for _, g in replicated], device) + exp_sq))


def gather_full_state(model, groups: Groups, state: dict | None = None) -> dict | None:
    """The full (EP=1) state dict on rank 0, CPU tensors; other ranks return None. `state`: this
    rank's state dict to gather in place of the model's (same names and shapes: the EMA's)."""
    state = {k: v.detach().clone() for k, v in (state or model.state_dict()).items()}
    if groups.ep_size > 1:
        for k in list(state):
            if is_expert_param(k):
                # on the model's device: NCCL carries no CPU tensor
                mine = state[k].to(next(model.parameters()).device).contiguous()
                parts = [torch.empty_like(mine) for _ in range(groups.ep_size)]
                dist.all_gather(parts, mine, group=groups.ep_group)
                state[k] = torch.cat(parts)
    return {k: v.cpu() for k, v in state.items()} if groups.rank == 0 else None


def load_start(job: TrainJobConfig) -> Transformer | None:
    """The model that fine-tuning starts from (`job.init_from`, on the CPU), else None. Every
    worker reads the whole directory and keeps its share."""
    if not job.init_from:
        return None
    return load_model(Path(job.init_from).expanduser())[1]


def start_biases(start: Transformer) -> torch.Tensor:
    """[L, E] fp32 selection biases of `start`'s MoE layers, the RouterActor's row order."""
    return torch.stack(
        [m.gate.e_score_correction_bias.detach().float() for m in tstep.moe_layers(start)]
    )


def parallelize(model: Transformer, job: TrainJobConfig, groups: Groups, device) -> Transformer:
    """Apply, in this order, what a PP = 1 rank runs on top of the plain single-device model:
    FP8 projections, expert parallelism (this rank keeps E/EP routed experts; node-limited with
    `parallel.node_limited`), the routed experts as one autograd node with grouped GEMMs
    (`experts_mlp.enable_grouped_experts`: the grouped FP8 kernel on CUDA, and with one rank the
    experts' weight gradients k-grouped, as `moeray bench train --pp 1` measures), with one rank
    the other linear layers as split linears (`weight_grad.enable_split_linears`, as the bench
    too), recompute in the backward (`job.recompute`, train/recompute.py), the device. Returns
    the same module, changed in place."""
    if job.fp8:
        enable_fp8_training(model, job.fp8_scope)
    p = job.parallel
    if groups.ep_size > 1 and p.node_limited:
        topology = node_topology(groups.ep_group, p.ranks_per_node)
        enable_node_limited(model, groups.ep_group, groups.ep_rank, groups.ep_size, topology)
    elif groups.ep_size > 1:
        enable_expert_parallel(model, groups.ep_group, groups.ep_rank, groups.ep_size)
    cuda = torch.device(device).type == "cuda"
    # The k-grouped weight-gradient kernel hung the 4-GPU pipeline's first step (cause not found,
    # benchmarks/notes-train.md): with several ranks the weight gradients stay per expert.
    alone = not dist.is_initialized() or dist.get_world_size() == 1
    enable_grouped_experts(model, grouped_fp8=cuda, kgrouped_wgrad=cuda and alone)
    if alone:
        # With several ranks nn.Linear stays: the fp32-out weight gradient is for a process
        # alone (`weight_grad.use_fused_linear_wgrad`), and the swap without it was not measured.
        enable_split_linears(model)
    if job.recompute:
        apply_recompute(model, job.recompute)
    return model.to(device)


@dataclass
class _StepParts:
    main: float  # this rank's share: summed over ranks and divided by the shards it is the loss
    mtp: float
    balance: float
    norm: float
    loads_LE: Any


class FlatReplica:
    """PP = 1: the whole model (experts sharded over EP) on this rank's device."""

    def __init__(
        self, job: TrainJobConfig, rank: int, world: int, device, start: Transformer | None = None
    ) -> None:
        self.job, self.device = job, device
        self.groups = make_groups(rank, world, job.parallel.ep)
        model = Transformer(job.model_config())
        model.reset_parameters(seed=job.seed)  # identical initial weights on every rank
        if start is not None:  # fine-tuning (`load_start`)
            model.load_state_dict(start.state_dict())
        self.module = parallelize(model, job, self.groups, device)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.bf16)
        dtype = torch.bfloat16 if job.bf16 else None
        self.graph = (
            MicrobatchGraph(self.module, job.loss, 1, torch.device(device), dtype)
            if job.cuda_graphs
            else None
        )
        # a captured graph writes and adds into the gradients by address: left in place
        self.keep_grads = self.graph is not None

    def step(self, batch, loss: tstep.LossConfig | None = None) -> _StepParts:
        """Forward and backward on `batch` with `loss` (default: the job's), gradients synced."""
        loss = loss or self.job.loss
        if self.graph is not None:
            self.graph.start_step()
            self.graph.run(batch.to(self.device), loss)
            main, mtp, balance = self.graph.loss_3.tolist()
            loads = self.graph.loads_LE.cpu()
        else:
            with self.autocast:
                parts = tstep.compute_loss(self.module, batch.to(self.device), loss)
            parts.total.backward()
            main, mtp, balance = parts.values_3.tolist()
            loads = tstep.expert_loads(self.module)
        norm = sync_gradients(self.module, self.groups)
        return _StepParts(main, mtp, balance, norm, loads)

    def after_update(self) -> None:
        """After the optimizer step: a graph's cached weight forms re-made in place."""
        if self.graph is not None:
            self.graph.refresh()

    def set_biases(self, bias_LE) -> None:
        tstep.set_biases(self.module, bias_LE)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)  # in place: a captured graph reads the same tensors
        self.after_update()

    def full_state(self, state: dict | None = None) -> dict | None:
        return gather_full_state(self.module, self.groups, state)

    def close(self) -> None:
        pass


class PipelineReplica:
    """PP > 1: this rank's pipeline stages (`parallel/pipeline.PipelineModel`)."""

    def __init__(
        self, job: TrainJobConfig, rank: int, world: int, device, start: Transformer | None = None
    ) -> None:
        p = job.parallel
        self.job = job
        self.pm = PipelineModel(
            job.model_config(),
            PipelineSpec(p.pp, p.dp, p.ep, p.schedule, p.microbatches),
            rank,
            seed=job.seed,
            fp8=job.fp8,
            fp8_scope=job.fp8_scope,
            device=device,
            overlap=p.overlap,
            autocast_dtype=torch.bfloat16 if job.bf16 else None,
            seq_len=job.data.seq_len,
            full_init=None if start is None else lambda m: m.load_state_dict(start.state_dict()),
        )
        self.module = self.pm.modules
        self.keep_grads = False  # no graphs here (job_config: cuda_graphs needs pp = 1)

    def step(self, batch, loss: tstep.LossConfig | None = None) -> _StepParts:
        out = self.pm.forward_backward(batch, loss or self.job.loss)
        norm = self.pm.sync_gradients()
        return _StepParts(out.main_sum, out.mtp_sum, out.balance_sum, norm, out.loads_LE)

    def after_update(self) -> None:
        pass

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
