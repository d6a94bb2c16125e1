import dataclasses
import math

import pytest
import torch

from moeray.platform.engine.sampler import (
    History,
    Sampler,
    SamplingParams,
    apply_filters,
    filtered_probs,
    last_rows,
    make_generator,
    sample_from_probs,
    step_back_to_mass,
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


def test_a_rows_filtered_probs_do_not_depend_on_its_batch_mates():
    """Each row's filtered distribution is the one it gets alone, whatever its batch-mates ask:
    a top_p = 1 row beside a top_p < 1 one keeps every token (its fp32 running sum reaches 1.0
    before the last tokens, so a drop applied to all rows would cut ~1,000 of 32,768 here), and
    likewise top-k, min-p and temperature rows beside others."""
    big = torch.randn(4, 32768, generator=torch.Generator().manual_seed(0)) * 3
    rows = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.2, top_k=50),
        SamplingParams(temperature=0.9, min_p=0.05),
    ]
    together = filtered_probs(big, rows)
    for i, p in enumerate(rows):
        assert torch.equal(together[i], filtered_probs(big[i : i + 1], [p])[0]), p
    assert (together[0] > 0).all()


def test_a_filter_no_row_uses_changes_nothing():
    """`apply_filters` with a filter present whose every row has it off (min-p 0, top-p 1, no
    greedy row) gives the bits of the call without it: a CUDA graph captured with a filter serves
    batches that do not use it (engine/spec_step.py)."""
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(4)) * 3
    temps = torch.tensor([0.7, 1.0, 1.3])
    plain = apply_filters(x, temps, None)
    assert torch.equal(
        plain, filtered_probs(x, [SamplingParams(temperature=t) for t in (0.7, 1.0, 1.3)])
    )
    off = dict(min_ps_B=torch.zeros(3), top_ps_B=torch.ones(3))
    assert torch.equal(apply_filters(x, temps, torch.zeros(3, dtype=torch.bool), **off), plain)
    top_k = (5, torch.tensor([4, 0, 0]), torch.tensor([False, False, False]))
    assert torch.equal(apply_filters(x, temps, None, top_k=top_k), plain)
    # and with them on, the rows that use them change
    some = apply_filters(
        x, temps, torch.tensor([True, False, False]), top_ps_B=torch.tensor([1.0, 0.5, 1.0])
    )
    assert torch.equal(some[2], plain[2]) and not torch.equal(some[1], plain[1])
    assert torch.equal(some[0], torch.nn.functional.one_hot(x[0].argmax(), 500).float())


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


def test_step_back_to_mass_equals_the_per_row_rule():
    """Any pick, at random zero patterns: a pick with mass stays; a zero-probability pick moves to
    the last token with mass at or before it, else the first one (the per-row rule it replaced)."""
    g = torch.Generator().manual_seed(5)
    probs = torch.rand(64, 23, generator=g)
    probs[torch.rand(64, 23, generator=g) < 0.6] = 0
    probs[torch.arange(64), torch.randint(0, 23, (64,), generator=g)] = 0.5  # mass in every row
    tok = torch.randint(0, 23, (64,), generator=g)
    want = []
    for row, t in zip(probs, tok.tolist(), strict=True):
        nz = (row > 0).nonzero().flatten()
        want.append(t if row[t] > 0 else int(nz[nz <= t].max() if (nz <= t).any() else nz.min()))
    assert step_back_to_mass(probs, tok).tolist() == want
    assert sum(w != t for w, t in zip(want, tok.tolist(), strict=True)) > 10  # moves tested


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
        (dict(min_p=1.5), r"min_p=1.5 must be in \[0, 1\]"),
        (dict(min_tokens=5, max_tokens=4), r"min_tokens=5 must be in \[0, max_tokens=4\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty=0.0 must be a finite number > 0"),
        (dict(presence_penalty=2.5), r"presence_penalty=2.5 must be in \[-2, 2\]"),
        (dict(frequency_penalty=-3.0), r"frequency_penalty=-3.0 must be in \[-2, 2\]"),
        (dict(logit_bias=((3, 101.0),)), r"\{3: 101.0\}.*\[-100, 100\]"),
        (dict(logit_bias=((-1, 1.0),)), "token ids must be >= 0"),
        (dict(stop_token_ids=(-4,)), "stop_token_ids"),
        (dict(prompt_logprobs=21), "prompt_logprobs=21"),
    ],
)
def test_bad_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


