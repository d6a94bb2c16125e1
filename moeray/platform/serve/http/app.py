"""The FastAPI app: routes, bearer auth on /v1/*, OpenAI-style errors.

`build_app(backend, tokenizer, config)` serves
    POST /v1/completions, POST /v1/chat/completions  (stream true/false, n, max_tokens,
         temperature, top_p, top_k (vLLM's extension), stop, seed, logprobs; SSE chunks end with
         `data: [DONE]`; unset sampling fields take OpenAIServerConfig.sampling_defaults; chat
         also tools + tool_choice (tool_calls parsed by config.tool_call_parser, streamed as
         deltas) and response_format json_object/json_schema (grammar-constrained): tools.py)
    GET /v1/models, GET /health, GET /openapi.json (the OpenAPI 3.1 document of these routes)
The Serve ingress deployment (serve/app.py) builds it at replica start, in
`__serve_build_asgi_app__`.

Errors are OpenAI-shaped `{"error": {"message", "type", "param", "code"}}`:
    400 invalid body (param names the field, e.g. `messages.[0].role`,
        `tools.[0].function.parameters` for a schema xgrammar cannot compile), prompt over the
        context
    401 missing/wrong bearer token when an API key is configured
    404 unknown model or route
    413 a body over `max_body_bytes`, refused before it is parsed (middleware.py)
    429 + Retry-After when `max_in_flight` choices are already running, or the backend raises
        `BackendOverloaded` (its queues are full) before the first token
    503 + Retry-After when the backend raises `BackendUnavailable` (an expert-parallel replica
        lost a rank); in a stream already started, that body as the last event before [DONE]
    500 anything else: a plain message with the request id; the cause goes to the server log
Every response carries `X-Request-Id` (the client's, when it sent a plain token).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeray.platform.metrics import Metrics
from moeray.platform.serve.http.auth import check_bearer
from moeray.platform.serve.http.chat import ChatTemplate, deepseek_chat_prompt
from moeray.platform.serve.http.errors import (
    APIError,
    error_body,
    internal_error_message,
    validation_error,
)
from moeray.platform.serve.http.middleware import (
    BodyLimitMiddleware,
    RequestIdMiddleware,
    request_id,
)
from moeray.platform.serve.http.protocol import GenerationBackend, Tokenizer
from moeray.platform.serve.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    openapi_responses,
)
from moeray.platform.serve.http.server import OpenAIServer, OpenAIServerConfig

log = logging.getLogger(__name__)


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error can quote any client text and must still encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def build_app(
    backend: GenerationBackend,
    tokenizer: Tokenizer,
    config: OpenAIServerConfig,
    *,
    metrics: Metrics | None = None,
    chat_template: ChatTemplate = deepseek_chat_prompt,
) -> FastAPI:
    """The FastAPI app over `backend`; `app.state.server` is its OpenAIServer."""
    server = OpenAIServer(backend, tokenizer, config, metrics=metrics, chat_template=chat_template)
    app = FastAPI(
        title="moeray OpenAI-compatible API",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.server = server
    # The last added runs first: the id is set before the limit can answer, so a 413 has one.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    app.router.on_shutdown.append(server.close)

    def endpoint_of(request: Request) -> str:
        return (
            "chat"
            if request.url.path.endswith("/chat/completions")
            else ("completions" if request.url.path.endswith("/completions") else request.url.path)
        )

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status in (400, 401, 404, 413) and request.method == "POST":
            # 429s and backend failures are counted where they happen, with their request's stats
            server.record_status(endpoint_of(request), exc.status)
        return ErrorResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _api_error(request, validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            return await _api_error(request, APIError(413, str(exc.detail), code="body_too_large"))
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ErrorResponse(
            error_body(str(exc.detail), kind),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # The cause (an actor id, a pid, a node's IP) is for the operator, not the client.
        rid = request_id(request.scope)
        log.error("request %s failed", rid, exc_info=exc)
        # Starlette answers this outside the middleware: set the id header here.
        return ErrorResponse(
            error_body(internal_error_message(rid), "server_error"),
            status_code=500,
            headers={"X-Request-Id": rid},
        )

    async def auth(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), config.api_key)

    @app.get("/health", responses=openapi_responses())
    async def health() -> dict[str, Any]:
        return {"status": "ok", "in_flight": server.gate.in_flight, "limit": server.gate.limit}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @v1.get("/models", responses=openapi_responses())
    async def models() -> dict[str, Any]:
        return server.models().model_dump()

    @v1.post("/completions", responses=openapi_responses(CompletionRequest))
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await server.completions(body, request_id(request.scope))

    @v1.post("/chat/completions", responses=openapi_responses(ChatCompletionRequest))
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        return await server.chat(body, request_id(request.scope))

    app.include_router(v1)
    return app
