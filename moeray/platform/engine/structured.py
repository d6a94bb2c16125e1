"""What a request's output must match (grammar-constrained decoding): the spec alone.

The matchers that enforce it live in engine/grammar.py (xgrammar, a native extension that only
the engines that serve such requests load); this module has no dependency, so sampling params,
the HTTP layer and every engine image can carry a spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

KINDS = ("json_object", "json_schema")


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must be. kind "json_object": any JSON object (OpenAI's
    `response_format: json_object`); "json_schema": JSON valid against `schema` (JSON text)."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind={self.kind!r}: accepted {KINDS}")
        if (self.kind == "json_schema") != (self.schema is not None):
            raise ValueError(f"kind={self.kind!r} takes a schema only with json_schema")

    @classmethod
    def from_schema(cls, schema: Any) -> StructuredOutput:
        """A json_schema spec from a schema object (dict or bool); its text is canonical (sorted
        keys), so equal schemas share one compiled grammar."""
        if not isinstance(schema, dict | bool):
            raise ValueError(f"a JSON schema must be an object or a boolean, got {schema!r:.80}")
        return cls("json_schema", json.dumps(schema, sort_keys=True))
