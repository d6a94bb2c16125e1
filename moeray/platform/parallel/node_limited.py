"""Node-limited expert parallelism: the gate's expert groups are the nodes holding the EP ranks,
and a token crosses the network once per node it needs, not once per expert.

Legend: T local tokens, K experts per token, D model width, E routed experts, P ranks in the EP
group, N nodes, Q = P/N ranks per node, L = E/P experts per rank, C = E/N experts per node,
X rows sent in one exchange, R1 / R2 rows received in stage 1 / stage 2.

EP rank p lives on node p // Q at local index p % Q and owns experts [p*L, (p+1)*L), so node n
owns experts [n*C, (n+1)*C): exactly gate group n when n_group = N. With topk_group = M the gate
then keeps at most M nodes per token (DeepSeek-V3: 8 nodes, M = 4, K = 8).

Dispatch in two stages, the shape of DeepEP's internode kernels (RDMA to the rank with the same
local index on each remote node, then NVLink inside the node):
  1. a token's hidden row goes once to each node holding one of its experts, to the rank there
     with this rank's local index (on the own node: itself, no copy over any link);
  2. that rank forwards the row once to each rank of its node that holds one of its experts.
Each row carries its K (expert id, routing weight) pairs ([K, 2] fp32; ids < 2^24 are exact), so
the expert rank weights its outputs and sums a row's experts before anything travels back.
Combine reverses it: each expert rank returns one weighted partial sum per row, the stage-1 rank
adds up its node's partial sums (fp32) and returns one row per node, and the source adds the
nodes' rows (fp32). A token's inter-node rows fall from its K experts' remote count to its remote
node count (at most M), in both directions.
Under bf16 the partial sums are rounded to bf16 before they travel (DeepEP's combine also sends
bf16), where the flat combine sums a token's K outputs in fp32 at the source.

All exchanges run over the whole EP group with all_to_all_single; rows a stage does not send to
a rank have split 0 (on NCCL a zero split moves nothing). The hidden rows and the (id, weight)
rows travel through the autograd all-to-all of `expert.py`, so the backward runs the reverse
exchanges and input, expert and routing-weight gradients equal the flat dispatch.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moeray.platform.config import ModelConfig
from moeray.platform.model.moe import MoE
from moeray.platform.parallel.expert import (
    DispatchPlan,
    ExpertParallelMoE,
    all_to_all,
    enable_expert_parallel,
    exchange_counts,
)


@dataclass(frozen=True)
class NodeTopology:
    """Which node each rank of an EP group is on: ranks [n*Q, (n+1)*Q) form node n."""

    num_ranks: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        if self.ranks_per_node < 1 or self.num_ranks % self.ranks_per_node:
            raise ValueError(
                f"ranks_per_node={self.ranks_per_node} must be >= 1 and divide the "
                f"{self.num_ranks} EP ranks"
            )

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node

    def node(self, rank: int) -> int:
        return rank // self.ranks_per_node

    @staticmethod
    def from_hosts(hosts: list[str]) -> NodeTopology:
        """The topology of EP ranks whose host names are `hosts` (rank order). Each host must
        hold one contiguous block of ranks, all blocks the same size, as `make_groups` lays
        ranks out over machines that each run the same number of workers."""
        blocks: list[tuple[str, int]] = []  # (host, ranks) in rank order
        for h in hosts:
            if blocks and blocks[-1][0] == h:
                blocks[-1] = (h, blocks[-1][1] + 1)
            else:
                blocks.append((h, 1))
        names = [h for h, _ in blocks]
        sizes = {n for _, n in blocks}
        if len(set(names)) != len(names) or len(sizes) != 1:
            raise ValueError(
                f"the EP ranks' hosts {hosts} are not equal contiguous blocks of ranks; set "
                "parallel.ranks_per_node to say which ranks share a node"
            )
        return NodeTopology(len(hosts), sizes.pop())


def node_topology(group, ranks_per_node: int = 0) -> NodeTopology:
    """The node layout of EP group `group`: `ranks_per_node` consecutive ranks per node when
    given (> 0: tests fake several nodes on one machine), else the ranks' host names."""
    size = dist.get_world_size(group)
    if ranks_per_node:
        return NodeTopology(size, ranks_per_node)
    hosts: list = [None] * size
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return NodeTopology.from_hosts([str(h) for h in hosts])


def check_node_limited(config: ModelConfig, topology: NodeTopology) -> None:
    """ValueError unless the gate's groups are the nodes: one group per node, and each node
    holding exactly its group's experts."""
    E, N = config.n_routed_experts, topology.num_nodes
    if config.n_group != N:
        raise ValueError(
            f"node-limited routing needs one expert group per node: the model has n_group="
            f"{config.n_group} but the {topology.num_ranks} EP ranks span {N} nodes of "
            f"{topology.ranks_per_node}; use ranks_per_node = "
            f"{topology.num_ranks}/n_group (when that divides) or a model with n_group={N}"
        )
    if E % topology.num_ranks:
        raise ValueError(f"{E} routed experts do not split evenly over {topology.num_ranks} ranks")


