"""The OpenAI-compatible API over real HTTP (uvicorn + the openai client + raw httpx).

The engine behind it is a small deterministic generator written for these tests (`EchoEngine`):
it echoes the prompt's tokens cyclically, starting at an offset drawn from the seed, in steps of
1-3 tokens (as MTP would), and records when each request's generator is closed. The tokenizer is
UTF-8 bytes, so multi-byte characters split across steps exercise incremental detokenization.
test_loadgen.py imports these helpers.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

try:
    import httpx
except ImportError:  # the openai client in this environment ships httpx as httpx2
    import httpx2 as httpx

from moeray.platform.config import ServeConfig
from moeray.platform.engine.detokenize import IncrementalDetokenizer
from moeray.platform.serve.app import check_model_dir
from moeray.platform.serve.generation_config import sampling_defaults
from moeray.platform.serve.http.admission import AdmissionGate
from moeray.platform.serve.http.app import build_app
from moeray.platform.serve.http.auth import API_KEY_ENV, check_bearer, resolve_api_key
from moeray.platform.serve.http.chat import deepseek_chat_prompt
from moeray.platform.serve.http.errors import APIError, param_path, validation_error
from moeray.platform.serve.http.protocol import (
    BackendOverloaded,
    GenerationParams,
    GenerationRequest,
    GenerationStep,
    TokenLogprob,
)
from moeray.platform.serve.http.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from moeray.platform.serve.http.server import OpenAIServerConfig
from moeray.platform.serve.http.text import StopMatcher
from moeray.platform.serve.tokenizer import ServeTokenizer
from moeray.platform.serve.worker import ColocatedWorker, make_engine

EOS = 256


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus EOS (256), a special token: "<|eos|>" unless skipped. No BOS."""

    vocab_size = 257

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out, run = [], bytearray()
        for t in token_ids:
            if t < 256:
                run.append(t)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append("" if skip_special_tokens else "<|eos|>")
        return "".join(out) + run.decode("utf-8", errors="replace")


def echo_tokens(
    prompt: Sequence[int], seed: int | None, max_tokens: int, ignore_eos: bool = False
) -> tuple[list[int], str]:
    """What EchoEngine generates: the prompt cyclically from offset seed % len, until EOS
    (included, finish "stop"; unless ignore_eos) or max_tokens ("length")."""
    start = 0 if seed is None else seed % len(prompt)
    out: list[int] = []
    for i in range(max_tokens):
        t = prompt[(start + i) % len(prompt)]
        out.append(t)
        if t == EOS and not ignore_eos:
            return out, "stop"
    return out, "length"


def fake_logprob(token: int) -> float:
    return -((token % 7) + 1) / 10.0


@dataclass
class EchoEngine:
    delay_s: float = 0.0  # per step
    overloaded: bool = False
    steps: tuple[int, ...] = (1, 2, 3)  # tokens per step, cycled (MTP accepts drafts)
    live: set[str] = field(default_factory=set)
    closed: dict[str, str] = field(default_factory=dict)  # request id -> "finished" | "cancelled"
    requests: list[GenerationRequest] = field(default_factory=list)

    async def generate(self, request: GenerationRequest):
        if self.overloaded:
            raise BackendOverloaded("test engine queue full", retry_after_s=2.5)
        self.requests.append(request)
        self.live.add(request.request_id)
        tokens, reason = echo_tokens(
            request.prompt_ids,
            request.params.seed,
            request.params.max_tokens,
            request.params.ignore_eos,
        )
        k = request.params.logprobs
        pos, i = 0, 0
        outcome = "cancelled"
        try:
            while pos < len(tokens):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                n = self.steps[i % len(self.steps)]
                i += 1
                chunk = tuple(tokens[pos : pos + n])
                pos += len(chunk)
                lps = None
                if k is not None:
                    lps = tuple(
                        TokenLogprob(
                            t,
                            fake_logprob(t),
                            tuple(((t + j) % 256, -0.05 * (j + 1)) for j in range(k)),
                        )
                        for t in chunk
                    )
                done = pos == len(tokens)
                if done:
                    outcome = "finished"
                yield GenerationStep(chunk, lps, reason if done else None)
        finally:
            self.live.discard(request.request_id)
            self.closed[request.request_id] = outcome


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(app) -> Iterator[str]:
    """Run `app` with uvicorn on a free port in a background thread; yield its base URL."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", access_log=False
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def serve_model_dir(model_dir, model_id: str, **engine) -> Iterator[str]:
    """`model_dir` served as `moeray serve --mode colocated` serves it, on the CPU in fp32
    (check_model_dir, make_engine, a ColocatedWorker behind the OpenAI app with the directory's
    tokenizer, chat template and generation config), under `serve_app`: yield the base URL.
    `engine`: ServeConfig's sizes (page_size, num_pages, max_model_len, ...)."""
    cfg = ServeConfig(
        model=str(model_dir), mode="colocated", device="cpu", dtype="float32", **engine
    )
    check_model_dir(cfg)
    worker = ColocatedWorker(make_engine(cfg))
    tok = ServeTokenizer(model_dir)
    config = OpenAIServerConfig(
        model_id=model_id,
        max_context=cfg.max_model_len,
        sampling_defaults=sampling_defaults(model_dir),
    )
    try:
        with serve_app(build_app(worker, tok, config, chat_template=tok.chat_template())) as url:
            yield url
    finally:
        worker.loop.shutdown()


