"""`moeray bench node-ep`: the bytes one MoE layer's dispatch and combine send per token between
nodes, flat (`expert.py`: a row per (token, expert)) against node-limited (`node_limited.py`: a
row per (token, node)), measured from the split sizes of the real exchanges.

Gloo processes on this machine stand for the EP ranks, `--ranks-per-node` consecutive ranks
faking one node. Each rank routes `--tokens` random tokens through the gate of the model's shape
with random weights (routing near uniform, no trained preference), runs the layer forward once
per mode, and reports what it sent (`node_limited.Traffic`). The bytes depend on the width, the
activation dtype, K and the routing, not on the expert width, so `--expert-width` shrinks the
experts (default 8) to keep 256 of them in memory. The model's n_group must equal the nodes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeray.platform import config as mc
from moeray.platform.model.moe import MoE
from moeray.platform.parallel.expert import ExpertParallelMoE
from moeray.platform.parallel.node_limited import (
    NodeLimitedMoE,
    NodeTopology,
    Traffic,
    check_node_limited,
    last_traffic,
    node_topology,
)
from moeray.results import device_slug, write_result

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("flat", "node_limited")


@dataclasses.dataclass(frozen=True)
class NodeBench:
    model: str = "deepseek_v3"
    ep: int = 8
    ranks_per_node: int = 1
    tokens: int = 256  # per rank
    dtype: str = "bf16"
    expert_width: int = 8
    seed: int = 0
    n_group: int = 0  # 0: the model's
    topk_group: int = 0  # 0: the model's

    def model_config(self) -> mc.ModelConfig:
        base = mc.preset(self.model)
        return base.replace(
            moe_intermediate_size=self.expert_width,
            n_shared_experts=min(base.n_shared_experts, 1),
            n_group=self.n_group or base.n_group,
            topk_group=self.topk_group or base.topk_group,
        )

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; accepted: {sorted(DTYPES)}")
        if self.tokens < 1 or self.ep < 2 or self.expert_width < 1:
            raise ValueError(
                f"tokens={self.tokens}, ep={self.ep}, expert_width={self.expert_width}: need "
                "tokens >= 1, ep >= 2, expert_width >= 1"
            )
        check_node_limited(self.model_config(), NodeTopology(self.ep, self.ranks_per_node))


def _layer(b: NodeBench, mode: str, rank: int, topology: NodeTopology) -> ExpertParallelMoE:
    torch.manual_seed(b.seed)  # the same weights on every rank and in both modes
    moe = MoE(b.model_config())
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    moe = moe.to(DTYPES[b.dtype])
    if mode == "flat":
        return ExpertParallelMoE(moe, None, rank, b.ep)
    return NodeLimitedMoE(moe, None, rank, b.ep, topology=topology)


def _worker(rank: int, b: NodeBench, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=b.ep)
    try:
        topology = node_topology(None, b.ranks_per_node)
        g = torch.Generator().manual_seed(b.seed * 1000 + rank)
        D = b.model_config().hidden_size
        x_TD = torch.randn(b.tokens, D, generator=g).to(DTYPES[b.dtype])
        out: dict[str, object] = {}
        for mode in MODES:
            layer = _layer(b, mode, rank, topology)
            with torch.no_grad():
                layer(x_TD)
            traffic = last_traffic(torch.nn.ModuleList([layer]), topology)
            out[mode] = dataclasses.asdict(traffic)
        ids_TK = layer.route(x_TD).expert_ids_TK  # the same gate weights in both modes
        C = b.model_config().n_routed_experts // topology.num_nodes
        nodes_TK = torch.div(ids_TK, C, rounding_mode="floor")
        here = rank // b.ranks_per_node
        remote = [len(set(row) - {here}) for row in nodes_TK.tolist()]
        out["remote_nodes"] = sum(remote)
        out["remote_experts"] = int((nodes_TK != here).sum())
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run(b: NodeBench) -> dict:
    b.check()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(b, f"{tmp}/pg", tmp), nprocs=b.ep, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(b.ep)]
    cfg = b.model_config()
    numbers: dict = {
        "config": dataclasses.asdict(b),
        "hidden_size": cfg.hidden_size,
        "top_k": cfg.num_experts_per_tok,
        "nodes": b.ep // b.ranks_per_node,
        "topk_group": cfg.topk_group,
    }
    tokens = b.ep * b.tokens
    for mode in MODES:
        t = sum((Traffic(**r[mode]) for r in ranks), start=Traffic())
        numbers[mode] = {
            "inter_node_bytes_per_token": t.inter_node_bytes / tokens,
            "intra_node_bytes_per_token": t.intra_node_bytes / tokens,
        }
    numbers["remote_nodes_per_token"] = sum(r["remote_nodes"] for r in ranks) / tokens
    numbers["remote_experts_per_token"] = sum(r["remote_experts"] for r in ranks) / tokens
    flat = numbers["flat"]["inter_node_bytes_per_token"]
    limited = numbers["node_limited"]["inter_node_bytes_per_token"]
    numbers["inter_node_ratio_flat_over_limited"] = flat / limited if limited else None
    return numbers


def main(argv: list[str]) -> int:
    d = NodeBench()
    p = argparse.ArgumentParser(prog="moeray bench node-ep", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=d.model, help=f"preset: {', '.join(mc.PRESETS)}")
    p.add_argument("--ep", type=int, default=d.ep, help="EP ranks (gloo processes)")
    p.add_argument("--ranks-per-node", type=int, default=d.ranks_per_node)
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per rank")
    p.add_argument("--dtype", default=d.dtype, help=f"activations: {', '.join(DTYPES)}")
    p.add_argument("--expert-width", type=int, default=d.expert_width)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--n-group", type=int, default=0, help="expert groups (default: the model's)")
    p.add_argument("--topk-group", type=int, default=0, help="groups per token (the model's)")
    p.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    a = p.parse_args(argv)
    b = NodeBench(
        a.model,
        a.ep,
        a.ranks_per_node,
        a.tokens,
        a.dtype,
        a.expert_width,
        a.seed,
        a.n_group,
        a.topk_group,
    )
    try:
        numbers = run(b)
    except ValueError as e:
        print(f"moeray bench node-ep: {e}", file=sys.stderr)
        return 2
    nodes = b.ep // b.ranks_per_node
    name = f"node-ep-{b.model}-{nodes}x{b.ranks_per_node}-{device_slug()}"
    path = write_result(name, numbers, directory=a.out_dir)
    print(json.dumps({k: numbers[k] for k in (*MODES, "inter_node_ratio_flat_over_limited")}))
    print(f"wrote {path}")
    return 0
