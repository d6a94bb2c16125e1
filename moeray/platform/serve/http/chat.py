"""Chat messages to a prompt: the default chat template.

A model directory's own Jinja template (`ServeTokenizer.chat_template`, serve/tokenizer.py) takes
precedence when it has one; `deepseek_chat_prompt` is the fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from moeray.platform.serve.http.schemas import ChatMessage

ChatTemplate = Callable[[Sequence[ChatMessage]], str]


class ChatTemplateError(ValueError):
    """A chat template refused the messages (its raise_exception, an error while rendering, or
    an operation the sandbox forbids): the request's fault, answered with 400."""


def deepseek_chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """DeepSeek-V3's chat format (its tokenizer_config chat_template, without tools)."""
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    system = "\n\n".join(m.content for m in messages if m.role in ("system", "developer"))
    out = [bos + system]
    for m in messages:
        if m.role == "user":
            out.append("<｜User｜>" + m.content)
        elif m.role == "assistant":
            out.append("<｜Assistant｜>" + m.content + eos)
    out.append("<｜Assistant｜>")
    return "".join(out)