def make_server(engine=None, *, metrics=None, **cfg):
    engine = engine or EchoEngine()
    config = OpenAIServerConfig(**{"model_id": "tiny", "max_context": 512, **cfg})
    return engine, build_app(engine, ByteTokenizer(), config, metrics=metrics)


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# ---- pure pieces -------------------------------------------------------------------------------
def test_incremental_detokenizer_random_utf8_splits():
    rng = random.Random(0)
    alphabet = "ab z\n" + "éü✓€" + "𝄞😀"  # 1-, 2-, 3- and 4-byte characters
    tok = ByteTokenizer()
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = tok.encode(text)
        det = IncrementalDetokenizer(tok.decode)
        pieces, pos = [], 0
        while pos < len(ids):
            n = rng.randint(1, 4)
            pieces.append(det.push(ids[pos : pos + n]))
            pos += n
        pieces.append(det.flush())
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)  # held back, never emitted half-decoded


def test_incremental_detokenizer_flushes_a_truncated_character():
    tok = ByteTokenizer()
    det = IncrementalDetokenizer(tok.decode)
    ids = tok.encode("a€")[:-1]  # the euro sign cut after 2 of 3 bytes
    assert det.push(ids[:1]) == "a"
    assert det.push(ids[1:]) == ""  # held back: the character is incomplete
    assert det.flush() == "\ufffd"


def test_stop_matcher_random_against_reference():
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        stops = [
            "".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(1, 3))
        ]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        want = text[: min(hits)] if hits else text
        m = StopMatcher(stops)
        out, pos = [], 0
        while pos < len(text) and not m.stopped:
            n = rng.randint(1, 5)
            final = pos + n >= len(text)
            out.append(m.push(text[pos : pos + n], final=final))
            pos += n
            # never sends text that a later stop string could still claim
            assert len("".join(out)) <= len(want)
        if not text:
            out.append(m.push("", final=True))
        assert "".join(out) == want, (text, stops)
        assert m.stopped == bool(hits)


