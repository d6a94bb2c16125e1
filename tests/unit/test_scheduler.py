"""Scheduler + KV cache driven by a fake model whose next token depends on the whole context read
back from the paged slots, so a wrong block table, a bad shared page or a wrong chunk shows up as a
different generation than the sequential reference."""

import random

import pytest

from moeray.platform.engine.kv_cache import KVCacheManager
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.engine.scheduler import Scheduler, SchedulerConfig

V = 97


def next_token(ctx):
    return (sum((i + 1) * t for i, t in enumerate(ctx)) * 31 + len(ctx)) % V


def reference(prompt, n, stop_ids=(), eos=()):
    toks = list(prompt)
    out = []
    for _ in range(n):
        t = next_token(toks)
        toks.append(t)
        out.append(t)
        if t in stop_ids or t in eos:
            break
    return out


class FakeRunner:
    """Writes each computed token id into its slot and predicts from the slots it reads back."""

    def __init__(self, sched, draft_accuracy=None, seed=0):
        self.sched, self.kv = sched, sched.kv
        self.slots: dict[int, int] = {}
        self.draft_accuracy = draft_accuracy
        self.rng = random.Random(seed)
        self.steps = []

    def step(self):
        out = self.sched.schedule()
        self.steps.append(out)
        assert out.num_tokens <= self.sched.config.max_num_batched_tokens
        sampled = {}
        for s in out.scheduled:
            rid = s.request.request_id
            ids = s.input_ids
            assert len(ids) == s.num_tokens
            for slot, t in zip(
                self.kv.slots(rid, s.start, s.start + s.num_tokens), ids, strict=False
            ):
                self.slots[slot] = t
            ctx = [self.slots[x] for x in self.kv.slots(rid, 0, s.start + s.num_tokens)]
            known = s.num_tokens - len(s.spec_token_ids)
            assert ctx[: s.start + known] == s.request.token_ids[: s.start + known]
            if not s.samples:
                continue
            new = []
            for j in range(len(s.spec_token_ids) + 1):
                t = next_token(ctx[: s.start + known + j])
                new.append(t)
                if j == len(s.spec_token_ids) or s.spec_token_ids[j] != t:
                    break
            sampled[rid] = new
        outs = self.sched.update(out, sampled)
        if self.draft_accuracy is not None:
            k = self.sched.config.num_speculative_tokens
            for r in self.sched.running:
                if len(r.token_ids) - r.num_computed == 1:
                    ctx, drafts = list(r.token_ids), []
                    for _ in range(k):
                        t = next_token(ctx)
                        if self.rng.random() > self.draft_accuracy:
                            t = (t + 1) % V
                        drafts.append(t)
                        ctx.append(t)
                    r.spec_token_ids = drafts
        return outs

    def run(self, arrivals=None, max_steps=2000):
        """arrivals: {step: [(id, prompt, params)]}; returns {id: final RequestOutput}."""
        arrivals = arrivals or {}
        final = {}
        for step in range(max_steps):
            for rid, prompt, params in arrivals.get(step, []):
                self.sched.add_request(rid, prompt, params)
            if not self.sched.has_unfinished() and step > max(arrivals, default=0):
                return final
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
        raise AssertionError("did not finish")


def make(num_pages=64, page_size=4, budget=16, max_seqs=8, k=0, max_len=256, **kw):
    kv = KVCacheManager(num_pages, page_size)
    cfg = SchedulerConfig(
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_len,
        num_speculative_tokens=k,
    )
    return Scheduler(cfg, kv, **kw)


