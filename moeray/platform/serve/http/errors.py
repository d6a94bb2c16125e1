"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`.

`APIError` carries the HTTP status, body and headers; `validation_error` turns pydantic's errors
into the 400, with `param` naming the first bad field (e.g. `messages.[0].role`);
`too_many_requests` is the 429 with Retry-After, `service_unavailable` the 503 with Retry-After.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class APIError(Exception):
    """An error the API answers with `status` and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def param_path(loc: Sequence[str | int]) -> str | None:
    """Pydantic error location -> OpenAI's `param`: ("body", "messages", 0, "role") ->
    "messages.[0].role"."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    if not parts or (len(parts) == 1 and isinstance(parts[0], int)):  # a JSON syntax error
        return None
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in parts)


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """The 400 for pydantic/FastAPI validation errors; param is the first bad field."""
    first = errors[0]
    param = param_path(first.get("loc", ()))
    if first.get("type") == "lone_surrogate":  # raised for the whole body; ctx names the field
        param = first.get("ctx", {}).get("param", param)
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return APIError(400, f"Invalid JSON body: {detail}", code="invalid_json")
    msgs = []
    for e in errors:
        p = param_path(e.get("loc", ()))
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        value = e.get("input")
        if isinstance(value, (int, float)) and e.get("type") != "value_error":
            msg += f" (got {value!r})"  # pydantic's own checks name the limit, not the value
        msgs.append(f"{p}: {msg}" if p else msg)
    return APIError(400, "; ".join(msgs), param=param, code="invalid_value")


def _retry_later(status: int, message: str, type: str, code: str, retry_after_s: float) -> APIError:
    # Retry-After takes whole seconds (RFC 9110); round up so clients never retry too early.
    return APIError(
        status,
        message,
        type=type,
        code=code,
        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
    )


def too_many_requests(message: str, retry_after_s: float) -> APIError:
    return _retry_later(429, message, "rate_limit_error", "rate_limit_exceeded", retry_after_s)


def service_unavailable(message: str, retry_after_s: float) -> APIError:
    return _retry_later(503, message, "server_error", "service_unavailable", retry_after_s)


def internal_error_message(request_id: str) -> str:
    """What a client sees of a server-side failure: the cause stays in the server log."""
    return f"The server failed to process the request; quote request id {request_id} to report it"
