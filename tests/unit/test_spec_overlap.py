"""Speculative steps under async scheduling (engine/spec_overlap.py,
`EngineConfig.async_scheduling_spec`) on CPU: the same outputs as plain greedy decoding and as
the synchronous MTP engine, the same drafts at the same positions and the same acceptance counts,
with steps launched one ahead (counted) through accepted and rejected drafts, ends found at resolve
(EOS, stop ids), ends by length (max_tokens, max_model_len), arrivals (a drain, then ahead again)
and aborts; what does not run ahead runs as before."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from moeray.platform.config import ServeConfig
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams, filtered_probs, sample_from_probs
from moeray.platform.engine.scheduler import Scheduler
from moeray.platform.engine.spec_overlap import SpecOverlap
from moeray.platform.engine.spec_step import (
    greedy_verdict,
    sampled_verdict,
    spec_drafts,
    spec_graph_kind,
    spec_graph_rows,
    spec_step_outputs,
)
from moeray.platform.engine.speculative import verify
from moeray.platform.serve.worker import engine_config
from tests.engine_helpers import drop_even_drafts, run_to_end, trained_on_cycle

V = 256
CYCLE = 48


@pytest.fixture(scope="module")
def trained():
    """tests/engine_helpers.trained_on_cycle: drafts accepted on the cycle, rejected off it."""
    return trained_on_cycle(V, CYCLE)


@pytest.fixture
def mixed_drafts(monkeypatch):
    """About half the drafts rejected (tests/engine_helpers.drop_even_drafts)."""
    drop_even_drafts(monkeypatch)


def _engine(model, *, spec: int = 1, ahead: bool = True, **kw) -> Engine:
    base = dict(page_size=16, num_pages=64, max_num_seqs=8, max_num_batched_tokens=64)
    ahead_kw = dict(async_scheduling=ahead, async_scheduling_spec=ahead)
    return Engine(model, EngineConfig(**{**base, **ahead_kw, **kw}, num_speculative_tokens=spec))


def _run(eng: Engine, prompts, params) -> list[tuple[list[int], str | None, object]]:
    """Every request to its end: (output ids, finish reason, stop reason), in prompt order."""
    return list(run_to_end(eng, prompts, params).values())


def _ahead(eng: Engine) -> int:
    assert eng._overlap is not None and eng._overlap.spec is not None
    return eng._overlap.spec.overlapped_steps


def _drafts_by_position(eng: Engine) -> dict[tuple[str, int], tuple[int, ...]]:
    """Every draft the engine's steps verify, by (request id, the step's start), through the
    scheduler's update (which both paths call with the step as scheduled)."""
    seen: dict[tuple[str, int], tuple[int, ...]] = {}
    update = eng.scheduler.update

    def spy(output, sampled, logprobs=None):
        for s in output.scheduled:
            if s.spec_token_ids:
                seen[(s.request.request_id, s.start)] = s.spec_token_ids
        return update(output, sampled, logprobs)

    eng.scheduler.update = spy  # type: ignore[method-assign]
    return seen


