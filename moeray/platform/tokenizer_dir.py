"""A model directory's tokenizer as a `tokenizers.Tokenizer`, whichever files it ships.

- `tokenizer.json` (DeepSeek-V3/R1, what transformers and our training job write): loaded as is.
- `tiktoken.model` without tokenizer.json (Moonlight, Kimi-K2: their tokenizer is a Python class,
  `tokenization_*.py`, that transformers runs only with trust_remote_code): converted here, and
  no code from the directory runs. The class builds `tiktoken.Encoding(pat_str, ranks,
  special_tokens)`; this module reads the same three things as data: the BPE ranks from
  tiktoken.model (one "base64(token bytes) rank" per line), the pre-tokenizer pattern `pat_str`
  from the class's source by evaluating its string expression with `ast` (string literals, `+`
  and `"sep".join([...])` only), and the special tokens from tokenizer_config.json's
  `added_tokens_decoder`, the ids from len(ranks) on that the class fills (names it lacks become
  `<|reserved_token_{id}|>`, as the class names them).

The conversion is the one transformers uses for tiktoken files (byte-level BPE whose merges are
every split of a token into two tokens, ranked by the merged token's rank): BPE then merges the
adjacent pair whose result has the lowest rank, tiktoken's rule, and a piece that is itself a
token is taken whole (`ignore_merges`), as tiktoken does. tests/unit/test_tokenizer_dir.py checks
the ids against tiktoken's own encoder, special tokens and non-Latin text included.
"""

from __future__ import annotations

import ast
import base64
import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

TOKENIZER_JSON = "tokenizer.json"
TIKTOKEN_MODEL = "tiktoken.model"


# The files a model directory's tokenizer may consist of (HF's, then tiktoken's): what a copy of the
# tokenizer takes along (`tokenizer_files`), so that transformers and this module both load it.
HF_TOKENIZER_FILES = (
    TOKENIZER_JSON,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def tokenizer_files(path: str | Path) -> list[Path]:
    """The tokenizer files in model directory `path`: HF_TOKENIZER_FILES, tiktoken.model and the
    tokenization_*.py that tokenizer_config.json's auto_map names (Moonlight, Kimi-K2)."""
    p = Path(path)
    found = [p / f for f in HF_TOKENIZER_FILES if (p / f).is_file()]
    if (p / TIKTOKEN_MODEL).is_file():
        found += [p / TIKTOKEN_MODEL, *sorted(p.glob("tokenization_*.py"))]
    return found


def config_token(config: dict[str, Any], key: str) -> str:
    """The token text that tokenizer_config.json's `key` ("eos_token", ...) names: a string or
    {"content": ...}; "" when absent."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def eos_token(path: str | Path, default: str) -> str:
    """The end-of-sequence token text that tokenizer_config.json names in directory `path`, else
    `default`: DeepSeek-V3's <｜end▁of▁sentence｜>, Moonlight's and Kimi-K2's [EOS]."""
    config = Path(path) / "tokenizer_config.json"
    named = config_token(json.loads(config.read_text()), "eos_token") if config.is_file() else ""
    return named or default


def has_tokenizer(path: str | Path) -> bool:
    """Whether the directory ships tokenizer files this module loads."""
    p = Path(path)
    return (p / TOKENIZER_JSON).is_file() or (p / TIKTOKEN_MODEL).is_file()


def load_tokenizer_dir(path: str | Path) -> Tokenizer:
    """The tokenizer of the model directory (or tokenizer.json file) at `path`."""
    p = Path(path)
    if p.is_file() and p.name == TOKENIZER_JSON:
        return Tokenizer.from_file(str(p))
    if (p / TOKENIZER_JSON).is_file():
        return Tokenizer.from_file(str(p / TOKENIZER_JSON))
    if (p / TIKTOKEN_MODEL).is_file():
        return _from_tiktoken_dir(p)
    raise ValueError(
        f"no {TOKENIZER_JSON} or {TIKTOKEN_MODEL} in {p}: the model directory needs its "
        f"tokenizer files ({TOKENIZER_JSON}, transformers' fast tokenizer; or {TIKTOKEN_MODEL} "
        "with its tokenization_*.py and tokenizer_config.json, as Moonlight and Kimi-K2 ship)"
    )


def read_tiktoken_ranks(file: str | Path) -> dict[bytes, int]:
    """tiktoken.model's BPE ranks: token bytes -> rank (= id)."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(Path(file).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(
                f"{file}:{n}: {line[:60]!r} is not 'base64(token) rank' ({e})"
            ) from None
    return ranks


def tokenizer_from_tiktoken(
    ranks: dict[bytes, int], pattern: str, special_tokens: dict[int, tuple[str, bool]]
) -> Tokenizer:
    """A byte-level BPE `Tokenizer` that encodes as tiktoken.Encoding(pattern, ranks, specials)
    does with allowed_special="all". `special_tokens`: id -> (text, skipped on decode)."""
    byte_char = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {text(t): r for t, r in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], text(left), text(right)))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], ignore_merges=True)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    taken = set(ranks.values())
    for i, (content, special) in sorted(special_tokens.items()):
        if i in taken:
            raise ValueError(f"special token {content!r} has id {i}, which a BPE token has")
        if i != tok.get_vocab_size(with_added_tokens=True):
            raise ValueError(
                f"special token ids must follow the {len(ranks)} BPE ids without gaps; "
                f"{content!r} has id {i}"
            )
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE's alphabet): printable Latin-1
    bytes map to themselves, the others to U+0100 and up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _from_tiktoken_dir(path: Path) -> Tokenizer:
    config_file = path / "tokenizer_config.json"
    config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.exists() else {}
    source = _tokenizer_source(path, config)
    try:
        tree = ast.parse(source.read_text(), filename=str(source))
    except SyntaxError as e:
        raise ValueError(f"{source} does not parse as Python: {e}") from None
    pattern = _constant(tree, "pat_str", str, source)
    ranks = read_tiktoken_ranks(path / TIKTOKEN_MODEL)
    base = len(ranks)
    if sorted(ranks.values()) != list(range(base)):
        raise ValueError(f"{path / TIKTOKEN_MODEL}: ranks are not 0..{base - 1}, each once")
    named: dict[int, tuple[str, bool]] = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str):
            raise ValueError(f"{config_file}: added_tokens_decoder[{key!r}] has no content")
        named[int(key)] = (content, bool(entry.get("special", True)))
    reserved = _optional_constant(tree, "num_reserved_special_tokens", int)
    # The class fills ids base .. base + reserved + 1 (its BOS and EOS come on top of the
    # reserved block); without that constant, up to the highest named id.
    top = base + reserved + 2 if reserved is not None else max(named, default=base - 1) + 1
    if any(i < base or i >= top for i in named):
        raise ValueError(
            f"{config_file}: added_tokens_decoder ids {sorted(named)} fall outside "
            f"{base}..{top - 1}, the special ids after {path / TIKTOKEN_MODEL}'s {base} tokens"
        )
    specials = {i: named.get(i, (f"<|reserved_token_{i}|>", True)) for i in range(base, top)}
    return tokenizer_from_tiktoken(ranks, pattern, specials)


def _tokenizer_source(path: Path, config: dict[str, Any]) -> Path:
    """The tokenization_*.py that tokenizer_config.json's auto_map names (its AutoTokenizer
    class), else the directory's only tokenization_*.py."""
    ref = (config.get("auto_map") or {}).get("AutoTokenizer")
    name = ref[0] if isinstance(ref, list) and ref else ref
    if isinstance(name, str) and "." in name:
        module = name.rsplit(".", 1)[0].split("--")[-1]  # "repo--module.Class" names another repo
        file = path / f"{module}.py"
        if file.is_file():
            return file
    found = sorted(path.glob("tokenization_*.py"))
    if len(found) != 1:
        raise ValueError(
            f"{path} has {TIKTOKEN_MODEL} but {len(found)} tokenization_*.py files and no "
            "tokenizer_config.json auto_map naming one: its pre-tokenizer pattern (pat_str) "
            "comes from that file"
        )
    return found[0]


