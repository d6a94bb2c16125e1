"""The OpenAI wire format: request and response schemas.

Request schemas (`CompletionRequest`, `ChatCompletionRequest`) validate bodies the way OpenAI does
(strict scalar types, OpenAI's limits on stop strings and logprobs); response and chunk schemas
(`CompletionResponse` doubles as the stream chunk, as in OpenAI's API) are what the server sends
back.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from moeray.platform.serve.http.protocol import MAX_TOP_LOGPROBS

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values: [-100, 100]
MAX_PENALTY = 2.0  # OpenAI's range for presence and frequency penalties: [-2, 2]

# Strict scalar types: OpenAI rejects `"n": "2"`, `"stream": "yes"` and `"n": 1.5`; pydantic's lax
# mode would accept them. Floats still accept JSON integers (`"temperature": 1`).
SInt = Annotated[int, Strict()]
SFloat = Annotated[float, Strict()]
SBool = Annotated[bool, Strict()]
SStr = Annotated[str, Strict()]

# The fields validated by hand below are typed Any; these are their accepted shapes, published in
# /openapi.json so that clients and API fuzzers see what the validators accept.
_STOP_SCHEMA = {
    "anyOf": [
        {"type": "null"},
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP},
    ]
}
_IDS_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        _IDS_SCHEMA,
        {"type": "array", "items": _IDS_SCHEMA, "minItems": 1},
    ]
}
_CONTENT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                "required": ["type", "text"],
                "additionalProperties": False,
            },
        },
    ]
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def lone_surrogate_path(value: Any, path: str = "") -> str | None:
    """The param path (`messages.[0].content`) of the first string, key or value, holding a lone
    UTF-16 surrogate (JSON's "\\ud800" escape decodes to one), else None. Such a string cannot
    be encoded to UTF-8, so no tokenizer takes it and no response can quote it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and lone_surrogate_path(k) is not None:
                return path or "body"
            found = lone_surrogate_path(v, sub)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = lone_surrogate_path(v, f"{path}.[{i}]" if path else f"[{i}]")
            if found is not None:
                return found
    return None


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
    stop: Annotated[Any, WithJsonSchema(_STOP_SCHEMA)] = Field(None, validate_default=True)
    seed: SInt | None = Field(None, ge=0, lt=2**63)
    presence_penalty: SFloat = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: SFloat = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    # {"token id": bias}; parsed to (token id, bias) pairs, checked against the vocabulary later
    logit_bias: Any = Field(None, validate_default=True)
    user: SStr | None = None
    # Not OpenAI: vLLM's extensions (`ignore_eos` is used by `moeray bench serve`).
    ignore_eos: SBool = False
    top_k: SInt | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: SFloat | None = Field(None, ge=0.0, le=1.0)  # None: generation_config.json's or 0
    repetition_penalty: SFloat | None = Field(None, gt=0.0, allow_inf_nan=False)
    min_tokens: SInt = Field(0, ge=0)
    stop_token_ids: list[Annotated[int, Strict(), Field(ge=0)]] | None = None
    # vLLM's text extensions. skip_special_tokens: leave special tokens (<|eos|>,
    # <|User|>, ...) out of the text. add_special_tokens: let the tokenizer add BOS to a text
    # prompt; None is the endpoint's default (completions yes, chat no: the template writes it).
    # return_tokens_as_token_ids: logprobs name tokens "token_id:<id>" instead of their text.
    skip_special_tokens: SBool = True
    add_special_tokens: SBool | None = None
    return_tokens_as_token_ids: SBool = False

    @model_validator(mode="before")
    @classmethod
    def _utf8(cls, data: Any) -> Any:
        bad = lone_surrogate_path(data)
        if bad is not None:
            raise PydanticCustomError(
                "lone_surrogate",
                "{param}: contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
                "accepted: valid Unicode text",
                {"param": bad},
            )
        return data

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

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: Any) -> tuple[tuple[int, float], ...]:
        if v is None:
            return ()
        if not isinstance(v, dict):
            raise ValueError('must be an object mapping token ids to biases, e.g. {"50256": -100}')
        pairs = []
        for key, bias in v.items():
            if not (isinstance(key, str) and key.isdigit()):
                raise ValueError(f"key {key!r} is not a token id (a non-negative integer)")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)):
                raise ValueError(f"bias {bias!r} of token {key} is not a number")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(
                    f"bias {bias} of token {key} is outside [-{MAX_LOGIT_BIAS:g}, "
                    f"{MAX_LOGIT_BIAS:g}]"
                )
            pairs.append((int(key), float(bias)))
        return tuple(sorted(pairs))