@dataclass(frozen=True)
class Traffic:
    """Bytes one rank sent in one MoE forward (dispatch and combine), by where they went; a row
    a rank keeps for itself counts nowhere."""

    tokens: int = 0
    inter_node_bytes: int = 0
    intra_node_bytes: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.tokens + other.tokens,
            self.inter_node_bytes + other.inter_node_bytes,
            self.intra_node_bytes + other.intra_node_bytes,
        )


def sent_traffic(
    topology: NodeTopology, rank: int, rows_P: list[int], row_bytes: int, tokens: int = 0
) -> Traffic:
    """The Traffic of sending rows_P[d] rows of `row_bytes` bytes to each rank d."""
    inter = intra = 0
    for d, n in enumerate(rows_P):
        if d == rank:
            continue
        if topology.node(d) == topology.node(rank):
            intra += n * row_bytes
        else:
            inter += n * row_bytes
    return Traffic(tokens, inter, intra)


def flat_traffic(plan: DispatchPlan, topology: NodeTopology, rank: int) -> Traffic:
    """What the flat dispatch (`expert.dispatch`) and its combine sent from `rank`: one row and
    one local expert id per (token, expert) out, one row per received assignment back."""
    out = sent_traffic(topology, rank, plan.send_counts, plan.row_bytes + plan.id_bytes)
    back = sent_traffic(topology, rank, plan.recv_counts, plan.row_bytes)
    return Traffic(plan.num_tokens) + out + back


@dataclass(frozen=True)
class Stage:
    """One exchange: the rows to send, sorted by destination rank, and the split sizes."""

    src_X: torch.Tensor  # local row each sent row is a copy of
    send_counts: list[int]
    recv_counts: list[int]


def _stage(src_X: torch.Tensor, dest_X: torch.Tensor, world: int, group) -> Stage:
    """`dest_X` must be sorted (the rows go out in that order)."""
    send_P = torch.bincount(dest_X, minlength=world).to(torch.int64)
    recv_P = exchange_counts(send_P, group)
    counts = torch.cat([send_P, recv_P]).tolist()  # one device->host wait for both
    return Stage(src_X, counts[:world], counts[world:])


def _send(stage: Stage, rows: torch.Tensor, group) -> torch.Tensor:
    return all_to_all(rows[stage.src_X], stage.recv_counts, stage.send_counts, group)


def _send_back(stage: Stage, y_RD: torch.Tensor, num_rows: int, group) -> torch.Tensor:
    """Reverse `stage`: return each received row's output and add up, in fp32, the outputs that
    belong to the same local row (one per destination) -> [num_rows, D] in y's dtype."""
    y_XD = all_to_all(y_RD, stage.send_counts, stage.recv_counts, group)
    out = torch.zeros(num_rows, y_RD.shape[-1], dtype=torch.float32, device=y_RD.device)
    return out.index_add(0, stage.src_X, y_XD.float()).to(y_RD.dtype)


@dataclass(frozen=True)
class TwoStagePlan:
    inter: Stage  # stage 1: one row per (token, node), to that node's rank with our local index
    intra: Stage  # stage 2: one row per (stage-1 row, rank of this node holding its experts)
    num_tokens: int
    inter_rows: int  # R1
    row_bytes: int  # one hidden row (D x the activation's element size)
    route_bytes: int  # one row's [K, 2] fp32 (expert id, weight) pairs