def _assigned(tree: ast.Module, name: str) -> ast.expr | None:
    """The value of the first assignment to `name` (module or class level, or `self.name`)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if (isinstance(target, ast.Name) and target.id == name) or (
                    isinstance(target, ast.Attribute) and target.attr == name
                ):
                    return node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            if isinstance(node.target, ast.Name) and node.target.id == name:
                return node.value
    return None


def _constant(tree: ast.Module, name: str, kind: type, source: Path) -> Any:
    value = _optional_constant(tree, name, kind)
    if value is None:
        raise ValueError(f"{source}: no {name} assignment of a {kind.__name__} literal found")
    return value


def _optional_constant(tree: ast.Module, name: str, kind: type) -> Any:
    node = _assigned(tree, name)
    for _ in range(4):  # `self.pat_str = pat_str`: follow the name to its literal
        if not isinstance(node, ast.Name):
            break
        node = _assigned(tree, node.id)
    if node is None:
        return None
    value = _literal(node)
    if not isinstance(value, kind):
        raise ValueError(f"{name} is not a {kind.__name__} expression of literals")
    return value


def _literal(node: ast.expr) -> Any:
    """Evaluate literals, string `+` and `"sep".join([...])`; anything else is refused."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int)):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal(node.left), _literal(node.right)
        if type(left) is type(right):
            return left + right
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "join"
        and isinstance(node.func.value, ast.Constant)
        and isinstance(node.func.value.value, str)
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], (ast.List, ast.Tuple))
    ):
        parts = [_literal(e) for e in node.args[0].elts]
        if all(isinstance(p, str) for p in parts):
            return node.func.value.value.join(parts)
    raise ValueError(f"line {node.lineno}: not an expression of literals ({ast.dump(node)[:80]})")
