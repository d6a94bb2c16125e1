"""Training data: a byte-level BPE tokenizer trained here, and packed fixed-length sequences.

Legend: N sequences in the packed dataset, S sequence length (model input), B sequences per batch.

Corpora:
  - default: the Python standard library's `.py` files (no test suites, no site-packages), a
    deterministic subset bounded by `max_bytes`, chosen by a hash of the relative path so it spreads
    over the whole library instead of taking the alphabetically first packages;
  - a directory: every `.txt`, `.md`, `.py`, `.jsonl` file below it, in sorted path order;
  - a `.txt` (or any plain text) file: one document;
  - a `.jsonl` file: one document per line, from its "text" field.

Packing: every document is tokenized and followed by <|eos|>; the documents are concatenated into
one token stream, which is cut into non-overlapping windows of S+1 tokens (S inputs plus the next
token as the last target; MTP depth k targets token t+1+k and masks the last k positions, so no
extra tokens are needed). The tail shorter than S+1 is dropped.

Order: epoch e visits the N windows in the permutation `randperm(N, seed + e)`. A global batch is
the next `global_batch` windows of that order; DP rank r takes the rows [r*B, (r+1)*B) of it. The
state is (epoch, position): `position` counts windows of the epoch consumed by all ranks together,
so a job restored from a checkpoint continues with exactly the batches it would have seen.
Incomplete global batches at the end of an epoch are dropped (every step has the same size).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moeray.platform.tokenizer_dir import (
    TOKENIZER_JSON,
    eos_token,
    load_tokenizer_dir,
    tokenizer_files,
)

if TYPE_CHECKING:
    import tokenizers
    import torch

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)
# DeepSeek-V3's chat layout (system text after BOS, then User/Assistant turns, each assistant turn
# closed by EOS) written with our tokenizer's specials; served models read it from
# tokenizer_config.json like any HF chat template.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|Assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|Assistant|>{% endif %}"
)

# 4 MB of stdlib source trains a 1024-token BPE in about a second and packs to roughly 1.3M tokens
# (about 3 bytes per token at this vocabulary size): hundreds of tiny-model steps without repeats.
DEFAULT_MAX_BYTES = 4_000_000
DEFAULT_VOCAB_SIZE = 1024
TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")


# ----------------------------------------------------------------------------------------------
# corpora


def stdlib_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """A deterministic subset of the stdlib `.py` files, at most `max_bytes` in total."""
    import sysconfig

    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} must be positive")
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_parts = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [
        p for p in root.rglob("*.py") if not skip_parts.intersection(p.relative_to(root).parts)
    ]
    # sha1 of the relative path: stable across machines with the same Python, spread over packages
    files.sort(key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())
    chosen, total = [], 0
    for p in files:
        size = p.stat().st_size
        if size == 0 or total + size > max_bytes:
            continue
        chosen.append(p)
        total += size
    return sorted(chosen)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        # a few stdlib files are deliberately not utf-8 (encoding tests); skip rather than mangle
        return None


def _jsonl_texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(
                    f"{path}:{lineno}: each jsonl line must be an object with a string 'text' field"
                )
            yield record["text"]


def _file_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from _jsonl_texts(path)
    else:
        text = _read_text(path)
        if text:
            yield text


def corpus_texts(
    corpus: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> list[str]:
    """The documents of a corpus (see the module docstring); None means the stdlib subset.

    `max_bytes` bounds every corpus: documents are taken in order until the next would pass it.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} must be positive")
    if corpus is None or str(corpus) in ("", "stdlib"):
        files = stdlib_files(max_bytes)
    else:
        path = Path(corpus)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not files:
                raise ValueError(
                    f"corpus directory {path} holds no {'/'.join(TEXT_SUFFIXES)} files"
                )
        elif path.is_file():
            files = [path]
        else:
            raise ValueError(
                f"corpus {str(corpus)!r} is neither 'stdlib' nor an existing file or directory"
            )
    texts: list[str] = []
    total = 0
    for text in (t for f in files for t in _file_texts(f)):
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            if not texts:  # a single huge document: keep its first max_bytes
                texts.append(text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore"))
            break
        texts.append(text)
        total += size
    if not texts:
        raise ValueError(f"corpus {str(corpus)!r} holds no text")
    return texts


# ----------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE
) -> tokenizers.Tokenizer:
    """Byte-level BPE with the special tokens <|bos|> (id 0) and <|eos|> (id 1).

    Byte level: the 256 byte symbols are the initial alphabet, so any text encodes without <unk>
    and decodes back to the same bytes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # 2 special tokens + 256 byte symbols; below that BPE could not even hold the alphabet
    if vocab_size < 258 + 1:
        raise ValueError(
            f"vocab_size={vocab_size} must be at least 259 (2 special + 256 bytes + 1)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(
    tok: tokenizers.Tokenizer, directory: str | os.PathLike, model_max_length: int = 4096
) -> Path:
    """Write tokenizer.json plus the config files that transformers' AutoTokenizer reads."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        # no padding token of its own: batches are packed; generation pads with <|eos|>
        "pad_token": EOS_TOKEN,
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return d / "tokenizer.json"


