"""generation_config.json in the model directory gives the sampling defaults of requests that leave
a field unset (temperature, top_p, top_k, max_new_tokens -> max_tokens), as vLLM does."""

import asyncio
import json

import pytest
import torch

from moeray.platform.checkpoint import save_model
from moeray.platform.config import ServeConfig, tiny
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer
from moeray.platform.serve.app import Ingress
from moeray.platform.serve.generation_config import eos_token_ids, sampling_defaults
from moeray.platform.serve.http.protocol import GenerationRequest, GenerationStep, SamplingDefaults
from moeray.platform.serve.http.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
)
from moeray.platform.serve.http.server import OpenAIServer, OpenAIServerConfig
from moeray.platform.serve.worker import make_engine, sampling_params

# deepseek-ai/DeepSeek-V3's generation_config.json as published.
DEEPSEEK_V3 = {
    "_from_model_config": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.95,
    "transformers_version": "4.46.3",
}


class Recorder:
    """A backend that records each request's params and answers one token."""

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest):
        self.requests.append(request)
        yield GenerationStep((65,), finish_reason="length")


class Chars:
    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(t) for t in token_ids)


def _params(defaults: SamplingDefaults, body, *, max_context=100):
    backend = Recorder()
    server = OpenAIServer(
        backend,
        Chars(),
        OpenAIServerConfig(model_id="m", max_context=max_context, sampling_defaults=defaults),
        chat_template=lambda messages: "".join(m.content for m in messages),
    )
    handler = server.chat if isinstance(body, ChatCompletionRequest) else server.completions
    asyncio.run(handler(body))
    return backend.requests[0].params


def _write(tmp_path, data):
    (tmp_path / "generation_config.json").write_text(json.dumps(data))
    return tmp_path


def test_published_file_and_missing_file(tmp_path):
    assert sampling_defaults(tmp_path) == SamplingDefaults()  # no file: the API's defaults
    got = sampling_defaults(_write(tmp_path, DEEPSEEK_V3))
    assert got == SamplingDefaults(temperature=0.6, top_p=0.95)
    got = sampling_defaults(_write(tmp_path, {"top_k": -1, "max_new_tokens": 7}))
    assert got == SamplingDefaults(top_k=0, max_tokens=7)  # -1 is off, as in vLLM


@pytest.mark.parametrize(
    "data, match",
    [
        ({"temperature": 3.0}, "temperature=3.0: accepted a number in \\[0, 2\\]"),
        ({"top_p": 0}, "top_p=0: accepted a number in \\(0, 1\\]"),
        ({"top_k": 2.5}, "top_k=2.5 is invalid: expected an integer"),
        ({"top_k": -3}, "top_k=-3 is invalid"),
        ({"max_new_tokens": 0}, "max_new_tokens=0 is invalid: expected an integer >= 1"),
        ({"temperature": "hot"}, "temperature='hot' is invalid: expected a number"),
        ([1, 2], "holds a list: expected a JSON object"),
    ],
)
def test_bad_values_name_the_file_and_value(tmp_path, data, match):
    with pytest.raises(ValueError, match=match) as e:
        sampling_defaults(_write(tmp_path, data))
    assert "generation_config.json" in str(e.value)


def test_min_p_and_repetition_penalty_are_defaults_too(tmp_path):
    got = sampling_defaults(
        _write(tmp_path, {"repetition_penalty": 1.1, "min_p": 0.05, "temperature": 0.3})
    )
    assert (got.temperature, got.min_p, got.repetition_penalty) == (0.3, 0.05, 1.1)
    p = _params(got, CompletionRequest(model="m", prompt="hello"))
    assert (p.min_p, p.repetition_penalty) == (0.05, 1.1)
    p = _params(got, CompletionRequest(model="m", prompt="hi", min_p=0.0, repetition_penalty=1.0))
    assert (p.min_p, p.repetition_penalty) == (0.0, 1.0)
    with pytest.raises(ValueError, match="repetition_penalty=0"):
        sampling_defaults(_write(tmp_path, {"repetition_penalty": 0}))


