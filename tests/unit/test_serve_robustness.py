"""The API under hostile input, over real HTTP (uvicorn + the openai client + raw httpx): body-size
limit, tokenization off the event loop, lone surrogates, no internals in error bodies, and a
bounded schemathesis fuzz of /openapi.json that must find no 5xx; a backend lost mid-request is
a 503 (or that error inside the stream)."""

from __future__ import annotations

import json
import logging
import threading
import time

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

from moeray.platform.serve.http.app import build_app
from moeray.platform.serve.http.chat import deepseek_chat_prompt
from moeray.platform.serve.http.protocol import BackendUnavailable, GenerationStep
from moeray.platform.serve.http.schemas import ChatMessage
from moeray.platform.serve.http.server import OpenAIServerConfig
from tests.unit.test_openai_schemas import (
    ByteTokenizer,
    EchoEngine,
    _client,
    httpx,
    make_server,
    serve_app,
)

FUZZ_EXAMPLES = 25  # per operation and mode: ~15 s for the whole fuzz on 2 cores


class SlowTokenizer(ByteTokenizer):
    """ByteTokenizer that blocks (GIL released, as the tokenizers library does) while encoding a
    long text, until the test lets it go."""

    def __init__(self, long_chars: int) -> None:
        self.long_chars = long_chars
        self.started = threading.Event()
        self.release = threading.Event()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) >= self.long_chars:
            self.started.set()
            assert self.release.wait(20), "the test never released the tokenizer"
        return super().encode(text, add_special_tokens)


def test_body_over_the_limit_gets_413_before_parsing():
    _, app = make_server(max_body_bytes=10_000)
    with serve_app(app) as url, httpx.Client(timeout=10) as h:
        client = _client(url)
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="tiny", prompt="x" * 20_000, max_tokens=2)
        assert e.value.status_code == 413
        err = e.value.body
        assert err["code"] == "body_too_large" and "10000 bytes" in err["message"], err
        assert e.value.response.headers["x-request-id"]
        # Chunked (no Content-Length): refused once the bytes received pass the limit.
        chunks = [b'{"model": "tiny", "prompt": "'] + [b"y" * 4096] * 8 + [b'"}']
        r = h.post(
            url + "/v1/completions",
            content=iter(chunks),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
        assert time.monotonic() - t0 < 5
        # Under the limit still works, chunked or not.
        ok = client.completions.create(model="tiny", prompt="abc", max_tokens=3)
        assert ok.choices[0].text == "abc"
        r = h.post(
            url + "/v1/completions",
            content=iter([b'{"model": "tiny", ', b'"prompt": "ab", "max_tokens": 2}']),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ab"


def test_config_rejects_a_bad_body_limit():
    with pytest.raises(ValueError, match="max_body_bytes=0"):
        OpenAIServerConfig(model_id="m", max_context=8, max_body_bytes=0)
    with pytest.raises(ValueError, match="tokenizer_threads=0"):
        OpenAIServerConfig(model_id="m", max_context=8, tokenizer_threads=0)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_health_answers_while_a_long_prompt_tokenizes(endpoint):
    tok = SlowTokenizer(long_chars=50_000)
    config = OpenAIServerConfig(model_id="tiny", max_context=200_000)
    app = build_app(EchoEngine(), tok, config)
    with serve_app(app) as url, httpx.Client(timeout=10) as h:
        client = _client(url)
        result: dict[str, object] = {}

        def long_request() -> None:
            if endpoint == "chat":
                r = client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "z" * 60_000}], max_tokens=2
                )
                result["text"] = r.choices[0].message.content
            else:
                r = client.completions.create(model="tiny", prompt="z" * 60_000, max_tokens=2)
                result["text"] = r.choices[0].text

        th = threading.Thread(target=long_request)
        th.start()
        try:
            assert tok.started.wait(10), "the long prompt never reached the tokenizer"
            t0 = time.monotonic()
            assert h.get(url + "/health").status_code == 200
            # Another request's whole round trip, while the long one is still tokenizing.
            short = client.completions.create(model="tiny", prompt="hi", max_tokens=2)
            elapsed = time.monotonic() - t0
            assert short.choices[0].text == "hi"
            assert not tok.release.is_set() and th.is_alive()
            assert elapsed < 2.0, f"/health and a short request took {elapsed:.2f} s"
        finally:
            tok.release.set()
            th.join(20)
        prompt = "z" * 60_000
        if endpoint == "chat":
            prompt = deepseek_chat_prompt([ChatMessage(role="user", content=prompt)])
        assert result["text"] == tok.decode(tok.encode(prompt)[:2])


