"""Redundant-expert placement for serving: the EPLB policy.

Legend: L MoE layers, E logical (routed) experts, T tokens, K experts per token, P physical expert
slots (experts plus redundant replicas), R the most replicas of any one expert, X items to pack.

Replicate the hottest experts, pack groups onto nodes, then replicas onto GPUs. Runs on the CPU:
L x P is at most ~60 x 300. The router (`routing.state.RouterState`) recomputes a `Placement`
from its load average; the engine (`engine/eplb.py`) applies one with `to_physical`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    """Logical-to-physical expert maps for every MoE layer.

    Physical slot p lives on GPU p // (P / num_gpus); GPUs g*(gpus per node) .. belong to node g.
    """

    phy2log_LP: torch.Tensor  # int64: logical expert held by each physical slot
    log2phy_LER: torch.Tensor  # int64: physical slots of each logical expert, -1 padded
    logcnt_LE: torch.Tensor  # int64: replicas of each logical expert (>= 1)
    num_gpus: int
    num_nodes: int

    def state_dict(self) -> dict:
        return {
            "phy2log_LP": self.phy2log_LP.clone(),
            "log2phy_LER": self.log2phy_LER.clone(),
            "logcnt_LE": self.logcnt_LE.clone(),
            "num_gpus": self.num_gpus,
            "num_nodes": self.num_nodes,
        }

    def gpu_of_slot(self) -> torch.Tensor:
        """[P] GPU index of each physical slot."""
        P = self.phy2log_LP.shape[1]
        return torch.arange(P) // (P // self.num_gpus)

    @classmethod
    def from_state_dict(cls, d: dict) -> Placement:
        return cls(
            d["phy2log_LP"],
            d["log2phy_LER"],
            d["logcnt_LE"],
            int(d["num_gpus"]),
            int(d["num_nodes"]),
        )


def _balanced_packing(
    weight_LX: torch.Tensor, num_packs: int, labels_LX: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack X items into `num_packs` packs of X/num_packs items each, per layer, greedily.

    Heaviest item first into the lightest pack that has room (longest-processing-time rule).
    With `labels`, a pack that already holds an item of the same label is avoided while another
    pack has room: two replicas of one expert on one GPU would not spread its load at all.
    Returns (pack of each item, rank of the item inside its pack), both [L, X] int64.
    """
    L, X = weight_LX.shape
    assert X % num_packs == 0, (X, num_packs)
    per_pack = X // num_packs
    pack_LX = torch.full((L, X), -1, dtype=torch.int64)
    rank_LX = torch.full((L, X), -1, dtype=torch.int64)
    order_LX = weight_LX.double().sort(dim=-1, descending=True, stable=True).indices
    w = weight_LX.double().tolist()
    for layer in range(L):
        pack_weight = [0.0] * num_packs
        pack_items = [0] * num_packs
        pack_labels: list[set[int]] = [set() for _ in range(num_packs)]
        for item in order_LX[layer].tolist():
            open_packs = [p for p in range(num_packs) if pack_items[p] < per_pack]
            if labels_LX is not None:
                label = int(labels_LX[layer, item])
                fresh = [p for p in open_packs if label not in pack_labels[p]]
                open_packs = fresh or open_packs
            pack = min(open_packs, key=lambda p: (pack_weight[p], p))
            pack_LX[layer, item] = pack
            rank_LX[layer, item] = pack_items[pack]
            pack_weight[pack] += w[layer][item]
            pack_items[pack] += 1
            if labels_LX is not None:
                pack_labels[pack].add(label)
    return pack_LX, rank_LX