def test_param_paths_and_validation_errors():
    assert param_path(("body", "messages", 0, "role")) == "messages.[0].role"
    assert param_path(("body", "temperature")) == "temperature"
    assert param_path(("body", 12)) is None
    cases = [
        ({"model": "m", "prompt": "x", "temperature": 2.5}, "temperature"),
        ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "x", "n": 1.5}, "n"),
        ({"model": "m", "prompt": "x", "n": "2"}, "n"),
        ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
        ({"model": "m", "prompt": "x", "stop": 3}, "stop"),
        ({"model": "m", "prompt": "x", "logprobs": 6}, "logprobs"),
        ({"model": "m", "prompt": "x", "seed": -1}, "seed"),
        ({"model": "m", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ({"model": "m", "prompt": "x", "frequency_penalty": -2.01}, "frequency_penalty"),
        ({"model": "m", "prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
        ({"model": "m", "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"model": "m", "prompt": "x", "logit_bias": {"5": "up"}}, "logit_bias"),
        ({"model": "m", "prompt": "x", "min_p": 1.5}, "min_p"),
        ({"model": "m", "prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ({"model": "m", "prompt": "x", "min_tokens": -1}, "min_tokens"),
        ({"model": "m", "prompt": "x", "stop_token_ids": [3, -1]}, "stop_token_ids.[1]"),
        ({"model": "m", "prompt": "x", "best_of": 0}, "best_of"),
        ({"model": "m", "prompt": "x", "n": 3, "best_of": 2}, "best_of"),
        ({"model": "m", "prompt": "x", "best_of": 2, "stream": True}, "best_of"),
        (
            {"model": "m", "prompt": "x", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ({"model": "m", "prompt": "x", "frobnicate": 1}, "frobnicate"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": [1, "a"]}, "prompt"),
        ({"model": "m"}, "prompt"),
        ({"prompt": "x"}, "model"),
    ]
    for body, param in cases:
        with pytest.raises(Exception) as ei:
            CompletionRequest.model_validate(body)
        err = validation_error(ei.value.errors())
        assert err.status == 400 and err.param == param, (body, err.param, err.message)
        assert param in err.message
    chat_cases = [
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.[0].role"),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 5}],
            },
            "messages.[1].content",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.[0].content",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "logprobs": True,
                "top_logprobs": 21,
            },
            "top_logprobs",
        ),
    ]
    for body, param in chat_cases:
        with pytest.raises(Exception) as ei:
            ChatCompletionRequest.model_validate(body)
        assert validation_error(ei.value.errors()).param == param, body
    ok = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "temperature": 0,
            "stop": "x",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
        }
    )
    assert ok.messages[0].content == "ab" and ok.stop == ("x",) and ok.temperature == 0.0
    batch = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]]})
    assert batch.prompt == [[1, 2], [3]]


def test_admission_gate_bearer_and_params():
    g = AdmissionGate(limit=3, retry_after_s=0.2)
    assert g.try_acquire(2) and not g.try_acquire(2) and g.try_acquire(1)
    assert g.in_flight == 3
    err = g.rejection()
    assert err.status == 429 and err.headers["Retry-After"] == "1"  # whole seconds, rounded up
    g.release(2)
    assert g.try_acquire(2)
    with pytest.raises(ValueError):
        AdmissionGate(limit=0)
    check_bearer(None, None)
    check_bearer("Bearer s3cret", "s3cret")
    check_bearer("bearer s3cret", "s3cret")
    for bad in (None, "", "Bearer", "Bearer wrong", "Basic s3cret", "s3cret"):
        with pytest.raises(APIError) as ei:
            check_bearer(bad, "s3cret")
        assert ei.value.status == 401
    with pytest.raises(ValueError, match="max_tokens"):
        GenerationParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationParams(max_tokens=1, top_p=0.0)
    with pytest.raises(ValueError, match="max_context"):
        OpenAIServerConfig(model_id="m", max_context=0)


def test_resolve_api_key(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert resolve_api_key(None) is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(None) == "from-env"
    assert resolve_api_key("flag") == "flag"


def test_deepseek_chat_prompt():
    msgs = [
        ChatMessage(role="system", content="S"),
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="assistant", content="yo"),
        ChatMessage(role="user", content="q"),
    ]
    assert deepseek_chat_prompt(msgs) == (
        "<｜begin▁of▁sentence｜>S<｜User｜>hi<｜Assistant｜>yo<｜end▁of▁sentence｜>"
        "<｜User｜>q<｜Assistant｜>"
    )


# ---- over HTTP ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live():
    """One server for the read-only tests: (engine, base_url, prometheus registry)."""
    import prometheus_client as pc

    from moeray.platform.metrics import Metrics

    reg = pc.CollectorRegistry()
    engine, app = make_server(metrics=Metrics("prometheus", registry=reg))
    with serve_app(app) as url:
        yield engine, url, reg


def _client(url: str, key: str = "unused"):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20)


def test_completions_with_openai_client(live):
    engine, url, _reg = live
    client = _client(url)
    prompt = "héllo wörld ✓ 😀"
    ids = ByteTokenizer().encode(prompt)
    seed = random.Random(5).randint(0, 10_000)
    want_ids, reason = echo_tokens(ids, seed, 23)
    want = ByteTokenizer().decode(want_ids)
    r = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=23, seed=seed, temperature=0.7, top_p=0.9
    )
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    (c,) = r.choices
    assert c.text == want and c.finish_reason == reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 23)
    req = next(q for q in engine.requests if q.params.seed == seed)
    assert (req.params.temperature, req.params.top_p, req.params.max_tokens) == (0.7, 0.9, 23)

    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=23,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 23 and not chunks[-1].choices