# ---- logits processing: batched pass against a per-row reference -----------------------------
EOS_IDS = (4, 11)


def reference_process(x_V, p, prompt, output):
    """One row, plain loops: min_tokens, logit_bias, repetition, frequency and presence."""
    x = x_V.clone().float()
    for t, b in p.logit_bias:
        x[t] += b
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(EOS_IDS)):
            x[t] = float("-inf")
    for t in set(prompt) | set(output):
        r = p.repetition_penalty
        x[t] = x[t] / r if x[t] > 0 else x[t] * r
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return x


def random_case(B, V, seed):
    rng = torch.Generator().manual_seed(seed)

    def ri(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=rng))

    params, hist = [], []
    for b in range(B):
        kind = b % 4
        kw = {}
        if kind in (1, 3):
            kw.update(
                repetition_penalty=[0.5, 1.0, 1.3, 2.0][ri(0, 4)],
                presence_penalty=[-0.7, 0.0, 0.4][ri(0, 3)],
                frequency_penalty=[-1.1, 0.0, 0.6][ri(0, 3)],
            )
        if kind in (2, 3):
            toks = torch.randperm(V, generator=rng)[: ri(1, 6)].tolist()
            kw["logit_bias"] = tuple((t, float(ri(-100, 101))) for t in toks)
            kw["min_tokens"] = ri(0, 6)
            kw["stop_token_ids"] = (ri(0, V),)
            kw["ignore_eos"] = bool(ri(0, 2))
        params.append(SamplingParams(max_tokens=8, **kw))
        prompt = torch.randint(0, V, (ri(1, 30),), generator=rng).tolist()
        output = torch.randint(0, V, (ri(0, 12),), generator=rng).tolist()
        hist.append(History(prompt, output))
    return params, hist


@pytest.mark.parametrize("B,V,seed", [(1, 7, 0), (7, 53, 1), (13, 101, 2), (5, 1000, 3)])
def test_batched_processing_matches_per_row_reference(B, V, seed):
    x = torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3
    params, hist = random_case(B, V, seed)
    got = Sampler(EOS_IDS).process(x, params, hist)
    # the engine hands prompts over as device tensors: the same result
    as_tensors = [History(torch.tensor(h.prompt), h.output) for h in hist]
    assert torch.equal(Sampler(EOS_IDS).process(x, params, as_tensors), got)
    want = torch.stack(
        [reference_process(x[b], params[b], hist[b].prompt, hist[b].output) for b in range(B)]
    )
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    assert torch.allclose(got[fin], want[fin], atol=1e-5)
    assert not torch.equal(got, x) or all(not p.processes_logits for p in params)
    # the caller's logits are untouched (logprobs read them)
    assert torch.equal(x, torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3)
    # greedy picks the argmax of the processed logits, row by row
    gp = [dataclasses.replace(p, temperature=0.0) for p in params]
    r = Sampler(EOS_IDS)(x, gp, gens([None] * B), hist)
    assert r.token_ids == want.argmax(-1).tolist()


