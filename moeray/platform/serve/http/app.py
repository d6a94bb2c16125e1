"""The FastAPI app: routes, bearer auth on /v1/*, OpenAI-style errors.

`build_app(backend, tokenizer, config)` serves
    POST /v1/completions, POST /v1/chat/completions  (stream true/false, n, max_tokens,
         temperature, top_p, top_k (vLLM's extension), stop, seed, logprobs; SSE chunks end with
         `data: [DONE]`; unset sampling fields take OpenAIServerConfig.sampling_defaults; chat
         also tools + tool_choice (tool_calls parsed by config.tool_call_parser, streamed as
         deltas) and response_format json_object/json_schema (grammar-constrained): tools.py)
    GET /v1/models, GET /health
The Serve ingress deployment (serve/app.py) builds it at replica start, in
`__serve_build_asgi_app__`.

Errors are OpenAI-shaped `{"error": {"message", "type", "param", "code"}}`:
    400 invalid body (param names the field, e.g. `messages.[0].role`,
        `tools.[0].function.parameters` for a schema xgrammar cannot compile), prompt over the
        context
    401 missing/wrong bearer token when an API key is configured
    404 unknown model or route
    429 + Retry-After when `max_in_flight` choices are already running, or the backend raises
        `BackendOverloaded` (its queues are full) before the first token
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeray.platform.metrics import Metrics
from moeray.platform.serve.http.auth import check_bearer
from moeray.platform.serve.http.chat import ChatTemplate, deepseek_chat_prompt
from moeray.platform.serve.http.errors import APIError, error_body, validation_error
from moeray.platform.serve.http.protocol import GenerationBackend, Tokenizer
from moeray.platform.serve.http.schemas import ChatCompletionRequest, CompletionRequest
from moeray.platform.serve.http.server import OpenAIServer, OpenAIServerConfig


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
        title="moeray OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.server = server

    def endpoint_of(request: Request) -> str:
        return (
            "chat"
            if request.url.path.endswith("/chat/completions")
            else ("completions" if request.url.path.endswith("/completions") else request.url.path)
        )

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status in (400, 401, 404) and request.method == "POST":
            # 429s and backend failures are counted where they happen, with their request's stats
            server.record_status(endpoint_of(request), exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _api_error(request, validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), kind),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
            status_code=500,
        )

    async def auth(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), config.api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "in_flight": server.gate.in_flight, "limit": server.gate.limit}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict[str, Any]:
        return server.models().model_dump()

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest) -> Any:
        return await server.completions(body)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(body: ChatCompletionRequest) -> Any:
        return await server.chat(body)

    return app