def _inputs_check(eng: Engine):
    """Record each step the overlap launches (row request ids, device ids and starts read back here)
    and each step it resolves as scheduled; the returned function asserts that every launched row
    ran on its resolved step's inputs (start, [last token, drafts]): those the synchronous engine
    would have given it (a row resolved with fewer drafts, its room cut them, ran on those first),
    in pages of its own. (The trained model predicts from the last token alone, so wrong positions
    would not change its outputs: this checks them directly.)"""
    spec = eng._overlap.spec
    launched: list[tuple[str, int, tuple[int, ...]]] = []
    resolved: dict[tuple[str, int], tuple[int, ...]] = {}
    launch, update = spec._launch, eng.scheduler.update

    def spy_launch(rows, ids_BJ, starts_B, farthest):
        for r, ids, start in zip(rows, ids_BJ.tolist(), starts_B.tolist(), strict=True):
            launched.append((r.request_id, start, tuple(ids)))
            # its pages hold the step's positions and its chain's: start .. start + 2K - 1
            held = len(eng.kv.tables[r.request_id].pages) * eng.kv.page_size
            assert held >= start + 2 * spec.k, (r.request_id, start, held)
        return launch(rows, ids_BJ, starts_B, farthest)

    def spy_update(output, sampled, logprobs=None):
        resolved.update({(s.request.request_id, s.start): s.input_ids for s in output.scheduled})
        return update(output, sampled, logprobs)

    spec._launch = spy_launch
    eng.scheduler.update = spy_update  # type: ignore[method-assign]

    def check() -> int:
        """-> rows launched. A row never resolved must be its request's last (dropped: the
        request ended at the resolve of the step before it)."""
        last = {rid: (rid, start, ids) for rid, start, ids in launched}
        missing = []
        for rid, start, ids in launched:
            got = resolved.get((rid, start))
            if got is None or ids[: len(got)] != got:
                missing.append((rid, start, ids))
        assert all(row == last[row[0]] for row in missing), missing[:4]
        return len(launched)

    return check


def test_verdict_drafts_and_next_inputs_of_a_step():
    """K = 3 drafts: the verdict accepts the leading drafts equal to the target before each;
    the first next draft is the MTP argmax at s + acc, the others the MTP depth again one
    position at a time from s + acc + 1, each on its own last hidden row and the draft before;
    the next inputs are [target acc, the drafts] from s + 1 + acc."""
    ids = torch.tensor([[5, 7, 8, 9], [5, 7, 0, 9], [1, 2, 3, 4]])
    targets = torch.tensor([[7, 8, 9, 6], [7, 8, 9, 6], [3, 4, 5, 6]])
    acc, toks, plain = greedy_verdict(ids, targets)
    assert acc.tolist() == [[3], [1], [0]] and plain.tolist() == [7, 7, 3]
    starts, V, D = torch.tensor([10, 20, 30]), 200, 2
    calls = []

    def mtp_forward(ids_BS, at_B, h_BSD):
        """The argmax at each row's position p is 100 + p; the hidden row out is h + 1000."""
        calls.append((ids_BS.clone(), at_B.clone(), h_BSD.clone()))
        B, S = ids_BS.shape
        pos_BS = at_B[:, None] + torch.arange(S)
        logits = torch.zeros(B, S, V).scatter(-1, (100 + pos_BS)[..., None], 1.0)
        return logits, h_BSD + 1000

    hidden = torch.arange(4.0)[None, :, None].expand(3, 4, D)  # row j of each: j
    drafts = spec_drafts(mtp_forward, toks, hidden, starts, acc, 3)
    at = starts + acc[:, 0]  # the last newly valid position
    assert drafts.tolist() == [[100 + p, 101 + p, 102 + p] for p in at.tolist()]
    (ids0, at0, _h0), (ids1, at1, h1), (ids2, at2, h2) = calls
    assert torch.equal(ids0, toks) and torch.equal(at0, starts)
    assert at1.tolist() == (at + 1).tolist() and at2.tolist() == (at + 2).tolist()
    assert (
        ids1[:, 0].tolist() == drafts[:, 0].tolist()
        and ids2[:, 0].tolist() == drafts[:, 1].tolist()
    )
    assert h1[:, 0, 0].tolist() == (acc[:, 0] + 1000.0).tolist()  # the MTP row at s + acc
    assert h2[:, 0, 0].tolist() == (acc[:, 0] + 2000.0).tolist()
    nxt, next_starts = spec_step_outputs(starts, acc, toks, drafts)
    assert nxt[:, 0].tolist() == [6, 8, 3] and torch.equal(nxt[:, 1:], drafts)
    assert next_starts.tolist() == [14, 22, 31]


