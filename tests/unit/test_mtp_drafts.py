"""Several MTP drafts a step (`num_speculative_tokens` k > 1; speculative.py's module docstring),
on CPU: greedy outputs equal plain decoding; each step's drafts are what the uncached MTP module
drafts when run again on its own hidden rows (so the chain's guessed MTP latents never leak into a
later draft); every step is one main forward, one MTP forward and k - 1 one-position MTP forwards;
acceptance reaches every count 0..k; max_tokens and max_model_len cut the drafts; the chain's
positions sit in the request's own pages, and a request whose pages cannot grow drafts what they
hold; sampled verification over several drafts keeps the target's distribution; steps of several
drafts run ahead under async scheduling (greedy and seeded sampled) with the synchronous steps'
drafts and tokens; the OpenAI server's completions and logprobs are plain greedy decoding's."""

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from test_sampling_http import ids_of, openai_client

from moeray.platform.config import tiny
from moeray.platform.config.graphs import MAX_SPECULATIVE_TOKENS
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams, filtered_probs
from moeray.platform.engine.speculative import verify
from moeray.platform.model.transformer import Transformer
from tests.engine_helpers import drop_even_drafts, run_to_end, trained_on_cycle
from tests.unit.test_spec_overlap import _drafts_by_position

V = 256
CYCLE = 48
PAGE = 4  # small pages: draft chains cross page ends


@pytest.fixture(scope="module")
def trained():
    """tests/engine_helpers.trained_on_cycle (test_spec_overlap.py's): its MTP block drafts the
    cycle, so chains of drafts are accepted where the output follows it."""
    return trained_on_cycle(V, CYCLE)


def _engine(model, k: int, **kw) -> Engine:
    base = dict(page_size=PAGE, num_pages=256, max_num_seqs=8, max_num_batched_tokens=64)
    return Engine(model, EngineConfig(**{**base, **kw}, num_speculative_tokens=k))


MAX_TOKENS = (20, 7, 13, 20, 9)


def _params():
    return [SamplingParams(temperature=0, max_tokens=m) for m in MAX_TOKENS]


@pytest.fixture(scope="module")
def plain(trained):
    model, prompts = trained
    return list(run_to_end(_engine(model, 0), prompts, _params()).values())


@torch.no_grad()
def _uncached_drafts(model, token_ids: list[int], c: int, n: int):
    """The drafts after `token_ids` (the last at position c) and their logits [n, V], computed
    without a cache: the MTP module over positions 0 .. c - 1 on the main model's hidden rows
    and the tokens after them, then again at each next position on its own hidden row before it
    and the draft before."""
    out = model(torch.tensor([token_ids]))
    hidden_1SD = out.hidden[:, :c]
    next_ids = list(token_ids[1 : c + 1])
    drafts: list[int] = []
    rows = []
    for _ in range(n):
        S = hidden_1SD.shape[1]
        h_1SD, logits = model.mtp_step(
            model.mtp[0], hidden_1SD, torch.tensor([next_ids]), torch.arange(S)[None]
        )
        rows.append(logits[0, -1].float())
        drafts.append(int(rows[-1].argmax()))
        hidden_1SD = torch.cat([hidden_1SD, h_1SD[:, -1:]], 1)
        next_ids.append(drafts[-1])
    return drafts, torch.stack(rows)


def _spy(eng: Engine, model, check_chain: bool):
    """Record each step's forwards [(kind, B, S)] and drafts set; with check_chain, compare each
    request's new drafts with `_uncached_drafts` and check its pages hold the chain's
    positions."""
    runner, drafter, log = eng.runner, eng.drafter, []
    fg, execute, propose = runner.forward_group, runner.execute, drafter.propose
    execute_mtp = runner.execute_mtp
    last_logits: dict[str, list[torch.Tensor]] = {}  # a step's MTP logits by request, in order

    def spy_execute_mtp(module, items):
        results = execute_mtp(module, items)
        for (rid, *_rest), (_h, logits_SV) in zip(items, results, strict=True):
            last_logits.setdefault(rid, []).append(logits_SV[-1])
        return results

    def spy_execute(seqs, *a, **kw):
        log.append({"decode": all(s.is_decode for s in seqs), "forwards": [], "drafts": []})
        return execute(seqs, *a, **kw)

    def forward_group(ids_BS, *a, **kw):
        kind = "main" if kw.get("mtp_module") is None else "mtp"
        log[-1]["forwards"].append((kind, *ids_BS.shape))
        return fg(ids_BS, *a, **kw)

    def spy_propose(scheduled, hidden, max_model_len):
        last_logits.clear()
        propose(scheduled, hidden, max_model_len)
        for s in scheduled:
            req = s.request
            if req.status.value != "running" or not req.spec_token_ids:
                continue
            c, n = req.num_computed, len(req.spec_token_ids)
            log[-1]["drafts"].append(n)
            held = len(eng.kv.tables[req.request_id].pages) * PAGE
            assert held >= c + n - 1, (req.request_id, c, n, held)
            if check_chain:  # the drafts, and the logits they came from
                drafts, logits_NV = _uncached_drafts(model, req.token_ids, c, n)
                assert req.spec_token_ids == drafts
                got_NV = torch.stack(last_logits[req.request_id][:n])
                torch.testing.assert_close(got_NV, logits_NV, atol=2e-5, rtol=1e-4)

    runner.execute, runner.forward_group = spy_execute, forward_group
    runner.execute_mtp = spy_execute_mtp
    drafter.propose = spy_propose
    return log