def test_unset_request_fields_take_the_defaults():
    d = SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20, max_tokens=40)
    p = _params(d, CompletionRequest(model="m", prompt="hello"))
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.95, 20, 40)
    # What a request sets wins, also when it equals the API's own default.
    body = CompletionRequest(
        model="m", prompt="hello", temperature=1.0, top_p=1.0, top_k=-1, max_tokens=5
    )
    p = _params(d, body)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (1.0, 1.0, 0, 5)
    # The default max_tokens is clipped to the context (an explicit one would be refused).
    p = _params(d, CompletionRequest(model="m", prompt="x" * 90))
    assert p.max_tokens == 10
    # Chat: the default instead of the rest of the context; without one, the rest of it.
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert _params(d, chat).max_tokens == 40
    assert _params(SamplingDefaults(), chat).max_tokens == 98
    # Without a file the API's defaults: temperature 1, top_p 1, top_k off, 16 tokens.
    p = _params(SamplingDefaults(), CompletionRequest(model="m", prompt="hello"))
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (1.0, 1.0, 0, 16)


def test_top_k_reaches_the_engine():
    d = SamplingDefaults(top_k=20)
    p = _params(d, CompletionRequest(model="m", prompt="hello"))
    sp = sampling_params(GenerationRequest("r", (1, 2), p))
    assert sp.top_k == 20 and sp.temperature == 1.0


def test_the_ingress_reads_the_model_directory(tmp_path, refuse_ray_init):
    from tokenizers import Tokenizer, models

    model = Transformer(tiny())
    model.reset_parameters(seed=0)
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    path = save_model(model, tiny(), tmp_path / "m", tokenizer=tok, dtype=torch.bfloat16)
    _write(path, DEEPSEEK_V3)

    class Handle:
        def options(self, **kwargs):
            return self

    ingress = Ingress(ServeConfig(model=str(path)).to_dict(), Handle())
    app = ingress.__serve_build_asgi_app__()
    assert app.state.server.config.sampling_defaults == SamplingDefaults(0.6, 0.95)
    # --chat-template: the server renders chats with the given template, not the directory's
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<bot>"
    cfg = ServeConfig(model=str(path), chat_template=template)
    app = Ingress(cfg.to_dict(), Handle()).__serve_build_asgi_app__()
    messages = [ChatMessage(role="user", content="hi")]
    assert app.state.server.chat_template(messages) == "<user>hi<bot>"


def test_its_eos_token_ids_end_generation(tmp_path):
    """generation_config.json's eos_token_id list stops the served engine, as vLLM's stop
    tokens (Kimi-K2's <|im_end|> is not config.json's EOS)."""
    c = tiny()
    model = Transformer(c)
    model.reset_parameters(seed=0)
    path = save_model(model, c, tmp_path / "m")
    cfg = ServeConfig(
        model=str(path), device="cpu", dtype="float32", page_size=16, num_pages=8, max_num_seqs=2
    )
    prompt = [5, 6, 7, 8]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    (free,) = make_engine(cfg).generate([prompt], params)
    g = free.output_token_ids
    k = next(i for i in range(1, 8) if g[i] not in g[:i] and g[i] != c.eos_token_id)
    _write(path, {"eos_token_id": [c.eos_token_id, g[k]]})
    assert eos_token_ids(path) == (c.eos_token_id, g[k])
    (out,) = make_engine(cfg).generate([prompt], params)
    assert out.output_token_ids == g[: k + 1] and out.finish_reason == "stop"
    _write(path, {"eos_token_id": 7})
    assert eos_token_ids(path) == (7,)
    _write(path, {"eos_token_id": ["</s>"]})
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id=\['</s>'\]"):
        eos_token_ids(path)
