"""What the HTTP server needs from the serving side: two small Protocols and their data.

`GenerationBackend.generate(GenerationRequest)` yields `GenerationStep`s (one or more new token
ids, their logprobs, and a finish_reason on the last step); it may raise `BackendOverloaded`
before the first step when its queues are full (the API answers 429 with Retry-After), and
`BackendUnavailable` at any step when it lost what it runs on (503, or an error event in a
stream).
`Tokenizer` encodes prompts and decodes generated ids.

Backends: the Serve ingress's handle to a decode/colocated deployment (`serve/app.py`), the
replica workers themselves (`serve/worker.py`), and test fakes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from moeray.platform.engine.structured import StructuredOutput

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat `top_logprobs`, the largest logprobs k accepted

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings for one choice; names match engine/sampler.py's SamplingParams.

    logprobs None: no logprobs; k >= 0: the chosen token's logprob and the k most likely tokens'.
    prompt_logprobs: the same for each prompt token (completions' echo), on the first step.
    stop: stop strings; the server enforces them on the text too, so a backend may ignore them.
    The rest are vLLM's logits processing (engine/sampling_params.py says what each does);
    logit_bias is (token id, bias) pairs.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks); vLLM's extension
    top_k: int = 0  # 0: off; vLLM's extension, or the model's generation_config.json
    min_p: float = 0.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: int | None = None
    # response_format json_object/json_schema, or tool_choice required/named: the output must
    # match this grammar (engine/grammar.py).
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens} must be in [0, max_tokens={self.max_tokens}]"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [-2, 2]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"prompt_logprobs={self.prompt_logprobs} must be None or in [0, {MAX_TOP_LOGPROBS}]"
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature} must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs} must be None or in [0, {MAX_TOP_LOGPROBS}]")
        if self.structured is not None and self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with structured output")


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves a sampling field unset gets instead of the API's default, as
    vLLM takes it from the model directory's generation_config.json (serve/generation_config.py);
    None keeps the API's default (temperature 1, top_p 1, top_k off, max_tokens 16 for
    completions and the rest of the context for chat, min_p 0, repetition_penalty 1)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature}: accepted a number in [0, 2]")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: accepted a number in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: accepted an integer >= 0 (0: off)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: accepted an integer >= 1")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p}: accepted a number in [0, 1]")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: accepted a number > 0")


@dataclass(frozen=True)
class GenerationRequest:
    """One choice to generate: the server makes n x prompts of them per API request."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: GenerationParams


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's logprob and its top alternatives (token id, logprob), best first.
    (Field names match engine/sampler.py's Logprobs, so a backend can pass those through.)
    logprob and top are None only for an echoed prompt's first token, which has no context."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None = ()


@dataclass(frozen=True)
class GenerationStep:
    """New tokens of one engine step: several when MTP drafts were accepted.

    logprobs: one entry per token when the request asked for logprobs, else None.
    prompt_logprobs: on the first step of a request with params.prompt_logprobs, one entry per
    prompt token (None for the first token), else None.
    finish_reason: "stop" (the last token is a stop token: EOS or a stop token id; the server
    leaves it out of the text), "length" (max_tokens or the context) on the last step; None before
    it. A backend's generator must end right after a finished step. (Stop strings are the
    server's: it cuts the text itself and closes the generator.)
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[Any, ...] | None = None
    finish_reason: FinishReason | None = None
    prompt_logprobs: tuple[Any, ...] | None = None


class GenerationBackend(Protocol):
    """Streams the steps of one choice.

    Cancellation contract: when a client disconnects, a stop string matches, or another choice of
    the same request fails, the server calls `aclose()` on the backend's async generator (on the
    task that iterates it), so the backend must free the request's KV pages in that generator's
    `finally` (and a generator that wraps another must `aclose()` the inner one there: `async for`
    does not).
    """

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationStep, None]:
        """Stream the steps of one choice; may raise BackendOverloaded before the first step."""
        ...


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens: what the tokenizer adds around a text (BOS where the model's
        tokenizer config asks for it)."""
        ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """skip_special_tokens: leave special tokens (BOS, EOS, role markers) out of the text."""
        ...


class BackendOverloaded(Exception):
    """Raised by a backend whose queues are full; the API answers 429 with Retry-After."""

    def __init__(self, message: str = "the engine's queues are full", retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(Exception):
    """Raised by a backend that cannot finish or take requests now (an expert-parallel replica
    that lost a rank, while Serve replaces it); the API answers 503 with Retry-After, or ends a
    stream with that error."""

    def __init__(
        self, message: str = "the serving replica is unavailable", retry_after_s: float = 5.0
    ):
        super().__init__(message)
        self.retry_after_s = retry_after_s
