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
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name, its arguments as JSON text, and the id the model
    wrote for it where its format has one (Kimi-K2's `functions.NAME:INDEX`; else None and the
    server makes one)."""

    name: str
    arguments: str
    call_id: str | None = None


@dataclass(frozen=True)
class ToolCallPiece:
    """Part of call `index`: its name and model-written id (first piece only, else None) and
    more argument text."""

    index: int
    name: str | None
    arguments: str
    call_id: str | None = None


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
    ids: dict[int, str | None] = {}
    args: dict[int, list[str]] = {}
    for p in pieces:
        if p.name is not None:
            names[p.index] = p.name
            ids[p.index] = p.call_id
        args.setdefault(p.index, []).append(p.arguments)
    return [ToolCall(names[i], "".join(args[i]), ids[i]) for i in sorted(names)]


def held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (text that may
    yet become the marker, so it cannot be released)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass(frozen=True)
class SectionFormat:
    """A format whose calls sit in one marked section after the content:

        CONTENT<begin> <call_begin>HEADER<args_open>ARGUMENTS<args_close> ... <end>

    with `between` characters allowed around the calls; `name(HEADER)` is the function's name,
    or None while the header may still be incomplete; `call_id(HEADER)` the id the model wrote
    (None: the format has none). What follows the section is dropped."""

    begin: str
    end: str
    call_begin: str
    args_open: str
    args_close: str
    between: str
    name: Callable[[str], str | None]
    call_id: Callable[[str], str | None] = lambda header: None


class SectionStream(StreamingToolParser):
    """The incremental parser of a `SectionFormat` (DeepSeek-V3's and Kimi-K2's)."""

    def __init__(self, fmt: SectionFormat) -> None:
        self.fmt = fmt
        self.text = ""
        self.pos = 0  # everything before pos is decided and emitted
        self.in_section = False
        self.index = -1  # the call being read; -1 before the first
        self.in_args = False

    def push(self, delta: str, final: bool = False) -> ParseDelta:
        f = self.fmt
        self.text += delta
        out = ParseDelta()
        while True:
            rest = self.text[self.pos :]
            if not self.in_section:
                at = rest.find(f.begin)
                if at < 0:
                    keep = 0 if final else held_back(rest, f.begin)
                    out.content += rest[: len(rest) - keep]
                    self.pos += len(rest) - keep
                    return out
                out.content += rest[:at]
                self.pos += at + len(f.begin)
                self.in_section = True
            elif self.in_args:
                at = rest.find(f.args_close)
                if at < 0:
                    keep = 0 if final else held_back(rest, f.args_close)
                    if len(rest) > keep:
                        out.calls.append(ToolCallPiece(self.index, None, rest[: len(rest) - keep]))
                    self.pos += len(rest) - keep
                    return out
                if at:
                    out.calls.append(ToolCallPiece(self.index, None, rest[:at]))
                self.pos += at + len(f.args_close)
                self.in_args = False
            else:
                # Between calls: a whole call header, or the end of the section; anything else
                # (an unfinished header) waits for more text.
                stripped = rest.lstrip(f.between)
                skipped = len(rest) - len(stripped)
                if stripped.startswith(f.end) or (final and not stripped):
                    self.pos = len(self.text)  # what follows the calls is not content
                    return out
                end = stripped.find(f.args_open)
                if not stripped.startswith(f.call_begin) or end < 0:
                    return out
                header = stripped[len(f.call_begin) : end]
                name = f.name(header)
                if name is None:
                    return out
                self.index += 1
                out.calls.append(ToolCallPiece(self.index, name, "", f.call_id(header)))
                self.pos += skipped + end + len(f.args_open)
                self.in_args = True
