"""Tool-call parsers (DeepSeek-V3's and Kimi-K2's formats, generic JSON), whole and streamed at
every split, and the DeepSeek-V3 chat prompt with tools, tool calls and tool results."""

import json
import random

import pytest

from moeray.platform.serve.http.chat import deepseek_chat_prompt
from moeray.platform.serve.http.schemas import ChatMessage
from moeray.platform.serve.http.tool_parsers import ToolCall, get_tool_parser
from moeray.platform.serve.http.tool_parsers.base import join_pieces
from moeray.platform.serve.http.tool_parsers.deepseek_v3 import format_tool_calls
from moeray.platform.serve.http.tool_parsers.kimi_k2 import format_tool_calls as kimi_format

WEATHER = json.dumps({"city": "Paris", "days": 3, "note": "```json inside ``` a string"})
TIME = json.dumps({"tz": "Europe/Paris"})
# DeepSeek-V3 output as its chat template writes a call (content, then the calls).
DS_TEXT = (
    "Let me check. "
    "<｜tool▁calls▁begin｜>"
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n" + WEATHER + "\n```"
    "<｜tool▁call▁end｜>\n"
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n" + TIME + "\n```"
    "<｜tool▁call▁end｜>"
    "<｜tool▁calls▁end｜>"
)
DS_CALLS = [ToolCall("get_weather", WEATHER), ToolCall("get_time", TIME)]
# Kimi-K2 output: markers with whitespace between them, one id without "functions.".
KIMI_TEXT = (
    "Let me check. "
    "<|tool_calls_section_begin|>\n"
    "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    + WEATHER
    + "<|tool_call_end|>\n"
    "<|tool_call_begin|> get_time:1 <|tool_call_argument_begin|>" + TIME + "<|tool_call_end|>"
    "<|tool_calls_section_end|>"
)


def _stream(parser, chunks):
    s = parser.stream()
    content, pieces = [], []
    for i, c in enumerate(chunks):
        d = s.push(c, final=i == len(chunks) - 1)
        content.append(d.content)
        pieces.extend(d.calls)
    return "".join(content), pieces


def test_deepseek_v3_whole_text():
    p = get_tool_parser("deepseek_v3")
    assert p.parse(DS_TEXT) == ("Let me check. ", DS_CALLS)
    assert format_tool_calls([(c.name, c.arguments) for c in DS_CALLS]) == DS_TEXT[14:]
    assert p.parse("no calls, just text <｜tool▁call") == ("no calls, just text <｜tool▁call", [])
    assert p.parse(DS_TEXT[14:]) == (None, DS_CALLS)


def test_kimi_k2_whole_text():
    """Names without the `functions.` prefix and index; the ids as the model wrote them."""
    p = get_tool_parser("kimi_k2")
    calls = [
        ToolCall("get_weather", WEATHER, "functions.get_weather:0"),
        ToolCall("get_time", TIME, "get_time:1"),
    ]
    assert p.parse(KIMI_TEXT) == ("Let me check. ", calls)
    canonical = kimi_format([(c.name, c.arguments) for c in DS_CALLS])
    assert p.parse(canonical) == (
        None,
        [*calls[:1], ToolCall("get_time", TIME, "functions.get_time:1")],
    )
    assert p.parse("text <|tool_call_begin|> alone") == ("text <|tool_call_begin|> alone", [])


@pytest.mark.parametrize(
    "name,text",
    [
        ("deepseek_v3", DS_TEXT),
        ("deepseek_v3", "plain answer ``` <｜ not a marker"),
        ("deepseek_v3", DS_TEXT[14:]),
        ("kimi_k2", KIMI_TEXT),
        ("kimi_k2", "plain <| not a marker <|tool_calls"),
    ],
)
def test_streamed_split_at_every_position(name, text):
    p = get_tool_parser(name)
    whole = p.parse(text)
    for cut in range(len(text) + 1):
        content, pieces = _stream(p, [text[:cut], text[cut:]])
        assert ((content or None), join_pieces(pieces)) == whole, cut
    # One character at a time, and random chunkings: every name arrives once, before its args.
    rng = random.Random(0)
    chunkings = [list(text)]
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        chunkings.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    for chunks in chunkings:
        content, pieces = _stream(p, chunks)
        assert ((content or None), join_pieces(pieces)) == whole
        firsts = [q.index for q in pieces if q.name is not None]
        assert firsts == list(range(len(whole[1])))
        for q in pieces:
            assert q.index in firsts[: firsts.index(q.index) + 1]


def test_deepseek_v3_stream_holds_back_only_possible_markers():
    s = get_tool_parser("deepseek_v3").stream()
    assert s.push("Hello <").content == "Hello "  # "<" may start the calls marker
    assert s.push("b>").content == "<b>"  # it did not
    d = s.push('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{"a"')
    assert d.content == "" and [(q.name, q.arguments) for q in d.calls] == [
        ("f", ""),
        (None, '{"a"'),
    ]
    assert s.push(":1}\n``").calls[0].arguments == ":1}"  # "\n``" may start the closing fence
    d = s.push("`<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
    assert d.calls == [] and d.content == ""


def test_json_parser():
    p = get_tool_parser("json")
    one = '{"name": "get_time", "arguments": {"tz": "UTC"}}'
    assert p.parse(one) == (None, [ToolCall("get_time", '{"tz": "UTC"}')])
    many = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]'
    assert p.parse(many) == (None, [ToolCall("a", '{"x": 1}'), ToolCall("b", "{}")])
    assert p.parse('{"answer": 42}') == ('{"answer": 42}', [])  # JSON, but not a call
    assert p.parse("hi there") == ("hi there", [])
    for text in (one, many, "hi there", '  {"name": "x"'):
        for cut in range(len(text) + 1):
            content, pieces = _stream(p, [text[:cut], text[cut:]])
            assert ((content or None), join_pieces(pieces)) == p.parse(text)
    with pytest.raises(ValueError, match="accepted"):
        get_tool_parser("hermes")


def test_deepseek_prompt_with_tools_calls_and_results():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather by city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather"}}
    call["function"]["arguments"] = '{"city": "Paris"}'
    messages = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="weather?"),
        ChatMessage(role="assistant", content=None, tool_calls=[call]),
        ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
        ChatMessage(role="tool", content="22C", tool_call_id="call_1"),
    ]
    prompt = deepseek_chat_prompt(messages, tools)
    head, tail = prompt.split("<｜User｜>")
    assert head.startswith("<｜begin▁of▁sentence｜>be brief\n\n## Tools")
    assert "### get_weather\nDescription: Weather by city\nParameters: {" in head
    assert tail == (
        "weather?<｜Assistant｜>"
        + format_tool_calls([("get_weather", '{"city": "Paris"}')])
        + "<｜end▁of▁sentence｜>"
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>"
        "\n<｜tool▁output▁begin｜>22C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    )
    # Without tools the prompt is the plain chat format.
    assert deepseek_chat_prompt(messages[:2]) == (
        "<｜begin▁of▁sentence｜>be brief<｜User｜>weather?<｜Assistant｜>"
    )
