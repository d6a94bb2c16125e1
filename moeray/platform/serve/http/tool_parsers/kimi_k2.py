"""Kimi-K2's tool-call format (its chat template; vLLM's and SGLang's kimi_k2 parsers read the
same):

    CONTENT<|tool_calls_section_begin|>
    <|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>ARGUMENTS<|tool_call_end|>
    <|tool_call_begin|>functions.NAME2:1<|tool_call_argument_begin|>...<|tool_call_end|>
    <|tool_calls_section_end|>

A call's id is `functions.NAME:INDEX` (some outputs drop the `functions.` prefix); it is the
tool call's id in the response, as vLLM returns it, since Kimi's chat template writes it back
with the call and its result. Whitespace may stand between the markers. The markers are special
tokens, so the output must be decoded with them kept (skip_special_tokens false) for this parser
to see them.
"""

from __future__ import annotations

from moeray.platform.serve.http.tool_parsers.base import (
    SectionFormat,
    SectionStream,
    StreamingToolParser,
    ToolParser,
)

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGS_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"


def format_tool_calls(calls: list[tuple[str, str]]) -> str:
    """(name, arguments JSON) pairs as Kimi-K2 writes them (prompts and tests)."""
    body = "".join(
        f"{CALL_BEGIN}functions.{name}:{i}{ARGS_BEGIN}{args}{CALL_END}"
        for i, (name, args) in enumerate(calls)
    )
    return SECTION_BEGIN + body + SECTION_END


def call_name(call_id: str) -> str:
    """The function name in a call id: `functions.get_weather:0` -> `get_weather`."""
    name = call_id.strip().rsplit(":", 1)[0]
    return name.removeprefix("functions.")


FORMAT = SectionFormat(
    begin=SECTION_BEGIN,
    end=SECTION_END,
    call_begin=CALL_BEGIN,
    args_open=ARGS_BEGIN,
    args_close=CALL_END,
    between=" \t\r\n",
    name=call_name,
    call_id=str.strip,  # the id goes back into the template with the call's result
)


class KimiK2ToolParser(ToolParser):
    name = "kimi_k2"

    def stream(self) -> StreamingToolParser:
        return SectionStream(FORMAT)
