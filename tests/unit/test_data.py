"""Tokenizer and packed-data tests: byte-level round trip, HF loading, resumable sharded order."""

import json
import random

import pytest
import torch

from moeray.platform.checkpoint import save_model
from moeray.platform.config import tiny
from moeray.platform.model.transformer import Transformer
from moeray.platform.train import data


@pytest.fixture(scope="module")
def stdlib_texts():
    # 300 kB keeps tokenizer training well under a second on one core
    return data.corpus_texts(None, max_bytes=300_000)


@pytest.fixture(scope="module")
def tok(stdlib_texts):
    return data.train_tokenizer(stdlib_texts, vocab_size=512)


def test_stdlib_subset_is_deterministic_and_bounded():
    a = data.stdlib_files(200_000)
    b = data.stdlib_files(200_000)
    assert a == b and len(a) > 3
    assert sum(p.stat().st_size for p in a) <= 200_000
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in a)


def test_tokenizer_special_tokens_and_byte_roundtrip(tok):
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id(data.BOS_TOKEN) == 0 and tok.token_to_id(data.EOS_TOKEN) == 1
    rng = random.Random(3)
    # arbitrary unicode (incl. characters never seen in training) must survive: byte level, no <unk>
    alphabet = "abc XYZ\t\n()[]{}:=é✓漢😀\u00a0" + "".join(
        chr(rng.randrange(32, 0x3000)) for _ in range(50)
    )
    for _ in range(20):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 200)))
        ids = tok.encode(s, add_special_tokens=False).ids
        assert tok.decode(ids) == s
    # merges were learned: code compresses well below one token per byte
    code = "def __init__(self, value):\n        self.value = value\n        return None\n"
    assert len(tok.encode(code).ids) < len(code.encode()) / 2


def test_saved_directory_loads_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    data.save_tokenizer(tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.bos_token == data.BOS_TOKEN and hf.bos_token_id == 0
    assert hf.eos_token == data.EOS_TOKEN and hf.eos_token_id == 1
    text = "for i in range(10):\n    print(i ** 2)  # ünïcode\n"
    assert hf.encode(text) == tok.encode(text).ids  # no BOS/EOS added behind our back
    assert hf.decode(hf.encode(text)) == text
    assert data.load_tokenizer(tmp_path).encode(text).ids == tok.encode(text).ids


def test_corpus_by_path(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third", "id": 3}) + "\n"
    )
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert data.corpus_texts(tmp_path) == ["first document", "second", "third"]
    assert data.corpus_texts(tmp_path / "sub" / "b.jsonl") == ["second", "third"]
    assert data.corpus_texts(tmp_path, max_bytes=len("first document") + 6) == [
        "first document",
        "second",
    ]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="text"):
        data.corpus_texts(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="neither"):
        data.corpus_texts(tmp_path / "missing")


def test_tokenize_corpus_appends_eos(tok):
    docs = ["x = 1", "y = 2\n"]
    stream = data.tokenize_corpus(docs, tok)
    eos = tok.token_to_id(data.EOS_TOKEN)
    assert stream.dtype == torch.int32
    assert (stream == eos).sum() == 2 and stream[-1] == eos
    assert tok.decode([int(i) for i in stream if i != eos]) == "x = 1y = 2\n"


