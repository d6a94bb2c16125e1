"""The OpenAI-compatible HTTP server: routes, auth, admission, detokenization, stop strings.

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

The wire format (request/response schemas, `APIError`, SSE framing) and the engine interface
(`Engine`, `Tokenizer`, `GenerationStep`, ...) live in `serve/openai.py`. The server detokenizes
incrementally, applies stop strings, counts usage and records the metrics in
`moeray.platform.metrics`.

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
import os
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse

from moeray.platform.serve.openai import (
    SSE_DONE,
    APIError,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprob,
    ChatMessage,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Engine,
    EngineOverloaded,
    EngineRequest,
    GenerationParams,
    ModelCard,
    ModelList,
    Tokenizer,
    TopLogprob,
    Usage,
    error_body,
    sse_event,
    too_many_requests,
    validation_error,
)

if TYPE_CHECKING:
    from moeray.platform.metrics import Metrics

API_KEY_ENV = "MOERAY_API_KEY"


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
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    ):
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
            f"Server busy: {self.in_flight} of {self.limit} request slots in use",
            self.retry_after_s,
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
                (
                    i
                    for s in self._stops
                    for i in range(max(self._sent, n - len(s) + 1), n)
                    if s.startswith(text[i:])
                ),
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
                404,
                f"The model `{model}` does not exist; this server serves `{self.config.model_id}`",
                param="model",
                code="model_not_found",
            )

    def _check_ids(self, ids: Sequence[int], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400,
                f"token ids {bad[:5]} are outside [0, {vocab})",
                param=param,
                code="invalid_value",
            )
        if not ids:
            raise APIError(
                400, "the prompt is empty after tokenization", param=param, code="invalid_value"
            )

    def _budget(self, prompt_len: int, max_tokens: int | None, param: str, mt_param: str) -> int:
        """max_tokens to use; 400 when the prompt (plus max_tokens) exceeds the context."""
        ctx = self.config.max_context
        if prompt_len >= ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens, but the prompt has "
                f"{prompt_len} tokens (at least one token must be generated)",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return ctx - prompt_len
        if prompt_len + max_tokens > ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens. However, you "
                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                f"{max_tokens} for the completion). Reduce the prompt or {mt_param}.",
                param=mt_param,
                code="context_length_exceeded",
            )
        return max_tokens

    def _check_n(self, n: int, prompts: int) -> int:
        if n > self.config.max_n:
            raise APIError(
                400,
                f"n={n} is above this server's limit {self.config.max_n}",
                param="n",
                code="invalid_value",
            )
        weight = n * prompts
        if weight > self.gate.limit:
            raise APIError(
                400,
                f"{weight} choices (n x prompts) exceed the server's {self.gate.limit} slots",
                param="n",
                code="invalid_value",
            )
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
                        f"{len(step.token_ids)} tokens"
                    )
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
            raise RuntimeError(
                f"engine stream for {request.request_id} ended without a finish_reason"
            )
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
            except Exception as e:
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
        self,
        prompts: list[list[int]],
        params: GenerationParams,
        n: int,
        stats: _RequestStats,
        rid: str,
    ) -> tuple[AsyncGenerator[_ChoiceEvent, None], _ChoiceEvent]:
        """Start every choice and wait for the first event, so that an overloaded engine still
        gets a 429 (not a 200 stream with an error inside)."""
        streams = []
        for p, ids in enumerate(prompts):
            for j in range(n):
                seed = None if params.seed is None else (params.seed + j) % 2**63
                req = EngineRequest(
                    f"{rid}-{p * n + j}", tuple(ids), dataclasses.replace(params, seed=seed)
                )
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
                raise APIError(
                    400,
                    "set max_tokens or max_completion_tokens, not both",
                    param="max_completion_tokens",
                    code="invalid_value",
                )
            mt_param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
            requested = (
                body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
            )
            max_tokens = self._budget(len(prompts[0]), requested, "messages", mt_param)
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            prompts = []
            for i, p in enumerate(body.prompt):
                ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
                param = "prompt" if len(body.prompt) == 1 else f"prompt.[{i}]"
                self._check_ids(ids, param)
                prompts.append(ids)
            requested = (
                body.max_tokens if body.max_tokens is not None else self.config.default_max_tokens
            )
            # A short default must still fit: clip it (never an explicit max_tokens) to the context.
            if body.max_tokens is None:
                longest = max(len(p) for p in prompts)
                requested = max(1, min(requested, self.config.max_context - longest))
            max_tokens = min(
                self._budget(len(p), requested, "prompt", "max_tokens") for p in prompts
            )
            logprobs = body.logprobs
        weight = self._check_n(body.n, len(prompts))
        params = GenerationParams(
            max_tokens,
            body.temperature,
            body.top_p,
            body.seed,
            body.stop,
            logprobs,
            body.ignore_eos,
        )
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
            return SSEResponse(
                stream,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
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
        usage = Usage(
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
            total_tokens=stats.prompt_tokens + stats.completion_tokens,
        )
        return JSONResponse(fmt.full(events, len(prompts) * body.n, usage).model_dump())

    async def _stream(
        self,
        endpoint: str,
        fmt: _Formatter,
        merged: AsyncGenerator[_ChoiceEvent, None],
        first: _ChoiceEvent,
        stats: _RequestStats,
        weight: int,
        include_usage: bool,
    ) -> AsyncGenerator[bytes, None]:
        try:
            yield sse_event(fmt.chunk(first))
            async for ev in merged:
                yield sse_event(fmt.chunk(ev))
            if include_usage:
                yield sse_event(
                    fmt.usage_chunk(
                        Usage(
                            prompt_tokens=stats.prompt_tokens,
                            completion_tokens=stats.completion_tokens,
                            total_tokens=stats.prompt_tokens + stats.completion_tokens,
                        )
                    )
                )
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
        return ModelList(
            data=[
                ModelCard(
                    id=self.config.model_id,
                    created=self.config.created,
                    max_model_len=self.config.max_context,
                )
            ]
        )


class _Formatter:
    """Builds the OpenAI response objects for one request (completions or chat)."""

    def __init__(self, tokenizer: Tokenizer, endpoint: str, rid: str, created: int, model: str):
        self.tok, self.endpoint, self.rid, self.created, self.model = (
            tokenizer,
            endpoint,
            rid,
            created,
            model,
        )
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

        return ChatChoiceLogprobs(
            content=[
                ChatLogprob(
                    **top(lp.token_id, lp.logprob).model_dump(),
                    top_logprobs=[top(t, v) for t, v in lp.top],
                )
                for lp in ev.logprobs
            ]
        )

    def chunk(self, ev: _ChoiceEvent) -> BaseModel:
        if self.endpoint == "completions":
            return CompletionResponse(
                id=self.rid,
                created=self.created,
                model=self.model,
                choices=[
                    CompletionChoice(
                        index=ev.index,
                        text=ev.text,
                        finish_reason=ev.finish_reason,
                        logprobs=self._completion_logprobs(ev),
                    )
                ],
            )
        role = None
        if ev.index not in self._started:
            self._started.add(ev.index)
            role = "assistant"
        return ChatCompletionChunk(
            id=self.rid,
            created=self.created,
            model=self.model,
            choices=[
                ChatChunkChoice(
                    index=ev.index,
                    delta=ChatDelta(role=role, content=ev.text),
                    finish_reason=ev.finish_reason,
                    logprobs=self._chat_logprobs(ev),
                )
            ],
        )

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
                choices.append(
                    CompletionChoice(
                        index=i, text="".join(texts[i]), finish_reason=finish[i], logprobs=lp
                    )
                )
            return CompletionResponse(
                id=self.rid, created=self.created, model=self.model, choices=choices, usage=usage
            )
        return ChatCompletionResponse(
            id=self.rid,
            created=self.created,
            model=self.model,
            usage=usage,
            choices=[
                ChatChoice(
                    index=i,
                    message=ChatResponseMessage(content="".join(texts[i])),
                    finish_reason=finish[i],
                    logprobs=self._chat_logprobs(_ChoiceEvent(i, "", (), tuple(lps[i]), None))
                    if has_lp
                    else None,
                )
                for i in range(n_choices)
            ],
        )


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
    app = FastAPI(
        title="moeray OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.server = server

    def endpoint_of(request: Request) -> str:
        return (
            "chat"
            if request.url.path.endswith("/chat/completions")
            else ("completions" if request.url.path.endswith("/completions") else request.url.path)
        )

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
        return JSONResponse(
            error_body(str(exc.detail), kind),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
            status_code=500,
        )

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