def load_tokenizer(directory_or_file: str | os.PathLike) -> tokenizers.Tokenizer:
    """The tokenizer of a model directory (tokenizer.json, or Moonlight's and Kimi-K2's
    tiktoken.model converted: platform/tokenizer_dir.py) or of a tokenizer.json file."""
    p = Path(directory_or_file)
    if not (p.is_dir() or (p.is_file() and p.name == TOKENIZER_JSON)):
        raise ValueError(f"no tokenizer.json at {str(directory_or_file)!r}")
    return load_tokenizer_dir(p)


def tokenize_corpus(
    texts: list[str], tok: tokenizers.Tokenizer, end_token: str = EOS_TOKEN
) -> torch.Tensor:
    """One int32 token stream: each document's tokens followed by `end_token` (ours: <|eos|>; a
    checkpoint's tokenizer: the EOS its tokenizer_config.json names, `tokenizer_dir.eos_token`)."""
    import torch

    eos = tok.token_to_id(end_token)
    if eos is None:
        raise ValueError(f"tokenizer has no {end_token} token (the end-of-document marker)")
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def prepare_corpus(
    directory: str | os.PathLike,
    corpus: str | None = None,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    model_max_length: int = 4096,
    tokenizer: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Train the tokenizer and tokenize the corpus once (the driver does it, workers load files).

    Writes `directory/tokenizer/` (HF tokenizer files) and `directory/tokens.pt` (int32 stream);
    returns (tokenizer directory, tokens.pt). `tokenizer`: a model directory whose tokenizer
    encodes the corpus instead (fine-tuning keeps the checkpoint's vocabulary), each document
    ended by the EOS token its tokenizer_config.json names; its tokenizer files are copied into
    `directory/tokenizer/`, with a tokenizer.json converted from tiktoken.model where it ships
    none (Moonlight, Kimi-K2), so the run's tokenizer loads without the start directory.
    """
    import torch

    texts = corpus_texts(corpus, max_bytes)
    tok_dir = Path(directory) / "tokenizer"
    if tokenizer is not None:
        start = Path(tokenizer)
        tok, eos = load_tokenizer(start), eos_token(start, EOS_TOKEN)
        tok_dir.mkdir(parents=True, exist_ok=True)
        for f in tokenizer_files(start):
            shutil.copy(f, tok_dir / f.name)
        if not (tok_dir / TOKENIZER_JSON).exists():
            tok.save(str(tok_dir / TOKENIZER_JSON))
    else:
        tok, eos = train_tokenizer(texts, vocab_size), EOS_TOKEN
        save_tokenizer(tok, tok_dir, model_max_length)
    tokens_path = Path(directory) / "tokens.pt"
    torch.save(tokenize_corpus(texts, tok, eos), tokens_path)
    return tok_dir, tokens_path


# ----------------------------------------------------------------------------------------------
# packed sequences in a resumable order


@dataclass(frozen=True)
class DataState:
    epoch: int = 0
    position: int = 0  # windows of this epoch consumed by all DP ranks together

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    @staticmethod
    def from_dict(d: dict) -> DataState:
        return DataState(int(d["epoch"]), int(d["position"]))


class PackedDataset:
    """Non-overlapping windows of S+1 tokens over a token stream."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        self.seq_len = seq_len
        n = tokens.numel() // (seq_len + 1)
        if n == 0:
            raise ValueError(
                f"corpus of {tokens.numel()} tokens is shorter than one window of seq_len+1="
                f"{seq_len + 1}"
            )
        self.windows_NS1 = tokens[: n * (seq_len + 1)].view(n, seq_len + 1).long()

    def __len__(self) -> int:
        return self.windows_NS1.shape[0]


class BatchLoader:
    """This DP rank's slice of each global batch, in a deterministic, resumable order."""

    def __init__(
        self,
        dataset: PackedDataset,
        global_batch: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        state: DataState = DataState(),
    ):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if global_batch < 1 or global_batch % dp_size:
            raise ValueError(
                f"global_batch={global_batch} must be a positive multiple of dp_size={dp_size}"
            )
        if global_batch > len(dataset):
            raise ValueError(
                f"global_batch={global_batch} is larger than the dataset ({len(dataset)} windows)"
            )
        if state.epoch < 0 or not 0 <= state.position <= len(dataset):
            raise ValueError(f"state {state} is outside a dataset of {len(dataset)} windows")
        self.dataset = dataset
        self.global_batch = global_batch
        self.local_batch = global_batch // dp_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.state = state
        self._order_epoch = -1
        self._order: torch.Tensor | None = None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        import torch

        order = self._order
        if epoch != self._order_epoch or order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.dataset), generator=g)
            self._order = order
            self._order_epoch = epoch
        return order

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    def next_batch(self) -> torch.Tensor:
        """[local_batch, S+1] token ids; advances the state by one global batch."""
        epoch, pos = self.state.epoch, self.state.position
        if pos + self.global_batch > len(self.dataset):
            epoch, pos = epoch + 1, 0
        order = self._epoch_order(epoch)
        start = pos + self.dp_rank * self.local_batch
        rows = order[start : start + self.local_batch]
        self.state = DataState(epoch, pos + self.global_batch)
        return self.dataset.windows_NS1[rows]

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()
