"""The model directory's tokenizer and chat template, as the OpenAI app needs them."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class ServeTokenizer:
    """`tokenizers.Tokenizer` from `<model>/tokenizer.json` behind the app's Tokenizer protocol."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise ValueError(
                f"no tokenizer.json in {path}: the model directory needs its tokenizer files"
            )
        self._tok = Tokenizer.from_file(str(file))
        self.directory = file.parent
        config = file.parent / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config.read_text()) if config.exists() else {}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=False)

    def _special(self, key: str) -> str:
        value = self.config.get(key) or ""
        return value.get("content", "") if isinstance(value, dict) else value

    def chat_template(self) -> Callable[..., str] | None:
        """The directory's Jinja chat template (tokenizer_config.json `chat_template` or
        chat_template.jinja), rendered the way transformers does; None when there is none."""
        source = self.config.get("chat_template")
        jinja_file = self.directory / "chat_template.jinja"
        if not source and jinja_file.exists():
            source = jinja_file.read_text()
        if not source:
            return None
        import jinja2

        env = jinja2.Environment(
            trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined
        )
        env.globals["raise_exception"] = _raise
        template = env.from_string(source)
        bos, eos = self._special("bos_token"), self._special("eos_token")

        def render(messages: Sequence[Any], tools: list[dict[str, Any]] | None = None) -> str:
            msgs = [_message_dict(m) for m in messages]
            return template.render(
                messages=msgs,
                tools=tools,
                add_generation_prompt=True,
                bos_token=bos,
                eos_token=eos,
            )

        return render


def _message_dict(m: Any) -> dict[str, Any]:
    """A chat message as templates read it: role and content, plus tool_calls (OpenAI's dicts,
    arguments as JSON text) and tool_call_id when the message has them."""
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if getattr(m, "tool_calls", None):
        d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if getattr(m, "tool_call_id", None) is not None:
        d["tool_call_id"] = m.tool_call_id
    return d


def _raise(message: str) -> None:
    raise ValueError(message)
