"""Tool calling and response_format for chat requests, as OpenAI's API and vLLM define them.

`plan_chat(request, parser_name)` decides, per request, what the chat template gets (the tool
definitions), which grammar constrains the output (engine/structured.py), and how the output
text becomes `message.tool_calls`:
    tool_choice "none" (or no tools)  no tools in the prompt; the output is content
    "auto" (the default with tools)   tools in the prompt; the configured parser (tool_parsers/)
                                      splits the output into content and calls
    "required"                        the output must be a JSON array of {"name", "parameters"}
                                      objects, one of the tools each (a grammar, as vLLM does)
    {"type": "function", ...} (named) the output must be that function's arguments (a grammar
                                      from its `parameters` schema)
    response_format json_object / json_schema: the output must be a JSON object / match the
                                      schema (a grammar); not combinable with required/named.
Bad tool specs, schemas or choices are 400s naming the field.

`ChoiceOutput` turns one choice's text, as it streams or whole, into content and tool-call
deltas; a choice that called tools and stopped finishes with "tool_calls". Streamed, a named
call's arguments and DeepSeek-V3 calls arrive piece by piece; JSON-format calls (the json parser,
tool_choice required) come whole in the last chunk, since only the complete JSON tells a call
from content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, overload

from moeray.platform.engine.grammar import check_structured_output
from moeray.platform.engine.structured import StructuredOutput
from moeray.platform.serve.http.errors import APIError
from moeray.platform.serve.http.protocol import FinishReason
from moeray.platform.serve.http.schemas import (
    ChatCompletionRequest,
    ChatFinishReason,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
)
from moeray.platform.serve.http.tool_parsers import (
    ParseDelta,
    StreamingToolParser,
    ToolParser,
    get_tool_parser,
)
from moeray.platform.serve.http.tool_parsers.base import ToolCallPiece, join_pieces
from moeray.platform.serve.http.tool_parsers.json_tools import JSONToolParser

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


@dataclass(frozen=True)
class ChatPlan:
    """tools: the definitions the chat template renders (None: none). structured: the grammar.
    parser: how the output becomes calls (None: content only). named: tool_choice's function,
    whose arguments are the whole output."""

    tools: list[dict[str, Any]] | None = None
    structured: StructuredOutput | None = None
    parser: ToolParser | None = None
    named: str | None = None


def _schema_spec(schema: dict[str, Any], param: str) -> StructuredOutput:
    spec = StructuredOutput.from_schema(schema)
    try:
        check_structured_output(spec)
    except ValueError as e:
        raise _bad(f"invalid JSON schema: {e}", param) from None
    return spec


def _tool_choice(value: Any, names: list[str]) -> str:
    """ "none" | "auto" | "required" | "named:<function name>"."""
    if value is None:
        return "auto" if names else "none"
    if value in ("none", "auto", "required"):
        choice: str = value
    elif (
        isinstance(value, dict)
        and set(value) == {"type", "function"}
        and value["type"] == "function"
        and isinstance(value["function"], dict)
        and set(value["function"]) == {"name"}
        and isinstance(value["function"]["name"], str)
    ):
        name = value["function"]["name"]
        if name not in names:
            raise _bad(
                f"tool_choice names function {name!r}, which is not in tools ({names})",
                "tool_choice.function.name",
            )
        choice = "named:" + name
    else:
        raise _bad(
            f"tool_choice={value!r:.100}: accepted 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": <a tool\'s name>}}',
            "tool_choice",
        )
    if choice != "none" and not names:
        raise _bad(f"tool_choice {value!r:.100} needs tools", "tool_choice")
    return choice


def plan_chat(body: ChatCompletionRequest, parser_name: str) -> ChatPlan:
    tools = body.tools or []
    names = [t.function.name for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise _bad(f"two tools are named {name!r}", f"tools.[{i}].function.name")
    params = {
        t.function.name: _schema_spec(
            t.function.parameters or ANY_OBJECT, f"tools.[{i}].function.parameters"
        )
        for i, t in enumerate(tools)
    }
    choice = _tool_choice(body.tool_choice, names)
    fmt = body.response_format
    structured = None
    if fmt is not None and fmt.type == "json_object":
        structured = StructuredOutput("json_object")
    elif fmt is not None and fmt.json_schema is not None:
        structured = _schema_spec(fmt.json_schema.json_schema, "response_format.json_schema.schema")
    if structured is not None and choice not in ("none", "auto"):
        raise _bad(
            "response_format json_object/json_schema cannot be combined with tool_choice "
            "'required' or a named function (both constrain the whole output)",
            "response_format",
        )
    if choice == "none":
        plan = ChatPlan(structured=structured)
    else:
        rendered = [t.model_dump(exclude_none=True) for t in tools]
        if choice == "auto":
            plan = ChatPlan(rendered, structured, get_tool_parser(parser_name))
        elif choice == "required":
            plan = ChatPlan(
                rendered,
                StructuredOutput.from_schema(_required_schema(body, params)),
                JSONToolParser(),
            )
        else:
            name = choice.removeprefix("named:")
            plan = ChatPlan(rendered, params[name], named=name)
    if plan.structured is not None and body.ignore_eos:
        raise _bad("ignore_eos cannot be combined with structured output", "ignore_eos")
    return plan


def _required_schema(
    body: ChatCompletionRequest, params: dict[str, StructuredOutput]
) -> dict[str, Any]:
    """A JSON array of one or more calls, each {"name": <a tool>, "parameters": <its args>}."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": name},
                "parameters": json.loads(spec.schema or "{}"),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for name, spec in params.items()
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if body.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema


