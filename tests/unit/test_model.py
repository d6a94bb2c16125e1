"""The model's own invariants: MLA's two paths agree, incremental decoding equals a full
forward, the gate's group masking, MTP shapes."""

import pytest
import torch

from moeray.platform.config import tiny
from moeray.platform.model.mla import DenseKVCache
from moeray.platform.model.rope import rope_frequencies
from moeray.platform.model.transformer import Transformer, greedy_generate
from moeray.platform.routing.gate import GROUP_MASK_OFFICIAL, GROUP_MASK_TRANSFORMERS, route


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(tiny()).eval()
    with torch.no_grad():
        for moe in m.moe_layers():  # non-zero biases so selection differs from the raw scores
            moe.gate.e_score_correction_bias.uniform_(-0.02, 0.02)
    return m


def test_absorbed_equals_expanded(model):
    ids = torch.randint(0, 1024, (3, 17))
    with torch.no_grad():
        expanded = model(ids).logits
        absorbed = model(ids, absorbed=True).logits
    rel = (expanded - absorbed).norm() / expanded.norm()
    assert rel < 1e-5, rel


def test_incremental_decoding_equals_full_forward(model):
    ids = torch.randint(0, 1024, (2, 13))
    cache = DenseKVCache(3, 2, 13, model.config)
    with torch.no_grad():
        full = model(ids).logits
        parts = [model(ids[:, :6], cache=cache).logits]
        for s in range(6, 13):  # one token at a time, positions continue from the cache
            parts.append(model(ids[:, s : s + 1], cache=cache).logits)
    inc = torch.cat(parts, dim=1)
    assert torch.allclose(inc, full, atol=1e-5, rtol=1e-4), (inc - full).abs().max()


def test_cache_overflow_is_a_clear_error(model):
    cache = DenseKVCache(3, 1, 4, model.config)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_greedy_generate_matches_argmax_of_full_forward(model):
    ids = torch.randint(0, 1024, (2, 5))
    out = greedy_generate(model, ids, 6)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits
    assert torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])


def test_mtp_logits_predict_the_token_after_next(model):
    ids = torch.randint(0, 1024, (2, 9))
    out = model(ids)
    assert out.logits.shape == (2, 9, 1024)
    assert [t.shape for t in out.mtp_logits] == [(2, 8, 1024)]
    # Position s of depth 1 sees tokens <= s+1 only: changing token 8 leaves positions < 7 alone.
    ids2 = ids.clone()
    ids2[:, 8] = (ids2[:, 8] + 1) % 1024
    out2 = model(ids2)
    assert torch.allclose(out.mtp_logits[0][:, :7], out2.mtp_logits[0][:, :7], atol=1e-6)
    assert not torch.allclose(out.mtp_logits[0][:, 7], out2.mtp_logits[0][:, 7])


def test_yarn_frequencies_interpolate_low_and_keep_high():
    c = tiny()
    yarn, factor = rope_frequencies(c)
    plain, _ = rope_frequencies(c.replace(rope_scaling=None))
    assert factor == pytest.approx(1.0)  # mscale == mscale_all_dim
    assert torch.allclose(yarn[0], plain[0])  # fastest rotation: extrapolated, kept
    assert torch.allclose(yarn[-1], plain[-1] / c.rope_scaling["factor"])  # slowest: interpolated


@pytest.mark.parametrize("mscale", [None, 0.707])
def test_rotary_cos_sin_in_three_ops(mscale):
    """cos/sin are the fp32 values of the written-out formula, bit for bit (integer positions
    cast to fp32, times inv_freq; times the YaRN factor), in 3 ops where the factor is 1.0
    (mscale == mscale_all_dim: DeepSeek-V3) and 5 where it is not."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moeray.platform.model.rope import RotaryEmbedding

    c = tiny()
    if mscale is not None:
        c = c.replace(rope_scaling={**c.rope_scaling, "mscale": mscale})
    emb = RotaryEmbedding(c)
    assert (emb.attention_factor == 1.0) == (mscale is None)
    positions = torch.tensor([[0, 1, 7, 4095], [163839, 3, 2, 100000]])
    angles = positions.float()[..., None] * emb.inv_freq
    want = (angles.cos() * emb.attention_factor, angles.sin() * emb.attention_factor)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        got = emb(positions)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    core = [n for n in ops.names if not n.startswith(("aten.unsqueeze", "aten.view", "aten.slice"))]
    assert len(core) == (3 if mscale is None else 5), ops.names


def test_group_masking_official_vs_transformers_with_negative_scores():
    """With negative biased scores, masking excluded groups with 0.0 (what transformers did through
    4.x) lets an excluded expert (0.0) beat every kept one (< 0), so a token reaches more groups
    than topk_group allows. We follow the official code: -inf, never more than topk_group groups."""
    torch.manual_seed(1)
    T, E, G, topk_group, K = 512, 16, 4, 2, 4
    logits = torch.randn(T, E)
    bias = torch.full((E,), -0.5)  # biased score < 0 wherever the logit is < 0
    groups_used = {}
    for name, value in (
        ("official", GROUP_MASK_OFFICIAL),
        ("zero", GROUP_MASK_TRANSFORMERS),
    ):
        r = route(
            logits,
            bias,
            top_k=K,
            n_group=G,
            topk_group=topk_group,
            routed_scaling_factor=2.5,
            group_mask_value=value,
        )
        groups = r.expert_ids_TK // (E // G)
        groups_used[name] = torch.tensor([len(set(g.tolist())) for g in groups])
    assert int(groups_used["official"].max()) <= topk_group
    assert int(groups_used["zero"].max()) > topk_group
    assert float((groups_used["zero"] > topk_group).float().mean()) > 0.05


def test_routing_weights_normalized_and_scaled():
    torch.manual_seed(2)
    r = route(
        torch.randn(64, 16),
        torch.zeros(16),
        top_k=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
    )
    assert torch.allclose(r.weights_TK.sum(-1), torch.full((64,), 2.5))
    assert int(r.counts_E.sum()) == 64 * 4
