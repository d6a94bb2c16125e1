"""Expert parallelism: routed experts sharded over the ranks of a process group, tokens moved to
their experts and back with all-to-all (NCCL on GPU, gloo on CPU).

Legend: T local tokens, K experts per token, D model width, E routed experts, P ranks in the EP
group, L = E/P experts per rank, A = T*K (token, expert) assignments, R assignments received.

Rank p owns experts [p*L, (p+1)*L). One MoE layer:
  1. route locally (the gate is replicated) -> expert_ids_TK, weights_TK;
  2. dispatch: sort the A assignments by owner rank, exchange the per-rank counts with
     all_to_all_single (so every rank can size its receive buffer), then send the token rows and
     their local expert ids with all_to_all_single;
  3. each rank runs its L experts on the R rows it received;
  4. combine: all_to_all_single back with the splits swapped, undo the sort, weight and sum the K
     outputs of each token.
The two token all-to-alls are autograd functions: the backward of dispatch is a combine of the
gradients and vice versa, so expert, input and routing-weight gradients equal the EP=1 run.
Replicated parameters (gate, shared experts, attention) get different gradients on each rank
(different tokens) and must be all-reduced like data-parallel gradients; expert shards must not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeray.platform.model.moe import MoE


def _host_wait(t: torch.Tensor) -> None:
    """On CUDA, block the host until the current stream (and so the exchange just enqueued on it)
    is done. The compute that follows an exchange is then never queued behind a kernel that waits
    for the EP peer: a pipeline rank runs two directions in two threads, and a launch queue filled
    behind one direction's waiting all-to-all blocks the other direction's launches too, which
    can be what the peer waits for (parallel/executor.py, `_take_recv`). The GPU loses only the
    tail of the stream: the other direction's thread keeps it busy."""
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()


class _AllToAll(torch.autograd.Function):
    """all_to_all_single on dim 0 with explicit splits; backward runs the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        import torch.distributed as dist

        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        _host_wait(out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        import torch.distributed as dist

        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(
            grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group
        )
        _host_wait(grad_in)
        return grad_in, None, None, None


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None
) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def exchange_counts(send_counts_P: torch.Tensor, group=None) -> torch.Tensor:
    """Each rank's per-destination counts -> the counts it will receive from each rank."""
    import torch.distributed as dist

    recv = torch.empty_like(send_counts_P)
    dist.all_to_all_single(recv, send_counts_P.contiguous(), group=group)
    return recv


@dataclass(frozen=True)
class DispatchPlan:
    order_A: torch.Tensor  # assignment indices sorted by owner rank (stable)
    send_counts: list[int]  # rows sent to each rank
    recv_counts: list[int]  # rows received from each rank
    num_tokens: int
    top_k: int
    row_bytes: int  # one token row as sent (D x its element size)
    id_bytes: int  # the local expert id sent with each row