def test_lone_surrogate_is_a_400_naming_the_field():
    """The openai client cannot encode a lone surrogate (it writes UTF-8), so this sends the JSON
    escape `"\\ud800"` as the fuzzer, curl and clients in other languages do."""
    _, app = make_server()
    with serve_app(app) as url, httpx.Client(timeout=10) as h:

        def post(path: str, body: dict) -> httpx.Response:
            return h.post(
                url + path,
                content=json.dumps(body, ensure_ascii=True).encode(),
                headers={"content-type": "application/json"},
            )

        cases = [
            ("/v1/completions", {"prompt": "ab\ud800c"}, "prompt"),
            ("/v1/completions", {"prompt": ["ok", "\udfff"]}, "prompt.[1]"),
            ("/v1/completions", {"prompt": "a", "model": "t\ud800"}, "model"),
            ("/v1/completions", {"prompt": "a", "stop": ["\ud800"]}, "stop.[0]"),
            ("/v1/completions", {"prompt": "a", "user": "\udc00"}, "user"),
            ("/v1/completions", {"prompt": "a", "\ud800": 1}, "body"),
            (
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "\ud800"}]},
                "messages.[0].content",
            ),
            (
                "/v1/chat/completions",
                {
                    "messages": [
                        {"role": "system", "content": "fine"},
                        {"role": "user", "content": [{"type": "text", "text": "x\ud800"}]},
                    ]
                },
                "messages.[1].content.[0].text",
            ),
        ]
        for path, body, param in cases:
            r = post(path, {"model": "tiny", "max_tokens": 2, **body})
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and "surrogate" in err["message"], (body, err)
        # The same request without the surrogate goes through the openai client.
        ok = _client(url).completions.create(model="tiny", prompt="abc", max_tokens=2)
        assert ok.choices[0].text == "ab"


def test_a_template_that_refuses_the_messages_is_a_400():
    """A model's Jinja template calls raise_exception (ValueError) on messages it does not take:
    the client's mistake, so a 400 on `messages`, not a 500."""

    def strict_template(messages):
        if messages[0].role != "user":
            raise ValueError("Conversation must start with a user message")
        return deepseek_chat_prompt(messages)

    app = build_app(
        EchoEngine(),
        ByteTokenizer(),
        OpenAIServerConfig(model_id="tiny", max_context=512),
        chat_template=strict_template,
    )
    with serve_app(app) as url:
        client = _client(url)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="tiny", messages=[{"role": "assistant", "content": "hi"}], max_tokens=2
            )
        assert e.value.body["param"] == "messages"
        assert "must start with a user message" in e.value.body["message"]
        ok = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert ok.choices[0].finish_reason == "length"


class FailingEngine(EchoEngine):
    """Fails the way a killed Ray replica does: the error text names the actor, pid and node."""

    INTERNALS = "ActorDiedError: actor 9f3c0ffee pid=4242 ip=10.1.2.3 killed by ray.kill"

    def __init__(self, after_steps: int, error: Exception | None = None) -> None:
        super().__init__()
        self.after_steps = after_steps
        self.error = error or RuntimeError(self.INTERNALS)

    async def generate(self, request):
        for i in range(self.after_steps):
            yield GenerationStep((97 + i,))
        raise self.error


@pytest.mark.parametrize("stream", [False, True])
def test_errors_carry_a_request_id_not_internals(stream, caplog):
    _, app = make_server(FailingEngine(after_steps=1 if stream else 0))
    caplog.set_level(logging.ERROR, logger="moeray.platform.serve.http")
    with serve_app(app) as url:
        client = _client(url)
        if not stream:
            with pytest.raises(openai.InternalServerError) as e:
                client.completions.create(model="tiny", prompt="abc", max_tokens=4)
            message = e.value.body["message"]
            rid = e.value.response.headers["x-request-id"]
        else:
            raw = client.completions.with_raw_response.create(
                model="tiny", prompt="abc", max_tokens=4, stream=True
            )
            rid = raw.headers["x-request-id"]
            texts = []
            with pytest.raises(openai.APIError) as e:
                for chunk in raw.parse():
                    texts.append(chunk.choices[0].text)
            assert texts == ["a"]  # the error comes inside the 200 stream, after the first token
            message = e.value.message
    assert rid in message
    # the request id is random hex: take it out first, or "4242" may be in it by chance
    without_id = message.replace(rid, "")
    for internal in ("9f3c0ffee", "4242", "10.1.2.3", "ray.kill", "ActorDiedError"):
        assert internal not in without_id
    logged = "\n".join(r.getMessage() + str(r.exc_info) for r in caplog.records)
    assert rid in logged and "killed by ray.kill" in logged