def test_spec_graph_kind_by_the_rows_settings():
    """Which whole-step graph a batch replays: greedy batches "spec"; sampled rows with
    temperature (and top-p: "spec_top_p") "spec_sampled", greedy rows among them read as
    one-hots whatever their own settings; min-p or top-k in a sampled row: none (their filters'
    shapes are chosen on the host). The settings a sampled graph reads, a row each."""
    g, t = SamplingParams(temperature=0), SamplingParams(temperature=0.8)
    tp, V = SamplingParams(temperature=0.8, top_p=0.9), 100
    assert spec_graph_kind([g, g], V) == "spec"
    assert spec_graph_kind([g, t], V) == "spec_sampled"
    assert spec_graph_kind([t, tp, g], V) == "spec_top_p"
    assert spec_graph_kind([SamplingParams(temperature=0, top_p=0.5), t], V) == "spec_sampled"
    assert spec_graph_kind([t, SamplingParams(temperature=1.0, top_k=5)], V) is None
    assert spec_graph_kind([t, SamplingParams(temperature=1.0, top_k=V)], V) == "spec_sampled"
    assert spec_graph_kind([SamplingParams(temperature=1.0, min_p=0.1)], V) is None
    rows = spec_graph_rows([g, tp], [(0.5, 0.5), (0.25, 0.75)])
    assert rows == [[1.0, 1.0, 1.0, 0.5, 0.5], [0.8, 0.9, 0.0, 0.25, 0.75]]


