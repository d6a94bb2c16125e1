"""Each published config, served end to end, gives transformers' greedy tokens over HTTP.

Per config of test_published_configs.py (shrunk, random weights, one MoE layer): a checkpoint
saved by transformers and the same weights in the official format written by our save_model (FP8
where the published config is), each with a small byte-level BPE tokenizer.json built here whose
special tokens are BOS, EOS, <|User|>, <|Assistant|> and <|end|> (ids 0-4), a post-processor that
adds BOS and a DeepSeek-style chat template. Each directory is served as `moeray serve` does it
(check_model_dir, make_engine, a ColocatedWorker behind the OpenAI app, uvicorn in a thread) and
queried with the openai client at temperature 0.

The vocabulary is relabeled so that the greedy completion shows what the text handling must get
right: the embedding and output rows of two tokens of transformers' greedy output are swapped with
<|User|>'s and EOS's (a relabeling: the model computes the same thing under other ids), so the
completion holds a special token and ends with EOS.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from moeray.platform.checkpoint import save_model  # noqa: E402
from moeray.platform.config import preset  # noqa: E402
from moeray.platform.model.transformer import Transformer  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"moeray_e2e_{name}", Path(__file__).with_name(f"{name}.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


pub = _load("test_published_configs")
srv = _load("test_openai_schemas")

SPECIALS = ["<|bos|>", "<|eos|>", "<|User|>", "<|Assistant|>", "<|end|>"]
BOS, EOS, USER = 0, 1, 2
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|User|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|Assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|Assistant|>{% endif %}"
)
PROMPT = "def f(x):\n    return"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """tokenizer.json (512 ids, as the shrunk models) and tokenizer_config.json."""
    corpus = [
        p.read_text() for p in sorted((Path(__file__).parents[2] / "moeray/platform").glob("*.py"))
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() == 512
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", BOS)]
    )
    d = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(d / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIALS[BOS],
        "eos_token": SPECIALS[EOS],
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": TEMPLATE,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return {f: (d / f).read_text() for f in ("tokenizer.json", "tokenizer_config.json")}


def _greedy(hf, ids: list[int], n: int, *, stop: bool = True) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=1 if stop else n,
            pad_token_id=EOS,
        )
    return out[0, len(ids) :].tolist()


_VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight")


def _relabel(hf, dirs: list[Path], prompt: list[int]) -> None:
    """Swap <|User|> and EOS with two tokens of hf's greedy output (not in the prompt), in hf and
    in the checkpoints' files (these rows are never quantized)."""
    g = _greedy(hf, prompt, 10, stop=False)
    avoid = {*prompt, BOS, EOS, USER}
    p = next(i for i, t in enumerate(g[:4]) if t not in avoid)
    k = next(
        i for i in range(p + 2, MAX_TOKENS) if g[i] not in avoid | {g[p]} and g[i] not in g[:i]
    )
    swaps = [(USER, g[p]), (EOS, g[k])]
    with torch.no_grad():
        for w in (hf.get_input_embeddings().weight, hf.get_output_embeddings().weight):
            for a, b in swaps:
                w[[a, b]] = w[[b, a]]
    for d in dirs:
        for shard in sorted(d.glob("*.safetensors")):
            tensors = load_file(str(shard))
            if not any(key.endswith(_VOCAB_ROWS) for key in tensors):
                continue
            for key, w in tensors.items():
                if key.endswith(_VOCAB_ROWS):
                    for a, b in swaps:
                        w[[a, b]] = w[[b, a]]
            save_file(tensors, str(shard), metadata={"format": "pt"})


def _checkpoints(name: str, tmp_path: Path, tokenizer_files: dict[str, str]):
    """The official directory, the transformers-saved one, and transformers' model of the
    weights both hold (FP8 dequantized: transformers cannot load FP8 on a CPU)."""
    c = pub._shrink(preset(name)).replace(bos_token_id=BOS, eos_token_id=EOS)
    model = Transformer(c).eval()
    model.reset_parameters(seed=3)
    pub._positive_biases(m.gate.e_score_correction_bias for m in model.moe_layers())
    official, saved = tmp_path / "official", tmp_path / "transformers"
    fp8 = c.quantization_config is not None
    save_model(model, c, official, fp8=fp8)  # with the MTP layer where the config has one
    reference = official
    if fp8 or c.num_nextn_predict_layers:
        reference = tmp_path / "dequantized"
        pub._dequantized_copy(official, reference, c)
    hf = pub._hf_load(reference)
    hf.save_pretrained(str(saved))
    for d in (official, saved):
        hf_tok = _write_tokenizer(d, tokenizer_files)
    _relabel(hf, [official, saved], hf_tok(PROMPT)["input_ids"])
    return [("official", official), ("transformers", saved)], hf


