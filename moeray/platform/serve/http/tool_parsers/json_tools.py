"""A generic JSON tool-call format, for chat templates without a tool syntax of their own: the
whole output is one call `{"name": ..., "arguments": {...}}` (or "parameters", vLLM's name), or a
JSON array of them. Anything else is content. This is also what `tool_choice: "required"` makes
the model write, under a grammar (serve/http/tools.py).
"""

from __future__ import annotations

import json

from moeray.platform.serve.http.tool_parsers.base import (
    ParseDelta,
    StreamingToolParser,
    ToolCallPiece,
    ToolParser,
)


def _calls(text: str) -> list[ToolCallPiece] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    pieces = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if not isinstance(args, dict) or set(item) - {"name", "arguments", "parameters"}:
            return None
        pieces.append(ToolCallPiece(i, item["name"], json.dumps(args, ensure_ascii=False)))
    return pieces or None


class _Stream(StreamingToolParser):
    """Text that starts (after whitespace) with `{` or `[` may be a call: it is held until the
    output ends, then released as calls or, if it is not one, as content."""

    def __init__(self) -> None:
        self.text = ""
        self.released = 0
        self.holding: bool | None = None  # None: only whitespace so far

    def push(self, delta: str, final: bool = False) -> ParseDelta:
        self.text += delta
        stripped = self.text.lstrip()
        if self.holding is None and stripped:
            self.holding = stripped[0] in "{["
        if self.holding is False:
            out = ParseDelta(content=self.text[self.released :])
            self.released = len(self.text)
            return out
        if not final:
            return ParseDelta()
        calls = _calls(stripped) if stripped else None
        if calls is not None:
            return ParseDelta(calls=calls)
        return ParseDelta(content=self.text)


class JSONToolParser(ToolParser):
    name = "json"

    def stream(self) -> StreamingToolParser:
        return _Stream()