def test_completions_token_prompts_eos_stop_and_default_max_tokens(live):
    _, url, _ = live
    client = _client(url)
    # EOS inside the echoed prompt ends the choice with finish "stop"
    r = client.completions.create(model="tiny", prompt=[72, 105, EOS, 33], max_tokens=50)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("Hi", "stop")
    assert r.usage.completion_tokens == 3
    r = client.completions.create(
        model="tiny", prompt=[72, 105, EOS, 33], max_tokens=9, extra_body={"ignore_eos": True}
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("Hi!Hi!H", "length")
    # a batch of prompts x n: choices indexed prompt * n + j, default max_tokens is 16
    r = client.completions.create(
        model="tiny", prompt=["abcdefghijklmnopqrstuvwxyz", "0123"], n=2, seed=3
    )
    by_index = {c.index: c.text for c in r.choices}
    tok = ByteTokenizer()
    for p, prompt in enumerate(["abcdefghijklmnopqrstuvwxyz", "0123"]):
        for j in range(2):
            want, _ = echo_tokens(tok.encode(prompt), 3 + j, 16)
            assert by_index[p * 2 + j] == tok.decode(want)
    assert r.usage.prompt_tokens == 30 and r.usage.completion_tokens == 64
    # stop strings cut the text (and end the engine's request)
    r = client.completions.create(
        model="tiny", prompt="one, two, three", max_tokens=40, stop=["three", ", t"]
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("one", "stop")
    chunks = list(
        client.completions.create(
            model="tiny", prompt="one, two, three", max_tokens=40, stop="two", stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == "one, "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs(live):
    _, url, _ = live
    r = _client(url).completions.create(model="tiny", prompt="xyz", max_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == list("xyzxy")
    assert lp.token_logprobs == pytest.approx([fake_logprob(ord(c)) for c in "xyzxy"])
    assert lp.text_offset == [0, 1, 2, 3, 4]
    assert lp.top_logprobs[0] == pytest.approx({"x": -0.05, "y": -0.1})


def test_chat_with_openai_client(live):
    _engine, url, _ = live
    client = _client(url)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ça va?"}]
    prompt_ids = ByteTokenizer().encode(deepseek_chat_prompt([ChatMessage(**m) for m in msgs]))
    want_ids, _ = echo_tokens(prompt_ids, 11, 30)
    want = ByteTokenizer().decode(want_ids)
    r = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=30, seed=11, logprobs=True, top_logprobs=3
    )
    assert r.object == "chat.completion"
    (c,) = r.choices
    assert c.message.role == "assistant" and c.message.content == want
    assert c.finish_reason == "length" and r.usage.prompt_tokens == len(prompt_ids)
    assert len(c.logprobs.content) == 30 and len(c.logprobs.content[0].top_logprobs) == 3
    stream = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=30, seed=11, stream=True, n=3
    )
    texts: dict[int, str] = {}
    roles: dict[int, str] = {}
    finish: dict[int, str] = {}
    for ch in stream:
        assert ch.object == "chat.completion.chunk"
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.delta.role:
                roles[choice.index] = choice.delta.role
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert set(texts) == {0, 1, 2} and texts[0] == want
    assert texts[1] != texts[0]  # seeds 11, 12, 13: different offsets
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert finish == {0: "length", 1: "length", 2: "length"}
    # without max_tokens chat may use the rest of the context
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "z"}])
    assert r.usage.total_tokens == 512 and r.choices[0].finish_reason == "length"


