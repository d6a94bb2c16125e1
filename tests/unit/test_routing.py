"""Gate, bias rule, balance statistics, balance loss, router state and expert placement (CPU).

Legend: T tokens, E experts, K experts per token, G groups, L layers, P physical slots.
"""

import pytest
import torch

from moeray.platform import placement as PL
from moeray.platform.routing.balance import (
    GammaSchedule,
    balance_stats,
    bias_update,
    maxvio,
    sequence_balance_loss,
)
from moeray.platform.routing.gate import GROUP_MASK_TRANSFORMERS, route
from moeray.platform.routing.state import RouterConfig, RouterState


def _route_reference(logits_TE, bias_E, top_k, n_group, topk_group, scale):
    """Token-by-token float64 reference of the official gate, written without batching."""
    T, E = logits_TE.shape
    per = E // n_group
    ids, weights = [], []
    for t in range(T):
        s = [1.0 / (1.0 + torch.exp(-logits_TE[t, e].double()).item()) for e in range(E)]
        b = [s[e] + (0.0 if bias_E is None else float(bias_E[e])) for e in range(E)]
        gscore = [sum(sorted(b[g * per : (g + 1) * per], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        cand = [e for e in range(E) if e // per in kept]
        chosen = sorted(cand, key=lambda e: -b[e])[:top_k]
        total = sum(s[e] for e in chosen)
        ids.append(sorted(chosen))
        weights.append({e: s[e] / total * scale for e in chosen})
    return ids, weights


@pytest.mark.parametrize("T,E,K,G,M", [(37, 24, 3, 6, 2), (19, 16, 4, 4, 3), (11, 10, 2, 1, 1)])
def test_route_matches_token_by_token_reference(T, E, K, G, M):
    g = torch.Generator().manual_seed(T * E)
    logits = torch.randn(T, E, generator=g) * 2
    bias = torch.randn(E, generator=g) * 0.3
    out = route(logits, bias, top_k=K, n_group=G, topk_group=M, routed_scaling_factor=2.5)
    ids, weights = _route_reference(logits, bias, K, G, M, 2.5)
    for t in range(T):
        got = out.expert_ids_TK[t].tolist()
        assert sorted(got) == ids[t], t
        for k, e in enumerate(got):
            assert out.weights_TK[t, k].item() == pytest.approx(weights[t][e], rel=1e-5)
    assert torch.equal(out.counts_E, torch.bincount(out.expert_ids_TK.flatten(), minlength=E))
    assert int(out.counts_E.sum()) == T * K


@pytest.mark.parametrize("seed", range(5))
def test_node_limit_holds_on_random_scores(seed):
    """Random logits and biases (many biased scores negative): never more than topk_group nodes."""
    g = torch.Generator().manual_seed(seed)
    E, G, M, K = 32, 8, 3, 6
    group_to_node = [[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 1, 2, 2, 3, 3], [3, 1, 0, 2, 2, 0, 1, 3]][
        seed % 3
    ]
    logits = torch.randn(501, E, generator=g) * 3
    bias = torch.randn(E, generator=g) - 0.5  # pushes many biased scores below 0
    out = route(logits, bias, top_k=K, n_group=G, topk_group=M, routed_scaling_factor=1.0)
    stats = balance_stats(out.expert_ids_TK, E, group_to_node)
    assert stats.nodes_per_token_max <= M
    groups_per_token = (out.expert_ids_TK // (E // G)).sort(-1).values
    distinct = (groups_per_token.diff(dim=-1) != 0).sum(-1) + 1
    assert int(distinct.max()) <= M
    # The same inputs masked with 0.0 (transformers' choice) do break the limit.
    loose = route(
        logits,
        bias,
        top_k=K,
        n_group=G,
        topk_group=M,
        routed_scaling_factor=1.0,
        group_mask_value=GROUP_MASK_TRANSFORMERS,
    )
    loose_groups = (loose.expert_ids_TK // (E // G)).sort(-1).values
    assert int(((loose_groups.diff(dim=-1) != 0).sum(-1) + 1).max()) > M


def test_balance_stats_hand_made():
    # E=8 in 4 groups of 2; groups 0,1 on node 0, groups 2,3 on node 1.
    ids = torch.tensor([[0, 1], [0, 2], [0, 7], [5, 6]])
    st = balance_stats(ids, 8, [0, 0, 1, 1])
    assert st.tokens_per_expert_E.tolist() == [3, 1, 1, 0, 0, 1, 1, 1]
    assert st.maxvio == pytest.approx(3 / 1.0 - 1)
    assert st.tokens_per_node_N.tolist() == [3, 2]  # token 2 counts once per node it touches
    assert st.nodes_per_token_max == 2
    assert st.nodes_per_token_mean == pytest.approx((1 + 1 + 2 + 1) / 4)


def test_maxvio_values():
    assert maxvio(torch.tensor([5, 5, 5, 5])).item() == 0.0
    assert maxvio(torch.tensor([8, 0, 0, 0])).item() == pytest.approx(3.0)
    v = maxvio(torch.tensor([[3, 1, 2], [0, 0, 0]]))
    assert v.tolist() == pytest.approx([0.5, 0.0])


def test_bias_update_on_hand_made_loads():
    bias = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, -0.2, 0.3, 0.0]])
    loads = torch.tensor([[10, 2, 5, 3], [7, 7, 7, 7]])  # means 5 and 7
    new = bias_update(bias, loads, gamma=0.001)
    assert new[0].tolist() == pytest.approx([-0.001, 0.001, 0.0, 0.001])
    assert new[1].tolist() == pytest.approx([0.1, -0.2, 0.3, 0.0])  # balanced layer unchanged
    assert torch.equal(bias_update(bias, loads, gamma=0.0), bias)
    with pytest.raises(ValueError, match="gamma"):
        bias_update(bias, loads, gamma=-1.0)
    with pytest.raises(ValueError, match="shape"):
        bias_update(bias, loads[:, :3], gamma=0.1)


def test_gamma_schedule_reaches_zero():
    s = GammaSchedule(0.001, zero_at_step=10)
    assert [s(i) for i in (0, 9, 10, 1000)] == [0.001, 0.001, 0.0, 0.0]
    assert GammaSchedule(0.002)(10**9) == 0.002
    with pytest.raises(ValueError):
        GammaSchedule(-0.1)


def test_bias_updates_balance_a_skewed_gate():
    """A gate that prefers some experts by a fixed offset: the sign rule removes the skew."""
    g = torch.Generator().manual_seed(3)
    E, G, M, K, T = 16, 4, 2, 4, 1024
    skew = torch.linspace(-1.5, 1.5, E)
    bias = torch.zeros(1, E)
    vios = []
    for _ in range(300):
        logits = torch.randn(T, E, generator=g) + skew
        out = route(logits, bias[0], top_k=K, n_group=G, topk_group=M, routed_scaling_factor=1.0)
        vios.append(float(maxvio(out.counts_E)))
        bias = bias_update(bias, out.counts_E.unsqueeze(0), gamma=0.01)
    assert vios[0] > 1.5
    assert sum(vios[-50:]) / 50 < 0.35
    assert bias[0, 0] > bias[0, -1]  # the disfavoured expert got the larger bias


def _seq_loss_reference(scores, ids, alpha):
    B, S, E = scores.shape
    K = ids.shape[-1]
    total = 0.0
    for b in range(B):
        seq = 0.0
        for i in range(E):
            f = E / (K * S) * int((ids[b] == i).sum())
            p = sum(float(scores[b, t, i] / scores[b, t].sum()) for t in range(S)) / S
            seq += f * p
        total += alpha * seq
    return total / B


def test_sequence_balance_loss_matches_reference_and_has_gradient():
    g = torch.Generator().manual_seed(0)
    B, S, E, K = 3, 7, 12, 3
    logits = torch.randn(B * S, E, generator=g, requires_grad=True)
    out = route(logits, None, top_k=K, n_group=4, topk_group=2, routed_scaling_factor=1.0)
    ids = out.expert_ids_TK.view(B, S, K)
    scores = out.scores_TE.view(B, S, E)
    loss = sequence_balance_loss(scores, ids, alpha=0.01)
    assert loss.item() == pytest.approx(_seq_loss_reference(scores.detach(), ids, 0.01), rel=1e-5)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # Perfect balance and uniform scores give exactly alpha.
    uniform = torch.full((1, 4, 4), 0.5)
    ids_bal = torch.tensor([[[0], [1], [2], [3]]])
    assert sequence_balance_loss(uniform, ids_bal, alpha=0.1).item() == pytest.approx(0.1)


def _config(**kw):
    base = dict(
        layer_ids=(1, 2, 3), n_experts=8, n_group=4, topk_group=2, num_reporters=3, gamma=0.01
    )
    base.update(kw)
    return RouterConfig(**base)


def test_router_state_sums_ranks_and_ignores_retries():
    st = RouterState(_config())
    g = torch.Generator().manual_seed(1)
    loads = [torch.randint(0, 50, (3, 8), generator=g) for _ in range(3)]
    assert st.report(0, 0, loads[0]) == {"counted": True, "applied": False, "step": -1}
    assert st.report(0, 0, loads[0] * 5)["counted"] is False  # retry of rank 0: not counted again
    assert st.report(0, 2, loads[2])["applied"] is False
    assert torch.equal(st.biases()["bias_LE"], torch.zeros(3, 8))  # waits for every rank
    assert st.report(0, 1, loads[1]) == {"counted": True, "applied": True, "step": 0}
    total = loads[0] + loads[1] + loads[2]
    assert torch.equal(st.last_loads_LE, total)
    assert torch.allclose(st.biases()["bias_LE"], bias_update(torch.zeros(3, 8), total, 0.01))
    assert st.report(0, 1, loads[1])["counted"] is False  # late retry after the step applied
    assert st.maxvio() == pytest.approx(
        {k: float(v) for k, v in zip((1, 2, 3), maxvio(total), strict=True)}
    )
    with pytest.raises(ValueError, match="rank"):
        st.report(1, 3, loads[0])
    with pytest.raises(ValueError, match="shape"):
        st.report(1, 0, loads[0][:, :4])
    with pytest.raises(ValueError, match=">= 0"):
        st.report(1, 0, -loads[0] - 1)


def test_router_state_round_trips_and_continues_identically():
    g = torch.Generator().manual_seed(2)
    steps = [[torch.randint(0, 40, (3, 8), generator=g) for _ in range(3)] for _ in range(6)]
    a = RouterState(_config(gamma_zero_at_step=4, num_physical=12, serve_gpus=4, serve_nodes=2))
    for s in range(3):
        for r in range(3):
            a.report(s, r, steps[s][r])
    a.report(3, 0, steps[3][0])  # step 3 half reported when the checkpoint is taken
    b = RouterState(_config(gamma_zero_at_step=4, num_physical=12, serve_gpus=4, serve_nodes=2))
    b.load_state_dict(a.state_dict())
    for st in (a, b):
        st.report(3, 0, steps[3][0])  # retry after restore: still not double counted
        for s in range(3, 6):
            for r in range(3):
                st.report(s, r, steps[s][r])
        st.rebalance()
    assert torch.equal(a.bias_LE, b.bias_LE)
    assert torch.equal(a.placement.phy2log_LP, b.placement.phy2log_LP)
    assert b.step == 5 and b.biases()["gamma"] == 0.0
    # Steps 4 and 5 ran with gamma 0: biases equal those after step 3.
    c = RouterState(_config())
    bias = torch.zeros(3, 8)
    for s in range(4):
        bias = bias_update(bias, sum(steps[s]), 0.01)
    assert torch.allclose(b.bias_LE, bias)
    with pytest.raises(ValueError, match="n_experts"):
        RouterState(_config(n_experts=12)).load_state_dict(c.state_dict())


def _check_placement(pl, E, P, num_gpus):
    L = pl.phy2log_LP.shape[0]
    assert pl.phy2log_LP.shape == (L, P)
    for layer in range(L):
        held = torch.bincount(pl.phy2log_LP[layer], minlength=E)
        assert int(held.min()) >= 1  # every expert kept at least once
        assert torch.equal(held, pl.logcnt_LE[layer])
        for e in range(E):
            slots = [p for p in pl.log2phy_LER[layer, e].tolist() if p >= 0]
            assert len(slots) == int(pl.logcnt_LE[layer, e])
            assert all(int(pl.phy2log_LP[layer, p]) == e for p in slots)


@pytest.mark.parametrize(
    "E,P,groups,nodes,gpus", [(16, 24, 4, 2, 4), (16, 24, 4, 3, 6), (12, 20, 3, 1, 5)]
)
def test_placement_keeps_every_expert_and_beats_round_robin(E, P, groups, nodes, gpus):
    g = torch.Generator().manual_seed(E + P + nodes)
    L = 4
    # Skewed loads: a few hot experts (Zipf-like), shuffled so hot ones are not adjacent.
    base = 1000.0 / torch.arange(1, E + 1).double() ** 1.2
    load = torch.stack([base[torch.randperm(E, generator=g)] for _ in range(L)]).round()
    pl = PL.place_experts(load, P, groups, nodes, gpus)
    _check_placement(pl, E, P, gpus)
    ours = PL.gpu_loads(load, pl).amax(-1)
    rr = PL.round_robin_gpu_loads(load, gpus).amax(-1)
    assert bool((ours < rr).all()), (ours, rr)
    assert torch.allclose(PL.gpu_loads(load, pl).sum(-1), load.sum(-1))
    if groups % nodes == 0:
        # Hierarchical: every replica of a group's experts sits on that group's node.
        gpus_per_node = gpus // nodes
        node_of_slot = torch.arange(P) // (P // gpus) // gpus_per_node
        group_of_slot = pl.phy2log_LP // (E // groups)
        for layer in range(L):
            for grp in range(groups):
                assert len(set(node_of_slot[group_of_slot[layer] == grp].tolist())) == 1


def test_placement_rejects_bad_shapes():
    load = torch.ones(2, 8)
    with pytest.raises(ValueError, match="num_physical"):
        PL.place_experts(load, 6, 2, 1, 2)
    with pytest.raises(ValueError, match="num_gpus"):
        PL.place_experts(load, 12, 2, 2, 3)


def test_to_physical_spreads_hot_expert_over_replicas():
    g = torch.Generator().manual_seed(5)
    E, P, T, K = 8, 12, 301, 2
    load = torch.tensor([[900.0, 50, 40, 30, 20, 10, 5, 1]])
    pl = PL.place_experts(load, P, 2, 1, 4)
    assert int(pl.logcnt_LE[0, 0]) >= 3
    ids = torch.multinomial(load[0] / load.sum(), T * K, replacement=True, generator=g).view(T, K)
    phys = PL.to_physical(ids, pl.log2phy_LER[0], pl.logcnt_LE[0])
    assert torch.equal(pl.phy2log_LP[0][phys], ids)  # every token lands on a replica of its expert
    per_slot = torch.bincount(phys.flatten(), minlength=P)
    for e in range(E):
        slots = [p for p in pl.log2phy_LER[0, e].tolist() if p >= 0]
        counts = per_slot[slots]
        assert int(counts.max() - counts.min()) <= 1


def test_balance_bench_smoke(tmp_path):
    """A few steps of the three runs on a small corpus: the result file has the promised shape."""
    pytest.importorskip("moeray.platform.model.transformer")
    from moeray.platform import balance_bench

    cfg = balance_bench.BenchConfig(steps=4, batch=2, seq_len=16, max_bytes=150_000, eval_batches=1)
    numbers = balance_bench.run_bench(cfg, tmp_path, make_plot=False, log=lambda *_: None)
    saved = __import__("json").loads((tmp_path / "balance.json").read_text())
    assert set(saved["runs"]) == {"bias", "none", "aux_loss"}
    for run in saved["runs"].values():
        assert len(run["maxvio"]) == 4 and all(v >= 0 for v in run["maxvio"])
        assert run["final_loss"] > 0 and run["nodes_per_token_max"] <= 2
    assert saved["runs"]["none"]["bias_abs_max"] == 0.0
    assert (
        0 < saved["runs"]["bias"]["bias_abs_max"] <= 4 * cfg.gamma + 1e-7
    )  # at most gamma per step
    assert numbers["checks"]["node_limit_held"]


def test_serving_loop_rebalance_spreads_real_routing():
    """Skewed gate -> serving loads into the moving average -> rebalance -> tokens per GPU, counted
    on the physical ids of fresh batches, peak below round-robin placement's."""
    g = torch.Generator().manual_seed(11)
    E, G, M, K, T, gpus = 16, 4, 2, 4, 2000, 4
    cfg = RouterConfig(
        layer_ids=(5,),
        n_experts=E,
        n_group=G,
        topk_group=M,
        num_physical=24,
        serve_gpus=gpus,
        serve_nodes=1,
        load_ema=0.5,
    )
    st = RouterState(cfg)
    skew = torch.randn(E, generator=g) * 1.5
    for _ in range(4):
        out = route(
            torch.randn(T, E, generator=g) + skew,
            None,
            top_k=K,
            n_group=G,
            topk_group=M,
            routed_scaling_factor=1.0,
        )
        st.observe(out.counts_E.unsqueeze(0))
    pl = st.rebalance()
    out = route(
        torch.randn(T, E, generator=g) + skew,
        None,
        top_k=K,
        n_group=G,
        topk_group=M,
        routed_scaling_factor=1.0,
    )
    phys = PL.to_physical(out.expert_ids_TK, pl.log2phy_LER[0], pl.logcnt_LE[0])
    per_gpu = torch.bincount(pl.gpu_of_slot()[phys.flatten()], minlength=gpus)
    rr = torch.bincount(out.expert_ids_TK.flatten() % gpus, minlength=gpus)
    assert int(per_gpu.sum()) == T * K, (per_gpu, rr)
    assert int(per_gpu.max()) < int(rr.max())
    assert float(per_gpu.max()) < 1.1 * T * K / gpus  # within 10% of perfectly even
