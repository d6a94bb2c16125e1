"""Incremental detokenization: a growing token list to text deltas without re-decoding it all.

The scheduler's stop strings and `RequestOutput.text` and the HTTP layer's streamed text both
use it. Re-decoding a request's whole output at every step costs O(length) a token, O(length^2)
a request: at 8K generated tokens that is 8K ids through the tokenizer per request per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas, O(window) a push instead of O(length).

    Decodes the window ids[prefix:] and subtracts the text of ids[prefix:read]: a byte-level BPE
    token can end in the middle of a UTF-8 character (shown as U+FFFD), so text is held back until
    the character completes; decoding a window that starts a token or two back keeps what a
    tokenizer does at a sequence's start (a SentencePiece leading space dropped) out of the delta.
    The pushes' deltas and the final `flush` concatenate to decode(all ids).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]
