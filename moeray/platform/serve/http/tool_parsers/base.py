"""What a tool-call parser does: split a model's output into content and tool calls, whole or as
the text streams in.

A parser is stateless (`ToolParser`); `ToolParser.stream()` gives one incremental parser per
choice. `push(delta, final)` returns what became certain with that delta: content text and
tool-call pieces (a call's name once, then its arguments in pieces). Text that could still turn
out to be the start of a tool-call marker is held back until the next push decides it. `parse`
is the same parser run over the whole text at once, so a stream's pieces always add up to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallPiece:
    """Part of call `index`: its name (first piece only, else None) and more argument text."""

    index: int
    name: str | None
    arguments: str


@dataclass
class ParseDelta:
    content: str = ""
    calls: list[ToolCallPiece] = field(default_factory=list)


class StreamingToolParser(ABC):
    @abstractmethod
    def push(self, delta: str, final: bool = False) -> ParseDelta:
        """Take the next text; final: no more text follows (flush what was held back)."""


class ToolParser(ABC):
    name: str

    @abstractmethod
    def stream(self) -> StreamingToolParser:
        """A fresh incremental parser for one choice."""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content or None when empty, tool calls) of a whole output."""
        d = self.stream().push(text, final=True)
        return (d.content or None), join_pieces(d.calls)


def join_pieces(pieces: list[ToolCallPiece]) -> list[ToolCall]:
    """Tool calls from their streamed pieces (in index order)."""
    names: dict[int, str] = {}
    args: dict[int, list[str]] = {}
    for p in pieces:
        if p.name is not None:
            names[p.index] = p.name
        args.setdefault(p.index, []).append(p.arguments)
    return [ToolCall(names[i], "".join(args[i])) for i in sorted(names)]


def held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (text that may
    yet become the marker, so it cannot be released)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
