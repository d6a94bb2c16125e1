"""Generated ids to text: incremental detokenization and stop strings."""

from __future__ import annotations

from collections.abc import Sequence

from moeray.platform.serve.http.protocol import Tokenizer


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