@pytest.mark.parametrize("k", [1, 3])
def test_sampled_verdict_is_what_verify_draws(k):
    """Row by row, `sampled_verdict` emits what `speculative.verify` emits from the same logits,
    params and generator state over k drafts (the tokens toks[: acc + 1]), plain is the plain
    sampler's token at the first uniform, and it draws what verify draws (k verdicts, then the
    token's, whatever the verdicts): the generators end in the same state. Rows at several
    temperatures, top-k/top-p/min-p, drafts on each row's argmax (mostly accepted) and off it
    (mostly rejected), drafts holding all the mass (kept), and greedy rows."""
    V, J, g = 64, k + 1, torch.Generator().manual_seed(1)
    sets = [(1.0, 0, 1.0, 0.0), (0.7, 8, 1.0, 0.0), (1.3, 0, 0.8, 0.0)]
    sets += [(1.0, 0, 1.0, 0.1), (0.5, 5, 0.9, 0.0), (1.0, 1, 1.0, 0.0)]
    params = [
        SamplingParams(temperature=t, top_k=tk, top_p=tp, min_p=mp) for t, tk, tp, mp in sets
    ] * 40 + [SamplingParams(temperature=0)] * 8
    B = len(params)
    logits = torch.randn(B, J, V, generator=g) * 3
    last = torch.randint(0, V, (B, 1), generator=g)
    on_argmax = logits[:, :k].argmax(-1)
    off = torch.randint(0, V, (B, k), generator=g)
    on = (torch.arange(B) // 6 % 2 == 0)[:, None]  # every param set both ways
    drafts = torch.where(on, on_argmax, off)
    ids = torch.cat([last, drafts], 1)
    want_toks, want_plain, want_state = [], [], []
    for b, p in enumerate(params):
        gen = torch.Generator().manual_seed(b)
        toks, _ = verify(logits[b], drafts[b].tolist(), p, gen, num_verdicts=k)
        want_toks.append(toks)
        want_state.append(gen.get_state())
        gen = torch.Generator().manual_seed(b)
        u0 = torch.rand((1,), generator=gen)
        want_plain.append(int(sample_from_probs(filtered_probs(logits[b, :1], [p]), u0)[0]))
    gens = [torch.Generator().manual_seed(b) for b in range(B)]
    rows = [SimpleNamespace(params=p, generator=gen) for p, gen in zip(params, gens, strict=True)]
    u = torch.tensor(SpecOverlap._uniforms(SimpleNamespace(k=k), rows))
    probs = filtered_probs(logits.reshape(J * B, V), [p for p in params for _ in range(J)])
    acc, toks, plain = sampled_verdict(ids, probs.view(B, J, V), u)
    got = [t[: a + 1] for t, a in zip(toks.tolist(), acc[:, 0].tolist(), strict=True)]
    assert got == want_toks
    assert plain.tolist() == want_plain
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    assert all(torch.equal(gens[b].get_state(), want_state[b]) for b in range(B))
    n_acc = sum(acc[b, 0].item() > 0 for b in sampled)
    assert 0.2 * len(sampled) < n_acc < 0.8 * len(sampled), n_acc  # both verdicts exercised
    assert {int(a) for a in acc[sampled, 0]} == set(range(k + 1))  # every count of accepted
    # top_k=1 rows hold all of each p_j on its argmax: drafts there are kept whatever u
    kept = [b for b in range(5, 240, 6) if b // 6 % 2 == 0]
    assert len(kept) == 20 and all(acc[b, 0] == k for b in kept)
    # a room of r < k drafts a row: what verify emits over the first r drafts, with the same
    # draws (k verdicts, then the token's); r = 0 rows emit `plain` (the sampler's one draw)
    room = torch.arange(B)[:, None] % (k + 1)
    gens = [torch.Generator().manual_seed(b) for b in range(B)]
    rows = [SimpleNamespace(params=p, generator=gen) for p, gen in zip(params, gens, strict=True)]
    u = torch.tensor(SpecOverlap._uniforms(SimpleNamespace(k=k), rows))
    acc, toks, plain = sampled_verdict(ids, probs.view(B, J, V), u, room)
    for b, p in enumerate(params):
        r = int(room[b, 0])
        if r == 0:
            assert int(plain[b]) == want_plain[b]
            continue
        gen = torch.Generator().manual_seed(b)
        want, _ = verify(logits[b, : r + 1], drafts[b, :r].tolist(), p, gen, num_verdicts=k)
        assert toks[b, : int(acc[b, 0]) + 1].tolist() == want, (b, r)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_outputs_drafts_and_acceptance_equal_the_synchronous_engine(trained, mixed_drafts, k):
    """K drafts a step (greedy): the same outputs, the same drafts verified at the same
    positions (rows near max_tokens with fewer, as the synchronous engine cuts them) and the
    same acceptance counts as the synchronous engine's, steps launched ahead."""
    model, prompts = trained
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 19, 1, 30, 24)
    ]
    plain = _run(_engine(model, spec=0, ahead=False), prompts, params)
    sync = _engine(model, spec=k, ahead=False)
    sync_drafts = _drafts_by_position(sync)
    assert _run(sync, prompts, params) == plain
    eng = _engine(model, spec=k)
    drafts = _drafts_by_position(eng)
    check = _inputs_check(eng)
    assert _run(eng, prompts, params) == plain
    assert check() >= 30 // k
    assert [len(o[0]) for o in plain] == [3, 19, 1, 30, 24]
    assert drafts == sync_drafts  # the same drafts at every position the engines verified
    assert max(len(d) for d in drafts.values()) == k
    st, st_sync = eng.drafter.stats, sync.drafter.stats
    assert (st.num_draft_tokens, st.num_accepted_tokens) == (
        st_sync.num_draft_tokens,
        st_sync.num_accepted_tokens,
    )
    assert 0 < st.num_accepted_tokens < st.num_draft_tokens, st  # both verdicts ran ahead
    assert _ahead(eng) >= 15 // k
    assert eng.kv.pool.num_available == eng.kv.num_pages  # every page back


