"""OpenAI response objects from a request's choice events: stream chunks and full responses,
the echoed prompt of completions' `echo`, and best_of's choice selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    CompletionRequest,
    CompletionResponse,
    TopLogprob,
    Usage,
)
from moeray.platform.serve.http.text import TokenText
from moeray.platform.serve.http.tools import ChatPlan, ChoiceOutput


@dataclass
class ChoiceEvent:
    """New text of one choice (after detokenizing and stop strings), with its tokens; logprobs:
    the tokens whose text this event completes, each a TokenText around its TokenLogprob."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenText, ...] | None
    finish_reason: FinishReason | None
    # The summed logprob of the step's generated tokens (stop token included): best_of's rank.
    logprob_sum: float = 0.0


@dataclass(frozen=True)
class Echo:
    """Completions' echo: the prompt's text (and, with logprobs, its scored tokens) goes before
    each choice's first text. only: max_tokens was 0, so the generated token is dropped."""

    text: str
    prompt_ids: tuple[int, ...]
    logprobs: bool
    only: bool

    @classmethod
    def for_prompts(
        cls, body: CompletionRequest, prompts: list[list[int]], tokenizer: Tokenizer
    ) -> list[Echo]:
        """One per prompt of an echo request: a text prompt comes back as sent, token ids as
        their text."""
        return [
            cls(
                p if isinstance(p, str) else tokenizer.decode(ids),
                tuple(ids),
                body.logprobs is not None,
                body.max_tokens == 0,
            )
            for p, ids in zip(body.prompt, prompts, strict=True)
        ]

    def around(
        self,
        step: GenerationStep,
        text: str,
        ids: tuple[int, ...],
        lps: tuple[TokenText, ...] | None,
        tokenizer: Tokenizer,
        *,
        first: bool,
    ) -> tuple[str, tuple[int, ...], tuple[TokenText, ...] | None]:
        """A step's text, ids and logprob tokens with the echo: the generated part moved past
        the prompt's text (or dropped when `only`), and on the first step the prompt in front,
        its tokens scored by the step's prompt_logprobs."""
        if self.only:
            text, ids, lps = "", (), None
        elif lps is not None:
            lps = tuple(TokenText(t.value, t.text, t.offset + len(self.text)) for t in lps)
        if not first:
            return text, ids, lps
        if not self.logprobs:
            return self.text + text, ids, lps
        scored = step.prompt_logprobs
        if scored is None or len(scored) != len(self.prompt_ids):
            got = None if scored is None else len(scored)
            raise RuntimeError(
                f"the backend returned {got} prompt logprobs for {len(self.prompt_ids)} tokens"
            )
        # The first token has no context, so no logprob (OpenAI, vLLM).
        entries = [TokenLogprob(self.prompt_ids[0], None, None), *scored[1:]]
        head, offset = [], 0
        for token_id, entry in zip(self.prompt_ids, entries, strict=True):
            piece = tokenizer.decode([token_id])
            head.append(TokenText(entry, piece, offset))
            offset += len(piece)
        return self.text + text, ids, (*head, *(lps or ()))


def select_best(
    events: list[ChoiceEvent], num_prompts: int, best_of: int, n: int, keep_logprobs: bool
) -> tuple[list[ChoiceEvent], int]:
    """best_of > n: of each prompt's best_of choices (indices p * best_of + j), keep the n with
    the highest cumulative logprob of their generated tokens, renumbered p * n + rank (best
    first, as vLLM orders them). Returns the kept events (logprobs dropped unless
    keep_logprobs) and their generated token count (the usage vLLM reports)."""
    total: dict[int, float] = {}
    for ev in events:
        total[ev.index] = total.get(ev.index, 0.0) + ev.logprob_sum
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
            ev.logprob_sum,
        )
        for ev in events
        if ev.index in renumber
    ]
    return kept, sum(len(ev.token_ids) for ev in kept)


class ResponseFormatter:
    """Builds the OpenAI response objects for one request (completions or chat)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        endpoint: str,
        rid: str,
        created: int,
        model: str,
        plan: ChatPlan | None = None,
        *,
        as_token_ids: bool = False,
    ):
        """plan: the chat request's tools plan (serve/http/tools.py); None: content only."""
        self.tok, self.endpoint, self.rid, self.created, self.model = (
            tokenizer,
            endpoint,
            rid,
            created,
            model,
        )
        self.as_token_ids = as_token_ids  # vLLM's return_tokens_as_token_ids
        self.plan = plan or ChatPlan()
        self._started: set[int] = set()
        self._outputs: dict[int, ChoiceOutput] = {}

    def _token_str(self, token_id: int) -> str:
        """An alternative token's name: its own text, special tokens included (several special
        tokens would otherwise all be "" and collide as keys)."""
        if self.as_token_ids:
            return f"token_id:{token_id}"
        return self.tok.decode([token_id], skip_special_tokens=False)

    def _chosen_str(self, tok: TokenText) -> str:
        """The chosen token's name: its share of the choice's text (they concatenate to it)."""
        return f"token_id:{tok.value.token_id}" if self.as_token_ids else tok.text

    def _completion_logprobs(self, ev: ChoiceEvent) -> CompletionLogprobs | None:
        if ev.logprobs is None:
            return None
        out = CompletionLogprobs()
        for tok in ev.logprobs:
            lp = tok.value
            out.tokens.append(self._chosen_str(tok))
            # None: an echoed prompt's first token, which has no context (OpenAI, vLLM)
            out.token_logprobs.append(None if lp.logprob is None else float(lp.logprob))
            out.top_logprobs.append(
                None if lp.top is None else {self._token_str(t): float(v) for t, v in lp.top}
            )
            out.text_offset.append(tok.offset)
        return out

    def _chat_logprobs(self, ev: ChoiceEvent) -> ChatChoiceLogprobs | None:
        if ev.logprobs is None:
            return None

        def top(t: int, v: float) -> TopLogprob:
            s = self._token_str(t)
            text = s if not self.as_token_ids else self.tok.decode([t], skip_special_tokens=False)
            return TopLogprob(token=s, logprob=float(v), bytes=list(text.encode()))

        return ChatChoiceLogprobs(
            content=[
                ChatLogprob(
                    token=self._chosen_str(tok),
                    logprob=float(tok.value.logprob),
                    bytes=list(tok.text.encode()),
                    top_logprobs=[top(t, v) for t, v in tok.value.top],
                )
                for tok in ev.logprobs
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
        out = self._outputs.setdefault(ev.index, ChoiceOutput(self.plan))
        content, tool_calls = out.push(ev.text, final=ev.finish_reason is not None)
        return ChatCompletionChunk(
            id=self.rid,
            created=self.created,
            model=self.model,
            choices=[
                ChatChunkChoice(
                    index=ev.index,
                    delta=ChatDelta(role=role, content=content, tool_calls=tool_calls),
                    finish_reason=out.finish_reason(ev.finish_reason),
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
        lps: dict[int, list[TokenText]] = {i: [] for i in range(n_choices)}
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
        chat_choices = []
        for i in range(n_choices):
            out = ChoiceOutput(self.plan)
            content, tool_calls = out.full("".join(texts[i]))
            chat_choices.append(
                ChatChoice(
                    index=i,
                    message=ChatResponseMessage(content=content, tool_calls=tool_calls),
                    finish_reason=out.finish_reason(finish[i]),
                    logprobs=self._chat_logprobs(ChoiceEvent(i, "", (), tuple(lps[i]), None))
                    if has_lp
                    else None,
                )
            )
        return ChatCompletionResponse(
            id=self.rid, created=self.created, model=self.model, usage=usage, choices=chat_choices
        )
