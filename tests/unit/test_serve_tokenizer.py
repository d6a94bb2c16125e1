"""The served model's tokenizer and chat template come from its directory's files."""

import json
from datetime import datetime

import jinja2
import pytest

from moeray.platform.serve.http.chat import ChatTemplateError
from moeray.platform.serve.http.schemas import ChatMessage
from moeray.platform.serve.tokenizer import ServeTokenizer
from moeray.platform.train.data import save_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(["def f(x):\n    return x\n"] * 20, vocab_size=300), d)
    return d


def test_round_trip_and_template_from_tokenizer_config(tok_dir):
    tok = ServeTokenizer(tok_dir)
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok.encode(text)) == text
    render = tok.chat_template()
    prompt = render(
        [
            ChatMessage(role="system", content="be brief"),
            ChatMessage(role="user", content="hi"),
            ChatMessage(role="assistant", content="hello"),
            ChatMessage(role="user", content="bye"),
        ]
    )
    assert prompt == "<|bos|>be brief\n<|User|>hi<|Assistant|>hello<|eos|><|User|>bye<|Assistant|>"


def test_a_directory_template_wins_and_missing_files_are_errors(tok_dir, tmp_path):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    for f in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / f).write_text((tok_dir / f).read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    render = ServeTokenizer(tmp_path).chat_template()
    assert render([ChatMessage(role="user", content="x")]) == "[user]x"
    # the server's --chat-template wins over the directory's; one that does not parse raises
    render = ServeTokenizer(tmp_path).chat_template("{{ messages[0]['content'] }}!")
    assert render([ChatMessage(role="user", content="x")]) == "x!"
    with pytest.raises(jinja2.TemplateSyntaxError):
        ServeTokenizer(tmp_path).chat_template("{% for m in messages %}")
    with pytest.raises(ValueError, match=r"no tokenizer.json"):
        ServeTokenizer(tmp_path / "nowhere")


def _bpe_dir(d, *, post_bos: bool, add_bos: bool | None, end_special: bool = True):
    """A byte-level BPE whose tokenizer.json post-processor adds BOS or not, and a
    tokenizer_config.json with add_bos_token true, false or absent. <|bos|> and <|eos|> are
    trained in as plain tokens: only tokenizer_config.json names them special. <|end|> is an
    added token that tokenizer.json marks special or not."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|bos|>", "<|eos|>"],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello world, the quick brown fox"] * 50, trainer)
    tok.add_tokens([AddedToken("<|end|>", special=end_special)])
    for t in ("<|bos|>", "<|eos|>"):  # as if trained plain: special only by the config's word
        tok.add_tokens([AddedToken(t, special=False)])
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", 0)]
        )
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "additional_special_tokens": ["<|end|>"],
    }
    if add_bos is not None:
        cfg["add_bos_token"] = add_bos
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("post_bos", [False, True])
@pytest.mark.parametrize("add_bos", [None, True, False])
def test_bos_where_the_tokenizer_config_asks_for_it(tmp_path, post_bos, add_bos):
    tok = ServeTokenizer(_bpe_dir(tmp_path, post_bos=post_bos, add_bos=add_bos))
    plain = tok.encode("hello world", add_special_tokens=False)
    assert plain and 0 not in plain
    want_bos = add_bos if add_bos is not None else post_bos
    assert tok.encode("hello world") == [0] * want_bos + plain
    # a prompt that writes BOS itself (a chat template's) keeps exactly that one without
    # special tokens added, as the chat endpoint encodes
    assert tok.encode("<|bos|>hello world", add_special_tokens=False) == [0, *plain]
    if add_bos is None or add_bos == post_bos:  # where transformers 5 agrees
        transformers = pytest.importorskip("transformers")
        hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        assert hf("hello world")["input_ids"] == tok.encode("hello world")


@pytest.mark.parametrize("end_special", [False, True])
def test_decode_skips_special_tokens_by_default(tmp_path, end_special):
    tok = ServeTokenizer(_bpe_dir(tmp_path, post_bos=True, add_bos=None, end_special=end_special))
    ids = tok.encode("hello<|end|> world<|eos|>")
    assert tok.decode(ids) == ("hello world" if end_special else "hello<|end|> world")
    assert tok.decode(ids, skip_special_tokens=False) == "<|bos|>hello<|end|> world<|eos|>"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def _template(tok_dir, tmp_path, source):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = source
    for f in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / f).write_text((tok_dir / f).read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return ServeTokenizer(tmp_path).chat_template()


def test_chat_template_sandbox_and_transformers_globals(tok_dir, tmp_path):
    msgs = [ChatMessage(role="user", content="<é & ü>"), ChatMessage(role="user", content="b")]
    render = _template(
        tok_dir,
        tmp_path,
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% endfor %}|{{ strftime_now('%Y') }}|{{ bos_token }}",
    )
    year = str(datetime.now().year)
    # tojson as transformers': no ASCII or HTML escaping; loop controls; strftime_now
    assert render(msgs) == f'{{"role": "user", "content": "<é & ü>"}}|{year}|<|bos|>'
    for source, message in [
        ("{{ raise_exception('only user turns') }}", "only user turns"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
        ("{% set _ = messages.append(1) %}", "unsafe"),
        ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    ]:
        with pytest.raises(ChatTemplateError, match=message):
            _template(tok_dir, tmp_path, source)(msgs)
