"""Chat messages (and tool definitions) to a prompt: the default chat template.

A model directory's own Jinja template (`ServeTokenizer.chat_template`, serve/tokenizer.py) takes
precedence when it has one; `deepseek_chat_prompt` is the fallback. A template is called as
`template(messages, tools=...)`, tools being OpenAI's tool definitions (dicts) or None, as
transformers' apply_chat_template passes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from moeray.platform.serve.http.schemas import ChatMessage
from moeray.platform.serve.http.tool_parsers.deepseek_v3 import format_tool_calls

ChatTemplate = Callable[..., str]

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"


class ChatTemplateError(ValueError):
    """A chat template refused the messages (its raise_exception, an error while rendering, or
    an operation the sandbox forbids): the request's fault, answered with 400."""


def tools_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """The tool definitions and DeepSeek-V3's call syntax, for the system prompt. (V3's own
    template renders no tools; its later templates put them in the system prompt like this.)"""
    parts = ["## Tools\nYou can call these functions:"]
    for t in tools:
        f = t["function"]
        parts.append(
            f"### {f['name']}\nDescription: {f.get('description', '')}\n"
            f"Parameters: {json.dumps(f.get('parameters', {'type': 'object'}))}"
        )
    example = format_tool_calls([("NAME", "ARGUMENTS AS JSON")])
    parts.append(f"To call functions, answer with exactly:\n{example}")
    return "\n\n".join(parts)


def deepseek_chat_prompt(
    messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] | None = None
) -> str:
    """DeepSeek-V3's chat format (its tokenizer_config chat_template): tool calls in its
    special-token syntax, tool results between tool-output markers; tools in the system prompt."""
    system = "\n\n".join(m.content for m in messages if m.role in ("system", "developer"))
    if tools:
        system = "\n\n".join(s for s in (system, tools_prompt(tools)) if s)
    out = [BOS + system]
    in_outputs = False  # inside a run of tool results
    for m in messages:
        if m.role == "tool":
            out.append(("\n" if in_outputs else OUTPUTS_BEGIN) + OUTPUT_BEGIN + m.content)
            out.append(OUTPUT_END)
            in_outputs = True
            continue
        if m.role == "user":
            out.append("<｜User｜>" + m.content)
        elif m.role == "assistant" and m.tool_calls:
            calls = [(c.function.name, c.function.arguments) for c in m.tool_calls]
            out.append("<｜Assistant｜>" + (m.content or "") + format_tool_calls(calls) + EOS)
        elif m.role == "assistant":
            # After tool results the answer follows their end marker, with no Assistant tag.
            out.append((OUTPUTS_END if in_outputs else "<｜Assistant｜>") + m.content + EOS)
        if m.role in ("user", "assistant"):
            in_outputs = False
    out.append(OUTPUTS_END if in_outputs else "<｜Assistant｜>")
    return "".join(out)