def test_models_health_and_raw_sse(live):
    _, url, _ = live
    models = _client(url).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    with httpx.Client(timeout=10) as h:
        assert h.get(url + "/health").json()["status"] == "ok"
        with h.stream(
            "POST",
            url + "/v1/completions",
            json={"model": "tiny", "prompt": "ab", "max_tokens": 7, "stream": True},
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    assert text == "abababa"


def test_bad_requests_get_400_naming_the_field(live):
    _, url, reg = live
    with httpx.Client(timeout=10) as h:

        def post(path, body, **kw):
            return h.post(url + path, json=body, **kw)

        cases = [
            ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 3}, "temperature"),
            ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -2}, "max_tokens"),
            ("/v1/completions", {"model": "tiny", "prompt": [5, 999]}, "prompt"),
            ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 17}, "n"),
            (
                "/v1/chat/completions",
                {"model": "tiny", "messages": [{"role": "user"}]},
                "messages.[0].content",
            ),
            ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, "messages"),
            (
                "/v1/chat/completions",
                {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": 3,
                    "max_completion_tokens": 3,
                },
                "max_completion_tokens",
            ),
        ]
        for path, body, param in cases:
            r = post(path, body)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error", err
            assert set(err) == {"message", "type", "param", "code"}
        r = h.post(
            url + "/v1/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        # over the context limit (512): prompt alone, and prompt + max_tokens
        r = post("/v1/completions", {"model": "tiny", "prompt": "x" * 512})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert r.json()["error"]["param"] == "prompt"
        r = post("/v1/completions", {"model": "tiny", "prompt": "x" * 500, "max_tokens": 13})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert "513" in r.json()["error"]["message"]
        r = post("/v1/completions", {"model": "tiny", "prompt": "x" * 500, "max_tokens": 12})
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 512
        r = post(
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "y" * 600}]},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = post("/v1/completions", {"model": "gpt-9", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert h.get(url + "/v1/nope").status_code == 404
    assert (
        reg.get_sample_value(
            "moeray_requests_total", {"model": "tiny", "endpoint": "completions", "status": "400"}
        )
        == 7
    )


def test_auth_401_and_metrics():
    import prometheus_client as pc

    from moeray.platform.metrics import Metrics

    reg = pc.CollectorRegistry()
    _, app = make_server(metrics=Metrics("prometheus", registry=reg), api_key="s3cret")
    with serve_app(app) as url, httpx.Client(timeout=10) as h:
        body = {"model": "tiny", "prompt": "abc", "max_tokens": 4}
        assert h.post(url + "/v1/completions", json=body).status_code == 401
        r = h.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        # auth is checked before the body: a bad body without a key is still a 401
        assert h.post(url + "/v1/completions", json={"x": 1}).status_code == 401
        assert h.get(url + "/v1/models").status_code == 401
        assert h.get(url + "/health").status_code == 200  # probes need no key
        import openai

        with pytest.raises(openai.AuthenticationError):
            _client(url, "wrong").completions.create(model="tiny", prompt="a", max_tokens=2)
        r = _client(url, "s3cret").completions.create(model="tiny", prompt="abc", max_tokens=4)
        assert r.choices[0].text == "abca"
    g = reg.get_sample_value
    assert (
        g("moeray_requests_total", {"model": "tiny", "endpoint": "completions", "status": "401"})
        == 4
    )
    assert (
        g("moeray_requests_total", {"model": "tiny", "endpoint": "completions", "status": "200"})
        == 1
    )
    assert g("moeray_prompt_tokens_total", {"model": "tiny"}) == 3
    assert g("moeray_generation_tokens_total", {"model": "tiny"}) == 4
    assert g("moeray_ttft_seconds_count", {"model": "tiny"}) == 1
    # 4 tokens in steps of 1, 2, 1 (the cycle 1, 2, 3 clipped): 2 gaps after the first chunk
    assert g("moeray_inter_token_latency_seconds_count", {"model": "tiny"}) == 2
    assert g("moeray_tpot_seconds_count", {"model": "tiny"}) == 1
    assert g("moeray_e2e_latency_seconds_count", {"model": "tiny"}) == 1


def test_429_when_full_and_when_engine_overloaded():
    engine = EchoEngine(delay_s=0.05)
    _, app = make_server(engine, max_in_flight=2, retry_after_s=1.5)
    with serve_app(app) as url, httpx.Client(timeout=10) as h:
        body = {"model": "tiny", "prompt": "abcdef", "max_tokens": 400, "stream": True}
        with h.stream("POST", url + "/v1/completions", json={**body, "n": 2}) as r1:
            assert r1.status_code == 200
            # keep the iterator: a discarded one closes the connection when collected
            lines = r1.iter_lines()
            next(lines)  # admitted and streaming: both slots taken
            r = h.post(url + "/v1/completions", json={"model": "tiny", "prompt": "a"})
            assert r.status_code == 429 and r.headers["retry-after"] == "2"
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert h.get(url + "/health").json()["in_flight"] == 2
        _wait(lambda: h.get(url + "/health").json()["in_flight"] == 0)
        r = h.post(url + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2})
        assert r.status_code == 200
        # more choices than slots can never be admitted: 400, not an endless 429
        r = h.post(url + "/v1/completions", json={"model": "tiny", "prompt": "a", "n": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        engine.overloaded = True
        r = h.post(url + "/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert h.get(url + "/health").json()["in_flight"] == 0
    import openai

    engine.overloaded = True
    with serve_app(app) as url:
        with pytest.raises(openai.RateLimitError):
            _client(url).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}]
            )


@pytest.mark.parametrize("n", [1, 3])
def test_client_disconnect_cancels_the_engine_request(n):
    engine = EchoEngine(delay_s=0.02)
    _, app = make_server(engine)
    with serve_app(app) as url, httpx.Client(timeout=10) as h:
        body = {"model": "tiny", "prompt": "abcdefgh", "max_tokens": 400, "stream": True, "n": n}
        with h.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert got[0].startswith("data: ")
            assert len(engine.live) == n
        # closing the response drops the connection mid-stream
        _wait(lambda: len(engine.closed) == n and not engine.live)
        assert set(engine.closed.values()) == {"cancelled"}
        _wait(lambda: h.get(url + "/health").json()["in_flight"] == 0)
