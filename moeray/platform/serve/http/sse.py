"""Server-sent events: the event framing and the streaming response that watches for disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict[str, Any]) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return b"data: " + text.encode() + b"\n\n"


class SSEResponse(StreamingResponse):
    """Streams while watching for the client's disconnect whatever the ASGI spec version
    (Starlette watches only below 2.4; uvicorn's h11 reports 2.3, httptools 2.4), and always
    closes the body iterator, so a disconnect frees the engine's pages at once rather than at the
    next token or at garbage collection."""

    def __init__(
        self,
        content: AsyncGenerator[bytes, None],
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        super().__init__(content, status_code, headers, media_type, background)
        self._body_gen = content  # = body_iterator, typed as the generator we close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        stop = asyncio.Event()

        async def stream() -> None:
            try:
                await self.stream_response(send)
            except OSError:  # the client went away while we were sending
                pass
            finally:
                stop.set()

        async def watch() -> None:
            await self.listen_for_disconnect(receive)
            stop.set()

        tasks = [asyncio.create_task(stream()), asyncio.create_task(watch())]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await self._body_gen.aclose()
        if isinstance(results[0], Exception):  # a bug while streaming: let the server log it
            raise results[0]
