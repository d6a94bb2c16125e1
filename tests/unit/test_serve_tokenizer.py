"""The served model's tokenizer and chat template come from its directory's files."""

import json

import pytest

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
    with pytest.raises(ValueError, match=r"no tokenizer.json"):
        ServeTokenizer(tmp_path / "nowhere")