def dispatch(
    x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, num_experts: int, group=None
) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
    """Send each (token, expert) assignment's row to the expert's owner.

    Returns the received rows x_RD, their expert ids local to this rank [R], and the plan that
    `combine` needs to bring the outputs back.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if num_experts % world:
        raise ValueError(f"{num_experts} experts do not split evenly over {world} EP ranks")
    per_rank = num_experts // world
    T, K = expert_ids_TK.shape
    ids_A = expert_ids_TK.reshape(-1)
    owner_A = torch.div(ids_A, per_rank, rounding_mode="floor")
    order_A = torch.argsort(owner_A, stable=True)
    send_P = torch.bincount(owner_A, minlength=world).to(torch.int64)
    recv_P = exchange_counts(send_P, group)
    counts = torch.cat([send_P, recv_P]).tolist()  # one device->host wait for both
    send_counts, recv_counts = counts[:world], counts[world:]
    local_A = (ids_A[order_A] - owner_A[order_A] * per_rank).contiguous()
    local_R = torch.empty(sum(recv_counts), dtype=local_A.dtype, device=local_A.device)
    # the ids first: the rows' exchange then host-waits for both (one communicator, in order)
    dist.all_to_all_single(local_R, local_A, recv_counts, send_counts, group=group)
    x_AD = x_TD.repeat_interleave(K, dim=0)[order_A]  # row a = token a // K
    x_RD = all_to_all(x_AD, recv_counts, send_counts, group)
    row_bytes = x_TD.shape[-1] * x_TD.element_size()
    plan = DispatchPlan(order_A, send_counts, recv_counts, T, K, row_bytes, local_A.element_size())
    return x_RD, local_R, plan


def combine(
    y_RD: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan, group=None
) -> torch.Tensor:
    """Bring expert outputs back to their tokens and sum them with the routing weights."""
    y_sorted_AD = all_to_all(y_RD, plan.send_counts, plan.recv_counts, group)
    inverse_A = torch.empty_like(plan.order_A)
    inverse_A[plan.order_A] = torch.arange(plan.order_A.numel(), device=plan.order_A.device)
    y_AD = y_sorted_AD[inverse_A]
    T, K = plan.num_tokens, plan.top_k
    # Weighted and summed in fp32, as the fused single-device MoE kernel accumulates: in bf16 the
    # K-term sum alone moved greedy decodes off the single-device ones.
    w_TK1 = weights_TK.reshape(T, K, 1).float()
    # The width spelled out: a rank with zero tokens (a serving rank's empty forward) has 0 rows.
    y_TKD = y_AD.view(T, K, y_RD.shape[-1]).float()
    return (y_TKD * w_TK1).sum(dim=1).to(y_AD.dtype)


def is_expert_param(name: str) -> bool:
    """True for the stacked routed-expert weights (sharded over EP, never all-reduced over it)."""
    return ".experts." in name and name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")


def expert_range(num_experts: int, ep_rank: int, ep_size: int) -> range:
    """The global ids of the routed experts EP rank `ep_rank` of `ep_size` holds: [r*L, (r+1)*L)
    with L = num_experts / ep_size."""
    E = num_experts
    if ep_size < 1 or E % ep_size or not 0 <= ep_rank < ep_size:
        raise ValueError(
            f"cannot shard {E} experts over ep_size={ep_size} at ep_rank={ep_rank}: ep_size must "
            f"divide the number of experts and 0 <= ep_rank < ep_size"
        )
    L = E // ep_size
    return range(ep_rank * L, (ep_rank + 1) * L)


def shard_experts(moe: MoE, ep_rank: int, ep_size: int) -> None:
    """Keep only this rank's slice [ep_rank*L, (ep_rank+1)*L) of the stacked expert weights."""
    experts = moe.experts
    ids = expert_range(experts.num_experts, ep_rank, ep_size)
    L, lo = len(ids), ids.start
    for name in ("gate_proj", "up_proj", "down_proj"):
        full = getattr(experts, name)
        setattr(
            experts,
            name,
            nn.Parameter(full.detach()[lo : lo + L].clone(), requires_grad=full.requires_grad),
        )
    experts.num_experts = L


class ExpertParallelMoE(MoE):
    """A MoE layer whose routed experts are split over an EP process group.

    Built from an existing MoE: it keeps the same submodules under the same names (so
    checkpoints and `Transformer.moe_layers()` keep working) and shards the experts in place, or
    keeps them when the MoE already holds only this rank's slice (a shard-wise load).
    """

    def __init__(self, moe: MoE, group, ep_rank: int, ep_size: int) -> None:
        nn.Module.__init__(self)
        self.config = moe.config
        self.gate = moe.gate
        self.experts = moe.experts
        self.shared_experts = moe.shared_experts
        self.group_mask_value = moe.group_mask_value
        self.last_routing = None
        self.last_plan: DispatchPlan | None = None  # the last forward's, what it sent where
        self.group = group
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.num_global_experts = moe.config.n_routed_experts
        held = moe.experts.num_experts
        if held == self.num_global_experts:
            shard_experts(self, ep_rank, ep_size)
        elif held * ep_size != self.num_global_experts:
            raise ValueError(
                f"the MoE holds {held} experts: expected all {self.num_global_experts} or this "
                f"rank's {self.num_global_experts // ep_size} of ep_size={ep_size}"
            )

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        r = self.route(x_TD)
        self.last_routing = r
        x_RD, local_R, plan = dispatch(x_TD, r.expert_ids_TK, self.num_global_experts, self.group)
        self.last_plan = plan
        if local_R.numel():
            ones_R1 = torch.ones(local_R.shape[0], 1, dtype=torch.float32, device=x_RD.device)
            y_RD = self.experts(x_RD, local_R[:, None], ones_R1)
        else:
            # No rows for this rank's experts: pass the (empty) rows through, so the combine (and,
            # in backward, the dispatch) all-to-alls stay in the autograd graph. Without this link
            # this rank skips both backward collectives while its peers run them: a collective
            # mismatch (gloo aborts with "Received data size doesn't match expected size").
            y_RD = x_RD
        y_TD = combine(y_RD, r.weights_TK, plan, self.group)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view_as(x_BSD)


def enable_expert_parallel(
    model: nn.Module,
    group,
    ep_rank: int,
    ep_size: int,
    cls: Callable[[MoE, Any, int, int], ExpertParallelMoE] | None = None,
) -> int:
    """Replace every MoE layer of `model` with its expert-parallel version (`cls(moe, group,
    ep_rank, ep_size)`, default ExpertParallelMoE); returns how many."""
    cls = cls or ExpertParallelMoE
    n = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, MoE) and not isinstance(module, ExpertParallelMoE):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, cls(module, group, ep_rank, ep_size))
            n += 1
    return n
