"""Serving with redundant experts: hot experts replicated, their tokens spread over the replicas,
outputs unchanged, and the busiest GPU lighter than with one copy per expert."""

import functools

import torch

from moeray.platform.config import tiny
from moeray.platform.engine.eplb import PlacedMoE, apply_placement, gpu_loads
from moeray.platform.model.transformer import Transformer, greedy_generate
from moeray.platform.parallel.experts_mlp import experts_mlp
from moeray.platform.placement import place_experts, round_robin_gpu_loads

GPUS = 4


def _skewed_model():
    torch.manual_seed(0)
    m = Transformer(tiny()).eval()
    with torch.no_grad():
        for moe in m.moe_layers():  # expert 5 is everybody's favourite (as after a drifted bias)
            moe.gate.e_score_correction_bias[5] = 1.0
    return m


def _placement_from_last_loads(model):
    """GPUS redundant slots placed by the expert loads of the model's last forward."""
    c = tiny()
    loads_LE = torch.stack([m.last_routing.counts_E for m in model.moe_layers()]).float()
    return place_experts(
        loads_LE,
        num_physical=c.n_routed_experts + GPUS,
        num_groups=c.n_group,
        num_nodes=1,
        num_gpus=GPUS,
    )


def test_placed_layers_spread_hot_experts_and_keep_outputs():
    model = _skewed_model()
    c = tiny()
    ids = torch.randint(0, c.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
    placement = _placement_from_last_loads(model)
    assert int(placement.logcnt_LE[:, 5].min()) >= 2  # the hot expert got replicas

    placed = apply_placement(model, placement)
    assert len(placed) == len(model.moe_layers()) and all(isinstance(m, PlacedMoE) for m in placed)
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for layer, m in enumerate(placed):
        slots = placement.log2phy_LER[layer, 5][: int(placement.logcnt_LE[layer, 5])]
        per_replica = m.slot_counts_P[slots]
        assert int(per_replica.max() - per_replica.min()) <= 1  # evenly spread
        assert int(per_replica.sum()) == int(m.last_routing.counts_E[5])
        placed_max = int(gpu_loads(m.slot_counts_P, placement).max())
        rr_max = int(round_robin_gpu_loads(m.last_routing.counts_E[None].float(), GPUS).max())
        assert placed_max < rr_max, (placed_max, rr_max)


def test_placed_layers_run_the_grouped_experts():
    """A placed layer's experts hold every physical slot: with the grouped experts' autograd node
    as mlp_fn (training's path) the logits stay those of the unplaced model."""
    model = _skewed_model()
    c = tiny()
    ids = torch.randint(0, c.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)
    placement = _placement_from_last_loads(model)
    for m in apply_placement(model, placement):
        assert m.experts.routed_experts == m.experts.num_experts == c.n_routed_experts + GPUS
        m.experts.mlp_fn = functools.partial(experts_mlp)
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)


def test_generation_unchanged_with_placement():
    model = _skewed_model()
    c = tiny()
    prompt = torch.randint(2, c.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    before = greedy_generate(model, prompt, 8)
    with torch.no_grad():
        model(prompt)  # a full forward (MTP included) to observe every MoE layer's loads
    loads = torch.stack([m.last_routing.counts_E for m in model.moe_layers()]).float() + 1
    apply_placement(model, place_experts(loads, c.n_routed_experts + GPUS, c.n_group, 1, GPUS))
    assert torch.equal(greedy_generate(model, prompt, 8), before)


def test_layer_count_mismatch_is_a_clear_error():
    model = _skewed_model()
    c = tiny()
    bad = place_experts(torch.ones(1, c.n_routed_experts), c.n_routed_experts, c.n_group, 1, 1)
    try:
        apply_placement(model, bad)
    except ValueError as e:
        assert "placement has 1 layers" in str(e)
    else:
        raise AssertionError("expected a ValueError")