@pytest.mark.parametrize("k", [2, 3])
def test_greedy_equals_plain_and_drafts_are_the_uncached_chain(trained, plain, k):
    model, prompts = trained
    eng = _engine(model, k)
    log = _spy(eng, model, check_chain=True)
    outs = list(run_to_end(eng, prompts, _params()).values())
    assert outs == plain
    st = eng.drafter.stats
    assert st.num_draft_tokens > 0 and 2.0 < st.mean_accepted_length <= 1 + k, st
    counts = [n for e in log for n in e["drafts"]]
    assert max(counts) == k and min(counts) < k  # max_tokens cuts the last drafts
    decodes = [e for e in log if e["decode"]]
    assert len(decodes) >= 3
    for e in decodes:  # one main forward, one MTP forward over the newly valid positions, the chain
        kinds = [f[0] for f in e["forwards"]]
        assert kinds[0] == "main" and kinds.count("main") == 1, e
        if e["drafts"]:
            assert kinds.count("mtp") == max(e["drafts"]), e
            assert all(f[2] == 1 for f in e["forwards"][2:]), e  # one position a row


def test_random_weights_draft_the_uncached_chain(plain):
    """Where the hidden rows and positions matter (random weights; the trained model drafts from
    the last token alone): each step's drafts are still the uncached chain's, and the output is
    plain decoding's."""
    cfg = tiny().replace(num_hidden_layers=2, vocab_size=V, eos_token_id=None)
    model = Transformer(cfg)
    model.reset_parameters(seed=1)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 9, 14)]
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (9, 5, 8)]
    expect = run_to_end(_engine(model, 0), prompts, params)
    eng = _engine(model, 3)
    log = _spy(eng, model, check_chain=True)
    assert run_to_end(eng, prompts, params) == expect
    assert sum(n == 3 for e in log for n in e["drafts"]) >= 6


@pytest.fixture
def mixed_drafts(monkeypatch):
    """About half the drafts rejected (tests/engine_helpers.drop_even_drafts)."""
    drop_even_drafts(monkeypatch)


@pytest.mark.parametrize("k", [2, 4])
def test_every_acceptance_count_keeps_plain_output(trained, plain, mixed_drafts, k):
    model, prompts = trained
    eng = _engine(model, k)
    seen: list[tuple[int, int]] = []
    record = eng.drafter.record

    def spy(num_drafts: int, num_accepted: int) -> None:
        seen.append((num_drafts, num_accepted))
        record(num_drafts, num_accepted)

    eng.drafter.record = spy
    assert list(run_to_end(eng, prompts, _params()).values()) == plain
    accepted = {a for _n, a in seen}
    assert {0, 1, 2} <= accepted and any(n == a == k for n, a in seen[:-1] + seen), seen


def test_max_model_len_cuts_the_drafts(trained):
    model, prompts = trained
    ref = _engine(model, 0, max_model_len=40)
    eng = _engine(model, 3, max_model_len=40)
    params = [SamplingParams(temperature=0, max_tokens=64)] * len(prompts)
    expect = run_to_end(ref, prompts, params)
    got = run_to_end(eng, prompts, params)
    assert list(got.values()) == list(expect.values())
    assert any(r == "length" for _o, r, _s in got.values())


def test_pages_that_cannot_grow_cut_the_chain(trained, plain):
    """No page free for the chain (kv.grow refused only there): each request drafts what its
    held pages allow, at least one, and the output is plain decoding's."""
    model, prompts = trained
    eng = _engine(model, 4)
    log = _spy(eng, model, check_chain=True)
    chain = eng.drafter.draft_chain

    def no_growth(*args, **kw):
        grow = eng.kv.grow
        eng.kv.grow = lambda *a, **k: False
        try:
            return chain(*args, **kw)
        finally:
            eng.kv.grow = grow

    eng.drafter.draft_chain = no_growth
    assert list(run_to_end(eng, prompts, _params()).values()) == plain
    counts = [n for e in log for n in e["drafts"]]
    assert 1 in counts and 4 in counts and set(counts) <= {1, 2, 3, 4}