def two_stage_dispatch(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    num_experts: int,
    topology: NodeTopology,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor, TwoStagePlan]:
    """Move each token's row to the ranks holding its experts through one rank per node.

    Returns the rows this rank's experts take, x_R2D, their [R2, K, 2] (expert id, weight) pairs
    (ids of experts elsewhere included; the caller keeps its own), and the plan `two_stage_combine`
    reverses."""
    P = topology.num_ranks
    Q, rank = topology.ranks_per_node, dist.get_rank(group)
    C, L = num_experts // topology.num_nodes, num_experts // P
    T = x_TD.shape[0]
    # [T, K, 2]: the ids ride as fp32 next to the weights, one exchange for both; exact below 2^24
    route_TK2 = torch.stack((expert_ids_TK.float(), weights_TK.float()), dim=-1)

    # stage 1: (node, token) pairs, node-major, so the rows go out sorted by destination rank
    need_NT = torch.zeros(topology.num_nodes, T, dtype=torch.bool, device=x_TD.device)
    need_NT.scatter_(0, torch.div(expert_ids_TK, C, rounding_mode="floor").T, True)
    node_X, token_X = need_NT.nonzero(as_tuple=True)
    inter = _stage(token_X, node_X * Q + rank % Q, P, group)
    route_R1K2 = _send(inter, route_TK2, group)
    x_R1D = _send(inter, x_TD, group)

    # stage 2: (local rank, row) pairs for the ranks of this node holding a row's experts
    R1 = x_R1D.shape[0]
    ids_R1K = route_R1K2[..., 0].detach().long()
    owner_R1K = torch.div(ids_R1K, L, rounding_mode="floor")
    here_R1K = torch.div(owner_R1K, Q, rounding_mode="floor") == rank // Q
    need_QR1 = torch.zeros(Q + 1, R1, dtype=torch.bool, device=x_TD.device)
    # experts on other nodes (the token's other stage-1 rows) go to the spare row Q, dropped
    slot_R1K = torch.where(here_R1K, owner_R1K % Q, Q)
    need_QR1.scatter_(0, slot_R1K.T, True)
    local_X, row_X = need_QR1[:Q].nonzero(as_tuple=True)
    intra = _stage(row_X, local_X + (rank // Q) * Q, P, group)
    route_R2K2 = _send(intra, route_R1K2, group)
    x_R2D = _send(intra, x_R1D, group)
    row_bytes = x_TD.shape[-1] * x_TD.element_size()
    route_bytes = route_TK2.shape[1] * route_TK2.shape[2] * route_TK2.element_size()
    return x_R2D, route_R2K2, TwoStagePlan(inter, intra, T, R1, row_bytes, route_bytes)


def two_stage_combine(y_R2D: torch.Tensor, plan: TwoStagePlan, group=None) -> torch.Tensor:
    """Weighted expert outputs [R2, D] (one partial sum per row) -> the tokens' sums [T, D]."""
    y_R1D = _send_back(plan.intra, y_R2D, plan.inter_rows, group)
    return _send_back(plan.inter, y_R1D, plan.num_tokens, group)


def two_stage_traffic(plan: TwoStagePlan, topology: NodeTopology, rank: int) -> Traffic:
    """What `two_stage_dispatch` and `two_stage_combine` sent from `rank`."""
    total = Traffic(plan.num_tokens)
    out_bytes = plan.row_bytes + plan.route_bytes
    for stage in (plan.inter, plan.intra):
        total += sent_traffic(topology, rank, stage.send_counts, out_bytes)
        total += sent_traffic(topology, rank, stage.recv_counts, plan.row_bytes)
    return total


class NodeLimitedMoE(ExpertParallelMoE):
    """The training EP layer with two-stage, node-deduplicated dispatch (module docstring).

    `last_traffic` holds what this rank sent in the last forward."""

    def __init__(self, moe: MoE, group, ep_rank: int, ep_size: int, *, topology: NodeTopology):
        if topology.num_ranks != ep_size:
            raise ValueError(f"a topology of {topology.num_ranks} ranks for ep_size={ep_size}")
        check_node_limited(moe.config, topology)
        super().__init__(moe, group, ep_rank, ep_size)
        self.topology = topology
        self.last_traffic = Traffic()

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        r = self.route(x_TD)
        self.last_routing = r
        x_R2D, route_R2K2, plan = two_stage_dispatch(
            x_TD, r.expert_ids_TK, r.weights_TK, self.num_global_experts, self.topology, self.group
        )
        self.last_traffic = two_stage_traffic(plan, self.topology, self.ep_rank)
        ids_R2K = route_R2K2[..., 0].detach().long()
        w_R2K = route_R2K2[..., 1]
        if x_R2D.shape[0]:
            # every received row has at least one expert here; the others' ids are skipped
            offset = self.ep_rank * self.experts.num_experts
            y_R2D = self.experts(x_R2D, ids_R2K, w_R2K, expert_offset=offset)
        else:
            # No rows: keep both received tensors in the autograd graph (as `ExpertParallelMoE`
            # does), or this rank skips backward all-to-alls its peers run.
            y_R2D = x_R2D + w_R2K.sum(-1, keepdim=True).to(x_R2D.dtype)
        y_TD = two_stage_combine(y_R2D, plan, self.group)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view_as(x_BSD)


def enable_node_limited(
    model: nn.Module, group, ep_rank: int, ep_size: int, topology: NodeTopology
) -> int:
    """`expert.enable_expert_parallel` with the node-limited layer; returns how many MoE layers."""
    cls = functools.partial(NodeLimitedMoE, topology=topology)
    return enable_expert_parallel(model, group, ep_rank, ep_size, cls)


def last_traffic(model: nn.Module, topology: NodeTopology) -> Traffic:
    """What this rank sent in the last forward of every EP MoE layer of `model`, node-limited
    or flat (the flat layer's `last_plan` read against `topology`)."""
    total = Traffic()
    for m in model.modules():
        if isinstance(m, NodeLimitedMoE):
            total += m.last_traffic
        elif isinstance(m, ExpertParallelMoE) and m.last_plan is not None:
            total += flat_traffic(m.last_plan, topology, m.ep_rank)
    return total
