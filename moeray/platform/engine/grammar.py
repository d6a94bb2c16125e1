"""Grammar-constrained decoding with xgrammar: a request's output must match a JSON grammar.

Legend: B rows being sampled, V the model's vocabulary (logit columns), W = ceil(V / 32) words
of a packed token bitmask (bit j of word w allows token 32 * w + j; xgrammar's layout).

A request carries a `StructuredOutput` (engine/structured.py) in its SamplingParams. The
engine keeps one xgrammar `GrammarMatcher` per such request in a `GrammarSet`: before sampling it
fills one bitmask row per sampled request (all ones for requests without a grammar), the sampler
masks the logits with it on the device, and after sampling the matcher advances by the sampled
token. Grammars are compiled once per spec (an LRU over specs, on top of xgrammar's own cache).

The tokenizer side (`TokenizerInfo`) is built from the model directory's `tokenizers` tokenizer:
each token's string and the vocabulary's encoding (byte-level BPE, byte-fallback, or raw).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr

from moeray.platform.engine.structured import StructuredOutput

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; clients see the rest.
_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")


def _grammar(spec: StructuredOutput) -> xgr.Grammar:
    if spec.kind == "json_object":
        return _from_schema(_ANY_OBJECT)
    return _from_schema(spec.schema or "")


_ANY_OBJECT = '{"type": "object"}'


# xgrammar 0.2.9 writes the characters of a length-bounded string (maxLength/minLength) as
# [^"\\\r\n], which lets control characters U+0000..U+001F through; JSON (RFC 8259) and Python's
# json.loads reject them raw. Its unbounded strings already exclude them: do the same here.
_LOOSE_CHAR = r"[^\"\\\r\n]"
_JSON_CHAR = r"[^\0-\x1f\"\\]"


def _from_schema(schema: str) -> xgr.Grammar:
    # Compact JSON (no free whitespace): with free whitespace a model (a random-weight one
    # surely) can emit spaces and newlines until max_tokens and never close the object.
    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    text = str(grammar)
    if _LOOSE_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_CHAR, _JSON_CHAR))


def check_structured_output(spec: StructuredOutput) -> None:
    """ValueError naming the problem when xgrammar cannot turn the spec's schema into a grammar
    (invalid JSON, unknown types, unresolvable $ref, bad patterns). No tokenizer needed."""
    try:
        _grammar(spec)
    except RuntimeError as e:
        raise ValueError(_CPP_PREFIX.sub("", str(e)).strip()) from None


def _vocab_type(tokenizer_json: dict[str, Any]) -> tuple[xgr.VocabType, bool]:
    """(vocab type, add_prefix_space) from a tokenizer.json's decoder: ByteLevel decoders map
    bytes to printable symbols (GPT-2, DeepSeek-V3); ByteFallback keeps <0xNN> tokens and a
    Metaspace/"▁" prefix (Llama, SentencePiece); anything else is raw text."""
    decoder = tokenizer_json.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {p.get("type") for p in parts if isinstance(p, dict)}
    if "ByteLevel" in types:
        return xgr.VocabType.BYTE_LEVEL, False
    if "ByteFallback" in types:
        return xgr.VocabType.BYTE_FALLBACK, True
    return xgr.VocabType.RAW, "Metaspace" in types


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> Any:
    """xgrammar's TokenizerInfo for a `tokenizers.Tokenizer`. vocab_size is the model's (its
    logit columns); ids the tokenizer lacks (padding of lm_head) are never allowed."""
    if not stop_token_ids:
        raise ValueError("structured output needs the model's eos token id (config.json)")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    # Special tokens (<|bos|>, DeepSeek's <｜tool▁sep｜>...) get no text, which xgrammar reads as
    # "never inside the grammar": their literal text would pass as JSON string content, but they
    # are control tokens, and decoding with skip_special_tokens drops them.
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    encoded = [""] * vocab_size
    for token, i in vocab.items():
        if i < vocab_size and i not in special:
            encoded[i] = token
    vocab_type, prefix_space = _vocab_type(json.loads(tokenizer.to_str()))
    return xgr.TokenizerInfo(
        encoded,
        vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=list(stop_token_ids),
        add_prefix_space=prefix_space,
    )


class GrammarSet:
    """The grammar matchers of one engine's requests, and the compiled grammars they share.

    Only the engine thread calls add/accept/bitmask/remove; `compile` may run on any thread (it
    takes a lock), so a worker can compile ahead of time off the engine thread."""

    def __init__(self, info: Any, *, max_cached: int = 256) -> None:
        self.vocab_size = int(info.vocab_size)
        self._compiler = xgr.GrammarCompiler(info)
        self._compiled: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self._max_cached = max_cached
        self._lock = threading.Lock()
        self._matchers: dict[str, Any] = {}

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]
    ) -> GrammarSet:
        return cls(tokenizer_info(tokenizer, vocab_size, stop_token_ids))

    def compile(self, spec: StructuredOutput) -> Any:
        with self._lock:
            hit = self._compiled.get(spec)
            if hit is not None:
                self._compiled.move_to_end(spec)
                return hit
        try:
            compiled = self._compiler.compile_grammar(_grammar(spec))
        except RuntimeError as e:
            raise ValueError(_CPP_PREFIX.sub("", str(e)).strip()) from None
        with self._lock:
            self._compiled[spec] = compiled
            while len(self._compiled) > self._max_cached:
                self._compiled.popitem(last=False)
        return compiled

    @property
    def num_cached(self) -> int:
        return len(self._compiled)

    def add(self, request_id: str, spec: StructuredOutput) -> None:
        self._matchers[request_id] = xgr.GrammarMatcher(self.compile(spec))

    def has(self, request_id: str) -> bool:
        return request_id in self._matchers

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def accept(self, request_id: str, token_ids: Sequence[int]) -> None:
        """Advance the request's matcher by its sampled tokens (a no-op without a grammar)."""
        m = self._matchers.get(request_id)
        if m is None:
            return
        for t in token_ids:
            if m.is_terminated():
                return  # the stop token ended it; the scheduler finishes the request
            if not m.accept_token(int(t)):
                raise RuntimeError(
                    f"request {request_id!r}: token {t} breaks its grammar (the mask allowed it)"
                )

    def bitmask(self, request_ids: Sequence[str], device: torch.device) -> torch.Tensor | None:
        """[B, W] int32 on `device`: row i allows what request_ids[i]'s grammar allows next (all
        tokens for a request without one); None when no row has a grammar."""
        rows = [(i, self._matchers[r]) for i, r in enumerate(request_ids) if r in self._matchers]
        if not rows:
            return None
        mask_BW = xgr.allocate_token_bitmask(len(request_ids), self.vocab_size)  # all ones
        for i, m in rows:
            if not m.is_terminated():
                m.fill_next_token_bitmask(mask_BW, i)
        return mask_BW.to(device, non_blocking=True)