def prompts(n, seed=0, lo=1, hi=30):
    rng = random.Random(seed)
    return [[rng.randrange(V) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("budget,max_seqs", [(5, 3), (16, 8), (64, 2)])
def test_continuous_batching_matches_sequential(budget, max_seqs):
    sched = make(budget=budget, max_seqs=max_seqs)
    runner = FakeRunner(sched)
    ps = prompts(9, seed=budget)
    arrivals = {}
    for i, p in enumerate(ps):
        arrivals.setdefault(i * 2, []).append(
            (f"r{i}", p, SamplingParams(temperature=0, max_tokens=3 + i))
        )
    final = runner.run(arrivals)
    for i, p in enumerate(ps):
        o = final[f"r{i}"]
        assert o.output_token_ids == reference(p, 3 + i)
        assert o.finish_reason == "length"
    # running decodes are never starved: every step with a decode-ready request schedules it
    # (budget >= max_seqs here except in the first case, where it must still be used fully)
    for out in runner.steps:
        assert len(out.scheduled) <= max_seqs
    assert sched.kv.pool.num_available == sched.kv.num_pages  # everything freed
    assert not sched.requests


def test_chunked_prefill_mixes_decodes_and_respects_budget():
    sched = make(budget=8, page_size=4)
    runner = FakeRunner(sched)
    sched.add_request("short", [1, 2, 3], SamplingParams(temperature=0, max_tokens=20))
    runner.step()  # prefill of short
    sched.add_request("long", list(range(30)), SamplingParams(temperature=0, max_tokens=2))
    runner.step()
    out = runner.steps[-1]
    got = [(s.request.request_id, s.num_tokens, s.samples) for s in out.scheduled]
    assert got == [("short", 1, True), ("long", 7, False)]  # decode first, then a 7-token chunk
    starts = []
    while "long" in sched.requests:
        runner.step()
        out = runner.steps[-1]
        starts += [s.start for s in out.scheduled if s.request.request_id == "long"]
        assert out.num_tokens <= 8
    assert starts[:3] == [7, 14, 21]


def test_fifo_head_blocks_later_requests():
    # 6 pages of 4: "a" holds 4 pages; "b" needs 3 pages and must wait; "c" (1 page) must not
    # overtake
    sched = make(num_pages=6, page_size=4, budget=64)
    runner = FakeRunner(sched)
    sched.add_request("a", list(range(15)), SamplingParams(temperature=0, max_tokens=2))
    runner.step()
    sched.add_request("b", list(range(20, 30)), SamplingParams(temperature=0, max_tokens=1))
    sched.add_request("c", [5], SamplingParams(temperature=0, max_tokens=1))
    runner.step()
    assert [s.request.request_id for s in runner.steps[-1].scheduled] == ["a"]
    runner.step()
    out = runner.steps[-1]  # a finished last step and freed its pages: b then c
    assert [s.request.request_id for s in out.scheduled] == ["b", "c"]


def test_preemption_by_recompute_gives_same_outputs():
    # 10 pages of 4 tokens for 5 requests that each grow to ~25 tokens: preemption is forced
    sched = make(num_pages=10, page_size=4, budget=32, max_seqs=5)
    runner = FakeRunner(sched)
    ps = prompts(5, seed=3, lo=5, hi=12)
    final = runner.run(
        {0: [(f"r{i}", p, SamplingParams(temperature=0, max_tokens=14)) for i, p in enumerate(ps)]}
    )
    assert sched.num_preemptions > 0
    for i, p in enumerate(ps):
        assert final[f"r{i}"].output_token_ids == reference(p, 14)
    assert sched.kv.pool.num_available == 10


def test_request_larger_than_cache_ends_with_length():
    sched = make(num_pages=2, page_size=4, budget=32)
    runner = FakeRunner(sched)
    final = runner.run({0: [("x", [1, 2, 3], SamplingParams(temperature=0, max_tokens=50))]})
    # 8 slots hold 3 prompt + 5 output tokens; the 6th output needs no slot of its own
    assert final["x"].finish_reason == "length" and len(final["x"].output_token_ids) == 6
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        sched.add_request("y", list(range(8)), SamplingParams())


def test_stop_token_ids_eos_and_ignore_eos():
    p = [3, 1, 4, 1, 5]
    ref = reference(p, 30)
    stop_tok = ref[4]
    sched = make(eos_token_ids=[ref[6]])
    runner = FakeRunner(sched)
    final = runner.run(
        {
            0: [
                (
                    "stop",
                    p,
                    SamplingParams(temperature=0, max_tokens=30, stop_token_ids=(stop_tok,)),
                ),
                ("eos", p, SamplingParams(temperature=0, max_tokens=30)),
                ("ign", p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
            ]
        }
    )
    first_stop = ref.index(stop_tok)
    assert final["stop"].output_token_ids == ref[: first_stop + 1]
    assert final["stop"].stop_reason == stop_tok and final["stop"].finish_reason == "stop"
    assert final["eos"].output_token_ids == ref[: ref.index(ref[6]) + 1]
    assert final["ign"].output_token_ids == ref and final["ign"].finish_reason == "length"


def test_stop_strings_straddling_tokens():
    def detok(ids):
        return "".join(chr(ord("a") + t % 26) for t in ids)

    p = [10, 20, 30]
    ref = reference(p, 40)
    text = detok(ref)
    stop = text[7:10]  # spans three tokens
    sched = make(detokenize=detok)
    runner = FakeRunner(sched)
    final = runner.run(
        {0: [("s", p, SamplingParams(temperature=0, max_tokens=40, stop=(stop, "#")))]}
    )
    o = final["s"]
    cut = text.find(stop)
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert o.text == text[:cut] and len(o.output_token_ids) == cut + len(stop)
    with pytest.raises(ValueError, match="tokenizer"):
        make().add_request("z", [1], SamplingParams(stop=("x",)))


def test_text_is_decoded_incrementally_and_ends_as_a_whole_decode():
    """Each token's text comes from a window of a few ids, not the whole output again (O(1)
    ids decoded a step, where re-decoding was O(length): ~250 us a step at 2.4K tokens for a
    byte-level BPE), and the final text is the whole output decoded, a multi-byte character
    split over tokens included (here every id is one UTF-8 byte; length-limited, so the last
    character may be cut: U+FFFD, as a whole decode gives)."""
    utf8 = "aé€😀z".encode()
    decoded: list[int] = []

    def detok(ids):
        decoded.append(len(ids))
        return bytes(utf8[t % len(utf8)] for t in ids).decode("utf-8", errors="replace")

    p = [3, 5, 7]
    n = 120
    sched = make(detokenize=detok, max_len=256)
    final = FakeRunner(sched).run({0: [("s", p, SamplingParams(temperature=0, max_tokens=n))]})
    o = final["s"]
    assert len(o.output_token_ids) == n and o.finish_reason == "length"
    assert o.text == detok(o.output_token_ids)
    # 2 windows a token (the read prefix and the whole window), each a few ids (longer while
    # invalid bytes hold text back): ~10 a token here, where re-decoding is n^2 / 2 = 7,200
    assert sum(decoded[:-1]) <= 16 * n, sum(decoded[:-1])


def test_abort_frees_pages_immediately():
    sched = make(num_pages=20, page_size=4)
    runner = FakeRunner(sched)
    sched.add_request("a", list(range(13)), SamplingParams(temperature=0, max_tokens=10))
    sched.add_request("w", list(range(5)), SamplingParams(temperature=0, max_tokens=10))
    runner.step()
    runner.step()
    held = 20 - sched.kv.pool.num_available
    assert held > 0
    assert sched.abort("a") and not sched.abort("a") and not sched.abort("nope")
    assert 20 - sched.kv.pool.num_available == held - 4  # a's 4 pages back at once
    sched.add_request("q", [1], SamplingParams(max_tokens=1))
    assert sched.abort("q") and len(sched.waiting) == 0  # waiting requests cancel too
    for _ in range(12):
        runner.step()
    assert not sched.has_unfinished()


def test_max_model_len():
    sched = make(max_len=12)
    runner = FakeRunner(sched)
    final = runner.run({0: [("m", list(range(9)), SamplingParams(temperature=0, max_tokens=100))]})
    assert len(final["m"].output_token_ids) == 3 and final["m"].finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request("n", list(range(12)), SamplingParams())


def test_prefix_cache_hit_on_repeated_prompt():
    sched = make(num_pages=32, page_size=4)
    runner = FakeRunner(sched)
    p = prompts(1, seed=9, lo=18, hi=19)[0]
    final = runner.run(
        {
            0: [("a", p, SamplingParams(temperature=0, max_tokens=4))],
            6: [("b", [*p, 1, 2], SamplingParams(temperature=0, max_tokens=4))],
        }
    )
    assert final["a"].num_cached_tokens == 0 and final["b"].num_cached_tokens == 16
    assert final["b"].output_token_ids == reference([*p, 1, 2], 4)


@pytest.mark.parametrize("accuracy", [1.0, 0.6, 0.0])
def test_speculative_drafts_verify_to_the_same_output(accuracy):
    sched = make(k=3, budget=12, num_pages=40, page_size=4)
    runner = FakeRunner(sched, draft_accuracy=accuracy, seed=1)
    ps = prompts(4, seed=7)
    final = runner.run(
        {0: [(f"r{i}", p, SamplingParams(temperature=0, max_tokens=17)) for i, p in enumerate(ps)]}
    )
    for i, p in enumerate(ps):
        assert final[f"r{i}"].output_token_ids == reference(p, 17)
    n_steps = len(runner.steps)
    # perfect drafts finish in far fewer steps than one token per step
    if accuracy == 1.0:
        assert n_steps < 17
    if accuracy == 0.0:
        assert n_steps >= 17


def test_bad_config_and_duplicate_ids():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=2, num_speculative_tokens=2)
    sched = make()
    sched.add_request("a", [1], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request("a", [1], SamplingParams())
    with pytest.raises(ValueError, match="empty prompt"):
        sched.add_request("b", [], SamplingParams())
