"""Async scheduling through admissions (`EngineConfig.async_scheduling_prefill`, engine/overlap.py)
on CPU: requests that arrive while a step is in flight prefill in the next step launched ahead,
beside the running decodes (their ids known on the host, the decodes' on the device), instead of
draining the overlap: the same outputs as the synchronous engine token for token (greedy and
seeded sampling, prompts of several chunks, a full cache), fewer drains; what cannot run ahead
(prompt logprobs) still drains; the scheduler's advance/resolve over prefill rows."""

import torch

from moeray.platform.engine.engine import Engine
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.engine.scheduler import PENDING, ScheduledSeq
from tests.unit import test_async_scheduling as base
from tests.unit.test_async_scheduling import V, _engine, _prompts

model = base.model  # the tiny model fixture, shared


def _arrivals(eng: Engine, waves, params) -> dict[str, tuple[list[int], str | None]]:
    """Add each wave's prompts at its step-call index, step to the end: (ids, finish reason)."""
    final, ids, call = {}, [], 0
    pending = sorted(waves.items())
    while pending or eng.has_unfinished():
        while pending and pending[0][0] <= call:
            _, prompts = pending.pop(0)
            ids += [eng.add_request(p, params(len(ids))) for p in prompts]
        for o in eng.step():
            if o.finished:
                final[o.request_id] = (o.output_token_ids, o.finish_reason)
        call += 1
    assert set(final) == set(ids)
    return {r: final[r] for r in ids}


def _drains(eng: Engine) -> int:
    assert eng._overlap is not None
    return eng._overlap.drained_steps


def _params(i: int) -> SamplingParams:
    """Greedy, with every third request sampled (seeded): both kinds run ahead."""
    if i % 3 == 2:
        return SamplingParams(temperature=0.9, top_k=30, max_tokens=9, ignore_eos=True, seed=i)
    return SamplingParams(temperature=0, max_tokens=7 + i % 4, ignore_eos=True)


def test_admissions_run_ahead_with_the_same_outputs(model):
    """Arrivals at four step calls, one prompt of 150 tokens (three chunks at the 64-token
    budget, the decodes beside each): outputs equal the synchronous engine's; with the setting
    the overlap drains once per time the engine runs dry, without it once per admission wave."""
    prompts = _prompts(6, seed=11)
    long_prompt = torch.randint(0, V, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    waves = {0: prompts[:2], 3: [long_prompt], 4: prompts[2:4], 9: prompts[4:]}  # long: sampled
    want = _arrivals(_engine(model, False), waves, _params)
    eng = _engine(model, True, async_scheduling_prefill=True)
    assert _arrivals(eng, waves, _params) == want
    plain = _engine(model, True)
    assert _arrivals(plain, waves, _params) == want
    assert eng._overlap is not None and eng._overlap.overlapped_steps > 15
    assert _drains(eng) <= 1 and _drains(plain) >= 3, (_drains(eng), _drains(plain))
    assert eng.stats.prompt_tokens == sum(map(len, [*prompts, long_prompt]))
    assert eng.kv.pool.num_available == eng.kv.num_pages


def test_a_full_cache_drains_instead_of_preempting(model):
    """13 pages of 16 tokens: one request decodes over 7 of them when a second, of 100 tokens,
    is admitted with its first 64-token chunk (4 pages); its second chunk would need 3 pages of
    the 2 left, so that step is not launched ahead (scheduling it would preempt a request whose
    id is in flight): the overlap drains and the synchronous step preempts as the synchronous
    engine does; outputs equal."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (100,), generator=g).tolist() for _ in range(2)]
    waves = {0: prompts[:1], 3: prompts[1:]}
    params = lambda i: SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)  # noqa: E731
    want = _arrivals(_engine(model, False, num_pages=13), waves, params)
    eng = _engine(model, True, num_pages=13, async_scheduling_prefill=True)
    assert _arrivals(eng, waves, params) == want
    assert eng.scheduler.num_preemptions > 0 and _drains(eng) >= 2


def test_prompt_logprobs_keep_the_drain(model):
    """A request asking for prompt logprobs reads its prefill's logits: its admission drains the
    step in flight and runs synchronously, with the synchronous engine's prompt logprobs."""
    prompts = _prompts(3, seed=4)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    asks = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=1)
    results = {}
    for async_on in (False, True):
        eng = _engine(model, async_on, async_scheduling_prefill=True)
        a = eng.add_request(prompts[0], greedy)
        outs: dict[str, list] = {}
        for _ in range(3):
            for o in eng.step():
                outs.setdefault(o.request_id, []).append(o)
        b = eng.add_request(prompts[1], asks)
        while eng.has_unfinished():
            for o in eng.step():
                outs.setdefault(o.request_id, []).append(o)
        last = {r: v[-1] for r, v in outs.items()}
        lps = next(o.prompt_logprobs for o in outs[b] if o.prompt_logprobs)
        results[async_on] = (last[a].output_token_ids, last[b].output_token_ids, lps)
        if async_on:
            assert _drains(eng) >= 2  # b's admission, then the end
    assert results[True] == results[False]
    assert len(results[True][2]) == len(prompts[1])


def test_advance_and_resolve_over_prefill_rows(model):
    """advance: a chunk short of its prompt's end counts as computed, the chunk reaching it holds
    the first token's place with PENDING; resolve: the first commits, the second takes its token;
    drafts are refused; the runner refuses a pending id without device ids."""
    eng = _engine(model, False, max_num_batched_tokens=16)
    eng.add_request(list(range(1, 25)), SamplingParams(temperature=0, max_tokens=4))
    sched = eng.scheduler
    first = sched.schedule()  # tokens [0, 16) of 24
    (s,) = first.scheduled
    assert not s.samples and s.num_tokens == 16
    sched.advance(first)
    req = s.request
    assert req.num_computed == 16 and PENDING not in req.token_ids
    assert sched.resolve(first, {}) == []
    assert len(eng.kv.tables[req.request_id].hashes) == 1  # its full page, for prefix hits
    second = sched.schedule()  # tokens [16, 24): samples
    sched.advance(second)
    assert req.token_ids[-1] == PENDING and req.num_computed == 24
    (out,) = sched.resolve(second, {req.request_id: 7})
    assert out.new_token_ids == [7] and req.token_ids[-1] == 7
    drafted = ScheduledSeq.make(req, 24, 2, (3,))
    try:
        sched.advance(type(second)([drafted], []))
        raise AssertionError("advance took a draft")
    except ValueError as e:
        assert "draft" in str(e)
    decode = sched.schedule()
    sched.advance(decode)
    ahead = sched.schedule()  # the decode of the pending id
    assert ahead.scheduled[0].input_ids == (PENDING,)
    try:
        eng.runner.execute(ahead.scheduled)
        raise AssertionError("execute took a pending id without device ids")
    except ValueError as e:
        assert "ids_on_device" in str(e)
