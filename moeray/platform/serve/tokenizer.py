"""The model directory's tokenizer and chat template, as the OpenAI app needs them."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from moeray.platform.serve.http.chat import ChatTemplateError
from moeray.platform.tokenizer_dir import config_token, load_tokenizer_dir

# tokenizer_config.json keys naming special tokens; transformers (5.x) registers each one it finds
# in the vocabulary as special, so decoding with skip_special_tokens drops it even where
# tokenizer.json does not mark it special. (additional_special_tokens it does not re-register:
# those are skipped only when tokenizer.json marks them, as here.)
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")


class ServeTokenizer:
    """The model directory's `tokenizers.Tokenizer` (tokenizer.json, or Moonlight's and Kimi-K2's
    tiktoken.model converted: platform/tokenizer_dir.py) behind the app's Tokenizer protocol.

    Encoding with add_special_tokens applies tokenizer.json's post-processor (DeepSeek-V3's
    prepends <｜begin▁of▁sentence｜>), as transformers does; an explicit `add_bos_token` in
    tokenizer_config.json wins over it (transformers 4's Llama tokenizers rebuilt the
    post-processor from that flag): true gives exactly one leading BOS, false none.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import AddedToken

        path = Path(path)
        self._tok = load_tokenizer_dir(path)
        self.directory = path if path.is_dir() else path.parent
        config = self.directory / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config.read_text()) if config.exists() else {}
        named = [self._special(k) for k in _SPECIAL_KEYS]
        known = [t for t in named if t and self._tok.token_to_id(t) is not None]
        self._tok.add_special_tokens([AddedToken(t, special=True) for t in known])
        bos = self._special("bos_token")
        self.bos_token_id: int | None = self._tok.token_to_id(bos) if bos else None
        flag = self.config.get("add_bos_token")
        self._add_bos: bool | None = flag if isinstance(flag, bool) else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if not add_special_tokens or self._add_bos is None or bos is None:
            return ids
        plain = self._tok.encode(text, add_special_tokens=False).ids
        added = ids[:1] == [bos] and ids[1 : len(plain) + 1] == plain
        if self._add_bos and not added:
            return [bos, *ids]
        if not self._add_bos and added:
            return ids[1:]
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def _special(self, key: str) -> str:
        return config_token(self.config, key)

    def chat_template(self, override: str | None = None) -> Callable[..., str] | None:
        """The Jinja chat template `override` (the server's --chat-template), else the
        directory's (tokenizer_config.json `chat_template` or chat_template.jinja), in a sandbox
        with the filters and globals transformers gives it; None when there is none. A template
        that does not parse raises jinja2.TemplateSyntaxError here; rendering raises
        ChatTemplateError (the API's 400) when the template raises or the sandbox refuses an
        operation."""
        source = override or self.config.get("chat_template")
        jinja_file = self.directory / "chat_template.jinja"
        if not source and jinja_file.exists():
            source = jinja_file.read_text()
        if not source:
            return None
        template = _environment().from_string(source)
        specials = {k: self._special(k) for k in _SPECIAL_KEYS}

        def render(messages: Sequence[Any], tools: list[dict[str, Any]] | None = None) -> str:
            msgs = [_message_dict(m) for m in messages]
            try:
                return template.render(
                    messages=msgs, tools=tools, add_generation_prompt=True, **specials
                )
            except ChatTemplateError:
                raise
            except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as e:
                raise ChatTemplateError(f"{type(e).__name__}: {e}") from None

        return render


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """What transformers renders chat templates in: an immutable sandbox (a template can neither
    reach Python internals nor mutate its arguments), trim_blocks/lstrip_blocks, loop controls,
    a tojson that leaves non-ASCII and HTML characters alone, raise_exception and strftime_now."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt's text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


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
    raise ChatTemplateError(message)
