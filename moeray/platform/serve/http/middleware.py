"""ASGI middleware in front of the routes: a request id on every response, and a body-size limit.

`RequestIdMiddleware` gives each request an id (the client's `X-Request-Id` when it is a plain
token, else a new one), stores it in `scope["state"]["request_id"]` for the handlers and their
error logs, and returns it in the `X-Request-Id` response header: a client quotes it, an operator
greps the server log for it.

`BodyLimitMiddleware` answers 413 before the body is parsed or tokenized: at once when the
declared Content-Length is over the limit, else (chunked or a lying Content-Length) as soon as
the bytes received pass it, without reading the rest.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from moeray.platform.serve.http.errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def json_error_bytes(status_message: str, type: str, code: str | None = None) -> bytes:
    # ensure_ascii: an error message can quote client text, and escaping keeps any code point
    # (a lone surrogate included) encodable.
    return json.dumps(error_body(status_message, type, None, code), ensure_ascii=True).encode()


def request_id(scope: Scope) -> str:
    """The id RequestIdMiddleware gave this request ("-" outside it)."""
    return str(scope.get("state", {}).get("request_id", "-"))


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or ()).get(REQUEST_ID_HEADER.encode(), b"")
        try:
            given_id = given.decode("ascii")
        except UnicodeDecodeError:
            given_id = ""
        rid = given_id if _CLIENT_ID_RE.match(given_id) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != REQUEST_ID_HEADER]
                message["headers"] = [*headers, (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit; an HTTPException, so FastAPI's body
    parsing lets it through to the app's handler (any other error there becomes a 400)."""

    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


class BodyLimitMiddleware:
    """413 for a request body over `max_bytes` (Content-Length, or counted while it streams)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes} must be >= 1")
        self.app, self.max_bytes = app, max_bytes

    def _message(self, size: str) -> str:
        return (
            f"Request body of {size} is over this server's limit of {self.max_bytes} bytes "
            "(moeray serve --max-body-bytes)"
        )

    async def _reject(self, send: Send, size: str) -> None:
        body = json_error_bytes(self._message(size), "invalid_request_error", "body_too_large")
        # Connection: close, as the rest of the body is never read.
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send, f"{int(declared)} bytes")
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self._message(f"more than {self.max_bytes} bytes"))
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:  # an app without an HTTPException handler let it through
            if started:  # a handler that answered before reading its whole body
                raise
            await self._reject(send, f"more than {self.max_bytes} bytes")
