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
    SectionFormat,
    SectionStream,
    StreamingToolParser,
    ToolParser,
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


def _name(header: str) -> str | None:
    """`function<sep>NAME` -> NAME (None until the separator has arrived)."""
    return header.split(SEP, 1)[1].strip() if SEP in header else None


FORMAT = SectionFormat(
    begin=CALLS_BEGIN,
    end=CALLS_END,
    call_begin=CALL_BEGIN,
    args_open=ARGS_OPEN,
    args_close=ARGS_CLOSE,
    between="\n",
    name=_name,
)


class DeepSeekV3ToolParser(ToolParser):
    name = "deepseek_v3"

    def stream(self) -> StreamingToolParser:
        return SectionStream(FORMAT)