class _Named(StreamingToolParser):
    """tool_choice named: the whole output is the function's arguments."""

    def __init__(self, name: str) -> None:
        self.name: str | None = name

    def push(self, delta: str, final: bool = False) -> ParseDelta:
        piece = ToolCallPiece(0, self.name, delta)
        self.name = None
        return ParseDelta(calls=[piece] if piece.name is not None or delta else [])


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ChoiceOutput:
    """One choice's output text -> content and tool calls, per the request's plan."""

    def __init__(self, plan: ChatPlan) -> None:
        self.stream: StreamingToolParser | None = (
            _Named(plan.named)
            if plan.named is not None
            else (plan.parser.stream() if plan.parser is not None else None)
        )
        self.ids: list[str] = []

    @property
    def called(self) -> bool:
        return bool(self.ids)

    @overload
    def finish_reason(self, reason: FinishReason) -> ChatFinishReason: ...
    @overload
    def finish_reason(self, reason: None) -> None: ...
    def finish_reason(self, reason: FinishReason | None) -> ChatFinishReason | None:
        """A choice that called tools and stopped finishes with "tool_calls"."""
        return "tool_calls" if reason == "stop" and self.called else reason

    def push(self, text: str, final: bool) -> tuple[str | None, list[ToolCallDelta] | None]:
        """(content delta, tool-call deltas or None) for the next text of the choice."""
        if self.stream is None:
            return text, None
        d = self.stream.push(text, final)
        deltas = []
        for p in d.calls:
            first = p.name is not None
            if first:
                self.ids.append(p.call_id or _call_id())
            deltas.append(
                ToolCallDelta(
                    index=p.index,
                    id=self.ids[p.index] if first else None,
                    type="function" if first else None,
                    function=FunctionCallDelta(name=p.name, arguments=p.arguments),
                )
            )
        if deltas:
            return (d.content or None), deltas
        return d.content, None

    def full(self, text: str) -> tuple[str | None, list[ToolCall] | None]:
        """(content, tool calls) of the whole text."""
        if self.stream is None:
            return text, None
        d = self.stream.push(text, final=True)
        calls = join_pieces(d.calls)
        if not calls:
            return d.content, None
        self.ids = [c.call_id or _call_id() for c in calls]
        return (d.content or None), [
            ToolCall(id=i, function=FunctionCall(name=c.name, arguments=c.arguments))
            for i, c in zip(self.ids, calls, strict=True)
        ]
