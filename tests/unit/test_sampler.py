import math

import pytest
import torch

from moeray.platform.engine.sampler import (
    Sampler,
    SamplingParams,
    filtered_probs,
    make_generator,
    sample_from_probs,
)

V = 37


def logits(B, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 2


def gens(seeds):
    fallback = torch.Generator().manual_seed(123)
    return [make_generator(s, fallback) for s in seeds]


def test_greedy_is_argmax_with_first_index_on_ties():
    x = logits(4)
    x[2, 5] = x[2, 9] = x[2].max() + 1
    r = Sampler()(x, [SamplingParams(temperature=0)] * 4, gens([None] * 4))
    assert r.token_ids == x.argmax(-1).tolist() and r.token_ids[2] == 5
    assert r.logprobs == [None] * 4


def test_top_k_and_top_p_filters():
    x = logits(3, seed=1)
    p = filtered_probs(
        x,
        [
            SamplingParams(top_k=5),
            SamplingParams(top_p=0.5),
            SamplingParams(temperature=0.5, top_k=3, top_p=0.9),
        ],
    )
    assert torch.allclose(p.sum(-1), torch.ones(3))
    assert (p[0] > 0).sum() == 5 and set(p[0].nonzero().flatten().tolist()) == set(
        x[0].topk(5).indices.tolist()
    )
    keep5 = x[0].topk(5).indices
    assert torch.allclose(p[0][keep5], x[0][keep5].softmax(-1), atol=1e-6)
    # top-p: the smallest most-likely set with mass >= 0.5
    full = x[1].softmax(-1)
    sp, order = full.sort(descending=True)
    n = int((sp.cumsum(0) < 0.5).sum()) + 1
    assert set(p[1].nonzero().flatten().tolist()) == set(order[:n].tolist())
    assert torch.allclose(p[1][order[:n]], sp[:n] / sp[:n].sum(), atol=1e-6)
    # temperature then top-k then top-p
    t = x[2] / 0.5
    keep = t.topk(3).indices
    q = t[keep].softmax(-1)
    qs, qo = q.sort(descending=True)
    m = int((qs.cumsum(0) < 0.9).sum()) + 1
    assert set(p[2].nonzero().flatten().tolist()) == set(keep[qo[:m]].tolist())


def test_temperature_sampling_matches_distribution():
    x = logits(1, seed=2)[:, :6]
    params = SamplingParams(temperature=0.7)
    g = gens([7])[0]
    counts = torch.zeros(6)
    N = 6000
    s = Sampler()
    for _ in range(N // 200):
        r = s(x.expand(200, 6), [params] * 200, [g] * 200)
        counts += torch.bincount(torch.tensor(r.token_ids), minlength=6)
    expect = (x[0] / 0.7).softmax(-1)
    # 4.5 sigma of a binomial: passes by chance with p > 0.9999, fails for a wrong temperature (1.0)
    sigma = (expect * (1 - expect) / N).sqrt()
    assert ((counts / N - expect).abs() < 4.5 * sigma + 1e-3).all(), (counts / N, expect)
    wrong = x[0].softmax(-1)
    assert not ((counts / N - wrong).abs() < 4.5 * sigma + 1e-3).all()


def test_seed_per_request_independent_of_batch():
    x = logits(5, seed=3)
    ps = [SamplingParams(temperature=1.3, top_p=0.95, seed=s) for s in (1, 2, 3, 4, 5)]
    a = []
    b = []
    ga, gb = gens([1, 2, 3, 4, 5]), gens([1, 2, 3, 4, 5])
    s = Sampler()
    for _ in range(10):
        a.append(s(x, ps, ga).token_ids)
        # request 3 alone, then alongside a greedy one: same stream
        b.append(
            s(
                torch.stack([x[0], x[3]]), [SamplingParams(temperature=0), ps[3]], [gb[0], gb[3]]
            ).token_ids[1]
        )
    assert [row[3] for row in a] == b
    assert len({tuple(row) for row in a}) > 1  # actually random across steps
    # unseeded requests differ from each other
    g2 = gens([None, None])
    draws = [
        s(x[:1].expand(2, V), [SamplingParams(temperature=2.0)] * 2, g2).token_ids
        for _ in range(20)
    ]
    assert any(d[0] != d[1] for d in draws)


def test_logprobs_raw_model_distribution():
    x = logits(2, seed=4)
    ps = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=0.8, seed=0, logprobs=0),
    ]
    r = Sampler()(x, ps, gens([None, 0]))
    lp = x.log_softmax(-1)
    a, b = r.logprobs
    assert a.token_id == r.token_ids[0] and math.isclose(
        a.logprob, lp[0].max().item(), rel_tol=1e-5
    )
    assert [t for t, _ in a.top] == lp[0].topk(3).indices.tolist()
    assert math.isclose(b.logprob, lp[1, r.token_ids[1]].item(), rel_tol=1e-5) and b.top == ()


def test_inverse_cdf_never_picks_zero_probability():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 5)
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.99999999])
    tok = sample_from_probs(probs, u)
    assert tok.tolist() == [1, 1, 3, 3, 3]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(stop="ab"), "sequences"),
        (dict(stop=("",)), "empty"),
        (dict(temperature=float("nan")), "temperature"),
    ],
)
def test_bad_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
