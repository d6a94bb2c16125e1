"""Tool-call parsers: model output text -> content and `tool_calls`, whole or streamed.

Selected by `--tool-call-parser` (ServeConfig.tool_call_parser), as in vLLM:
    deepseek_v3  DeepSeek-V3's special-token format (deepseek_v3.py)
    json         one JSON call object or an array of them (json_tools.py)
    kimi_k2      Kimi-K2's special-token format (kimi_k2.py)
"""

from __future__ import annotations

from moeray.platform.config import TOOL_CALL_PARSERS
from moeray.platform.serve.http.tool_parsers.base import (
    ParseDelta,
    StreamingToolParser,
    ToolCall,
    ToolCallPiece,
    ToolParser,
)
from moeray.platform.serve.http.tool_parsers.deepseek_v3 import DeepSeekV3ToolParser
from moeray.platform.serve.http.tool_parsers.json_tools import JSONToolParser
from moeray.platform.serve.http.tool_parsers.kimi_k2 import KimiK2ToolParser

_PARSERS: dict[str, type[ToolParser]] = {
    DeepSeekV3ToolParser.name: DeepSeekV3ToolParser,
    JSONToolParser.name: JSONToolParser,
    KimiK2ToolParser.name: KimiK2ToolParser,
}
assert tuple(_PARSERS) == TOOL_CALL_PARSERS, "config.TOOL_CALL_PARSERS names every parser"


def get_tool_parser(name: str) -> ToolParser:
    if name not in _PARSERS:
        raise ValueError(f"tool_call_parser={name!r}: accepted {TOOL_CALL_PARSERS}")
    return _PARSERS[name]()


__all__ = [
    "ParseDelta",
    "StreamingToolParser",
    "ToolCall",
    "ToolCallPiece",
    "ToolParser",
    "get_tool_parser",
]
