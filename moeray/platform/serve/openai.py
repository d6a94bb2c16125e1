"""OpenAI-compatible HTTP API, engine-agnostic: schemas, errors, streaming, auth, admission.

`build_app(engine, tokenizer, config)` returns the FastAPI app with
    POST /v1/completions, POST /v1/chat/completions  (stream true/false, n, max_tokens,
         temperature, top_p, stop, seed, logprobs; SSE chunks end with `data: [DONE]`)
    GET /v1/models, GET /health
The Serve ingress deployment (serve/app.py) builds it at replica start, e.g.

    @serve.deployment
    @serve.ingress()
    class Ingress:
        def __init__(self, ...): self.engine = ...   # wraps the prefill/decode handles
        def __serve_build_asgi_app__(self):
            return build_app(self.engine, self.tokenizer, cfg, metrics=Metrics("ray", ...))

What the app needs from the serving side is two small Protocols, `Engine` and `Tokenizer`:
the engine yields `GenerationStep`s (one or more new token ids, their logprobs, and a
finish_reason on the last step). The ingress detokenizes incrementally, applies stop strings, counts
usage and records the metrics in `moeray.platform.metrics`.

Cancellation contract: when a client disconnects, a stop string matches, or another choice of the
same request fails, the ingress calls `aclose()` on the engine's async generator (on the task
that iterates it), so the engine must free the request's KV pages in that generator's `finally`
(and a generator that wraps another must `aclose()` the inner one there: `async for` does not).

Errors are OpenAI-shaped `{"error": {"message", "type", "param", "code"}}`:
    400 invalid body (param names the field, e.g. `messages.[0].role`), prompt over the context
    401 missing/wrong bearer token when an API key is configured
    404 unknown model or route
    429 + Retry-After when `max_in_flight` choices are already running, or the engine raises
        `EngineOverloaded` (its queues are full) before the first token
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
import os
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationInfo, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse

if TYPE_CHECKING:
    from moeray.platform.metrics import Metrics

API_KEY_ENV = "MOERAY_API_KEY"
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat `top_logprobs`
SSE_DONE = b"data: [DONE]\n\n"

# Strict scalar types: OpenAI rejects `"n": "2"`, `"stream": "yes"` and `"n": 1.5`; pydantic's lax
# mode would accept them. Floats still accept JSON integers (`"temperature": 1`).
SInt = Annotated[int, Strict()]
SFloat = Annotated[float, Strict()]
SBool = Annotated[bool, Strict()]
SStr = Annotated[str, Strict()]


# ---- engine interface ----------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings for one choice; names match engine/sampler.py's SamplingParams.

    logprobs None: no logprobs; k >= 0: the chosen token's logprob and the k most likely tokens'.
    stop: stop strings; the ingress enforces them on the text too, so an engine may ignore them.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks); vLLM's extension

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature} must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs} must be None or in [0, {MAX_TOP_LOGPROBS}]")


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: GenerationParams


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's logprob and its top alternatives (token id, logprob), best first.
    (Field names match engine/sampler.py's Logprobs, so the engine can pass those through.)"""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationStep:
    """New tokens of one engine step: several when MTP drafts were accepted.

    logprobs: one entry per token when the request asked for logprobs, else None.
    finish_reason: "stop" (EOS or a stop token/string), "length" (max_tokens or the context) on
    the last step; None before it. An engine generator must end right after a finished step.
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[Any, ...] | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Engine(Protocol):
    def generate(self, request: EngineRequest) -> AsyncGenerator[GenerationStep, None]:
        """Stream the steps of one choice; may raise EngineOverloaded before the first step."""
        ...


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


class EngineOverloaded(Exception):
    """Raised by an engine whose queues are full; the API answers 429 with Retry-After."""

    def __init__(self, message: str = "the engine's queues are full", retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


# ---- errors ----------------------------------------------------------------------------------
class APIError(Exception):
    """An error the API answers with `status` and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def param_path(loc: Sequence[str | int]) -> str | None:
    """Pydantic error location -> OpenAI's `param`: ("body", "messages", 0, "role") ->
    "messages.[0].role"."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    if not parts or (len(parts) == 1 and isinstance(parts[0], int)):  # a JSON syntax error
        return None
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in parts)


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """The 400 for pydantic/FastAPI validation errors; param is the first bad field."""
    first = errors[0]
    param = param_path(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return APIError(400, f"Invalid JSON body: {detail}", code="invalid_json")
    msgs = []
    for e in errors:
        p = param_path(e.get("loc", ()))
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        msgs.append(f"{p}: {msg}" if p else msg)
    return APIError(400, "; ".join(msgs), param=param, code="invalid_value")


# ---- request schemas ---------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: SBool = False


class _SamplingRequest(_Strict):
    model: SStr = Field(min_length=1)
    max_tokens: SInt | None = Field(None, ge=1)
    temperature: SFloat = Field(1.0, ge=0.0, le=2.0)
    top_p: SFloat = Field(1.0, gt=0.0, le=1.0)
    n: SInt = Field(1, ge=1)
    stream: SBool = False
    stream_options: StreamOptions | None = None
    stop: Any = Field(None, validate_default=True)
    seed: SInt | None = Field(None, ge=0, lt=2**63)
    # Accepted so that clients that always send them work, but only with their neutral value.
    presence_penalty: SFloat = 0.0
    frequency_penalty: SFloat = 0.0
    logit_bias: dict[str, float] | None = None
    user: SStr | None = None
    ignore_eos: SBool = False  # not OpenAI: vLLM's extension, used by `moeray bench serve`

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> tuple[str, ...]:
        if v is None:
            return ()
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError("must be a string or a list of strings")
        if len(items) > MAX_STOP or any(s == "" for s in items):
            raise ValueError(f"must hold at most {MAX_STOP} non-empty strings, got {items!r}")
        return tuple(items)

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and not info.data.get("stream", False):
            raise ValueError("is only allowed when stream is true")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _zero_penalty(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError(f"{v} is not supported (only 0)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: Any) -> Any:
        if v:
            raise ValueError("is not supported (only empty or null)")
        return v


class CompletionRequest(_SamplingRequest):
    prompt: Any
    logprobs: SInt | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: SBool = False
    suffix: SStr | None = None
    best_of: SInt | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> list[str] | list[list[int]]:
        """str | list[str] | list[int] | list[list[int]] -> a non-empty batch of prompts."""

        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and all(type(t) is int for t in x)

        if isinstance(v, str):
            return [v]
        if is_ids(v) and v:
            return [v]
        if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
            return v
        if isinstance(v, list) and v and all(is_ids(p) and p for p in v):
            return v
        raise ValueError(
            "must be a string, a list of strings, a non-empty list of token ids, or a list of "
            "non-empty lists of token ids"
        )

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo=true is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: Any) -> Any:
        if v:
            raise ValueError("is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("is only supported equal to n")
        return v


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any
    name: SStr | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> str:
        """A string, or a list of text parts (joined): image/audio parts are not supported."""
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v:
            parts = []
            for i, p in enumerate(v):
                if (not isinstance(p, dict) or set(p) != {"type", "text"} or p["type"] != "text"
                        or not isinstance(p["text"], str)):
                    raise ValueError(f"part [{i}] must be {{'type': 'text', 'text': <string>}} "
                                     "(only text parts are supported)")
                parts.append(p["text"])
            return "".join(parts)
        raise ValueError("must be a string or a non-empty list of text parts")


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: SInt | None = Field(None, ge=1)
    logprobs: SBool = False
    top_logprobs: SInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and not info.data.get("logprobs", False):
            raise ValueError("requires logprobs to be true")
        return v


# ---- response schemas --------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """Both the response and each stream chunk (OpenAI uses the same object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moeray"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def sse_event(payload: BaseModel | dict[str, Any]) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return b"data: " + text.encode() + b"\n\n"


# ---- auth and admission ------------------------------------------------------------------------
def resolve_api_key(explicit: str | None) -> str | None:
    """`--api-key` if given, else $MOERAY_API_KEY, else None (no auth)."""
    key = explicit if explicit is not None else os.environ.get(API_KEY_ENV)
    return key or None


def check_bearer(authorization: str | None, api_key: str | None) -> None:
    """Raise a 401 APIError unless `authorization` is `Bearer <api_key>` (no-op without a key)."""
    if api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(
            401,
            "Missing or incorrect API key: send `Authorization: Bearer <key>`",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


@dataclass
class AdmissionGate:
    """Bounded in-flight counter: admits up to `limit` choices, else the API answers 429.

    Single event loop, no awaits between check and update, so no lock is needed.
    """

    limit: int
    retry_after_s: float = 1.0
    in_flight: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"admission limit {self.limit} must be >= 1")
        if not self.retry_after_s > 0:
            raise ValueError(f"retry_after_s {self.retry_after_s} must be > 0")

    def try_acquire(self, weight: int = 1) -> bool:
        if weight < 1:
            raise ValueError(f"weight {weight} must be >= 1")
        if self.in_flight + weight > self.limit:
            return False
        self.in_flight += weight
        return True

    def release(self, weight: int = 1) -> None:
        assert 0 < weight <= self.in_flight, (weight, self.in_flight)
        self.in_flight -= weight

    def rejection(self) -> APIError:
        return too_many_requests(
            f"Server busy: {self.in_flight} of {self.limit} request slots in use", self.retry_after_s
        )


def too_many_requests(message: str, retry_after_s: float) -> APIError:
    # Retry-After takes whole seconds (RFC 9110); round up so clients never retry too early.
    return APIError(
        429,
        message,
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
    )


# ---- text: incremental detokenization and stop strings -----------------------------------------
class IncrementalDetokenizer:
    """Turns a growing token list into text deltas without re-decoding everything.

    Decodes the window ids[prefix:] and subtracts the text of ids[prefix:read]: a byte-level BPE
    token can end in the middle of a UTF-8 character (shown as U+FFFD), so text is held back until
    the character completes. O(window) per step instead of O(length).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Cuts the output at the earliest stop string. While streaming it holds back only text that
    could still become one: a tail that is a proper prefix of some stop string (e.g. with stops
    ("b", "cba"), the text "cb" is held even though "b" matched, because "cba" may complete)."""

    def __init__(self, stops: Sequence[str]):
        self._stops = tuple(stops)
        self._text = ""
        self._sent = 0
        self.stopped = False

    def push(self, delta: str, final: bool = False) -> str:
        """Add generated text; return the text that may be sent now. Sets `stopped` on a match."""
        assert not self.stopped, "push after a stop string matched"
        self._text += delta
        text, n = self._text, len(self._text)
        # Nothing before _sent can start a stop string any more, so search from there.
        hit = min((i for i in (text.find(s, self._sent) for s in self._stops) if i >= 0), default=n)
        pending = n
        if not final:
            pending = min(
                (i for s in self._stops for i in range(max(self._sent, n - len(s) + 1), n)
                 if s.startswith(text[i:])),
                default=n,
            )
        if hit < n and hit <= pending:
            self.stopped = True
            end = hit
        else:
            end = min(hit, pending)
        out = text[self._sent : end]
        self._sent = end
        return out


# ---- the server --------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenAIServerConfig:
    """model_id: the name clients send as `model`; max_context: prompt + completion tokens.
    max_in_flight: admitted choices at once (a request with n=4 takes 4) before 429."""

    model_id: str
    max_context: int
    max_in_flight: int = 256
    retry_after_s: float = 1.0
    api_key: str | None = None
    max_n: int = 16
    default_max_tokens: int = 16  # /v1/completions default (OpenAI's); chat uses the context
    created: int = 0

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("model_id must be a non-empty string")
        for name in ("max_context", "max_in_flight", "max_n", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.retry_after_s > 0:
            raise ValueError(f"retry_after_s={self.retry_after_s} must be > 0")
        if self.api_key == "":
            raise ValueError("api_key must be None (no auth) or a non-empty string")


def deepseek_chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """DeepSeek-V3's chat format (its tokenizer_config chat_template, without tools)."""
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    system = "\n\n".join(m.content for m in messages if m.role in ("system", "developer"))
    out = [bos + system]
    for m in messages:
        if m.role == "user":
            out.append("<｜User｜>" + m.content)
        elif m.role == "assistant":
            out.append("<｜Assistant｜>" + m.content + eos)
    out.append("<｜Assistant｜>")
    return "".join(out)


@dataclass
class _ChoiceEvent:
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[Any, ...] | None
    finish_reason: str | None


@dataclass
class _RequestStats:
    """Per-request bookkeeping for usage and metrics."""

    arrival: float
    prompt_tokens: int
    completion_tokens: int = 0
    status: int = 499  # until the request finishes another way, assume the client went away


class OpenAIServer:
    """The request handling behind the routes; one per ingress replica."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        config: OpenAIServerConfig,
        *,
        metrics: Metrics | None = None,
        chat_template: Callable[[Sequence[ChatMessage]], str] = deepseek_chat_prompt,
    ):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.metrics, self.chat_template = metrics, chat_template
        self.gate = AdmissionGate(config.max_in_flight, config.retry_after_s)

    # -- metrics -------------------------------------------------------------------------------
    def _record(self, kind: str, name: str, value: float, **labels: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, kind)(name, value, model=self.config.model_id, **labels)

    def record_status(self, endpoint: str, status: int) -> None:
        self._record("inc", "moeray_requests", 1, endpoint=endpoint, status=str(status))

    # -- request preparation -------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.config.model_id:
            raise APIError(
                404, f"The model `{model}` does not exist; this server serves "
                f"`{self.config.model_id}`", param="model", code="model_not_found")

    def _check_ids(self, ids: Sequence[int], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside [0, {vocab})", param=param,
                           code="invalid_value")
        if not ids:
            raise APIError(400, "the prompt is empty after tokenization", param=param,
                           code="invalid_value")

    def _budget(self, prompt_len: int, max_tokens: int | None, param: str, mt_param: str) -> int:
        """max_tokens to use; 400 when the prompt (plus max_tokens) exceeds the context."""
        ctx = self.config.max_context
        if prompt_len >= ctx:
            raise APIError(
                400, f"This model's maximum context length is {ctx} tokens, but the prompt has "
                f"{prompt_len} tokens (at least one token must be generated)", param=param,
                code="context_length_exceeded")
        if max_tokens is None:
            return ctx - prompt_len
        if prompt_len + max_tokens > ctx:
            raise APIError(
                400, f"This model's maximum context length is {ctx} tokens. However, you "
                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                f"{max_tokens} for the completion). Reduce the prompt or {mt_param}.",
                param=mt_param, code="context_length_exceeded")
        return max_tokens

    def _check_n(self, n: int, prompts: int) -> int:
        if n > self.config.max_n:
            raise APIError(400, f"n={n} is above this server's limit {self.config.max_n}",
                           param="n", code="invalid_value")
        weight = n * prompts
        if weight > self.gate.limit:
            raise APIError(400, f"{weight} choices (n x prompts) exceed the server's "
                           f"{self.gate.limit} slots", param="n", code="invalid_value")
        return weight

    # -- generation ----------------------------------------------------------------------------
    async def _run_choice(
        self, index: int, request: EngineRequest, stats: _RequestStats
    ) -> AsyncGenerator[_ChoiceEvent, None]:
        detok = IncrementalDetokenizer(self.tokenizer)
        stopper = StopMatcher(request.params.stop)
        gen = self.engine.generate(request)
        first = last = None
        tokens = 0
        finished = False
        try:
            async for step in gen:
                now = time.monotonic()
                if not step.token_ids:
                    raise RuntimeError(f"engine step for {request.request_id} has no tokens")
                if step.logprobs is not None and len(step.logprobs) != len(step.token_ids):
                    raise RuntimeError(
                        f"engine step has {len(step.logprobs)} logprobs for "
                        f"{len(step.token_ids)} tokens")
                if first is None:
                    first = now
                    self._record("observe", "moeray_ttft_seconds", now - stats.arrival)
                else:
                    self._record("observe", "moeray_inter_token_latency_seconds", now - last)
                last = now
                tokens += len(step.token_ids)
                stats.completion_tokens += len(step.token_ids)
                self._record("inc", "moeray_generation_tokens", len(step.token_ids))
                done = step.finish_reason is not None
                delta = detok.push(step.token_ids) + (detok.flush() if done else "")
                text = stopper.push(delta, final=done)
                finish = "stop" if stopper.stopped else step.finish_reason
                yield _ChoiceEvent(index, text, step.token_ids, step.logprobs, finish)
                if finish is not None:
                    finished = True
                    return
            raise RuntimeError(f"engine stream for {request.request_id} ended without a "
                               "finish_reason")
        finally:
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()  # the engine frees the request's pages when we stop early
            if finished and tokens > 1:
                self._record("observe", "moeray_tpot_seconds", (last - first) / (tokens - 1))

    async def _merge(
        self, streams: list[AsyncGenerator[_ChoiceEvent, None]]
    ) -> AsyncGenerator[_ChoiceEvent, None]:
        """Interleave choices as their events arrive; closing this closes every choice."""
        if len(streams) == 1:
            (s,) = streams
            try:
                async for ev in s:
                    yield ev
            finally:
                await s.aclose()
            return
        queue: asyncio.Queue[_ChoiceEvent | BaseException | None] = asyncio.Queue()

        async def pump(s: AsyncGenerator[_ChoiceEvent, None]) -> None:
            try:
                async for ev in s:
                    await queue.put(ev)
                await queue.put(None)
            except Exception as e:  # noqa: BLE001 -- re-raised by the consumer
                await queue.put(e)
            finally:
                await s.aclose()

        tasks = [asyncio.create_task(pump(s)) for s in streams]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _start(
        self, prompts: list[list[int]], params: GenerationParams, n: int, stats: _RequestStats,
        rid: str,
    ) -> tuple[AsyncGenerator[_ChoiceEvent, None], _ChoiceEvent]:
        """Start every choice and wait for the first event, so that an overloaded engine still
        gets a 429 (not a 200 stream with an error inside)."""
        streams = []
        for p, ids in enumerate(prompts):
            for j in range(n):
                seed = None if params.seed is None else (params.seed + j) % 2**63
                req = EngineRequest(
                    f"{rid}-{p * n + j}", tuple(ids),
                    dataclasses.replace(params, seed=seed))
                streams.append(self._run_choice(p * n + j, req, stats))
        merged = self._merge(streams)
        try:
            first = await merged.__anext__()
        except EngineOverloaded as e:
            await merged.aclose()
            raise too_many_requests(str(e), e.retry_after_s) from e
        except BaseException:
            await merged.aclose()
            raise
        return merged, first

    # -- endpoints -----------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest) -> Any:
        return await self._handle("completions", body)

    async def chat(self, body: ChatCompletionRequest) -> Any:
        return await self._handle("chat", body)

    async def _handle(self, endpoint: str, body: CompletionRequest | ChatCompletionRequest) -> Any:
        arrival = time.monotonic()
        self._check_model(body.model)
        if isinstance(body, ChatCompletionRequest):
            text = self.chat_template(body.messages)
            prompts = [self.tokenizer.encode(text)]
            self._check_ids(prompts[0], "messages")
            if body.max_tokens is not None and body.max_completion_tokens is not None:
                raise APIError(400, "set max_tokens or max_completion_tokens, not both",
                               param="max_completion_tokens", code="invalid_value")
            mt_param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
            requested = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
            max_tokens = self._budget(len(prompts[0]), requested, "messages", mt_param)
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            prompts = []
            for i, p in enumerate(body.prompt):
                ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
                param = "prompt" if len(body.prompt) == 1 else f"prompt.[{i}]"
                self._check_ids(ids, param)
                prompts.append(ids)
            requested = body.max_tokens if body.max_tokens is not None else self.config.default_max_tokens
            # A short default must still fit: clip it (never an explicit max_tokens) to the context.
            if body.max_tokens is None:
                longest = max(len(p) for p in prompts)
                requested = max(1, min(requested, self.config.max_context - longest))
            max_tokens = min(
                self._budget(len(p), requested, "prompt", "max_tokens") for p in prompts)
            logprobs = body.logprobs
        weight = self._check_n(body.n, len(prompts))
        params = GenerationParams(max_tokens, body.temperature, body.top_p, body.seed, body.stop,
                                  logprobs, body.ignore_eos)
        if not self.gate.try_acquire(weight):
            self.record_status(endpoint, 429)
            raise self.gate.rejection()
        stats = _RequestStats(arrival, sum(len(p) for p in prompts))
        self._record("inc", "moeray_prompt_tokens", stats.prompt_tokens)
        rid = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        try:
            merged, first = await self._start(prompts, params, body.n, stats, rid)
        except BaseException as e:
            self.gate.release(weight)
            stats.status = e.status if isinstance(e, APIError) else 500
            self._finish(endpoint, stats)
            raise
        fmt = _Formatter(self.tokenizer, endpoint, rid, created, self.config.model_id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self._stream(endpoint, fmt, merged, first, stats, weight, include_usage)
            return SSEResponse(stream, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            events = [first]
            async for ev in merged:
                events.append(ev)
            stats.status = 200
        except Exception:
            stats.status = 500
            raise
        finally:
            await merged.aclose()
            self.gate.release(weight)
            self._finish(endpoint, stats)
        usage = Usage(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                      total_tokens=stats.prompt_tokens + stats.completion_tokens)
        return JSONResponse(fmt.full(events, len(prompts) * body.n, usage).model_dump())

    async def _stream(
        self, endpoint: str, fmt: _Formatter, merged: AsyncGenerator[_ChoiceEvent, None],
        first: _ChoiceEvent, stats: _RequestStats, weight: int, include_usage: bool,
    ) -> AsyncGenerator[bytes, None]:
        try:
            yield sse_event(fmt.chunk(first))
            async for ev in merged:
                yield sse_event(fmt.chunk(ev))
            if include_usage:
                yield sse_event(fmt.usage_chunk(Usage(
                    prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                    total_tokens=stats.prompt_tokens + stats.completion_tokens)))
            yield SSE_DONE
            stats.status = 200
        except Exception as e:  # the stream is already a 200: report the error inside it
            stats.status = 500
            yield sse_event(error_body(f"generation failed: {e}", "server_error"))
            yield SSE_DONE
        finally:
            await merged.aclose()
            self.gate.release(weight)
            self._finish(endpoint, stats)

    def _finish(self, endpoint: str, stats: _RequestStats) -> None:
        self._record("observe", "moeray_e2e_latency_seconds", time.monotonic() - stats.arrival)
        self.record_status(endpoint, stats.status)

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.config.model_id, created=self.config.created,
                                         max_model_len=self.config.max_context)])


class _Formatter:
    """Builds the OpenAI response objects for one request (completions or chat)."""

    def __init__(self, tokenizer: Tokenizer, endpoint: str, rid: str, created: int, model: str):
        self.tok, self.endpoint, self.rid, self.created, self.model = (
            tokenizer, endpoint, rid, created, model)
        self._started: set[int] = set()
        self._offsets: dict[int, int] = {}

    def _token_str(self, token_id: int) -> str:
        return self.tok.decode([token_id])

    def _completion_logprobs(self, ev: _ChoiceEvent) -> CompletionLogprobs | None:
        if ev.logprobs is None:
            return None
        out = CompletionLogprobs()
        offset = self._offsets.get(ev.index, 0)
        for lp in ev.logprobs:
            s = self._token_str(lp.token_id)
            out.tokens.append(s)
            out.token_logprobs.append(float(lp.logprob))
            out.top_logprobs.append({self._token_str(t): float(v) for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(s)
        self._offsets[ev.index] = offset
        return out

    def _chat_logprobs(self, ev: _ChoiceEvent) -> ChatChoiceLogprobs | None:
        if ev.logprobs is None:
            return None

        def top(t: int, v: float) -> TopLogprob:
            s = self._token_str(t)
            return TopLogprob(token=s, logprob=float(v), bytes=list(s.encode()))

        return ChatChoiceLogprobs(content=[
            ChatLogprob(**top(lp.token_id, lp.logprob).model_dump(),
                        top_logprobs=[top(t, v) for t, v in lp.top])
            for lp in ev.logprobs])

    def chunk(self, ev: _ChoiceEvent) -> BaseModel:
        if self.endpoint == "completions":
            return CompletionResponse(
                id=self.rid, created=self.created, model=self.model,
                choices=[CompletionChoice(index=ev.index, text=ev.text, finish_reason=ev.finish_reason,
                                          logprobs=self._completion_logprobs(ev))])
        role = None
        if ev.index not in self._started:
            self._started.add(ev.index)
            role = "assistant"
        return ChatCompletionChunk(
            id=self.rid, created=self.created, model=self.model,
            choices=[ChatChunkChoice(index=ev.index, delta=ChatDelta(role=role, content=ev.text),
                                     finish_reason=ev.finish_reason,
                                     logprobs=self._chat_logprobs(ev))])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        cls = CompletionResponse if self.endpoint == "completions" else ChatCompletionChunk
        return cls(id=self.rid, created=self.created, model=self.model, choices=[], usage=usage)

    def full(self, events: list[_ChoiceEvent], n_choices: int, usage: Usage) -> BaseModel:
        texts = {i: [] for i in range(n_choices)}
        finish: dict[int, str] = {}
        lps: dict[int, list[Any]] = {i: [] for i in range(n_choices)}
        has_lp = False
        for ev in events:
            texts[ev.index].append(ev.text)
            if ev.finish_reason is not None:
                finish[ev.index] = ev.finish_reason
            if ev.logprobs is not None:
                has_lp = True
                lps[ev.index].extend(ev.logprobs)
        assert len(finish) == n_choices, (finish, n_choices)
        if self.endpoint == "completions":
            choices = []
            for i in range(n_choices):
                lp = None
                if has_lp:
                    lp = self._completion_logprobs(_ChoiceEvent(i, "", (), tuple(lps[i]), None))
                choices.append(CompletionChoice(index=i, text="".join(texts[i]),
                                                finish_reason=finish[i], logprobs=lp))
            return CompletionResponse(id=self.rid, created=self.created, model=self.model,
                                      choices=choices, usage=usage)
        return ChatCompletionResponse(
            id=self.rid, created=self.created, model=self.model, usage=usage,
            choices=[ChatChoice(
                index=i, message=ChatResponseMessage(content="".join(texts[i])),
                finish_reason=finish[i],
                logprobs=self._chat_logprobs(_ChoiceEvent(i, "", (), tuple(lps[i]), None))
                if has_lp else None)
                for i in range(n_choices)])


class SSEResponse(StreamingResponse):
    """Streams while watching for the client's disconnect whatever the ASGI spec version
    (Starlette watches only below 2.4; uvicorn's h11 reports 2.3, httptools 2.4), and always
    closes the body iterator, so a disconnect frees the engine's pages at once rather than at the
    next token or at garbage collection."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        stop = asyncio.Event()

        async def stream() -> None:
            try:
                await self.stream_response(send)
            except OSError:  # the client went away while we were sending
                pass
            finally:
                stop.set()

        async def watch() -> None:
            await self.listen_for_disconnect(receive)
            stop.set()

        tasks = [asyncio.create_task(stream()), asyncio.create_task(watch())]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await self.body_iterator.aclose()
        if isinstance(results[0], Exception):  # a bug while streaming: let the server log it
            raise results[0]


def build_app(
    engine: Engine,
    tokenizer: Tokenizer,
    config: OpenAIServerConfig,
    *,
    metrics: Metrics | None = None,
    chat_template: Callable[[Sequence[ChatMessage]], str] = deepseek_chat_prompt,
) -> FastAPI:
    """The FastAPI app: routes, bearer auth on /v1/*, OpenAI-style errors."""
    server = OpenAIServer(engine, tokenizer, config, metrics=metrics, chat_template=chat_template)
    app = FastAPI(title="moeray OpenAI-compatible API", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server

    def endpoint_of(request: Request) -> str:
        return "chat" if request.url.path.endswith("/chat/completions") else (
            "completions" if request.url.path.endswith("/completions") else request.url.path)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status in (400, 401, 404) and request.method == "POST":
            # 429s and engine failures are counted where they happen, with their request's stats
            server.record_status(endpoint_of(request), exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _api_error(request, validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}",
                                       "server_error"), status_code=500)

    async def auth(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), config.api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "in_flight": server.gate.in_flight, "limit": server.gate.limit}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict[str, Any]:
        return server.models().model_dump()

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest) -> Any:
        return await server.completions(body)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(body: ChatCompletionRequest) -> Any:
        return await server.chat(body)

    return app
