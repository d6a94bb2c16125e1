"""Tool calling and structured output through the official openai client over real HTTP.

`real`: a random-weight tiny model served for real (engine on a ColocatedWorker thread + the
OpenAI app under uvicorn, no Ray): its output is noise, so every valid JSON answer and every
valid tool call is the grammar's doing. `scripted`: a backend that writes a fixed DeepSeek-V3
tool-call text, for the parser path (tool_choice auto) and the prompt the template builds.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pytest

from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.serve.bench import random_tiny_model
from moeray.platform.serve.http.app import build_app
from moeray.platform.serve.http.protocol import GenerationRequest, GenerationStep
from moeray.platform.serve.http.server import OpenAIServerConfig
from moeray.platform.serve.http.tool_parsers.deepseek_v3 import format_tool_calls
from moeray.platform.serve.http.tool_parsers.kimi_k2 import (
    format_tool_calls as kimi_format_tool_calls,
)
from moeray.platform.serve.tokenizer import ServeTokenizer
from moeray.platform.serve.worker import ColocatedWorker

_spec = importlib.util.spec_from_file_location(
    "moeray_test_openai_server_tools", Path(__file__).with_name("test_openai_schemas.py")
)
srv = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = srv
_spec.loader.exec_module(srv)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
SCHEMAS = [
    PERSON,
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high", None]}},
        "required": ["ok", "level"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4},
]
WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast",
            "parameters": WEATHER_ARGS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"tz": {"enum": ["UTC", "CET"]}},
                "required": ["tz"],
                "additionalProperties": False,
            },
        },
    },
]
ARGS_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "def add(a, b):"}]


def _client(url):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


class TextTokenizer(ServeTokenizer):
    """Decodes without special tokens (the model's <|eos|> ends each JSON answer): what
    OpenAI-style servers return as text."""

    def decode(self, token_ids, skip_special_tokens=True):
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    directory = random_tiny_model(tmp_path_factory.mktemp("tiny"))
    engine = Engine.from_pretrained(
        directory,
        EngineConfig(num_pages=64, page_size=16, max_num_batched_tokens=64, use_cuda_graphs=False),
    )
    worker = ColocatedWorker(engine)
    config = OpenAIServerConfig(model_id="tiny", max_context=engine.max_model_len)
    app = build_app(worker, TextTokenizer(directory), config)  # default DeepSeek-V3 prompt
    try:
        with srv.serve_app(app) as url:
            yield _client(url), engine
    finally:
        worker.loop.shutdown()


def _json_schema(name, schema):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_response_format_json_schema_validates(real):
    client, _ = real

    def ask(response_format, **kw):
        return client.chat.completions.create(
            model="tiny", messages=USER, response_format=response_format, **kw
        )

    for i, schema in enumerate(SCHEMAS):
        choice = ask(_json_schema(f"s{i}", schema), max_tokens=120, temperature=1.0, seed=i)
        choice = choice.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)
    # Streamed, the content deltas add up to valid JSON too; json_object gives an object.
    stream = ask(_json_schema("p", PERSON), max_tokens=120, seed=5, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    r = ask({"type": "json_object"}, max_tokens=40, temperature=0.0)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    # Without a response_format the same model writes no JSON: the grammar made the above.
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=30, seed=0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_tool_choice_named_and_required_return_valid_calls(real):
    client, _ = real
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice=named, max_tokens=60, seed=1
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)

    stream = client.chat.completions.create(
        model="tiny",
        messages=USER,
        tools=TOOLS,
        tool_choice=named,
        max_tokens=60,
        seed=2,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.function.name is None for d in deltas[1:])
    jsonschema.validate(json.loads("".join(d.function.arguments for d in deltas)), WEATHER_ARGS)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny",
            messages=USER,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=150,
            seed=seed,
            temperature=0.8,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), ARGS_OF[call.function.name])


def test_bad_tools_and_formats_are_400s_naming_the_field(real):
    import openai

    client, _ = real
    bad_params = [{"type": "function", "function": {"name": "f", "parameters": {"type": "nah"}}}]
    cases = [
        (dict(tools=bad_params), "tools.[0].function.parameters", "nah"),
        (
            dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
            "tool_choice.function.name",
            "nope",
        ),
        (dict(tool_choice="required"), "tool_choice", "needs tools"),
        (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice", "accepted"),
        (
            dict(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}},
                }
            ),
            "response_format.json_schema.schema",
            "missing",
        ),
        (
            dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
            "response_format",
            "cannot be combined",
        ),
        (
            dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]),
            "tools.[0].function.name",
            "",
        ),
        (
            dict(response_format={"type": "json_object"}, extra_body={"ignore_eos": True}),
            "ignore_eos",
            "ignore_eos",
        ),
    ]
    for kwargs, param, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, **kwargs)
        err = e.value.body
        assert err["param"] == param and words in err["message"], (kwargs, err)


@dataclass
class ScriptedBackend:
    """Writes `text` as byte tokens, a few per step, whatever the prompt; records requests."""

    text: str
    requests: list[GenerationRequest] = field(default_factory=list)

    async def generate(self, request: GenerationRequest):
        self.requests.append(request)
        ids = [*self.text.encode(), srv.EOS]
        for i in range(0, len(ids), 5):
            done = i + 5 >= len(ids)
            yield GenerationStep(tuple(ids[i : i + 5]), None, "stop" if done else None)


def test_tool_choice_auto_parses_deepseek_v3_calls_whole_and_streamed():
    args = '{"city": "Oslo", "days": 2}'
    text = "Checking. " + format_tool_calls([("get_weather", args), ("get_time", '{"tz": "UTC"}')])
    backend = ScriptedBackend(text)
    config = OpenAIServerConfig(model_id="tiny", max_context=4096)
    app = build_app(backend, srv.ByteTokenizer(), config)
    history = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": "12:00"},
    ]
    with srv.serve_app(app) as url:
        client = _client(url)
        r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Checking. "
        assert [(c.function.name, c.function.arguments) for c in msg.tool_calls] == [
            ("get_weather", args),
            ("get_time", '{"tz": "UTC"}'),
        ]
        assert len({c.id for c in msg.tool_calls}) == 2
        chunks = [
            c
            for c in client.chat.completions.create(
                model="tiny", messages=history, tools=TOOLS, stream=True
            )
            if c.choices
        ]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        calls: dict[int, list[str]] = {}
        names = {}
        for c in chunks:
            for d in c.choices[0].delta.tool_calls or []:
                if d.function.name is not None:
                    names[d.index] = d.function.name
                calls.setdefault(d.index, []).append(d.function.arguments)
        assert content == "Checking. " and chunks[-1].choices[0].finish_reason == "tool_calls"
        assert names == {0: "get_weather", 1: "get_time"}
        assert "".join(calls[0]) == args and "".join(calls[1]) == '{"tz": "UTC"}'
        # tool_choice none: no tools in the prompt and the markers stay content.
        r = client.chat.completions.create(
            model="tiny", messages=USER, tools=TOOLS, tool_choice="none"
        )
        assert r.choices[0].message.content == text and r.choices[0].finish_reason == "stop"
    prompt = bytes(backend.requests[0].prompt_ids).decode()
    assert "### get_weather" in prompt and "### get_time" in prompt  # the tools were rendered
    assert '<｜tool▁sep｜>get_time\n```json\n{"tz": "CET"}' in prompt  # the earlier call
    assert prompt.endswith(
        "<｜tool▁output▁begin｜>12:00<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    )
    assert "### get_weather" not in bytes(backend.requests[-1].prompt_ids).decode()
    assert all(q.params.structured is None for q in backend.requests)  # auto/none: no grammar


def test_tool_choice_auto_parses_kimi_k2_calls_with_its_parser():
    """`--tool-call-parser kimi_k2`: Kimi-K2's markers become tool_calls with Kimi's ids, whole
    and streamed."""
    args = '{"city": "Lima", "days": 5}'
    text = "On it. " + kimi_format_tool_calls([("get_weather", args)])
    config = OpenAIServerConfig(model_id="tiny", max_context=4096, tool_call_parser="kimi_k2")
    app = build_app(ScriptedBackend(text), srv.ByteTokenizer(), config)
    with srv.serve_app(app) as url:
        client = _client(url)
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content == "On it. "
        # the id is Kimi's own, which its chat template writes back with the call's result
        assert [(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls] == [
            ("functions.get_weather:0", "get_weather", args)
        ]
        stream = client.chat.completions.create(
            model="tiny", messages=USER, tools=TOOLS, stream=True
        )
        deltas = [d for c in stream if c.choices for d in c.choices[0].delta.tool_calls or []]
        firsts = [(d.id, d.function.name) for d in deltas if d.function.name]
        assert firsts == [("functions.get_weather:0", "get_weather")]
        assert "".join(d.function.arguments for d in deltas) == args