class CompletionRequest(_SamplingRequest):
    prompt: Annotated[Any, WithJsonSchema(_PROMPT_SCHEMA)]
    # 0 only with echo: the prompt comes back scored and nothing is generated (lm-eval's
    # log-likelihood requests); the server checks that.
    max_tokens: SInt | None = Field(None, ge=0)
    logprobs: SInt | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: SBool = False
    suffix: SStr | None = None
    best_of: SInt | None = Field(None, ge=1)

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

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: Any) -> Any:
        if v:
            raise ValueError("is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: Any, info: ValidationInfo) -> Any:
        n = info.data.get("n", 1)
        if v is not None and v < n:
            raise ValueError(f"best_of={v} must be >= n={n}")
        if v is not None and v > n and info.data.get("stream", False):
            raise ValueError(
                f"best_of={v} > n={n} cannot be streamed (the best choices are known only at "
                "the end): set stream=false or best_of=n"
            )
        return v


class FunctionCall(_Strict):
    name: SStr
    arguments: SStr  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    """A call in an assistant message (requests) or in a response's message."""

    id: SStr
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Strict):
    name: SStr = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: SStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: SBool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class JSONSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: SStr = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: SStr | None = None
    # `schema` in JSON; renamed here because BaseModel has a `schema` attribute.
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: SBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self


class ChatMessage(_Strict):
    # Fields validate in this order: content's check reads role and tool_calls.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    name: SStr | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages that called tools
    tool_call_id: SStr | None = None  # tool messages: the call this is the result of
    # Null is accepted only with tool_calls (the validator below), so the document says so.
    content: Annotated[
        Any, WithJsonSchema({"anyOf": [*_CONTENT_SCHEMA["anyOf"], {"type": "null"}]})
    ] = Field(None, validate_default=True)

    @model_validator(mode="after")
    def _role_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls is only allowed in assistant messages")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool messages need tool_call_id, and only they take one")
        return self

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any, info: ValidationInfo) -> str | None:
        """A string, or a list of text parts (joined): image/audio parts are not supported.
        Null (or absent) only in an assistant message with tool_calls."""
        if v is None:
            if info.data.get("role") == "assistant" and info.data.get("tool_calls"):
                return None
            raise ValueError("is required (null only in an assistant message with tool_calls)")
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
    tools: list[ToolDef] | None = None
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}};
    # checked against `tools` in serve/http/tools.py
    tool_choice: Any = None
    parallel_tool_calls: SBool | None = None
    response_format: ResponseFormat | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and not info.data.get("logprobs", False):
            raise ValueError("requires logprobs to be true")
        return v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """None entries: an echoed prompt's first token, which has no logprob."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
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
    content: str | None
    tool_calls: list[ToolCall] | None = None


ChatFinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: ChatFinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str = ""


class ToolCallDelta(BaseModel):
    """A streamed piece of tool call `index`: id, type and name come with its first piece."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error status answers this body (errors.py)."""

    error: ErrorDetail


def openapi_responses(request: type[BaseModel] | None = None) -> dict[int | str, Any]:
    """The `responses` of a route for /openapi.json: its 200 body (JSON, or an SSE stream of
    chunks for the generation routes) and the error body of 4XX (400 invalid, 401 key, 404
    model, 413 body size, 429 busy) and 500."""
    out: dict[int | str, Any] = {
        "4XX": {"model": ErrorResponse, "description": "OpenAI-style error"},
        500: {"model": ErrorResponse, "description": "Server error (cause in the server log)"},
    }
    if request is not None:
        response = (
            ChatCompletionResponse if request is ChatCompletionRequest else CompletionResponse
        )
        out[200] = {
            "model": response,
            "description": "The completion; with stream=true, server-sent events of chunks",
            # Each event's `data` is a chunk's JSON, the last one `[DONE]`.
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "properties": {"data": {"type": "string"}},
                        "required": ["data"],
                    }
                }
            },
        }
    return out