@pytest.mark.parametrize("after_steps", [0, 2])
def test_a_lost_backend_is_a_503_or_an_error_event_in_the_stream(after_steps):
    # As an EP replica that lost a rank fails (serve/gang.py).
    lost = BackendUnavailable("this replica lost a rank; retry the request", retry_after_s=4)
    _, app = make_server(FailingEngine(after_steps, lost))
    with serve_app(app) as url:
        client = _client(url)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny", prompt="abc", max_tokens=4)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "4"
        assert e.value.body == {
            "message": "this replica lost a rank; retry the request",
            "type": "server_error",
            "param": None,
            "code": "service_unavailable",
        }
        if after_steps == 0:  # nothing streamed yet: the stream request is a 503 too
            with pytest.raises(openai.InternalServerError, match="lost a rank"):
                client.completions.create(model="tiny", prompt="abc", max_tokens=4, stream=True)
            return
        texts = []
        with pytest.raises(openai.APIError) as err:
            for chunk in client.completions.create(
                model="tiny", prompt="abc", max_tokens=4, stream=True
            ):
                texts.append(chunk.choices[0].text)
        assert texts == ["a", "b"] and err.value.body["code"] == "service_unavailable"
        # Raw: the error event, then [DONE], then the stream ends.
        with httpx.Client(timeout=10) as h:
            body = {"model": "tiny", "prompt": "abc", "max_tokens": 4, "stream": True}
            r = h.post(url + "/v1/completions", json=body)
        events = [ln.removeprefix("data: ") for ln in r.text.split("\n\n") if ln]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "service_unavailable"


def test_a_client_request_id_is_kept_and_a_bad_one_replaced():
    _, app = make_server()
    with serve_app(app) as url, httpx.Client(timeout=10) as h:
        r = h.get(url + "/health", headers={"x-request-id": "trace-42.a:b"})
        assert r.headers["x-request-id"] == "trace-42.a:b"
        r = h.get(url + "/health", headers={"x-request-id": "has space<script>"})
        assert r.headers["x-request-id"] != "has space<script>"
        assert len(r.headers["x-request-id"]) == 32


# ---- the OpenAPI document, fuzzed ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_fuzz_finds_no_server_error(mode):
    """Schemathesis, bounded: for each operation in /openapi.json, `FUZZ_EXAMPLES` requests
    generated from the document (valid bodies, or bodies that break it), over real HTTP. No 5xx;
    every status, content type and JSON body as the document says."""
    engine = EchoEngine()
    config = OpenAIServerConfig(model_id="tiny", max_context=256, max_body_bytes=64_000)
    app = build_app(engine, ByteTokenizer(), config)
    with serve_app(app) as url, httpx.Client(timeout=10) as h:
        doc = h.get(url + "/openapi.json")
        assert doc.status_code == 200 and doc.json()["openapi"].startswith("3.")
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        operations = [op.ok() for op in schema.get_all_operations()]
        assert {f"{op.method.upper()} {op.path}" for op in operations} == {
            "GET /health",
            "GET /v1/models",
            "POST /v1/completions",
            "POST /v1/chat/completions",
        }
        statuses: dict[str, set[int]] = {}
        for op in operations:
            if mode == "negative" and op.method == "get":
                continue  # nothing to break: no parameters, no body
            strategy = op.as_strategy(generation_mode=GenerationMode(mode))
            if mode == "positive":  # the served model, so that valid bodies reach the engine
                strategy = strategy.map(_served_model)

            @given(case=strategy)
            @settings(
                max_examples=FUZZ_EXAMPLES,
                deadline=None,  # wall time is bounded by max_examples and the request timeout
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case) -> None:
                response = _send(h, case.as_transport_kwargs(base_url=url))
                statuses.setdefault(case.operation.label, set()).add(response.status_code)
                case.validate_response(
                    response,
                    checks=[
                        checks.not_a_server_error,
                        checks.status_code_conformance,
                        checks.content_type_conformance,
                        checks.response_schema_conformance,
                    ],
                )

            fuzz()
    assert not engine.live  # every generation the fuzz started was finished or closed
    gen = statuses["POST /v1/completions"] | statuses["POST /v1/chat/completions"]
    if mode == "positive":  # valid bodies reach the engine
        assert 200 in gen, statuses
    else:  # bodies that break the document are refused
        assert gen and all(400 <= s < 500 for s in gen), statuses


def _served_model(case):
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "tiny"
    return case


def _send(h: httpx.Client, kwargs: dict) -> httpx.Response:
    """Schemathesis' request (its `requests` keyword arguments) sent with httpx: its own
    `requests` transport does not run against the urllib3 installed here."""
    body: dict = {}
    if "json" in kwargs:
        body["json"] = kwargs["json"]
    elif kwargs.get("data") is not None:
        body["content"] = kwargs["data"]
    return h.request(
        kwargs["method"],
        kwargs["url"],
        headers=kwargs.get("headers"),
        params=kwargs.get("params"),
        cookies=kwargs.get("cookies") or None,
        **body,
    )
