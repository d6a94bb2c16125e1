"""Generated text as the API returns it: special tokens, the stop token, stop strings, streaming
and logprobs agree (ChoiceText directly, then over HTTP with the openai client)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from moeray.platform.serve.http.app import build_app
from moeray.platform.serve.http.server import OpenAIServerConfig
from moeray.platform.serve.http.text import ChoiceText
from moeray.platform.serve.tokenizer import ServeTokenizer
from moeray.platform.train.data import save_tokenizer, train_tokenizer

_spec = importlib.util.spec_from_file_location(
    "moeray_test_serve_text_srv", Path(__file__).with_name("test_openai_schemas.py")
)
assert _spec is not None and _spec.loader is not None
srv = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = srv  # dataclasses look their module up while the class is created
_spec.loader.exec_module(srv)
EOS = srv.EOS


def _stream_choice(tok, ids, stops, rng, *, skip, stop_token):
    """Push ids in random steps (values: their indices); check as it goes that the tokens
    released so far spell a prefix of the text sent so far. Returns (text, tokens)."""
    ct = ChoiceText(tok, stops, skip_special_tokens=skip)
    sent, released, pos = "", [], 0
    while pos < len(ids) and not ct.stopped:
        n = rng.randint(1, 4)
        final = pos + n >= len(ids)
        text, toks = ct.push(
            ids[pos : pos + n],
            range(pos, min(pos + n, len(ids))),
            final=final,
            stop_token=final and stop_token,
        )
        pos += n
        sent += text
        released += toks
        spelled = "".join(t.text for t in released)
        assert sent.startswith(spelled), (sent, spelled)
    return sent, released


def test_choice_text_random_against_reference():
    rng = random.Random(0)
    tok = srv.ByteTokenizer()
    alphabet = "ab c" + "é✓" + "😀"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        ids = tok.encode(text)
        for _ in range(rng.randint(0, 2)):  # special tokens inside the text
            ids.insert(rng.randint(0, len(ids)), EOS)
        stop_token = rng.random() < 0.5
        if stop_token:
            ids.append(EOS)
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 3)))]
        skip = rng.random() < 0.5
        visible = tok.decode(ids[:-1] if stop_token else ids, skip_special_tokens=skip)
        hits = [i for i in (visible.find(s) for s in stops) if i >= 0]
        want = visible[: min(hits)] if hits else visible
        sent, toks = _stream_choice(tok, ids, stops, rng, skip=skip, stop_token=stop_token)
        assert sent == want, (ids, stops)
        # every token with text in the output, in order, spelling it; offsets index it
        assert "".join(t.text for t in toks) == want
        assert [t.offset for t in toks] == [
            sum(len(u.text) for u in toks[:i]) for i in range(len(toks))
        ]
        assert [t.value for t in toks] == list(range(len(toks)))
        if not hits:  # all but the stop token
            assert len(toks) == len(ids) - stop_token


def test_the_stop_token_is_no_text_even_when_special_tokens_are_shown():
    tok = srv.ByteTokenizer()
    ct = ChoiceText(tok, (), skip_special_tokens=False)
    text, toks = ct.push([72, EOS], [0, 1])  # EOS inside the output (ignore_eos) is shown
    assert text == "H<|eos|>" and [t.text for t in toks] == ["H", "<|eos|>"]
    text, toks = ct.push([105, EOS], [2, 3], final=True, stop_token=True)
    assert text == "i" and [(t.value, t.text, t.offset) for t in toks] == [(2, "i", 8)]


@pytest.fixture(scope="module")
def live():
    engine, app = srv.make_server()
    with srv.serve_app(app) as url:
        yield engine, url


def test_special_tokens_and_the_stop_token_over_http(live):
    _, url = live
    client = srv._client(url)
    ids = [72, 105, EOS, 33]
    r = client.completions.create(
        model="tiny", prompt=ids, max_tokens=9, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == "Hi!Hi!H"  # skipped by default
    r = client.completions.create(
        model="tiny",
        prompt=ids,
        max_tokens=9,
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    assert r.choices[0].text == "Hi<|eos|>!Hi<|eos|>!H"
    # EOS ends the choice: not text, not a logprob entry, but a completion token (as vLLM)
    r = client.completions.create(
        model="tiny",
        prompt=ids,
        max_tokens=9,
        logprobs=1,
        extra_body={"skip_special_tokens": False},
    )
    (c,) = r.choices
    assert (c.text, c.finish_reason, r.usage.completion_tokens) == ("Hi", "stop", 3)
    assert c.logprobs.tokens == ["H", "i"] and c.logprobs.text_offset == [0, 1]
    r = client.completions.create(
        model="tiny",
        prompt="abc",
        max_tokens=4,
        logprobs=2,
        extra_body={"return_tokens_as_token_ids": True},
    )
    assert r.choices[0].logprobs.tokens == [
        "token_id:97",
        "token_id:98",
        "token_id:99",
        "token_id:97",
    ]
    assert set(r.choices[0].logprobs.top_logprobs[0]) == {"token_id:97", "token_id:98"}


def test_logprobs_agree_with_text_cut_by_a_stop_string(live):
    _, url = live
    client = srv._client(url)
    kw = dict(model="tiny", prompt="ça, deux, trois", max_tokens=40, logprobs=1, stop=["deux"])
    r = client.completions.create(**kw)
    (c,) = r.choices
    assert c.text == "ça, " and "".join(c.logprobs.tokens) == c.text
    assert c.logprobs.text_offset == [0, 0, 1, 2, 3]  # "ç" is two bytes: "" then "ç"
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    for ch in chunks:  # each chunk's tokens spell the chunk's text
        assert "".join(ch.choices[0].logprobs.tokens) == ch.choices[0].text
    msgs = [{"role": "user", "content": "ab✓"}]
    stream = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=30, logprobs=True, stream=True, stop="✓"
    )
    content = ""
    for ch in stream:
        delta = ch.choices[0].delta.content or ""
        lps = ch.choices[0].logprobs.content if ch.choices[0].logprobs else []
        assert "".join(lp.token for lp in lps) == delta
        assert b"".join(bytes(lp.bytes) for lp in lps) == delta.encode()
        content += delta
    assert "✓" not in content and content


def test_a_chat_template_error_is_a_400(tmp_path):
    save_tokenizer(train_tokenizer(["hello there"] * 20, vocab_size=280), tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System messages are not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    template = ServeTokenizer(tmp_path).chat_template()
    config = OpenAIServerConfig(model_id="tiny", max_context=512)
    app = build_app(srv.EchoEngine(), srv.ByteTokenizer(), config, chat_template=template)
    openai = pytest.importorskip("openai")
    with srv.serve_app(app) as url:
        client = srv._client(url)
        with pytest.raises(openai.BadRequestError) as ei:
            client.chat.completions.create(
                model="tiny", messages=[{"role": "system", "content": "x"}], max_tokens=2
            )
        assert "System messages are not supported" in str(ei.value)
        assert ei.value.body["param"] == "messages"
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert r.choices[0].message.content == "xx"
