"""OpenAI response objects from a request's choice events: stream chunks and full responses,
the echoed prompt of completions' `echo`, and best_of's choice selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from moeray.platform.serve.http.protocol import (
    FinishReason,
    GenerationStep,
    Tokenizer,
    TokenLogprob,
)
from moeray.platform.serve.http.schemas import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprob,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TopLogprob,
    Usage,
)


@dataclass
class ChoiceEvent:
    """New text of one choice (after detokenizing and stop strings), with its tokens."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[Any, ...] | None
    finish_reason: FinishReason | None


@dataclass(frozen=True)
class Echo:
    """Completions' echo: the prompt's text (and, with logprobs, its scored tokens) goes before
    each choice's first text. only: max_tokens was 0, so the generated token is dropped."""

    text: str
    prompt_ids: tuple[int, ...]
    logprobs: bool
    only: bool

    def first(self, step: GenerationStep) -> tuple[str, tuple[Any, ...] | None]:
        """The prompt's text and logprob entries to put before the first step's."""
        if not self.logprobs:
            return self.text, None
        lps = step.prompt_logprobs
        if lps is None or len(lps) != len(self.prompt_ids):
            got = None if lps is None else len(lps)
            raise RuntimeError(
                f"the backend returned {got} prompt logprobs for {len(self.prompt_ids)} tokens"
            )
        head = TokenLogprob(self.prompt_ids[0], None, None)  # no context: no logprob (OpenAI)
        return self.text, (head, *lps[1:])


def select_best(
    events: list[ChoiceEvent], num_prompts: int, best_of: int, n: int, keep_logprobs: bool
) -> tuple[list[ChoiceEvent], int]:
    """best_of > n: of each prompt's best_of choices (indices p * best_of + j), keep the n with
    the highest cumulative logprob of their generated tokens, renumbered p * n + rank (best
    first, as vLLM orders them). Returns the kept events (logprobs dropped unless
    keep_logprobs) and their generated token count (the usage vLLM reports)."""
    total: dict[int, float] = {}
    for ev in events:
        lps = [] if ev.logprobs is None else ev.logprobs[len(ev.logprobs) - len(ev.token_ids) :]
        total[ev.index] = total.get(ev.index, 0.0) + sum(float(lp.logprob) for lp in lps)
    renumber: dict[int, int] = {}
    for p in range(num_prompts):
        ranked = sorted(range(p * best_of, (p + 1) * best_of), key=lambda i: -total.get(i, 0.0))
        renumber.update({old: p * n + rank for rank, old in enumerate(ranked[:n])})
    kept = [
        ChoiceEvent(
            renumber[ev.index],
            ev.text,
            ev.token_ids,
            ev.logprobs if keep_logprobs else None,
            ev.finish_reason,
        )
        for ev in events
        if ev.index in renumber
    ]
    return kept, sum(len(ev.token_ids) for ev in kept)


class ResponseFormatter:
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

    def _completion_logprobs(self, ev: ChoiceEvent) -> CompletionLogprobs | None:
        if ev.logprobs is None:
            return None
        out = CompletionLogprobs()
        offset = self._offsets.get(ev.index, 0)
        for lp in ev.logprobs:
            s = self._token_str(lp.token_id)
            out.tokens.append(s)
            out.token_logprobs.append(None if lp.logprob is None else float(lp.logprob))
            out.top_logprobs.append(
                None if lp.top is None else {self._token_str(t): float(v) for t, v in lp.top}
            )
            out.text_offset.append(offset)
            offset += len(s)
        self._offsets[ev.index] = offset
        return out

    def _chat_logprobs(self, ev: ChoiceEvent) -> ChatChoiceLogprobs | None:
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

    def chunk(self, ev: ChoiceEvent) -> BaseModel:
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
        role: Literal["assistant"] | None = None
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

    def full(self, events: list[ChoiceEvent], n_choices: int, usage: Usage) -> BaseModel:
        texts: dict[int, list[str]] = {i: [] for i in range(n_choices)}
        finish: dict[int, FinishReason] = {}
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
                    lp = self._completion_logprobs(ChoiceEvent(i, "", (), tuple(lps[i]), None))
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
                    logprobs=self._chat_logprobs(ChoiceEvent(i, "", (), tuple(lps[i]), None))
                    if has_lp
                    else None,
                )
                for i in range(n_choices)
            ],
        )
