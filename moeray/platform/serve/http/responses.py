"""OpenAI response objects from a request's choice events: stream chunks and full responses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from moeray.platform.serve.http.protocol import FinishReason, Tokenizer
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
            out.token_logprobs.append(float(lp.logprob))
            out.top_logprobs.append({self._token_str(t): float(v) for t, v in lp.top})
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