def _write_tokenizer(d: Path, files: dict[str, str]):
    for f, text in files.items():
        (d / f).write_text(text)
    return transformers.AutoTokenizer.from_pretrained(str(d))


def _ids(tokens: list[str]) -> list[int]:
    assert all(t.startswith("token_id:") for t in tokens), tokens
    return [int(t.split(":", 1)[1]) for t in tokens]


def _no_special(text: str) -> bool:
    return not any(s in text for s in SPECIALS)


@pytest.mark.parametrize("name", sorted(pub.PUBLISHED))
def test_served_checkpoints_match_transformers_greedy(name, tmp_path, tokenizer_files):
    checkpoints, hf = _checkpoints(name, tmp_path, tokenizer_files)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(checkpoints[0][1]))
    prompt = hf_tok(PROMPT)["input_ids"]
    assert prompt[0] == BOS and prompt[1] != BOS
    want = _greedy(hf, prompt, MAX_TOKENS)
    # The relabeling put a special token in and EOS at the end.
    assert USER in want and want[-1] == EOS and want.count(EOS) == 1, want
    chat_prompt = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    chat_prompt = list(getattr(chat_prompt, "input_ids", chat_prompt))
    assert chat_prompt.count(BOS) == 1
    want_chat = _greedy(hf, chat_prompt, MAX_TOKENS)
    sizes = dict(
        page_size=16, num_pages=16, max_num_seqs=4, max_num_batched_tokens=128, max_model_len=128
    )
    for fmt, d in checkpoints:
        with srv.serve_model_dir(d, "m", **sizes) as url:
            client = openai.OpenAI(
                base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60
            )
            _check_completions(client, hf_tok, prompt, want, fmt)
            _check_chat(client, hf_tok, chat_prompt, want_chat, fmt)


def _check_completions(client, hf_tok, prompt, want, fmt):
    r = client.completions.create(
        model="m",
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=1,
        extra_body={"return_tokens_as_token_ids": True},
    )
    (c,) = r.choices
    # EOS ends it ("stop"), counted in usage as vLLM does, but is neither text nor a logprob.
    assert [*_ids(c.logprobs.tokens), EOS] == want, fmt
    assert c.finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(want))
    assert c.text == hf_tok.decode(want, skip_special_tokens=True) and _no_special(c.text)
    r = client.completions.create(
        model="m", prompt=PROMPT, max_tokens=1, extra_body={"add_special_tokens": False}
    )
    assert r.usage.prompt_tokens == len(prompt) - 1  # no BOS when asked so
    # Without skipping, <|User|> shows; EOS still does not. Streamed, with the token strings.
    chunks = list(
        client.completions.create(
            model="m",
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            logprobs=0,
            stream=True,
            extra_body={"skip_special_tokens": False},
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks)
    assert text == hf_tok.decode(want[:-1], skip_special_tokens=False)
    assert SPECIALS[USER] in text and SPECIALS[EOS] not in text
    tokens = [t for ch in chunks for t in ch.choices[0].logprobs.tokens]
    offsets = [o for ch in chunks for o in ch.choices[0].logprobs.text_offset]
    assert "".join(tokens) == text and len(tokens) == len(want) - 1
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def _check_chat(client, hf_tok, chat_prompt, want, fmt):
    r = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"return_tokens_as_token_ids": True},
    )
    (c,) = r.choices
    got = _ids([lp.token for lp in c.logprobs.content])
    stopped = want[-1] == EOS
    assert [*got, *[EOS] * stopped] == want, fmt
    assert c.finish_reason == ("stop" if stopped else "length")
    assert r.usage.prompt_tokens == len(chat_prompt)
    assert c.message.content == hf_tok.decode(want, skip_special_tokens=True)
    assert _no_special(c.message.content)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            max_completion_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1]) == c.message.content
    assert chunks[-1].usage.completion_tokens == len(want)
    # n greedy choices agree; a stop string cuts the text where it first occurs
    stop = c.message.content[1:3]
    r = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, n=2, stop=[stop]
    )
    cut = c.message.content[: c.message.content.index(stop)]
    assert [(ch.message.content, ch.finish_reason) for ch in r.choices] == [(cut, "stop")] * 2