def _replicate(
    weight_LX: torch.Tensor, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each of X experts one slot, then each extra slot to the expert with the highest load
    per replica. Returns (slot -> expert [L, num_slots], replica index of each slot, replicas per
    expert [L, X])."""
    L, X = weight_LX.shape
    assert num_slots >= X, (num_slots, X)
    slot2x = torch.arange(num_slots, dtype=torch.int64).repeat(L, 1)
    replica = torch.zeros(L, num_slots, dtype=torch.int64)
    count = torch.ones(L, X, dtype=torch.int64)
    rows = torch.arange(L)
    for slot in range(X, num_slots):
        hottest = (weight_LX.double() / count).argmax(-1)
        slot2x[:, slot] = hottest
        replica[:, slot] = count[rows, hottest]
        count[rows, hottest] += 1
    return slot2x, replica, count


def _inverse(perm_LX: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm_LX)
    inv.scatter_(1, perm_LX, torch.arange(perm_LX.shape[1]).expand_as(perm_LX))
    return inv


def _place_hierarchical(
    load_LE: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups -> nodes (balanced), replicas within each node, replicas -> the node's GPUs."""
    L, E = load_LE.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = E // num_nodes
    slots_per_node = num_physical // num_nodes
    slots_per_gpu = num_physical // num_gpus
    # 1. whole groups onto nodes, so a token's node limit from group-limited routing still holds.
    group_load_LG = load_LE.view(L, num_groups, group_size).sum(-1)
    node_LG, rank_LG = _balanced_packing(group_load_LG, num_nodes)
    # "node-major" order: the experts of node 0 first, then node 1, ...; log2nm maps into it.
    group_start_LG = (node_LG * groups_per_node + rank_LG) * group_size
    log2nm_LE = (group_start_LG.unsqueeze(-1) + torch.arange(group_size)).flatten(1)
    nm2log_LE = _inverse(log2nm_LE)
    # 2. replicas inside each node: rows are (layer, node) pairs.
    nm_load = load_LE.gather(1, nm2log_LE).view(L * num_nodes, experts_per_node)
    slot2nm, replica, nm_count = _replicate(nm_load, slots_per_node)
    # 3. the node's slots onto its GPUs, each slot weighing its expert's load / replicas.
    slot_load = (nm_load.double() / nm_count).gather(1, slot2nm)
    gpu_of_slot, rank_in_gpu = _balanced_packing(
        slot_load, num_gpus // num_nodes, labels_LX=slot2nm
    )
    slot2phys = gpu_of_slot * slots_per_gpu + rank_in_gpu  # position within the node
    phys2slot = _inverse(slot2phys)
    phys2nm_local = slot2nm.gather(1, phys2slot).view(L, num_nodes, slots_per_node)
    phys2nm = (phys2nm_local + (torch.arange(num_nodes) * experts_per_node).view(1, -1, 1)).flatten(
        1
    )
    phy2log_LP = nm2log_LE.gather(1, phys2nm)
    replica_LP = replica.gather(1, phys2slot).view(L, num_physical)
    logcnt_LE = nm_count.view(L, E).gather(1, log2nm_LE)
    return phy2log_LP, replica_LP, logcnt_LE


def place_experts(
    load_LE: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> Placement:
    """Replicate hot experts into `num_physical` slots and pack them onto GPUs and nodes.

    Hierarchical when the groups divide evenly over the nodes (groups stay whole on one node, so
    node-limited routing keeps its bound); otherwise one global pool of replicas over all GPUs.
    """
    if load_LE.dim() != 2:
        raise ValueError(f"load must be [layers, experts], got shape {tuple(load_LE.shape)}")
    L, E = load_LE.shape
    if num_gpus < 1 or num_nodes < 1 or num_gpus % num_nodes:
        raise ValueError(
            f"num_gpus={num_gpus} must be a positive multiple of num_nodes={num_nodes}"
        )
    if num_physical < E or num_physical % num_gpus:
        raise ValueError(
            f"num_physical={num_physical} must be >= the {E} experts and a multiple of "
            f"num_gpus={num_gpus}"
        )
    if num_groups < 1 or E % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {E} experts")
    if bool((load_LE < 0).any()):
        raise ValueError("expert loads must be >= 0")
    load_LE = load_LE.detach().double().cpu()
    if num_groups % num_nodes == 0:
        phy2log, replica, logcnt = _place_hierarchical(
            load_LE, num_physical, num_groups, num_nodes, num_gpus
        )
    else:
        phy2log, replica, logcnt = _place_hierarchical(load_LE, num_physical, 1, 1, num_gpus)
    R = int(logcnt.max())
    log2phy = torch.full((L, E * R), -1, dtype=torch.int64)
    log2phy.scatter_(1, phy2log * R + replica, torch.arange(num_physical).expand(L, -1))
    return Placement(phy2log, log2phy.view(L, E, R), logcnt, num_gpus, num_nodes)


def identity_placement(
    n_layers: int, n_experts: int, num_gpus: int = 1, num_nodes: int = 1
) -> Placement:
    """No replicas: expert e in slot e (contiguous blocks of experts per GPU)."""
    phy2log = torch.arange(n_experts, dtype=torch.int64).repeat(n_layers, 1)
    return Placement(
        phy2log, phy2log.clone().unsqueeze(-1), torch.ones_like(phy2log), num_gpus, num_nodes
    )


def gpu_loads(load_LE: torch.Tensor, placement: Placement) -> torch.Tensor:
    """[L, num_gpus] tokens per GPU when each expert's tokens split evenly over its replicas."""
    L, P = placement.phy2log_LP.shape
    per_replica_LE = load_LE.double() / placement.logcnt_LE
    slot_load_LP = per_replica_LE.gather(1, placement.phy2log_LP)
    return slot_load_LP.view(L, placement.num_gpus, P // placement.num_gpus).sum(-1)


def round_robin_gpu_loads(load_LE: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[L, num_gpus] tokens per GPU with expert e on GPU e % num_gpus and no replicas."""
    L, E = load_LE.shape
    gpu_E = torch.arange(E) % num_gpus
    out = torch.zeros(L, num_gpus, dtype=torch.float64)
    return out.index_add_(1, gpu_E, load_LE.double())


def to_physical(
    expert_ids_TK: torch.Tensor, log2phy_ER: torch.Tensor, logcnt_E: torch.Tensor
) -> torch.Tensor:
    """Map one layer's logical expert ids to physical slots, spreading each expert's tokens evenly
    over its replicas (the n-th token of expert e, in token order, goes to replica n % count[e];
    replica loads differ by at most one token). Same shape as `expert_ids_TK`."""
    flat = expert_ids_TK.flatten()
    if flat.numel() == 0:
        return expert_ids_TK.clone()
    E = logcnt_E.shape[0]
    log2phy_ER = log2phy_ER.to(flat.device)
    logcnt_E = logcnt_E.to(flat.device)
    order = torch.sort(flat, stable=True).indices
    sorted_ids = flat[order]
    run_start_E = torch.cumsum(torch.bincount(flat, minlength=E), 0) - torch.bincount(
        flat, minlength=E
    )
    rank_in_run = torch.arange(flat.numel(), device=flat.device) - run_start_E[sorted_ids]
    replica = rank_in_run % logcnt_E[sorted_ids]
    phys = torch.empty_like(flat)
    phys[order] = log2phy_ER[sorted_ids, replica]
    return phys.view_as(expert_ids_TK)
