"""Node-limited expert parallelism (`parallel/node_limited.py`) over 4 gloo processes faked as
nodes: outputs and gradients equal the flat dispatch and one process, and the inter-node bytes a
token costs fall; the training replica selects it from the job config; bad layouts are refused
with a ValueError naming the values."""

import dataclasses
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from moeray.platform.config import tiny
from moeray.platform.train.job_config import TrainJobConfig
from tests.spawn_ranks import init_file, spawn

WORLD = 4
T_PER_RANK = (7, 12, 0, 9)  # uneven, and one rank without tokens
SEED = 11
# name -> (ranks per node, n_group, topk_group, bias toward node 0's experts, node-limited)
CASES = {
    "2x2": (2, 2, 1, 0.0, True),
    "2x2-flat": (2, 2, 1, 0.0, False),
    # every token picks node 0: node 1's ranks forward and compute nothing (empty exchanges)
    "2x2-one-node": (2, 2, 1, 1.0, True),
    "4x1": (1, 4, 2, 0.0, True),
}


def _config(n_group, topk_group):
    # 16 experts, 4 per rank; top-4 of topk_group nodes
    return tiny().replace(n_group=n_group, topk_group=topk_group)


def _full_moe(n_group, topk_group, skew):
    from moeray.platform.model.moe import MoE

    torch.manual_seed(SEED)
    moe = MoE(_config(n_group, topk_group))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    E = moe.experts.num_experts
    bias = torch.linspace(-0.05, 0.05, E)
    bias[: E // 2] += skew
    moe.gate.e_score_correction_bias.copy_(bias)
    return moe


def _inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    D = tiny().hidden_size
    return torch.randn(1, T_PER_RANK[rank], D, generator=g), torch.randn(
        1, T_PER_RANK[rank], D, generator=g
    )


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from moeray.platform.parallel.expert import ExpertParallelMoE
    from moeray.platform.parallel.node_limited import NodeLimitedMoE, last_traffic, node_topology

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # no ranks_per_node: the ranks' host names decide (all on this machine: one node)
        hosts = node_topology(None)
        torch.save(dataclasses.asdict(hosts), os.path.join(out_dir, f"hosts-rank{rank}.pt"))
        for name, (rpn, n_group, topk_group, skew, limited) in CASES.items():
            topology = node_topology(None, rpn)
            moe = _full_moe(n_group, topk_group, skew)
            if limited:
                layer = NodeLimitedMoE(moe, None, rank, world, topology=topology)
            else:
                layer = ExpertParallelMoE(moe, None, rank, world)
            x, dy = _inputs(rank)
            x.requires_grad_()
            y = layer(x)
            y.backward(dy)
            container = torch.nn.ModuleList([layer])
            torch.save(
                {
                    "y": y.detach(),
                    "x_grad": x.grad,
                    "grads": {n: p.grad for n, p in layer.named_parameters()},
                    "ids": layer.last_routing.expert_ids_TK,
                    "traffic": dataclasses.asdict(last_traffic(container, topology)),
                },
                os.path.join(out_dir, f"{name}-rank{rank}.pt"),
            )
    finally:
        dist.destroy_process_group()


def _reference(n_group, topk_group, skew):
    moe = _full_moe(n_group, topk_group, skew)
    xs, dys = zip(*(_inputs(r) for r in range(WORLD)), strict=True)
    x = torch.cat(xs, dim=1).requires_grad_()
    y = moe(x)
    y.backward(torch.cat(dys, dim=1))
    return y.detach(), x.grad, {n: p.grad for n, p in moe.named_parameters()}


def _close(got, want):
    # other summation orders in fp32: bound the error by the tensor's scale
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale + 1e-7)


