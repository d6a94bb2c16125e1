"""DeepSeek-V3's tool-call format (its tokenizer_config.json chat template; vLLM's deepseek_v3
parser reads the same):

    CONTENT<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME2 ... <｜tool▁call▁end｜><｜tool▁calls▁end｜>

Calls are separated by a newline; the markers are special tokens, so the output must be decoded
with them kept (skip_special_tokens false) for this parser to see them.
"""

from __future__ import annotations

from moeray.platform.serve.http.tool_parsers.base import (
    ParseDelta,
    StreamingToolParser,
    ToolCallPiece,
    ToolParser,
    held_back,
)

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
ARGS_OPEN = "\n```json\n"
ARGS_CLOSE = "\n```" + CALL_END


def format_tool_calls(calls: list[tuple[str, str]]) -> str:
    """(name, arguments JSON) pairs as DeepSeek-V3 writes them (prompts and tests)."""
    body = "\n".join(
        f"{CALL_BEGIN}function{SEP}{name}{ARGS_OPEN}{args}{ARGS_CLOSE}" for name, args in calls
    )
    return CALLS_BEGIN + body + CALLS_END


class _Stream(StreamingToolParser):
    def __init__(self) -> None:
        self.text = ""
        self.pos = 0  # everything before pos is decided and emitted
        self.in_calls = False
        self.index = -1  # the call being read; -1 before the first
        self.in_args = False

    def push(self, delta: str, final: bool = False) -> ParseDelta:
        self.text += delta
        out = ParseDelta()
        while True:
            rest = self.text[self.pos :]
            if not self.in_calls:
                at = rest.find(CALLS_BEGIN)
                if at < 0:
                    keep = 0 if final else held_back(rest, CALLS_BEGIN)
                    out.content += rest[: len(rest) - keep]
                    self.pos += len(rest) - keep
                    return out
                out.content += rest[:at]
                self.pos += at + len(CALLS_BEGIN)
                self.in_calls = True
            elif self.in_args:
                at = rest.find(ARGS_CLOSE)
                if at < 0:
                    keep = 0 if final else held_back(rest, ARGS_CLOSE)
                    if len(rest) > keep:
                        out.calls.append(ToolCallPiece(self.index, None, rest[: len(rest) - keep]))
                    self.pos += len(rest) - keep
                    return out
                if at:
                    out.calls.append(ToolCallPiece(self.index, None, rest[:at]))
                self.pos += at + len(ARGS_CLOSE)
                self.in_args = False
            else:
                # Between calls: a whole call header `<call_begin>TYPE<sep>NAME\n```json\n`, or
                # the end of the calls; anything else (an unfinished header) waits for more text.
                stripped = rest.lstrip("\n")
                skipped = len(rest) - len(stripped)
                if stripped.startswith(CALLS_END) or (final and not stripped):
                    self.pos = len(self.text)  # what follows the calls is not content
                    return out
                end = stripped.find(ARGS_OPEN)
                if not stripped.startswith(CALL_BEGIN) or end < 0 or SEP not in stripped[:end]:
                    return out
                name = stripped[:end].split(SEP, 1)[1].strip()
                self.index += 1
                out.calls.append(ToolCallPiece(self.index, name, ""))
                self.pos += skipped + end + len(ARGS_OPEN)
                self.in_args = True


class DeepSeekV3ToolParser(ToolParser):
    name = "deepseek_v3"

    def stream(self) -> StreamingToolParser:
        return _Stream()
