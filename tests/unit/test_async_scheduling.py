"""Async scheduling (engine/overlap.py, `EngineConfig.async_scheduling`) on CPU: the same outputs
as the synchronous engine, token for token and finish reason for finish reason, with greedy
decodes launched one step ahead (counted), through known ends (max_tokens), ends found only at
resolve (EOS, a stop id: the step in flight for that request is dropped), requests arriving and
aborted mid-decode, and steps that cannot overlap (logprobs, sampling) running as before; the
scheduler's advance/resolve and the runner's device ids refuse what they do not take."""

import pytest
import torch

from moeray.platform.config import ServeConfig, tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.overlap import DecodeOverlap
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.engine.scheduler import PENDING
from moeray.platform.model.transformer import Transformer
from moeray.platform.serve.worker import engine_config
from tests.engine_helpers import prefill_exports, run_to_end

V = 256


@pytest.fixture(scope="module")
def model():
    cfg = tiny().replace(num_hidden_layers=2, vocab_size=V, eos_token_id=None)
    m = Transformer(cfg)
    m.reset_parameters(seed=3)
    return m


def _engine(model, async_scheduling: bool, **kw) -> Engine:
    base = dict(page_size=16, num_pages=64, max_num_seqs=8, max_num_batched_tokens=64)
    return Engine(model, EngineConfig(**{**base, **kw}, async_scheduling=async_scheduling))


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (5 + 7 * i,), generator=g).tolist() for i in range(n)]


_run = run_to_end


def _overlapped(eng: Engine) -> int:
    assert eng._overlap is not None
    return eng._overlap.overlapped_steps


def test_default_is_on_for_cuda_engines_only(model):
    """None (the default) resolves by device: off on CPU, where the forward runs on the host; the
    serve config carries the choice through to the engine's config."""
    base = dict(page_size=16, num_pages=64, max_num_seqs=8, max_num_batched_tokens=64)
    assert EngineConfig().async_scheduling is None
    assert Engine(model, EngineConfig(**base)).async_scheduling is False
    assert Engine(model, EngineConfig(**base, async_scheduling=True)).async_scheduling is True
    for value in (None, True, False):
        cfg = ServeConfig(async_scheduling=value)
        assert engine_config(cfg, "cuda").async_scheduling is value
    for value in (True, False):
        cfg = ServeConfig(async_scheduling_sampled=value, async_scheduling_prefill=value)
        assert engine_config(cfg, "cuda").async_scheduling_sampled is value
        assert engine_config(cfg, "cuda").async_scheduling_prefill is value


def test_greedy_outputs_equal_the_synchronous_engine(model):
    prompts = _prompts(4)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 9, 1, 14)]
    want = _run(_engine(model, False), prompts, params)
    eng = _engine(model, True)
    got = _run(eng, prompts, params)
    assert got == want
    assert [len(v[0]) for v in got.values()] == [3, 9, 1, 14]
    assert _overlapped(eng) >= 8  # the 14-token request decodes one step ahead most of the way
    assert eng.kv.pool.num_available == eng.kv.num_pages  # every page back