def test_sampled_verification_over_two_drafts_keeps_the_distribution():
    """verify's rule over drafts [d1, d2]: the first token is d1 with probability p0(d1), the pair
    (d1, d2) comes with p0(d1) p1(d2), and a rejected d1 is replaced from the residual."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 16, generator=g) * 1.5
    p = filtered_probs(logits, [SamplingParams(temperature=1.0)] * 3)
    d1, d2 = int(p[0].argsort()[-2]), int(p[1].argsort()[-3])
    n, rng = 6000, torch.Generator().manual_seed(1)
    firsts, pairs = torch.zeros(16), 0
    for _ in range(n):
        out, _lp = verify(logits, [d1, d2], SamplingParams(temperature=1.0), rng)
        assert 1 <= len(out) <= 3
        firsts[out[0]] += 1
        pairs += out[:2] == [d1, d2]
    for freq, expect in ((firsts / n, p[0]), (pairs / n, p[0, d1] * p[1, d2])):
        tol = 4.5 * (expect * (1 - expect) / n) ** 0.5 + 2e-3
        assert torch.all((freq - expect).abs() <= tol), (freq, expect)


def test_sampled_steps_run_and_repeat_by_seed(trained):
    model, prompts = trained
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=12) for i in range(len(prompts))]
    a = run_to_end(_engine(model, 3), prompts, params)
    b = run_to_end(_engine(model, 3), prompts, params)
    assert list(a.values()) == list(b.values())
    assert all(len(o) == 12 for o, _r, _s in a.values())


def test_config_bounds():
    for bad in (-1, MAX_SPECULATIVE_TOKENS + 1):
        with pytest.raises(ValueError, match=rf"num_speculative_tokens={bad}: accepted 0 .* 4"):
            EngineConfig(num_speculative_tokens=bad)


def _hidden_mixing_model() -> Transformer:
    """Random weights whose MTP block reads the next token's embedding whole and the hidden row
    at half its random weight: drafts follow the main model often enough to be accepted (about
    1 in 6), and hidden rows and positions still change them."""
    cfg = tiny().replace(num_hidden_layers=2, vocab_size=V, eos_token_id=None)
    model = Transformer(cfg)
    model.reset_parameters(seed=1)
    D = cfg.hidden_size
    with torch.no_grad():
        w = model.mtp[0].eh_proj.weight  # [D, 2D] over [enorm(embedding), hnorm(hidden)]
        w[:, :D] = torch.eye(D)
        w[:, D:] *= 0.5
    return model


@pytest.mark.parametrize("k", [2, 3])
def test_async_steps_draft_what_the_synchronous_engine_drafts(k):
    """Under async scheduling (greedy rows run ahead, spec_overlap.py) a step's drafts come from
    the device (spec_step.spec_drafts: the MTP row at s + acc, then its chain): the same drafts at
    every position, the same acceptance and the same outputs as synchronous steps, with accepted
    and rejected drafts, on weights where hidden rows and positions matter."""
    model = _hidden_mixing_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 9, 14, 20)]
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (24, 17, 24, 11)]
    expect = run_to_end(_engine(model, 0), prompts, params)
    runs = {}
    for ahead in (False, True):
        eng = _engine(model, k, async_scheduling=ahead, async_scheduling_spec=ahead)
        drafts = _drafts_by_position(eng)
        assert run_to_end(eng, prompts, params) == expect
        runs[ahead] = (drafts, eng.drafter.stats.as_dict(), eng)
    (sync_drafts, sync_stats, _), (drafts, stats, eng) = runs[False], runs[True]
    assert drafts == sync_drafts and stats == sync_stats
    assert stats["accepted_tokens"] > 5 and max(len(d) for d in drafts.values()) == k
    spec = eng._overlap.spec
    assert spec.overlapped_steps >= 10
    assert spec.launched_steps == spec.overlapped_steps + spec.drained_steps + (
        spec.pending is not None
    )
    # seeded sampled rows run ahead too, with the synchronous steps' tokens
    sampled = [SamplingParams(temperature=0.9, seed=i, max_tokens=12) for i in range(len(prompts))]
    before = spec.overlapped_steps
    want = run_to_end(_engine(model, k), prompts, sampled)
    assert list(run_to_end(eng, prompts, sampled).values()) == list(want.values())
    assert spec.overlapped_steps > before


def test_openai_client_gets_plain_greedy_tokens_and_logprobs(trained, plain):
    """Behind the OpenAI server (the official client over real HTTP): completions of an engine
    drafting 3 a step, sent at once and batched, are plain greedy decoding's, with the logprobs
    plain decoding reports."""
    model, prompts = trained
    eng = _engine(model, 3, use_cuda_graphs=False)
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=2, ignore_eos=True)
    want = _engine(model, 0).generate(prompts, params)
    with openai_client(eng) as client:

        def complete(prompt):
            r = client.completions.create(
                model="tiny",
                prompt=prompt,
                max_tokens=16,
                temperature=0,
                logprobs=2,
                extra_body={"ignore_eos": True},
            )
            return r.choices[0]

        with ThreadPoolExecutor(len(prompts)) as pool:
            got = [j.result(timeout=120) for j in [pool.submit(complete, p) for p in prompts]]
    for choice, ref in zip(got, want, strict=True):
        assert ids_of(choice.text) == ref.output_token_ids
        lps = choice.logprobs.token_logprobs
        assert lps == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-4)
    assert eng.drafter.stats.mean_accepted_length > 2.0


def test_acceptance_by_draft_position_reaches_the_replica_counters(trained, plain):
    """SpecStats counts drafts and acceptances by draft position (a draft counts as accepted
    only after those before it); EngineMetrics adds what is new at each update to the counters
    by position, as Prometheus scrapes them."""
    import prometheus_client as pc

    from moeray.actors.engine_metrics import EngineMetrics
    from moeray.platform.engine.speculative import SpecStats
    from moeray.platform.metrics import Metrics

    st = SpecStats()
    for n, a in ((3, 3), (3, 1), (2, 0), (1, 1)):
        st.record(n, a)
    assert st.drafted_per_position == [4, 3, 2] and st.accepted_per_position == [3, 1, 1]
    assert (st.num_verify_steps, st.num_draft_tokens, st.num_accepted_tokens) == (4, 9, 5)
    with pytest.raises(ValueError, match="3 accepted of 2 drafts"):
        st.record(2, 3)

    model, prompts = trained
    eng = _engine(model, 3)
    loop = SimpleNamespace(engine=eng, num_running=lambda: 0, num_waiting=lambda: 0)
    reg = pc.CollectorRegistry()
    labels = {"deployment": "decode", "replica": "r0"}
    metrics = EngineMetrics(
        "decode",
        loop,
        metrics=Metrics("prometheus", registry=reg, default_labels=labels),
        period_s=3600,
    )
    try:
        for half in (prompts[:2], prompts[2:]):  # two updates: each adds what is new
            run_to_end(eng, half, _params()[: len(half)])
            metrics.update()
    finally:
        metrics.close()
    st = eng.drafter.stats
    assert len(st.drafted_per_position) == 3 and st.accepted_per_position[2] > 0

    def sample(name, j):
        return reg.get_sample_value(f"{name}_total", {"deployment": "decode", "position": str(j)})

    for j in range(3):
        assert sample("moeray_mtp_draft_tokens_per_position", j) == st.drafted_per_position[j]
        assert sample("moeray_mtp_accepted_tokens_per_position", j) == st.accepted_per_position[j]
    total = reg.get_sample_value("moeray_mtp_accepted_tokens_total", {"deployment": "decode"})
    assert total == st.num_accepted_tokens == sum(st.accepted_per_position)


def test_a_step_launched_for_rows_that_end_is_drained_by_the_next_run():
    """With K = 2 a step in flight can accept drafts past a row's max_tokens, after the next step
    was launched for that row: when it was the last row, that step stays in flight with nothing
    left to run (counted in launched_steps, as a whole-step graph replays it on a GPU). The next
    run's first step drains it, and its tokens equal the synchronous engine's."""
    model = _hidden_mixing_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 9, 14, 20)]
    short = [SamplingParams(temperature=0, max_tokens=5) for _ in prompts]
    longer = [SamplingParams(temperature=0, max_tokens=m) for m in (24, 17, 24, 11)]
    sync = _engine(model, 2)
    eng = _engine(model, 2, async_scheduling=True, async_scheduling_spec=True)
    spec = eng._overlap.spec
    assert run_to_end(eng, prompts, short) == run_to_end(sync, prompts, short)
    assert spec.pending is not None and not eng.has_unfinished()
    assert spec.launched_steps == spec.overlapped_steps + spec.drained_steps + 1
    drained = spec.drained_steps
    want = list(run_to_end(sync, prompts, longer).values())
    assert list(run_to_end(eng, prompts, longer).values()) == want
    assert spec.drained_steps > drained and spec.pending is None
    assert spec.launched_steps == spec.overlapped_steps + spec.drained_steps
