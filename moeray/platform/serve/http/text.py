"""Generated ids to text: incremental detokenization, stop strings, and each token's share of
the text (what logprobs report), put together per choice by `ChoiceText`."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moeray.platform.engine.detokenize import IncrementalDetokenizer
from moeray.platform.serve.http.protocol import Tokenizer


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


@dataclass(frozen=True)
class TokenText:
    """One generated token's share of a choice's text: `text` starts at character `offset` of
    it. A token that ends inside a UTF-8 character has "" and the next token carries the
    character. `value` is what the caller attached to the token (its logprob entry)."""

    value: Any
    text: str
    offset: int


class ChoiceText:
    """One choice's generated ids to the text sent to the client, and the tokens that text is
    made of, so that a response's logprobs agree with its text.

    The stop token that ends a choice (EOS, or a stop token id) is not text, as in vLLM.
    `push` returns the text that may be sent now and the tokens whose whole share of the text
    has been sent; the strings of all tokens returned concatenate to the text returned, also when
    a stop string cuts it (a token straddling the cut keeps its part before it; tokens after it
    are dropped), and while text that may become a stop string is held back, so are its tokens.
    """

    def __init__(
        self, tokenizer: Tokenizer, stops: Sequence[str], *, skip_special_tokens: bool = True
    ):
        self._detok = IncrementalDetokenizer(
            lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        )
        self._stop = StopMatcher(stops)
        self._pending: deque[TokenText] = deque()
        self._length = 0  # characters detokenized so far
        self._sent = 0  # characters returned so far

    @property
    def stopped(self) -> bool:
        """A stop string matched: the choice is over."""
        return self._stop.stopped

    def push(
        self,
        token_ids: Sequence[int],
        values: Sequence[Any] | None = None,
        *,
        final: bool = False,
        stop_token: bool = False,
    ) -> tuple[str, list[TokenText]]:
        """Add the ids of one step (`values`, one per id, ride along to the TokenTexts).
        final: the choice's last step; stop_token: its last id is the stop token that ended it."""
        ids = list(token_ids)
        vals = list(values) if values is not None else [None] * len(ids)
        if final and stop_token:
            ids, vals = ids[:-1], vals[:-1]
        pieces = []
        for t, v in zip(ids, vals, strict=True):
            piece = self._detok.push([t])
            self._pending.append(TokenText(v, piece, self._length))
            self._length += len(piece)
            pieces.append(piece)
        if final:
            # An incomplete character at the very end belongs to the last token that has text.
            tail = self._detok.flush()
            if tail and self._pending:
                last = self._pending.pop()
                self._pending.append(TokenText(last.value, last.text + tail, last.offset))
                self._length += len(tail)
                pieces.append(tail)
        text = self._stop.push("".join(pieces), final=final)
        self._sent += len(text)
        return text, self._release(final or self.stopped)

    def _release(self, done: bool) -> list[TokenText]:
        out = []
        sent = self._sent
        while self._pending:
            tok = self._pending[0]
            end = tok.offset + len(tok.text)
            # An empty token goes with the character the next token completes.
            ready = tok.offset < sent and end <= sent
            if not ready and done:
                ready = tok.offset < sent or not self.stopped
                tok = TokenText(tok.value, tok.text[: max(0, sent - tok.offset)], tok.offset)
            if not ready:
                break
            out.append(tok)
            self._pending.popleft()
        if done:
            self._pending.clear()
        return out
