"""The OpenAI wire format, engine-agnostic: schemas, errors, SSE framing, the engine interface.

Request schemas (`CompletionRequest`, `ChatCompletionRequest`) validate bodies the way OpenAI does
(strict scalar types, OpenAI's limits on stop strings and logprobs); response and chunk schemas are
what the server sends back. The server that uses them (routes, auth, admission, detokenization,
stop strings, streaming) is `serve/ingress.py`.

What the server needs from the serving side is two small Protocols, `Engine` and `Tokenizer`:
the engine yields `GenerationStep`s (one or more new token ids, their logprobs, and a
finish_reason on the last step); it may raise `EngineOverloaded` when its queues are full. The
cancellation contract (who calls `aclose()` on the engine's generator, and when) is in
`serve/ingress.py`.

Errors are OpenAI-shaped `{"error": {"message", "type", "param", "code"}}` (`APIError.body()`,
`error_body`); `validation_error` turns pydantic's errors into the 400, with `param` naming the
first bad field (e.g. `messages.[0].role`); `too_many_requests` is the 429 with Retry-After.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationInfo, field_validator

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


def too_many_requests(message: str, retry_after_s: float) -> APIError:
    # Retry-After takes whole seconds (RFC 9110); round up so clients never retry too early.
    return APIError(
        429,
        message,
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
    )


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
                if (
                    not isinstance(p, dict)
                    or set(p) != {"type", "text"}
                    or p["type"] != "text"
                    or not isinstance(p["text"], str)
                ):
                    raise ValueError(
                        f"part [{i}] must be {{'type': 'text', 'text': <string>}} "
                        "(only text parts are supported)"
                    )
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
