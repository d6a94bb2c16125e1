"""The request handling behind the OpenAI routes: one `OpenAIServer` per ingress replica.

Per request it checks the model, tokenizes (chat through the chat template) on a thread pool, so
that a long prompt does not stall the event loop, fits max_tokens to the context, admits the
request's n x prompts choices through the `AdmissionGate` (429 when full), starts one backend
generator per choice and merges their events. Text prompts get BOS where the tokenizer config
asks, a rendered chat template none (it writes its own). Each choice's ids become text in
`text.ChoiceText` (incremental detokenization, special tokens skipped unless skip_special_tokens
is false, the stop token left out, stop strings cut; logprobs for exactly the tokens of the text
sent); usage is counted and the metrics of `moeray.platform.metrics` recorded. The response is
one JSON body or an SSE stream.

Completions also take `echo` (the prompt's text, and with `logprobs` its tokens scored by the
engine's prompt logprobs, go before each choice; max_tokens 0 then returns the prompt alone, as
vLLM does) and `best_of` (best_of choices run per prompt and the n with the highest cumulative
logprob are returned; not streamable).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from moeray.platform.config import DEFAULT_MAX_BODY_BYTES
from moeray.platform.metrics import Metrics
from moeray.platform.serve.http.admission import AdmissionGate
from moeray.platform.serve.http.chat import ChatTemplate, deepseek_chat_prompt
from moeray.platform.serve.http.errors import (
    APIError,
    error_body,
    internal_error_message,
    service_unavailable,
    too_many_requests,
)
from moeray.platform.serve.http.protocol import (
    BackendOverloaded,
    BackendUnavailable,
    FinishReason,
    GenerationBackend,
    GenerationParams,
    GenerationRequest,
    SamplingDefaults,
    Tokenizer,
)
from moeray.platform.serve.http.responses import (
    ChoiceEvent,
    Echo,
    ResponseFormatter,
    select_best,
)
from moeray.platform.serve.http.sampling import completion_max_tokens, generation_params
from moeray.platform.serve.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
)
from moeray.platform.serve.http.sse import SSE_DONE, SSEResponse, sse_event
from moeray.platform.serve.http.text import ChoiceText
from moeray.platform.serve.http.tool_parsers import get_tool_parser
from moeray.platform.serve.http.tools import ChatPlan, plan_chat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenAIServerConfig:
    """model_id: the name clients send as `model`; max_context: prompt + completion tokens.
    max_in_flight: admitted choices at once (a request with n=4 takes 4) before 429.
    max_body_bytes: larger request bodies get a 413 before they are parsed.
    tokenizer_threads: the pool that runs chat templates and tokenization off the event loop
    (the tokenizers library releases the GIL while it encodes, so /health and streams keep
    going meanwhile)."""

    model_id: str
    max_context: int
    max_in_flight: int = 256
    retry_after_s: float = 1.0
    api_key: str | None = None
    max_n: int = 16
    default_max_tokens: int = 16  # /v1/completions default (OpenAI's); chat uses the context
    created: int = 0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    tokenizer_threads: int = 4
    # The model's generation_config.json: defaults for the sampling fields a request leaves unset.
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    # How chat output becomes tool_calls with tool_choice auto (serve/http/tool_parsers/).
    tool_call_parser: str = "deepseek_v3"

    def __post_init__(self) -> None:
        get_tool_parser(self.tool_call_parser)  # ValueError naming the accepted parsers
        if not self.model_id:
            raise ValueError("model_id must be a non-empty string")
        for name in (
            "max_context",
            "max_in_flight",
            "max_n",
            "default_max_tokens",
            "max_body_bytes",
            "tokenizer_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.retry_after_s > 0:
            raise ValueError(f"retry_after_s={self.retry_after_s} must be > 0")
        if self.api_key == "":
            raise ValueError("api_key must be None (no auth) or a non-empty string")


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
        backend: GenerationBackend,
        tokenizer: Tokenizer,
        config: OpenAIServerConfig,
        *,
        metrics: Metrics | None = None,
        chat_template: ChatTemplate = deepseek_chat_prompt,
    ):
        self.backend, self.tokenizer, self.config = backend, tokenizer, config
        self.metrics, self.chat_template = metrics, chat_template
        self.gate = AdmissionGate(config.max_in_flight, config.retry_after_s)
        self._tokenize_pool = ThreadPoolExecutor(
            config.tokenizer_threads, thread_name_prefix="moeray-tokenize"
        )

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def _record(self, kind: str, name: str, value: float, **labels: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, kind)(name, value, model=self.config.model_id, **labels)

    def record_status(self, endpoint: str, status: int) -> None:
        self._record("inc", "moeray_requests", 1, endpoint=endpoint, status=str(status))

    def _check_model(self, model: str) -> None:
        if model != self.config.model_id:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.config.model_id}`",
                param="model",
                code="model_not_found",
            )

    def _check_vocab(self, ids: Sequence[int], param: str, what: str = "token ids") -> None:
        vocab = self.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400,
                f"{what} {bad[:5]} are outside the vocabulary [0, {vocab})",
                param=param,
                code="invalid_value",
            )

    def _check_ids(self, ids: Sequence[int], param: str) -> None:
        self._check_vocab(ids, param)
        if not ids:
            raise APIError(
                400, "the prompt is empty after tokenization", param=param, code="invalid_value"
            )

    def _check_token_params(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        """logit_bias and stop_token_ids name token ids: they must be in the vocabulary."""
        self._check_vocab([t for t, _ in body.logit_bias], "logit_bias", "logit_bias token ids")
        self._check_vocab(body.stop_token_ids or (), "stop_token_ids", "stop_token_ids")

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

    def _check_n(self, n: int, prompts: int, best_of: int) -> int:
        """The request's admission weight: the choices it generates (best_of x prompts)."""
        for name, value in (("n", n), ("best_of", best_of)):
            if value > self.config.max_n:
                raise APIError(
                    400,
                    f"{name}={value} is above this server's limit {self.config.max_n} "
                    "(OpenAIServerConfig.max_n)",
                    param=name,
                    code="invalid_value",
                )
        weight = best_of * prompts
        if weight > self.gate.limit:
            raise APIError(
                400,
                f"{weight} choices (best_of or n, x prompts) exceed the server's "
                f"{self.gate.limit} slots",
                param="best_of" if best_of > n else "n",
                code="invalid_value",
            )
        return weight

    async def _run_choice(
        self,
        index: int,
        request: GenerationRequest,
        stats: _RequestStats,
        skip_special: bool,
        echo: Echo | None = None,
    ) -> AsyncGenerator[ChoiceEvent, None]:
        choice_text = ChoiceText(
            self.tokenizer, request.params.stop, skip_special_tokens=skip_special
        )
        gen = self.backend.generate(request)
        first: float | None = None  # monotonic time of the first step
        last = 0.0  # of the latest step; read only once `first` is set
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
                text, tokens_sent = choice_text.push(
                    step.token_ids,
                    step.logprobs,
                    final=done,
                    stop_token=step.finish_reason == "stop",
                )
                finish: FinishReason | None = "stop" if choice_text.stopped else step.finish_reason
                ids, lps = step.token_ids, None if step.logprobs is None else tuple(tokens_sent)
                if echo is not None:
                    text, ids, lps = echo.around(
                        step, text, ids, lps, self.tokenizer, first=tokens == len(step.token_ids)
                    )
                score = sum(float(lp.logprob) for lp in step.logprobs or ())
                yield ChoiceEvent(index, text, ids, lps, finish, score)
                if finish is not None:
                    finished = True
                    return
            raise RuntimeError(
                f"engine stream for {request.request_id} ended without a finish_reason"
            )
        finally:
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()  # the backend frees the request's pages when we stop early
            if finished and tokens > 1 and first is not None:  # finished: `first` is set
                self._record("observe", "moeray_tpot_seconds", (last - first) / (tokens - 1))

    async def _merge(
        self, streams: list[AsyncGenerator[ChoiceEvent, None]]
    ) -> AsyncGenerator[ChoiceEvent, None]:
        """Interleave choices as their events arrive; closing this closes every choice."""
        if len(streams) == 1:
            (s,) = streams
            try:
                async for ev in s:
                    yield ev
            finally:
                await s.aclose()
            return
        queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()

        async def pump(s: AsyncGenerator[ChoiceEvent, None]) -> None:
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
        skip_special: bool,
        echoes: list[Echo] | None = None,
    ) -> tuple[AsyncGenerator[ChoiceEvent, None], ChoiceEvent]:
        """Start every choice (n per prompt; best_of of them when it is larger) and wait for the
        first event, so that an overloaded backend still gets a 429 (not a 200 stream with an
        error inside)."""
        streams = []
        for p, ids in enumerate(prompts):
            echo = None if echoes is None else echoes[p]
            for j in range(n):
                seed = None if params.seed is None else (params.seed + j) % 2**63
                req = GenerationRequest(
                    f"{rid}-{p * n + j}", tuple(ids), dataclasses.replace(params, seed=seed)
                )
                streams.append(self._run_choice(p * n + j, req, stats, skip_special, echo))
        merged = self._merge(streams)
        try:
            first = await merged.__anext__()
        except BackendOverloaded as e:
            await merged.aclose()
            raise too_many_requests(str(e), e.retry_after_s) from e
        except BackendUnavailable as e:
            await merged.aclose()
            raise service_unavailable(str(e), e.retry_after_s) from e
        except BaseException:
            await merged.aclose()
            raise
        return merged, first

    async def completions(self, body: CompletionRequest, request_id: str = "-") -> Any:
        return await self._handle("completions", body, request_id)

    async def chat(self, body: ChatCompletionRequest, request_id: str = "-") -> Any:
        return await self._handle("chat", body, request_id)

    def _prompts(
        self, body: CompletionRequest | ChatCompletionRequest, plan: ChatPlan | None
    ) -> list[list[int]]:
        """The request's prompts as token ids (chat through the template, with the plan's tools
        when there are some); runs on the pool."""
        if isinstance(body, ChatCompletionRequest):
            try:
                # Called with tools only when there are some: one-argument templates keep working.
                if plan is not None and plan.tools:
                    text = self.chat_template(body.messages, tools=plan.tools)
                else:
                    text = self.chat_template(body.messages)
            except ValueError as e:  # a template's raise_exception (ChatTemplateError) refuses
                raise APIError(
                    400,
                    f"the model's chat template rejected the messages: {e}",
                    param="messages",
                    code="invalid_value",
                ) from None
            # The template writes BOS itself where the model wants it (vLLM's default).
            ids = self.tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
            self._check_ids(ids, "messages")
            return [ids]
        prompts = []
        for i, p in enumerate(body.prompt):
            if isinstance(p, str):  # BOS where the model's tokenizer config asks for it
                ids = self.tokenizer.encode(
                    p, add_special_tokens=body.add_special_tokens is not False
                )
            else:
                ids = list(p)
            self._check_ids(ids, "prompt" if len(body.prompt) == 1 else f"prompt.[{i}]")
            prompts.append(ids)
        return prompts

    async def _handle(
        self, endpoint: str, body: CompletionRequest | ChatCompletionRequest, request_id: str
    ) -> Any:
        arrival = time.monotonic()
        self._check_model(body.model)
        defaults, ctx = self.config.sampling_defaults, self.config.max_context
        echoes: list[Echo] | None = None
        plan: ChatPlan | None = None
        if isinstance(body, ChatCompletionRequest):
            plan = plan_chat(body, self.config.tool_call_parser)
        # Off the event loop: a megabyte prompt takes seconds to template and encode.
        prompts = await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool, self._prompts, body, plan
        )
        if isinstance(body, ChatCompletionRequest):
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
            if requested is None and defaults.max_tokens is not None:
                # A default must still fit: clip it (never an explicit max_tokens) to the context.
                requested = max(1, min(defaults.max_tokens, ctx - len(prompts[0])))
            max_tokens = self._budget(len(prompts[0]), requested, "messages", mt_param)
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            requested = completion_max_tokens(body)
            if requested is None:
                # A default must still fit: clip it (never an explicit max_tokens) to the context.
                default = defaults.max_tokens or self.config.default_max_tokens
                requested = max(1, min(default, ctx - max(len(p) for p in prompts)))
            max_tokens = min(
                self._budget(len(p), requested, "prompt", "max_tokens") for p in prompts
            )
            logprobs = body.logprobs
            if body.echo:
                echoes = Echo.for_prompts(body, prompts, self.tokenizer)
        n = body.n
        best_of = getattr(body, "best_of", None) or n
        weight = self._check_n(n, len(prompts), best_of)
        self._check_token_params(body)
        params = generation_params(
            body,
            defaults,
            max_tokens,
            # best_of ranks choices by their cumulative logprob: always compute it
            logprobs if logprobs is not None or best_of == n else 0,
            prompt_logprobs=logprobs if echoes is not None else None,
            structured=plan.structured if plan is not None else None,
        )
        if not self.gate.try_acquire(weight):
            self.record_status(endpoint, 429)
            raise self.gate.rejection()
        stats = _RequestStats(arrival, sum(len(p) for p in prompts))
        self._record("inc", "moeray_prompt_tokens", stats.prompt_tokens)
        rid = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        # A tool-call parser reads the model's call markers, which tokenizers may mark special
        # (vLLM's parsers turn skipping off too); the parser strips them from the content.
        skip_special = body.skip_special_tokens and not (plan is not None and plan.parser)
        try:
            merged, first = await self._start(
                prompts, params, best_of, stats, rid, skip_special, echoes
            )
        except BaseException as e:
            self.gate.release(weight)
            stats.status = e.status if isinstance(e, APIError) else 500
            self._finish(endpoint, stats)
            raise
        fmt = ResponseFormatter(
            self.tokenizer,
            endpoint,
            rid,
            created,
            self.config.model_id,
            plan,
            as_token_ids=body.return_tokens_as_token_ids,
        )
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self._stream(
                endpoint, fmt, merged, first, stats, weight, include_usage, request_id
            )
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
        except BackendUnavailable as e:  # lost mid-generation (a replica's rank died)
            stats.status = 503
            raise service_unavailable(str(e), e.retry_after_s) from e
        except Exception:
            stats.status = 500
            raise
        finally:
            await merged.aclose()
            self.gate.release(weight)
            self._finish(endpoint, stats)
        completion_tokens = stats.completion_tokens
        if best_of > n:
            events, completion_tokens = select_best(
                events, len(prompts), best_of, n, keep_logprobs=logprobs is not None
            )
        usage = Usage(
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=stats.prompt_tokens + completion_tokens,
        )
        return JSONResponse(fmt.full(events, len(prompts) * n, usage).model_dump())

    async def _stream(
        self,
        endpoint: str,
        fmt: ResponseFormatter,
        merged: AsyncGenerator[ChoiceEvent, None],
        first: ChoiceEvent,
        stats: _RequestStats,
        weight: int,
        include_usage: bool,
        request_id: str,
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
        except BackendUnavailable as e:  # the stream is already a 200: the 503's body inside it
            stats.status = 503
            log.warning("request %s: backend lost mid-stream: %s", request_id, e)
            yield sse_event(service_unavailable(str(e), e.retry_after_s).body())
            yield SSE_DONE
        except Exception:  # the stream is already a 200: report the error inside it
            stats.status = 500
            # The cause (a replica's actor id, pid, node IP) goes to the log, not to the client.
            log.exception("request %s: generation failed mid-stream", request_id)
            yield sse_event(error_body(internal_error_message(request_id), "server_error"))
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