@pytest.mark.parametrize("k", [1, 3])
def test_ends_found_at_resolve_and_by_length(trained, mixed_drafts, k):
    """EOS and a stop id end requests on a token only the read-back shows (the step in flight
    for them is dropped); max_tokens and max_model_len end others at different steps."""
    model, prompts = trained
    free = _run(
        _engine(model, spec=0, ahead=False),
        prompts,
        [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)] * len(prompts),
    )
    eos = free[1][0][6]  # a token request 1 emits mid-run (first at its 7th token or earlier)
    stop = next(t for t in free[3][0][4:] if t != eos)
    params = [
        SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=14),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=14, stop_token_ids=[stop], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    ]
    kw = dict(eos_token_ids=(eos,), max_model_len=48)
    want = _run(_engine(model, spec=0, ahead=False, **kw), prompts, params)
    assert _run(_engine(model, spec=k, ahead=False, **kw), prompts, params) == want
    eng = _engine(model, spec=k, **kw)
    check = _inputs_check(eng)
    assert _run(eng, prompts, params) == want
    assert check() >= 20 // k
    reasons = [(r, s) for _o, r, s in want]
    assert reasons[1] == ("stop", eos) and reasons[3] == ("stop", stop), reasons
    assert reasons[4] == ("length", None) and len(want[4][0]) == 48 - len(prompts[4])
    assert _ahead(eng) >= 8 // k
    assert eng.kv.pool.num_available == eng.kv.num_pages


def test_arrivals_drain_then_run_ahead_again_and_aborts_stop(trained, mixed_drafts):
    model, prompts = trained
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    results = {}
    for ahead in (False, True):
        eng = _engine(model, ahead=ahead)
        a = eng.add_request(prompts[0], params)
        b = eng.add_request(prompts[1], params)
        final: dict[str, list[int]] = {}
        emitted: dict[str, int] = {}

        def step(eng=eng, final=final, emitted=emitted):
            for o in eng.step():
                emitted[o.request_id] = emitted.get(o.request_id, 0) + len(o.new_token_ids)
                if o.finished:
                    final[o.request_id] = o.output_token_ids

        for _ in range(4):
            step()
        before = _ahead(eng) if ahead else 0
        c = eng.add_request(prompts[4], params)
        eng.abort(b)
        for _ in range(3):  # admitted at once: the step in flight drains, the prefill runs
            step()
        assert emitted.get(c, 0) >= 1
        while eng.has_unfinished():
            step()
        assert set(final) == {a, c} and all(len(v) == 16 for v in final.values())
        results[ahead] = (final[a], final[c])
        if ahead:
            assert before >= 2 and _ahead(eng) >= before + 4  # ahead again after the prefill
            assert eng._overlap.spec.drained_steps >= 2
        assert eng.kv.pool.num_available == eng.kv.num_pages
    assert results[True] == results[False]


@pytest.mark.parametrize("k", [1, 3])
def test_sampled_outputs_equal_the_synchronous_engine(trained, mixed_drafts, k):
    """Seeded sampled requests (top-k, top-p, min-p; one greedy among them) run ahead and emit
    the synchronous MTP engine's tokens, k drafts a step: the verdict drawn on the device from
    the same uniforms in the same order; rows whose last step has no room for a draft emit the
    plain sample (k = 1), or the overlap drains first (k > 1: module docstring)."""
    model, prompts = trained
    params = [
        SamplingParams(temperature=2.5, max_tokens=21, ignore_eos=True, seed=11),
        SamplingParams(temperature=3.0, top_k=6, max_tokens=30, ignore_eos=True, seed=12),
        SamplingParams(temperature=0, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=2.0, top_p=0.95, max_tokens=26, ignore_eos=True, seed=13),
        SamplingParams(temperature=3.0, min_p=0.01, max_tokens=40, ignore_eos=True, seed=14),
    ]
    kw = dict(max_model_len=48)
    sync = _engine(model, spec=k, ahead=False, **kw)
    sync_drafts = _drafts_by_position(sync)
    want = _run(sync, prompts, params)
    eng = _engine(model, spec=k, **kw)
    drafts = _drafts_by_position(eng)
    check = _inputs_check(eng)
    assert _run(eng, prompts, params) == want
    assert drafts == sync_drafts
    assert check() >= 30 // k and _ahead(eng) >= 20 // k
    assert want[4][1] == "length" and len(want[4][0]) == 48 - len(prompts[4])
    st, st_sync = eng.drafter.stats, sync.drafter.stats
    assert (st.num_draft_tokens, st.num_accepted_tokens) == (
        st_sync.num_draft_tokens,
        st_sync.num_accepted_tokens,
    )
    assert 0 < st.num_accepted_tokens < st.num_draft_tokens, st
    # the draws matter: other seeds give other outputs
    other = [p if p.greedy else dataclasses.replace(p, seed=p.seed + 100) for p in params]
    assert _run(_engine(model, spec=k, **kw), prompts, other) != want
    assert eng.kv.pool.num_available == eng.kv.num_pages