def test_finetune_corpus_from_a_tiktoken_checkpoint(tmp_path):
    """Fine-tuning from a Moonlight/Kimi-K2-style directory (tiktoken.model + tokenization_*.py,
    no tokenizer.json): the corpus is encoded with the checkpoint's ids (tiktoken's own encoder
    as the oracle), each document ended by the [EOS] its tokenizer_config.json names; the run's
    tokenizer directory holds the checkpoint's files and a tokenizer.json, and loads alone."""
    from tests.unit.test_tokenizer_dir import PATTERN, _write_tiktoken_dir

    tiktoken = pytest.importorskip("tiktoken")
    start = tmp_path / "kimi"
    start.mkdir()
    ranks, specials = _write_tiktoken_dir(start)
    oracle = tiktoken.Encoding(
        name="kimi-test", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    docs = ["Hello, world! 中文English混合", "for i in range(3):\n\tprint(i)"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(docs):
        (corpus / f"{i}.txt").write_text(doc)
    tok_dir, tokens = data.prepare_corpus(tmp_path / "run", str(corpus), tokenizer=start)
    eos = specials["[EOS]"]
    want = [t for doc in docs for t in [*oracle.encode_ordinary(doc), eos]]
    assert torch.load(tokens).tolist() == want
    assert tok_dir == tmp_path / "run" / "tokenizer"
    assert {f.name for f in tok_dir.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "tiktoken.model",
        "tokenization_kimi.py",
    }
    again = data.load_tokenizer(tok_dir)
    assert again.encode(docs[0], add_special_tokens=False).ids == oracle.encode_ordinary(docs[0])
    # The fine-tuned model's directory (the job saves it with the run's tokenizer) ships them too.
    out = save_model(Transformer(tiny()), tiny(), tmp_path / "out", tokenizer=tok_dir)
    assert {f.name for f in tok_dir.iterdir()} <= {f.name for f in out.iterdir()}


def test_finetune_corpus_ends_documents_with_the_checkpoints_eos(tok, tmp_path):
    """A tokenizer.json checkpoint whose EOS is not ours (DeepSeek-V3's <｜end▁of▁sentence｜>):
    the documents end with it; a tokenizer without the named EOS is refused by name."""
    from tokenizers import AddedToken

    start = tmp_path / "v3"
    v3_tok = data.train_tokenizer(["x = 1\n"] * 50, vocab_size=300)
    v3_tok.add_special_tokens([AddedToken("<｜end▁of▁sentence｜>", special=True)])
    start.mkdir()
    v3_tok.save(str(start / "tokenizer.json"))
    config = {"eos_token": {"content": "<｜end▁of▁sentence｜>", "special": True}}
    (start / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "doc.txt").write_text("x = 1")
    _, tokens = data.prepare_corpus(tmp_path / "run", str(tmp_path / "doc.txt"), tokenizer=start)
    stream = torch.load(tokens).tolist()
    eos = v3_tok.token_to_id("<｜end▁of▁sentence｜>")
    assert stream[-1] == eos and stream.count(eos) == 1
    assert stream[:-1] == v3_tok.encode("x = 1", add_special_tokens=False).ids
    (start / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="no </s> token"):
        data.prepare_corpus(tmp_path / "run2", str(tmp_path / "doc.txt"), tokenizer=start)


def test_packed_windows_are_consecutive_slices():
    stream = torch.randint(0, 1000, (1003,), dtype=torch.int32)
    ds = data.PackedDataset(stream, seq_len=9)
    assert len(ds) == 100 and ds.windows_NS1.shape == (100, 10)
    assert torch.equal(ds.windows_NS1[37], stream[370:380].long())
    with pytest.raises(ValueError, match="shorter"):
        data.PackedDataset(stream[:5], seq_len=9)


def _loader(ds, rank, dp, state=None, seed=7, gb=6):
    state = data.DataState() if state is None else state
    return data.BatchLoader(ds, gb, dp_rank=rank, dp_size=dp, seed=seed, state=state)


def test_sharded_order_covers_each_window_once_per_epoch():
    # window i holds the value i in every position, so rows identify windows
    n, S = 41, 5
    stream = torch.arange(n).repeat_interleave(S + 1).int()
    ds = data.PackedDataset(stream, S)
    dp = 3
    loaders = [_loader(ds, r, dp) for r in range(dp)]
    seen = []
    for _ in range(n // 6):  # 6 full global batches; the 5 leftover windows are dropped
        parts = [ld.next_batch() for ld in loaders]
        assert all(p.shape == (2, S + 1) for p in parts)
        seen.extend(torch.cat(parts)[:, 0].tolist())
    assert len(set(seen)) == len(seen) == 36
    assert seen != sorted(seen)  # shuffled
    # next step starts epoch 1 with a different permutation
    nxt = torch.cat([ld.next_batch() for ld in loaders])[:, 0].tolist()
    assert loaders[0].state == data.DataState(1, 6)
    assert nxt != seen[:6]


def test_resume_reproduces_the_same_batches():
    stream = torch.randint(0, 500, (20 * 17,), dtype=torch.int32)
    ds = data.PackedDataset(stream, 16)
    ref = _loader(ds, 1, 2, gb=4)
    batches = [ref.next_batch() for _ in range(12)]  # crosses an epoch boundary (5 steps/epoch)
    for k in (0, 3, 5, 7):
        probe = _loader(ds, 1, 2, gb=4)
        for _ in range(k):
            probe.next_batch()
        state = data.DataState.from_dict(json.loads(json.dumps(probe.state.to_dict())))
        resumed = _loader(ds, 1, 2, state=state, gb=4)
        for want in batches[k:]:
            assert torch.equal(resumed.next_batch(), want)
    # a different seed is a different order
    other = _loader(ds, 1, 2, seed=8, gb=4)
    assert not all(torch.equal(other.next_batch(), b) for b in batches[:3])


def test_loader_rejects_bad_arguments():
    ds = data.PackedDataset(torch.arange(100, dtype=torch.int32), 9)
    with pytest.raises(ValueError, match="multiple of dp_size"):
        data.BatchLoader(ds, 5, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank"):
        data.BatchLoader(ds, 4, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="larger than the dataset"):
        data.BatchLoader(ds, 12)
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_tokenizer(["abc"], vocab_size=100)
