"""vLLM's sampling parameters end to end: the real engine (tiny model) behind the OpenAI server,
driven by the official `openai` client over HTTP, checked against plain-PyTorch references (a
full forward per token, and the per-row logits processing of test_sampler)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import openai
import pytest
import torch
from test_openai_schemas import serve_app
from test_sampler import reference_process

from moeray.platform.config import tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer
from moeray.platform.serve.http.app import build_app
from moeray.platform.serve.http.protocol import GenerationParams, GenerationRequest
from moeray.platform.serve.http.server import OpenAIServerConfig
from moeray.platform.serve.worker import ColocatedWorker, DecodeWorker

V = 256
EOS = 255
BASE = 0x100  # token t decodes to chr(BASE + t): text and ids map one to one


class CharTokenizer:
    """One character per token (none special), so a completion's text gives back its exact
    token ids. (The stop token that ends a choice is still left out of the text.)"""

    vocab_size = V

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) - BASE if BASE <= ord(c) < BASE + V else ord(c) % V for c in text]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(BASE + t) for t in token_ids)


TOK = CharTokenizer()


def ids_of(text: str) -> list[int]:
    return [ord(c) - BASE for c in text]


def chat_template(messages) -> str:
    return "".join(f"{m.role}:{m.content}\n" for m in messages) + "assistant:"


@pytest.fixture(scope="module")
def model():
    cfg = tiny().replace(num_hidden_layers=2, vocab_size=V, eos_token_id=EOS)
    m = Transformer(cfg).eval()
    m.reset_parameters(seed=3)
    return m


def make_engine(model, **kw) -> Engine:
    base = dict(page_size=16, num_pages=64, max_num_batched_tokens=32, use_cuda_graphs=False)
    return Engine(model, EngineConfig(**{**base, **kw}))


@contextmanager
def openai_client(engine: Engine) -> Iterator[openai.OpenAI]:
    """The official client of one OpenAI server over a colocated worker of `engine`."""
    worker = ColocatedWorker(engine)
    app = build_app(
        worker,
        TOK,
        OpenAIServerConfig(model_id="tiny", max_context=512, max_n=8),
        chat_template=chat_template,
    )
    try:
        with serve_app(app) as url:
            yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    finally:
        worker.loop.shutdown()


@pytest.fixture(scope="module")
def api(model):
    with openai_client(make_engine(model)) as client:
        yield client


def forward_logits(model, ids: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float()


def reference_greedy(model, prompt: list[int], p: SamplingParams, n: int) -> list[int]:
    """Plain greedy decoding with the per-row reference processing, one full forward a token."""
    out: list[int] = []
    for _ in range(n):
        x = reference_process(forward_logits(model, prompt + out)[-1], p, prompt, out)
        out.append(int(x.argmax()))
        if out[-1] == EOS and not p.ignore_eos and len(out) >= p.min_tokens:
            break
    return out


PROMPT = [(7 * i + 3) % 200 for i in range(40)]  # 40 tokens: prefilled in two chunks (32 + 8)


def test_penalties_match_the_reference_on_both_endpoints(api, model):
    # ignore_eos: the comparison covers every token (the tiny model's eos could end one early)
    kw = dict(repetition_penalty=1.8, presence_penalty=0.5, frequency_penalty=0.7, ignore_eos=True)
    ref = reference_greedy(model, PROMPT, SamplingParams(max_tokens=12, **kw), 12)
    plain = reference_greedy(model, PROMPT, SamplingParams(max_tokens=12, ignore_eos=True), 12)
    assert ref != plain  # the penalties change the output, so the check below can fail
    r = api.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body=kw
    )
    assert ids_of(r.choices[0].text) == ref
    r = api.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert ids_of(r.choices[0].text) == plain
    # chat: the same processing on the templated prompt
    messages = [{"role": "user", "content": "hello there"}]
    chat_ids = TOK.encode("user:hello there\nassistant:")
    ref = reference_greedy(model, chat_ids, SamplingParams(max_tokens=10, **kw), 10)
    c = api.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, extra_body=kw
    )
    assert ids_of(c.choices[0].message.content) == ref


def test_logit_bias_forces_and_bans_tokens(api, model):
    for temperature in (0.0, 1.0):
        r = api.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=6,
            temperature=temperature,
            seed=5,
            logit_bias={"65": 100},
        )
        assert ids_of(r.choices[0].text) == [65] * 6
    c = api.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logit_bias={"66": 100},
    )
    assert ids_of(c.choices[0].message.content) == [66] * 4
    # -100 on the greedy token: the next best comes out instead
    top = int(forward_logits(model, PROMPT)[-1].argmax())
    r = api.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=1, temperature=0, logit_bias={str(top): -100}
    )
    assert ids_of(r.choices[0].text) != [top]


def ask(api, endpoint: str, **kw) -> tuple[list[int], str, int]:
    """One greedy choice of PROMPT (completions) or a short chat: (ids, finish, tokens)."""
    if endpoint == "completions":
        r = api.completions.create(model="tiny", prompt=PROMPT, temperature=0, **kw)
        text = r.choices[0].text
    else:
        messages = [{"role": "user", "content": "hi"}]
        r = api.chat.completions.create(model="tiny", messages=messages, temperature=0, **kw)
        text = r.choices[0].message.content
    return ids_of(text), r.choices[0].finish_reason, r.usage.completion_tokens


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_min_tokens_stop_token_ids_and_ignore_eos(api, endpoint):
    eos_first = {str(EOS): 100}
    _, finish, n = ask(api, endpoint, max_tokens=8, logit_bias=eos_first)
    assert (finish, n) == ("stop", 1)
    # eos masked for 3 tokens, then taken: 4 tokens, finish "stop"
    ids, finish, n = ask(
        api, endpoint, max_tokens=8, logit_bias=eos_first, extra_body={"min_tokens": 3}
    )
    assert (finish, n) == ("stop", 4) and EOS not in ids[:3]
    # ignore_eos: eos no longer stops
    ids, finish, _ = ask(
        api, endpoint, max_tokens=5, logit_bias=eos_first, extra_body={"ignore_eos": True}
    )
    assert (finish, ids) == ("length", [EOS] * 5)
    # a stop token ends the choice with finish "stop"; min_tokens holds it back too
    # (its text is not shown, as in vLLM; it counts as a completion token)
    stop70 = {"stop_token_ids": [70]}
    ids, finish, n = ask(api, endpoint, max_tokens=8, logit_bias={"70": 100}, extra_body=stop70)
    assert (ids, finish, n) == ([], "stop", 1)
    ids, finish, n = ask(
        api, endpoint, max_tokens=8, logit_bias={"70": 100}, extra_body={**stop70, "min_tokens": 2}
    )
    assert (len(ids), finish, n) == (2, "stop", 3) and 70 not in ids  # masked, then taken


def test_top_k_min_p_and_seed(api):
    greedy = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = api.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.5, seed=1, extra_body=extra
        )
        assert r.choices[0].text == greedy.choices[0].text, extra
    # hot sampling with penalties: a seed reproduces, and choice j of n uses seed + j
    kw = dict(temperature=1.5, max_tokens=8, extra_body={"repetition_penalty": 1.3})
    a = api.completions.create(model="tiny", prompt=PROMPT, seed=11, n=2, **kw)
    b = api.completions.create(model="tiny", prompt=PROMPT, seed=12, **kw)
    again = api.completions.create(model="tiny", prompt=PROMPT, seed=11, n=2, **kw)
    assert [c.text for c in a.choices] == [c.text for c in again.choices]
    assert a.choices[1].text == b.choices[0].text
    assert a.choices[0].text != greedy.choices[0].text


def test_echo_logprobs_equal_a_direct_forward(api, model):
    lp = forward_logits(model, PROMPT).log_softmax(-1)
    want = [lp[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))]
    # twice: the second finds the prompt's pages in the prefix cache and must still score them
    for _ in range(2):
        r = api.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0
        )
        (c,) = r.choices
        assert ids_of(c.text) == PROMPT
        got = c.logprobs.token_logprobs
        assert len(got) == len(PROMPT) and got[0] is None and c.logprobs.top_logprobs[0] is None
        assert all(math.isclose(g, w, abs_tol=1e-4) for g, w in zip(got[1:], want, strict=True))
        tops = c.logprobs.top_logprobs[1:]
        assert [ids_of(next(iter(t))) for t in tops] == [[int(lp[i].argmax())] for i in range(39)]
        assert c.logprobs.text_offset == list(range(len(PROMPT)))
    # max_tokens=1 (lm-eval's other form): the prompt, then one generated token, both scored
    r = api.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=1, echo=True, logprobs=0, temperature=0
    )
    (c,) = r.choices
    nxt = int(lp[-1].argmax())
    assert ids_of(c.text) == [*PROMPT, nxt]
    assert math.isclose(c.logprobs.token_logprobs[-1], lp[-1, nxt].item(), abs_tol=1e-4)
    assert len(c.logprobs.tokens) == len(PROMPT) + 1
    # streamed: the prompt comes first; echo without logprobs only prepends the text
    chunks = list(
        api.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=3, echo=True, temperature=0, stream=True
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert ids_of(text)[: len(PROMPT)] == PROMPT and len(ids_of(text)) == len(PROMPT) + 3
    assert all(ch.choices[0].logprobs is None for ch in chunks if ch.choices)
    # streamed with logprobs: the first chunk carries the scored prompt, offsets run on
    chunks = list(
        api.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=3,
            echo=True,
            logprobs=0,
            temperature=0,
            stream=True,
        )
    )
    lps = [ch.choices[0].logprobs for ch in chunks if ch.choices]
    assert lps[0].token_logprobs[0] is None and len(lps[0].tokens) >= len(PROMPT)
    streamed = [v for lp in lps for v in lp.token_logprobs]
    assert len(streamed) == len(PROMPT) + 3
    assert all(math.isclose(g, w, abs_tol=1e-4) for g, w in zip(streamed[1:40], want, strict=True))
    assert [o for lp in lps for o in lp.text_offset] == list(range(len(PROMPT) + 3))
    # max_tokens=0 needs echo (vLLM's rule)
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="tiny", prompt=PROMPT, max_tokens=0)
    assert e.value.body["param"] == "max_tokens" and "echo" in e.value.body["message"]


def test_best_of_returns_the_most_likely_choices(api):
    # ignore_eos: every choice's text shows all its tokens (usage is checked against them)
    kw = dict(
        model="tiny",
        prompt=PROMPT,
        max_tokens=6,
        temperature=1.3,
        seed=21,
        extra_body={"ignore_eos": True},
    )
    every = api.completions.create(n=4, logprobs=0, **kw)
    score = {c.text: sum(c.logprobs.token_logprobs) for c in every.choices}
    best = sorted(score, key=score.get, reverse=True)[:2]
    r = api.completions.create(n=2, best_of=4, **kw)
    assert [c.text for c in r.choices] == best and [c.index for c in r.choices] == [0, 1]
    assert all(c.logprobs is None for c in r.choices)  # computed to rank, not asked for
    assert r.usage.completion_tokens == sum(len(ids_of(t)) for t in best)
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(n=2, best_of=4, stream=True, **kw)
    assert e.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(n=2, best_of=9, **kw)
    assert e.value.body["param"] == "best_of" and "limit 8" in e.value.body["message"]


@pytest.mark.parametrize(
    "extra,param,named",
    [
        ({"logit_bias": {"300": 1}}, "logit_bias", "300"),
        ({"logit_bias": {"3": 150}}, "logit_bias", "150"),
        ({"stop_token_ids": [999]}, "stop_token_ids", "999"),
        ({"min_tokens": 9}, "min_tokens", "min_tokens=9"),
        ({"repetition_penalty": -1.0}, "repetition_penalty", "-1.0"),
        ({"presence_penalty": 3}, "presence_penalty", "3"),
        ({"min_p": 2}, "min_p", "2"),
    ],
)
def test_bad_values_are_400_naming_the_param_and_value(api, extra, param, named):
    messages = [{"role": "user", "content": "x"}]
    for call in (
        lambda: api.completions.create(model="tiny", prompt="x", max_tokens=8, extra_body=extra),
        lambda: api.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, extra_body=extra
        ),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        msg = e.value.body["message"]
        assert e.value.body["param"] == param and param in msg and named in msg, msg


# ---- the engine directly: speculative decoding and prompt logprobs under pressure -------------
def test_mtp_verification_uses_the_processed_distribution(model):
    kw = dict(repetition_penalty=1.6, frequency_penalty=0.4, logit_bias=((9, 2.5),), min_tokens=4)
    p = SamplingParams(temperature=0, max_tokens=10, **kw)
    prompts = [PROMPT, PROMPT[:13], [5, 6, 7]]
    ref = [reference_greedy(model, q, p, 10) for q in prompts]
    for spec in (0, 1):
        eng = make_engine(model, num_speculative_tokens=spec)
        assert [o.output_token_ids for o in eng.generate(prompts, p)] == ref, spec
        if spec:
            assert eng.drafter.stats.num_draft_tokens > 0
    # sampling verifies drafts against the processed distribution too: +100 takes all the mass
    ps = SamplingParams(temperature=1.0, seed=4, max_tokens=10, logit_bias=((9, 100.0),))
    eng = make_engine(model, num_speculative_tokens=1)
    assert [o.output_token_ids for o in eng.generate(prompts, ps)] == [[9] * 10] * 3


def test_seeded_penalized_request_does_not_depend_on_its_batch(model):
    kw = dict(temperature=1.2, max_tokens=10, repetition_penalty=1.4, presence_penalty=0.3)
    ps = [SamplingParams(seed=70 + i, **kw) for i in range(3)]
    others = [SamplingParams(temperature=0, max_tokens=6), SamplingParams(min_p=0.1, seed=1)]
    prompts = [PROMPT, PROMPT[:20], [3, 1, 4, 1, 5]]
    together = make_engine(model).generate(prompts + prompts[:2], ps + others)
    for i in range(3):
        alone = make_engine(model).generate([prompts[i]], [ps[i]])[0]
        assert alone.output_token_ids == together[i].output_token_ids
    greedy = make_engine(model).generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    assert [o.output_token_ids for o in together[:3]] != [o.output_token_ids for o in greedy]


def test_prompt_logprobs_with_chunks_cache_hits_and_preemption(model):
    prompts = [PROMPT, [*PROMPT[:35], 1, 2, 3, 4, 5], list(range(60, 110))]
    # 6 pages of 16 tokens for three prompts of 40-50 tokens: preemption by recompute
    eng = make_engine(model, num_pages=6, max_num_batched_tokens=24)
    eng.generate([PROMPT], SamplingParams(max_tokens=1))  # its pages now sit in the cache
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=2))
    assert eng.metrics()["preemptions"] > 0
    for q, o in zip(prompts, outs, strict=True):
        lp = forward_logits(model, q).log_softmax(-1)
        assert o.prompt_logprobs is not None and o.prompt_logprobs[0] is None
        assert len(o.prompt_logprobs) == len(q) and o.num_cached_tokens == 0
        for i, e in enumerate(o.prompt_logprobs[1:], 1):
            assert e.token_id == q[i] and math.isclose(
                e.logprob, lp[i - 1, q[i]].item(), abs_tol=1e-4
            )
            assert [t for t, _ in e.top] == lp[i - 1].topk(2).indices.tolist()


def test_workers_pass_prompt_logprobs_once(model):
    """Colocated, and decode (which prefills such a request itself: the prefill replica's
    output carries no prompt logprobs, so fetch must not be called)."""

    async def no_fetch(req, start, endpoint):
        raise AssertionError("a request with prompt logprobs must prefill on the decode replica")

    async def run(worker):
        try:
            req = GenerationRequest(
                "r", tuple(PROMPT), GenerationParams(max_tokens=4, prompt_logprobs=0)
            )
            return [s async for s in worker.generate(req)]
        finally:
            worker.loop.shutdown()

    lp = forward_logits(model, PROMPT).log_softmax(-1)
    for worker in (ColocatedWorker(make_engine(model)), DecodeWorker(make_engine(model), no_fetch)):
        steps = asyncio.run(run(worker))
        first = steps[0].prompt_logprobs
        assert len(first) == len(PROMPT) and first[0] is None
        assert math.isclose(first[-1].logprob, lp[-2, PROMPT[-1]].item(), abs_tol=1e-4)
        assert all(s.prompt_logprobs is None for s in steps[1:])
        assert sum(len(s.token_ids) for s in steps) == 4