def test_what_does_not_run_ahead(trained):
    """On by default (off: no speculative overlap); logprobs requests, and sampled ones without
    async_scheduling_sampled, keep the synchronous MTP step; the serve config carries the switch
    to the engine's config."""
    model, prompts = trained
    assert EngineConfig().async_scheduling_spec is True
    assert ServeConfig().async_scheduling_spec is True
    for spec in (True, False):
        eng = _engine(model, async_scheduling_spec=spec)
        assert eng._overlap is not None and (eng._overlap.spec is not None) is spec
    for params, kw in (
        (SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1), {}),
        (
            SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True, seed=3),
            dict(async_scheduling_sampled=False),
        ),
    ):
        eng = _engine(model, **kw)
        got = _run(eng, prompts[:2], [params] * 2)
        assert got == _run(_engine(model, ahead=False), prompts[:2], [params] * 2)
        assert _ahead(eng) == 0 and eng._overlap.spec.pending is None
    for value in (True, False):
        cfg = ServeConfig(async_scheduling_spec=value)
        assert engine_config(cfg, "cuda").async_scheduling_spec is value


def test_resolve_applies_the_step_through_the_scheduler_update(trained, monkeypatch):
    """The overlap verifies and updates through `Scheduler.update` (the synchronous engine's
    stop checks and KV commits), one step after the launch: a step's outputs come one call
    late."""
    model, prompts = trained
    calls = []
    real = Scheduler.update
    monkeypatch.setattr(
        Scheduler, "update", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw)
    )
    eng = _engine(model)
    eng.add_request(prompts[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert eng.step()  # the prefill (synchronous): its first token
    assert eng.step() == [] and eng._overlap.spec.pending is not None  # launched, not read
    n = len(calls)
    outs = eng.step()  # the next launched, the first resolved
    assert len(calls) == n + 1 and len(outs) == 1 and 1 <= len(outs[0].new_token_ids) <= 2


def test_sampled_rows_near_their_end_are_cut_on_the_device(trained):
    """k = 3, sampled at temperature ~1 (drafts often accepted), requests ending at
    different lengths: a row whose step has room for r < 3 drafts gets the synchronous step's
    verdict over r drafts from the device (the token after draft r sampled from p_r, not draft
    r + 1 judged), every token the synchronous engine's, steps run ahead to the ends."""
    model, prompts = trained
    params = [
        SamplingParams(temperature=t, max_tokens=n, ignore_eos=True, seed=20 + i)
        for i, (t, n) in enumerate(((0.9, 13), (1.0, 17), (1.1, 22), (1.0, 9), (0.9, 26)))
    ]
    for rep in range(4):  # ends at other places: 20 ends in all
        params = [dataclasses.replace(p, seed=p.seed + 10 * rep) for p in params]
        want = _run(_engine(model, spec=3, ahead=False), prompts, params)
        eng = _engine(model, spec=3)
        assert _run(eng, prompts, params) == want, rep
        assert _ahead(eng) >= 4
        st = eng.drafter.stats
        assert st.num_accepted_tokens > 0.3 * st.num_draft_tokens, st.as_dict()