def test_processing_forces_and_bans_tokens():
    x = logits(3, seed=5)
    s = Sampler(EOS_IDS)
    weak = int(x[0].argmin())
    params = [
        SamplingParams(temperature=0.9, logit_bias=((weak, 100.0),)),
        SamplingParams(temperature=0, min_tokens=3, max_tokens=5),
        SamplingParams(temperature=0, min_tokens=3, max_tokens=5),
    ]
    x[1:, EOS_IDS[0]] = 50.0  # eos is the argmax of rows 1 and 2
    hist = [History([1], []), History([1], [7, 8]), History([1], [7, 8, 9])]
    r = s(x, params, gens([3, None, None]), hist)
    assert r.token_ids[0] == weak  # +100 takes all the mass
    assert r.token_ids[1] != EOS_IDS[0]  # 2 < min_tokens outputs: eos masked
    assert r.token_ids[2] == EOS_IDS[0]  # 3 outputs: allowed again
    with pytest.raises(ValueError, match="token history"):
        s(x, params, gens([3, None, None]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.process(x, [SamplingParams(logit_bias=((V, 1.0),))] * 3, hist)


def pack_mask(allowed_BV):
    """A boolean [B, V] mask as the grammar's packed int32 words (bit j of word w: 32w + j)."""
    B, Vn = allowed_BV.shape
    W = -(-Vn // 32)
    bits = torch.zeros(B, W * 32, dtype=torch.int64)
    bits[:, :Vn] = allowed_BV.long()
    words = (bits.view(B, W, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_grammar_mask_applies_before_bias_and_penalties():
    x = logits(2, seed=6)
    allowed = torch.zeros(2, V, dtype=torch.bool)
    allowed[0, [3, 9]] = True
    allowed[1, [20, 21]] = True
    ps = [
        SamplingParams(temperature=0, logit_bias=((5, 100.0),)),  # 5 is masked: bias can't lift it
        SamplingParams(temperature=1.0, seed=1, logit_bias=((21, 100.0),), repetition_penalty=1.5),
    ]
    hist = [History([1], []), History([21], [21])]
    r = Sampler()(x, ps, gens([None, 1]), hist, token_mask_BW=pack_mask(allowed))
    assert r.token_ids == [3 if x[0, 3] >= x[0, 9] else 9, 21]
    # logprobs still report the raw model distribution
    ps = [dataclasses.replace(p, logprobs=0) for p in ps]
    rl = Sampler()(x, ps, gens([None, 1]), hist, token_mask_BW=pack_mask(allowed))
    assert math.isclose(rl.logprobs[1].logprob, x[1].log_softmax(-1)[21].item(), rel_tol=1e-5)


def test_min_p_against_reference():
    x = logits(4, seed=7)
    ps = [
        SamplingParams(temperature=t, min_p=m)
        for t, m in ((1.0, 0.1), (0.5, 0.3), (2.0, 0.0), (1.0, 1.0))
    ]
    p = filtered_probs(x, ps)
    for b, sp in enumerate(ps):
        q = (x[b] / sp.temperature).softmax(-1)
        keep = q >= sp.min_p * q.max()
        want = torch.where(keep, q, 0.0)
        assert torch.allclose(p[b], want / want.sum(), atol=1e-6)
    assert int((p[3] > 0).sum()) == 1  # min_p 1: only the top token


def test_seeded_rows_with_penalties_do_not_depend_on_the_batch():
    x = logits(4, seed=8)
    params, hist = random_case(4, V, 9)
    params = [dataclasses.replace(p, temperature=1.1, seed=40 + i) for i, p in enumerate(params)]
    s = Sampler(EOS_IDS)
    together = s(x, params, gens([p.seed for p in params]), hist).token_ids
    alone = [
        s(x[b : b + 1], params[b : b + 1], gens([params[b].seed]), hist[b : b + 1]).token_ids[0]
        for b in range(4)
    ]
    assert together == alone


def test_last_rows_views_one_outputs_rows_and_copies_the_rest():
    """A decode group's rows (views [1, V] of one [B, S, V] output, as ModelRunner.execute cuts
    them) come back as a view of that output, equal to the stacked copy; rows out of order, of
    separate tensors, or a prefill chunk's [n, V] among them are stacked, as are tensors one
    stride apart of unequal lengths (their last rows are not)."""
    g = torch.Generator().manual_seed(0)
    out_BSV = torch.randn(5, 2, 11, generator=g)
    for S in (1, 2):
        lg = out_BSV[:, :S].contiguous()
        rows = [lg[j, :S] for j in range(4)]  # padded row 4 cut off
        got = last_rows(rows)
        assert torch.equal(got, torch.stack([r[-1] for r in rows]))
        assert got.untyped_storage().data_ptr() == lg.untyped_storage().data_ptr()
        one = last_rows(rows[2:3])
        assert torch.equal(one, lg[2, -1:]) and one.data_ptr() == lg[2, -1].data_ptr()
    lg = out_BSV[:, :1].contiguous()
    cases = [
        [lg[j, :1] for j in (0, 2, 1)],  # out of order
        [lg[0, :1], lg[2, :1], lg[4, :1], lg[1, :1]],  # one stride apart, then not
        [lg[0, :1], lg[1, :1].clone()],  # another tensor
        [lg[0, :1], out_BSV[3]],  # a chunk's [2, V] rows
        [out_BSV[0, :1], out_BSV[1, :2]],  # one stride apart, but [1, V] then [2, V]
    ]
    for rows in cases:
        got = last_rows(rows)
        assert torch.equal(got, torch.stack([r[-1] for r in rows]))
        assert got.data_ptr() != lg.data_ptr()