def test_ends_found_at_resolve_drop_the_step_in_flight(model):
    """EOS (engine-wide) and a per-request stop id end requests on a token only the read-back
    shows; the decode already launched for them adds nothing."""
    prompts = _prompts(3, seed=1)
    free = _run(
        _engine(model, False),
        prompts,
        [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 3,
    )
    outs = list(free.values())
    # the 6th token of request 0 as EOS, the 4th of request 1 as its stop id (first occurrences)
    eos = outs[0][0][5] if outs[0][0][5] not in outs[0][0][:5] else outs[0][0][0]
    stop = next(t for i, t in enumerate(outs[1][0][1:], 1) if t not in outs[1][0][:i] and t != eos)
    params = [
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    ]
    want = _run(_engine(model, False, eos_token_ids=(eos,)), prompts, params)
    eng = _engine(model, True, eos_token_ids=(eos,))
    got = _run(eng, prompts, params)
    assert got == want
    assert want[next(iter(want))][1] == "stop"  # the EOS ended request 0 early
    assert any(reason == "stop" and sr == stop for _, reason, sr in want.values())
    assert _overlapped(eng) > 0
    assert eng.kv.pool.num_available == eng.kv.num_pages


def test_arrivals_and_aborts_mid_decode(model):
    """Without async_scheduling_prefill, a request added while a step is in flight drains the
    overlap (its prefill runs as before); an aborted one stops producing; the rest end as in the
    synchronous engine."""
    prompts = _prompts(3, seed=2)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    results = {}
    for async_on in (False, True):
        eng = _engine(model, async_on, async_scheduling_prefill=False)
        a = eng.add_request(prompts[0], params)
        b = eng.add_request(prompts[1], params)
        seen: dict[str, list[int]] = {a: [], b: []}
        final = {}
        for _ in range(4):
            for o in eng.step():
                seen.setdefault(o.request_id, []).extend(o.new_token_ids)
        c = eng.add_request(prompts[2], params)
        eng.abort(b)
        while eng.has_unfinished():
            for o in eng.step():
                seen.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finished:
                    final[o.request_id] = o.output_token_ids
        assert set(final) == {a, c} and all(len(v) == 10 for v in final.values())
        results[async_on] = (final[a], final[c], len(seen[b]))
        if async_on:
            assert _overlapped(eng) > 0
        assert eng.kv.pool.num_available == eng.kv.num_pages
    # b's outputs before the abort lag one step under async scheduling: compare a and c only
    assert results[True][:2] == results[False][:2]
    assert results[True][2] <= results[False][2]


def test_steps_that_cannot_overlap_run_synchronously(model):
    """Logprobs, and sampling with async_scheduling_sampled=False, keep the synchronous step."""
    prompts = _prompts(2, seed=4)
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True, seed=7),
    ]
    eng = _engine(model, True, async_scheduling_sampled=False)
    got = _run(eng, prompts, params)
    assert got == _run(_engine(model, False), prompts, params)
    assert _overlapped(eng) == 0
    eng = _engine(model, True, async_scheduling_sampled=False)
    assert _run(eng, prompts[1:], params[1:]) == _run(
        _engine(model, False), prompts[1:], params[1:]
    )
    assert _overlapped(eng) == 0


def test_sampled_requests_overlap_with_the_same_tokens(model):
    """With async_scheduling_sampled (the default), seeded sampled requests (temperature, top-k,
    top-p, min-p, mixed with greedy ones) run ahead and draw exactly the synchronous engine's
    tokens: one uniform per token from each request's own generator, drawn at launch; ends found
    at resolve (stop ids) drop the step in flight as for greedy requests."""
    prompts = _prompts(5, seed=9)
    params = [
        SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, seed=1),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_tokens=9, ignore_eos=True, seed=2),
        SamplingParams(temperature=0, max_tokens=11, ignore_eos=True),
        SamplingParams(temperature=1.3, min_p=0.05, max_tokens=12, ignore_eos=True, seed=3),
        SamplingParams(temperature=1.0, max_tokens=12, seed=4, stop_token_ids=list(range(0, V, 3))),
    ]
    want = _run(_engine(model, False), prompts, params)
    eng = _engine(model, True)
    assert _run(eng, prompts, params) == want
    assert _overlapped(eng) > 0
    assert want[list(want)[4]][1] == "stop"  # the stop-id request ended on a sampled stop id


def test_advance_resolve_and_device_ids_refuse_what_they_do_not_take(model):
    eng = _engine(model, False)
    eng.add_request(_prompts(1)[0], SamplingParams(temperature=0, max_tokens=4))
    out = eng.scheduler.schedule()  # a prefill
    eng._step_scheduled(out)
    out = eng.scheduler.schedule()  # now a decode
    with pytest.raises(ValueError, match="no pending token"):
        eng.scheduler.resolve(out, {out.scheduled[0].request.request_id: 5})
    eng.scheduler.advance(out)
    req = out.scheduled[0].request
    assert req.token_ids[-1] == PENDING and req.num_computed == len(req.token_ids) - 1
    ahead = eng.scheduler.schedule()  # the decode of the pending id: one device id a sequence
    with pytest.raises(ValueError, match="ids_on_device"):
        eng.runner.execute(ahead.scheduled, ids_on_device=torch.zeros(2, dtype=torch.long))


def test_prefix_cache_pages_committed_with_the_real_ids(model):
    """Pages filled by overlapped decodes are registered under their real ids (resolve commits
    them, not `advance`): a later prompt that repeats a finished request's prompt and output hits
    them, and decodes as in the synchronous engine."""
    prompt = _prompts(1, seed=5)[0] + list(range(40))
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    results = {}
    for async_on in (False, True):
        eng = _engine(model, async_on)
        (first,) = _run(eng, [prompt], [params]).values()
        again = prompt + first[0][:24]
        before = eng.kv.prefix_hits
        (second,) = _run(eng, [again], [params]).values()
        results[async_on] = (first, second, eng.kv.prefix_hits - before)
    assert results[True] == results[False]
    assert results[True][2] >= 64  # the decoded tokens' full pages were hit, not only the prompt's


