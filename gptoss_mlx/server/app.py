"""The FastAPI app: routes, the API-key guard, request limits, the OpenAPI description and the
engine's lifetime.

    app = create_app(Engine(model, tokenizer), model_id="gpt-oss-20b", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from gptoss_mlx import __version__
from gptoss_mlx.server.chat_completions import chat_completions
from gptoss_mlx.server.engine import Engine
from gptoss_mlx.server.errors import APIError, context_length_exceeded, install_error_handlers
from gptoss_mlx.server.guard import RequestGuard
from gptoss_mlx.server.prompt_bound import prompt_texts, tokens_at_least
from gptoss_mlx.server.responses import responses
from gptoss_mlx.server.schemas import ChatCompletionRequest, ResponsesRequest

DEFAULT_MAX_BODY_BYTES = 16 * 2**20
_LOGGED_IDS = 64  # other model ids noted in the log (each once), so the set stays small
_SIZE_BY_LAYERS = {24: "20b", 36: "120b"}
log = logging.getLogger("gptoss_mlx.server")
# One server-sent event as OpenAPI tools read a stream: the `data` line, and an `event` name.
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}
Body = TypeVar("Body", ChatCompletionRequest, ResponsesRequest)
Handler = Callable[[Request, Body, Engine, str], Awaitable[JSONResponse | StreamingResponse]]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """An OpenAI error body."""

    error: ErrorDetail


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route can answer with."""
    what = {
        400: "Invalid request: a field breaks the rules in the request schema, the JSON does "
             "not parse, or the prompt exceeds the context.",
        401: "Missing or wrong API key (only when the server runs with --api-key).",
        404: "No such model.",
        413: "The request body exceeds the server's --max-body-size.",
        429: "The server is busy (the queue is full or no generation slot freed in time); "
             "retry after the Retry-After header's seconds.",
        503: "The server is shutting down.",
    }
    return {s: {"model": ErrorBody, "description": what[s]} for s in statuses}


def default_model_id(model_dir: str | Path, num_hidden_layers: int | None = None) -> str:
    """The id `/v1/models` lists: the folder name when it says gpt-oss, else `gpt-oss-20b` or
    `gpt-oss-120b` from the layer count, else `gpt-oss-<folder name>`."""
    name = Path(model_dir).resolve().name.lower()
    if "gpt-oss" in name:
        return name
    size = _SIZE_BY_LAYERS.get(num_hidden_layers or 0)
    return f"gpt-oss-{size}" if size else f"gpt-oss-{name}"


def create_app(engine: Engine, model_id: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               strict_tools: bool = True) -> FastAPI:
    """An app serving `engine` under `model_id`; with `api_key`, every path but /health
    requires it (checked before the body is read); bodies over `max_body_bytes` get a 413;
    `strict_tools` constrains every tool call's arguments to its schema (else only those of
    tools marked `strict: true`)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="gptoss-mlx", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.model_id = model_id
    app.state.strict_tools = strict_tools
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)
    install_error_handlers(app)
    created = int(time.time())
    other_ids: set[str] = set()
    auth = (401,) if api_key else ()
    generation_errors = _errors(400, *auth, 413, 429, 503)

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "openai",
                "context_length": engine.context_length}

    async def generate(handler: Handler, request: Request, body: Body,
                       texts: list[str], param: str) -> JSONResponse | StreamingResponse:
        if body.model and body.model != model_id and body.model not in other_ids and \
                len(other_ids) < _LOGGED_IDS:
            other_ids.add(body.model)
            log.warning("requests for model %r are served by %s, the model this server runs",
                        body.model, model_id)
        context = engine.context_length
        bound = await run_in_threadpool(tokens_at_least, engine.tokenizer, texts, context)
        if bound >= context:
            raise context_length_exceeded(bound, context, param, at_least=True)
        async with engine.admitted():
            return await handler(request, body, engine, model_id)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models", responses=_errors(*auth))
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", responses=_errors(*auth, 404))
    async def get_model(name: str) -> dict[str, Any]:
        if name != model_id:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                                f"'{model_id}'.", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", response_model=None, responses=generation_errors)
    async def post_chat_completions(
        request: Request, body: ChatCompletionRequest
    ) -> JSONResponse | StreamingResponse:
        texts = list(prompt_texts(body.model_dump(include={"messages", "tools"})))
        return await generate(chat_completions, request, body, texts, "messages")

    @app.post("/v1/responses", response_model=None, responses=generation_errors)
    async def post_responses(
        request: Request, body: ResponsesRequest
    ) -> JSONResponse | StreamingResponse:
        texts = list(prompt_texts(body.model_dump(include={"input", "instructions", "tools"})))
        return await generate(responses, request, body, texts, "input")

    _document_errors(app, api_key is not None)
    return app


def _document_errors(app: FastAPI, keyed: bool) -> None:
    """Make the OpenAPI description say what the server answers: bad input is a 400 with an
    OpenAI error body (FastAPI would list 422), a generation answers JSON or, streamed, server-
    sent events, and with a key every path needs the bearer."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for path in schema.get("paths", {}).values():
                for method, operation in path.items():
                    operation.get("responses", {}).pop("422", None)
                    if method == "post":
                        content = operation["responses"]["200"]["content"]
                        content["text/event-stream"] = {"schema": _SSE_EVENT}
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            if keyed:
                schema["components"]["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}}
                for url, path in schema.get("paths", {}).items():
                    if url != "/health":
                        for operation in path.values():
                            operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