def _check_equal(ranks, ref):
    y, x_grad, grads = ref
    ys, gxs = y.split(list(T_PER_RANK), 1), x_grad.split(list(T_PER_RANK), 1)
    for r, (y_ref, gx_ref) in enumerate(zip(ys, gxs, strict=True)):
        _close(ranks[r]["y"], y_ref)
        _close(ranks[r]["x_grad"], gx_ref)
    for name, g in grads.items():
        # a rank whose experts ran no rows has no gradient: zeros (as train/replica.py fills in)
        parts = [ranks[r]["grads"][name] for r in range(WORLD)]
        if name.startswith("experts."):
            L = g.shape[0] // WORLD
            zero = torch.zeros_like(g[:L])
            _close(torch.cat([zero if p is None else p for p in parts]), g)
        else:  # replicated: the ranks' gradients sum (all-reduce) to the full one
            _close(sum(torch.zeros_like(g) if p is None else p for p in parts), g)
    assert grads["gate.weight"].abs().sum() > 0


def test_node_limited_dispatch_matches_flat_and_one_process_with_fewer_bytes(tmp_path):
    spawn(_worker, args=(WORLD, init_file(tmp_path), str(tmp_path)), nprocs=WORLD)
    got = {
        name: [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(WORLD)] for name in CASES
    }
    from moeray.platform.parallel.node_limited import Traffic

    for r in range(WORLD):
        assert torch.load(tmp_path / f"hosts-rank{r}.pt") == {"num_ranks": 4, "ranks_per_node": 4}

    for name, (_, n_group, topk_group, skew, _) in CASES.items():
        _check_equal(got[name], _reference(n_group, topk_group, skew))
    for r in range(WORLD):  # the flat and node-limited layers agree with each other too
        _close(got["2x2"][r]["y"], got["2x2-flat"][r]["y"])
        _close(got["2x2"][r]["x_grad"], got["2x2-flat"][r]["x_grad"])

    # 2 nodes x 2 ranks, 4 experts per rank, 8 per node; every token keeps 1 node (topk_group=1)
    L, C, D, K = 4, 8, tiny().hidden_size, 4
    row = D * 4  # fp32 rows
    remote_experts = remote_nodes = 0
    for r in range(WORLD):
        ids_TK = got["2x2"][r]["ids"]
        assert torch.equal(ids_TK, got["2x2-flat"][r]["ids"])
        nodes_TK = ids_TK // C
        assert (nodes_TK == nodes_TK[:, :1]).all()  # the node limit M = topk_group = 1 held
        remote_experts += int((nodes_TK != r // 2).sum())
        remote_nodes += int((nodes_TK[:, 0] != r // 2).sum())
        # tokens really crossed nodes and ranks inside them
        assert (ids_TK // L != r).any() or T_PER_RANK[r] == 0
    assert remote_nodes > 0

    def per_token(name):
        total = sum((Traffic(**x["traffic"]) for x in got[name]), start=Traffic())
        assert total.tokens == sum(T_PER_RANK)
        return total, total.inter_node_bytes / total.tokens

    flat, flat_per_token = per_token("2x2-flat")
    limited, limited_per_token = per_token("2x2")
    # flat: each remote (token, expert) row out with its int64 id, and back
    assert flat.inter_node_bytes == remote_experts * (2 * row + 8)
    # node-limited: one row per remote (token, node) out with its [K, 2] fp32 routing, and back
    assert limited.inter_node_bytes == remote_nodes * (2 * row + K * 2 * 4)
    assert limited_per_token < flat_per_token / 2, (
        f"inter-node bytes per token: node-limited {limited_per_token:.1f}, "
        f"flat {flat_per_token:.1f}"
    )
    # stage 2 forwards inside the node; with one node per token nothing else crosses it
    assert limited.intra_node_bytes > 0
    skewed, _ = per_token("2x2-one-node")
    assert skewed.inter_node_bytes == sum(T_PER_RANK[2:]) * (2 * row + K * 2 * 4)


def test_topology_from_hosts_and_its_errors():
    from moeray.platform.parallel.node_limited import NodeTopology, check_node_limited

    topo = NodeTopology.from_hosts(["a", "a", "b", "b"])
    assert (topo.num_nodes, topo.ranks_per_node, topo.node(2)) == (2, 2, 1)
    assert NodeTopology.from_hosts(["a"] * 3).num_nodes == 1
    with pytest.raises(ValueError, match=r"hosts \['a', 'b', 'a', 'b'\].*ranks_per_node"):
        NodeTopology.from_hosts(["a", "b", "a", "b"])
    with pytest.raises(ValueError, match=r"hosts \['a', 'a', 'a', 'b'\]"):
        NodeTopology.from_hosts(["a", "a", "a", "b"])
    with pytest.raises(ValueError, match=r"ranks_per_node=3 must be >= 1 and divide the 4"):
        NodeTopology(4, 3)
    with pytest.raises(ValueError, match=r"n_group=4 but the 4 EP ranks span 2 nodes of 2"):
        check_node_limited(tiny(), NodeTopology(4, 2))
    check_node_limited(tiny(), NodeTopology(8, 2))


@pytest.mark.parametrize(
    "parallel, match",
    [
        ({"ep": 4, "node_limited": True, "ranks_per_node": 2}, r"n_group=4 but .* span 2 nodes"),
        ({"ep": 4, "ranks_per_node": 2}, r"ranks_per_node=2 needs node_limited: true"),
        ({"ep": 4, "node_limited": True, "ranks_per_node": 3}, r"must divide parallel\.ep=4"),
        ({"ep": 4, "node_limited": True, "ranks_per_node": -1}, r"must be >= 0"),
        ({"node_limited": True}, r"node_limited needs pp=1 and ep >= 2.*ep=1"),
        (
            {"pp": 2, "ep": 2, "node_limited": True, "microbatches": 4},
            r"node_limited needs pp=1.*pp=2",
        ),
    ],
)
def test_inconsistent_node_limited_layouts_are_refused(parallel, match):
    with pytest.raises(ValueError, match=match):
        job = TrainJobConfig.from_dict({"parallel": parallel})
        job.check_model(job.model_config())


def test_node_limited_replica_matches_single_process(tmp_path):
    # the training path: FlatReplica -> parallelize() -> NodeLimitedMoE, tiny (4 groups) on 4
    # ranks of one node each
    from test_pipeline import _check, _reference
    from test_train_layouts import _run_flat

    parallel = {"ep": 4, "node_limited": True, "ranks_per_node": 1}
    results = _run_flat(tmp_path, WORLD, [("ep4-nodes", parallel)])
    ref_parts, ref_grads = _reference()
    _check(results, ref_parts, ref_grads, ep=4)
    assert all(r["moe_classes"] == ["NodeLimitedMoE"] for r in results["ep4-nodes"])


def test_bench_node_ep_measures_both_dispatches_and_refuses_bad_layouts(
    tmp_path, capsys, monkeypatch
):
    from moeray.platform.parallel import node_bench

    monkeypatch.setattr(mp, "spawn", spawn)  # its 4 ranks from the fork server (spawn_ranks.py)

    args = ["--model", "tiny", "--ep", "4", "--out-dir", str(tmp_path)]
    assert node_bench.main([*args, "--ranks-per-node", "2"]) == 2
    assert "n_group=4 but the 4 EP ranks span 2 nodes" in capsys.readouterr().err
    assert node_bench.main([*args, "--dtype", "fp8"]) == 2
    assert "dtype='fp8'; accepted: ['bf16', 'fp32']" in capsys.readouterr().err

    # 2 nodes x 2 ranks, one node per token: a token's rows cross at most once each way
    args += ["--ranks-per-node", "2", "--n-group", "2", "--topk-group", "1", "--tokens", "16"]
    assert node_bench.main(args) == 0
    (path,) = tmp_path.glob("node-ep-tiny-2x2-*.json")
    res = json.loads(path.read_text())
    row = 64 * 2  # bf16 rows of width 64
    remote_nodes, remote_experts = res["remote_nodes_per_token"], res["remote_experts_per_token"]
    assert 0 < remote_nodes <= 1 and remote_experts == pytest.approx(4 * remote_nodes)
    flat, limited = res["flat"], res["node_limited"]
    assert flat["inter_node_bytes_per_token"] == pytest.approx(remote_experts * (2 * row + 8))
    assert limited["inter_node_bytes_per_token"] == pytest.approx(
        remote_nodes * (2 * row + 4 * 2 * 4)
    )
    assert res["inter_node_ratio_flat_over_limited"] > 3
    assert limited["intra_node_bytes_per_token"] > 0
