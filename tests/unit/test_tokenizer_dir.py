"""Model directories whose tokenizer is tiktoken.model plus a Python class (Moonlight, Kimi-K2),
converted without running the class (platform/tokenizer_dir.py), against tiktoken's own encoder.

The directory is written here as those checkpoints lay theirs out: BPE ranks trained with
tiktoken's trainer on a mixed corpus (code, English, Chinese), a tokenization_kimi.py whose class
holds Kimi's published pre-tokenizer pattern (character classes with Han subtracted, so Han runs
split from Latin words) as a `"|".join([...])` of raw strings and a small reserved block, and
whose first statement raises (the module must be read, never imported), and a
tokenizer_config.json naming special tokens in `added_tokens_decoder` (one not special) with an
`auto_map`. The oracle is `tiktoken.Encoding(pat_str, ranks, specials)`, what the class builds.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from test_openai_schemas import serve_model_dir

from moeray.platform.checkpoint import save_model
from moeray.platform.config import tiny
from moeray.platform.model.transformer import Transformer
from moeray.platform.serve.http.schemas import ChatMessage
from moeray.platform.serve.tokenizer import ServeTokenizer
from moeray.platform.tokenizer_dir import load_tokenizer_dir, read_tiktoken_ranks

tiktoken = pytest.importorskip("tiktoken")
educational = pytest.importorskip("tiktoken._educational")
openai = pytest.importorskip("openai")

# Kimi's pattern, one alternative a line (the order is the match order).
PATTERN_PARTS = [
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
]
PATTERN = "|".join(PATTERN_PARTS)
RESERVED = 6  # the class's num_reserved_special_tokens (Kimi's is 256)
NAMED = {  # offset from the BPE ids -> (content, special)
    0: ("[BOS]", True),
    1: ("[EOS]", True),
    2: ("<|im_end|>", True),
    3: ("<|im_user|>", True),
    4: ("<|im_assistant|>", True),
    5: ("<|im_middle|>", True),
    6: ("<|plain_marker|>", False),
}
CORPUS = (
    "def load(path):\n    with open(path) as f:\n        return json.load(f)\n\n"
    "The quick brown fox doesn't jump; it's 1234 feet away. HELLO World's end.\n"
    "中文和English混合的句子，模型需要正确地切分汉字。北京市 Pascal 你好世界！\n"
    "for i in range(10):\n\tprint(i, i ** 2)  # squares\n"
) * 8
TEXTS = [
    "Hello world",
    "Hello, world! I'll say: DON'T stop, they've gone.",
    "中文English混合",
    "北京市 Pascal 汉字abc",
    "numbers 1234567 and 3.14159",
    "    indented\n\n\n\t\ttabs   and  spaces  \n",
    "emoji 🙂 and Кириллица, bytes never seen in training",
    "qzq\nvwq",
    "<|im_user|>hi there<|im_middle|>answer<|im_end|>[EOS]",
    "a <|plain_marker|> between words",
    "",
]


def _write_tiktoken_dir(d: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    ranks = educational.bpe_train(CORPUS, 300, PATTERN, visualise=None)
    # Tokens training would not make, as published vocabularies have: "wq" ranked before "vw"
    # (tiktoken merges the pair whose result ranks lowest, not the leftmost or the one whose
    # left piece ranks lowest: "vwq" is v + wq), and "qzq", which no merge reaches (tiktoken
    # takes a piece that is a token whole).
    for extra in (b"wq", b"vw", b"qzq"):
        assert extra not in ranks
        ranks[extra] = len(ranks)
    lines = [
        f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])
    ]
    (d / "tiktoken.model").write_text("\n".join(lines) + "\n")
    parts = "".join(f'            r"""{p}""",\n' for p in PATTERN_PARTS)  # as Kimi writes them
    (d / "tokenization_kimi.py").write_text(
        'raise RuntimeError("this file is read as data, never run")\n\n\n'
        "class TikTokenTokenizer:\n"
        f"    num_reserved_special_tokens = {RESERVED}\n"
        '    pat_str = "|".join(\n'
        "        [\n" + parts + "        ]\n"
        "    )\n\n"
        "    def __init__(self, vocab_file):\n"
        "        self.pattern = self.pat_str\n"
    )
    base = len(ranks)
    config = {
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "added_tokens_decoder": {
            str(base + k): {"content": c, "special": s, "lstrip": False, "rstrip": False}
            for k, (c, s) in NAMED.items()
        },
        "chat_template": (
            "{% for m in messages %}<|im_user|>{{ m['content'] }}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_assistant|>{% endif %}"
        ),
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    specials = {
        NAMED.get(k, (f"<|reserved_token_{base + k}|>", True))[0]: base + k
        for k in range(RESERVED + 2)
    }
    return ranks, specials


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("kimi")
    ranks, specials = _write_tiktoken_dir(d)
    oracle = tiktoken.Encoding(
        name="kimi-test", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    return d, oracle


def test_pattern_splits_han_from_latin(kimi_dir):
    d, _ = kimi_dir
    tok = load_tokenizer_dir(d)
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("中文English混合")]
    assert len(pieces) == 3  # 中文 | English | 混合 (byte-level symbols)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_tiktoken(kimi_dir, text):
    d, oracle = kimi_dir
    tok = load_tokenizer_dir(d)
    want = oracle.encode(text, allowed_special="all")
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == want
    assert tok.decode(ids, skip_special_tokens=False) == text == oracle.decode(want)


def test_special_tokens_and_reserved_block(kimi_dir):
    d, oracle = kimi_dir
    tok = load_tokenizer_dir(d)
    base = len(read_tiktoken_ranks(d / "tiktoken.model"))
    assert tok.get_vocab_size(with_added_tokens=True) == base + RESERVED + 2 == oracle.n_vocab
    assert tok.id_to_token(base + 7) == f"<|reserved_token_{base + 7}|>"
    ids = tok.encode("<|im_user|>hi<|plain_marker|>yo<|im_end|>", add_special_tokens=False).ids
    # special tokens drop out with skip_special_tokens; the one marked not special stays
    assert tok.decode(ids, skip_special_tokens=True) == "hi<|plain_marker|>yo"


def test_serve_tokenizer_reads_the_directory(kimi_dir):
    d, oracle = kimi_dir
    st = ServeTokenizer(d)
    assert st.encode("中文 text") == oracle.encode("中文 text")
    template = st.chat_template()
    assert template is not None
    prompt = template([ChatMessage(role="user", content="hi")])
    assert prompt == "<|im_user|>hi<|im_end|><|im_assistant|>"


def _broken_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_clear_errors(kimi_dir, tmp_path):
    d, _ = kimi_dir
    with pytest.raises(ValueError, match=r"no tokenizer.json or tiktoken.model"):
        load_tokenizer_dir(tmp_path)
    computed = _broken_copy(d, tmp_path / "computed")
    source = computed / "tokenization_kimi.py"
    source.write_text(source.read_text().replace('pat_str = "|".join(', "pat_str = make("))
    with pytest.raises(ValueError, match=r"not an expression of literals"):
        load_tokenizer_dir(computed)
    no_source = _broken_copy(d, tmp_path / "no_source")
    (no_source / "tokenization_kimi.py").unlink()
    (no_source / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"0 tokenization_\*.py files.*pat_str"):
        load_tokenizer_dir(no_source)
    bad_rank = _broken_copy(d, tmp_path / "bad_rank")
    (bad_rank / "tiktoken.model").write_text("IQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match=r"tiktoken.model:2: .* is not 'base64\(token\) rank'"):
        load_tokenizer_dir(bad_rank)


@pytest.mark.slow
def test_served_through_the_openai_api(kimi_dir, tmp_path):
    """A model directory with this tokenizer serves: prompts tokenized as tiktoken does, the
    text decoded from the returned ids as tiktoken decodes them, and json_object output
    (xgrammar's vocabulary built from the converted tokenizer)."""
    d, oracle = kimi_dir
    eos = oracle.n_vocab - RESERVED - 1  # [EOS]
    cfg = tiny().replace(vocab_size=oracle.n_vocab, num_nextn_predict_layers=0, eos_token_id=eos)
    model = Transformer(cfg).eval()
    model.reset_parameters(seed=2)
    model_dir = save_model(model, cfg, tmp_path / "model")
    for f in ("tiktoken.model", "tokenization_kimi.py", "tokenizer_config.json"):
        (model_dir / f).write_bytes((d / f).read_bytes())
    sizes = dict(
        page_size=16, num_pages=32, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=128
    )
    with serve_model_dir(model_dir, "kimi", **sizes) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        prompt = "中文English 1234"
        r = client.completions.create(
            model="kimi",
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            logprobs=1,
            extra_body={"return_tokens_as_token_ids": True, "skip_special_tokens": False},
        )
        assert r.usage.prompt_tokens == len(oracle.encode(prompt))
        ids = [int(t.split(":", 1)[1]) for t in r.choices[0].logprobs.tokens]
        assert ids and r.choices[0].text == oracle.decode([i for i in ids if i != eos])
        chat = client.chat.completions.create(
            model="kimi",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=40,
            temperature=0,
            response_format={"type": "json_object"},
        )
        chat_prompt = "<|im_user|>hi<|im_end|><|im_assistant|>"
        assert chat.usage.prompt_tokens == len(oracle.encode(chat_prompt, allowed_special="all"))
        content = chat.choices[0].message.content
        if chat.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict)
        else:  # cut at max_tokens: still a prefix of an object
            assert content.startswith("{")