def test_known_ends_at_different_steps_keep_overlapping(model):
    """Requests ending by max_tokens (and one by max_model_len) at different steps: each is left
    out of the step after its last token's launch while the others go on one step ahead, so
    the overlap drains once, when the last one ends; outputs as the synchronous engine's."""
    prompts = [p[:5] for p in _prompts(5, seed=5)]
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (4, 7, 9, 12, 40)
    ]
    rows = {}

    def counted(eng: Engine) -> Engine:
        """Count the decode rows every schedule of `eng` runs, into rows[eng]."""
        schedule = eng.scheduler.schedule
        rows[eng] = 0

        def run():
            out = schedule()
            rows[eng] += sum(s.is_decode for s in out.scheduled)
            return out

        eng.scheduler.schedule = run
        return eng

    sync = counted(_engine(model, False, max_model_len=20))
    want = _run(sync, prompts, params)
    eng = counted(_engine(model, True, max_model_len=20))
    assert eng._overlap is not None
    drains = []
    drain = eng._overlap._drain
    eng._overlap._drain = lambda: drains.append(1) or drain()
    got = _run(eng, prompts, params)
    assert got == want
    assert rows[eng] == rows[sync]  # no decode launched past a request's end
    assert [len(v[0]) for v in got.values()] == [4, 7, 9, 12, 15]  # the last: 5 + 15 = 20
    assert got[next(reversed(got))][1] == "length"
    assert len(drains) == 1 == eng.metrics()["async_drains"]
    assert _overlapped(eng) >= 13
    assert eng.kv.pool.num_available == eng.kv.num_pages


def test_prefilled_arrivals_join_without_draining(model):
    """The decode side of prefill/decode disaggregation: requests added with their prompt KV from
    a prefill engine while a step is in flight join the next step (their first token uploaded
    beside the gathered ids) instead of draining the overlap; every output equals one
    synchronous engine doing prefill and decode."""
    prompts = _prompts(3, seed=6)
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    want = _run(_engine(model, False), prompts, [params] * 3)
    exported = prefill_exports(_engine(model, False), prompts[1:])
    eng = _engine(model, True)
    assert eng._overlap is not None
    drains = []
    drain = eng._overlap._drain
    eng._overlap._drain = lambda: drains.append(1) or drain()
    a = eng.add_request(prompts[0], params)
    got: dict[str, list[int]] = {a: []}
    final = {}

    def step():
        for o in eng.step():
            got[o.request_id] += o.new_token_ids
            if o.finished:
                final[o.request_id] = o.output_token_ids

    for _ in range(3):
        step()
    joined = []
    for p, out in zip(prompts[1:], exported, strict=True):
        first = out.output_token_ids[0]
        o = eng.add_prefilled_request(p, first, out.kv_export, params)
        assert o is not None and o.new_token_ids == [first]
        joined.append(o.request_id)
        got[o.request_id] = [first]
        step()
    while eng.has_unfinished():
        step()
    assert [final[r] for r in (a, *joined)] == [v[0] for v in want.values()]
    assert [got[r] for r in (a, *joined)] == [v[0] for v in want.values()]
    assert len(drains) == 1  # the last step's: every request ends there
    assert eng.kv.pool.num_available == eng.kv.num_pages


def test_steady_batch_feeds_its_ids_without_a_gather(model, monkeypatch):
    """A step launched while the previous one is in flight takes that step's sampled ids as
    they are when every row sits where it sat (no index upload, no gather); when rows move (a
    request ended, one arrived) it gathers them. Outputs equal the synchronous engine's."""
    prompts = _prompts(3)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 12, 12)]
    want = _run(_engine(model, False), prompts, params)
    kinds: list[str] = []
    real = DecodeOverlap._next_ids

    def spy(self, prev, out):
        ids = real(self, prev, out)
        if ids is not None:
            kinds.append("as is" if ids is prev.tokens_B else "gathered")
        return ids

    monkeypatch.setattr(DecodeOverlap, "_next_ids", spy)
    eng = _engine(model, True)
    assert _run(eng, prompts, params) == want
    assert kinds.count("as is") >= 6, kinds  # the three decoding together, then the two
    assert "gathered" in kinds, kinds  # after the 6-token request left the batch
