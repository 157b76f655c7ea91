"""The FastAPI application: routes, middleware (middleware.py) and errors in OpenAI's shape.

Routes::

    GET|HEAD /health             200 when the engine can generate, else 503 (no API key needed)
    GET  /metrics                Prometheus text
    GET  /openapi.json           the schema of the routes below
    GET  /v1/models[/{id}]       the served model
    POST /v1/chat/completions    chat.py
    POST /v1/completions         completions.py
    POST /tokenize, /detokenize  vLLM's shapes (tokenize.py)

A request's text work (chat template, tokenizing) runs on the preparer's threads (preparer.py), never on the event
loop, so one big request cannot stall the others or /health.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from fabrik import __version__
from fabrik.engine.llm_engine import LLMEngine
from fabrik.server import chat, completions, tokenize
from fabrik.server.common import ServerContext, unless_disconnected, until_disconnected
from fabrik.server.config import ModelInfo, ServerConfig
from fabrik.server.engine_client import EngineClient, EngineDeadError, EngineError, QueueFullError
from fabrik.server.errors import APIError, bad_request, from_value_error, validation_error
from fabrik.server.metrics import ServerMetrics
from fabrik.server.middleware import GuardMiddleware, RequestContextMiddleware
from fabrik.server.openapi import install_openapi, request_body
from fabrik.server.preparer import Preparer
from fabrik.server.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, DetokenizeRequest,
    DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse)
from fabrik.server.validation import check_unicode
from fabrik.server.shutdown import Drain

logger = logging.getLogger(__name__)


class _AnyText(PathConvertor):
    """A path segment and what follows, any character included: Starlette's ``path`` (``.*``) stops at a newline,
    so ``GET /v1/models/a%0Ab`` matched no route and got a bare 404 instead of ``model_not_found``."""

    regex = "(?s:.*)"


register_url_convertor("any_text", _AnyText())


# Status of a response nobody reads: the client disconnected before the result was ready (nginx's convention).
_CLIENT_CLOSED = 499


def _json(model: Any, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def model_info(engine: LLMEngine, name: str) -> ModelInfo:
    return ModelInfo(name=name, max_model_len=engine.max_model_len, vocab_size=engine.model_config.vocab_size,
                     kv_capacity_tokens=engine.num_blocks * engine.config.block_size, created=int(time.time()))


def uses_reasoning(engine: LLMEngine) -> bool:
    """Whether the model's chat template knows ``<think>`` blocks (Qwen3 and its kind)."""
    template = engine.tokenizer.chat_template if engine.tokenizer is not None else None
    return template is not None and any("<think>" in source for source in template.templates.values())


def system_fingerprint(engine: LLMEngine) -> str:
    """What decides the tokens besides the request: fabrik's version, the weights, dtype, formats and kernels."""
    config = engine.config
    parts = (__version__, str(engine.model_path), str(engine.dtype), config.quantization or "",
             config.kv_cache_dtype, engine.runner.kernel_backend)
    return "fp_" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def build_app(engine: LLMEngine, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving ``engine``; the engine thread starts with the app (its lifespan)."""
    metrics = ServerMetrics(config.served_model_name)
    client = EngineClient(engine, metrics, config.max_waiting_requests)
    preparer = Preparer(config.prepare_workers, config.max_preparing_requests)
    ctx = ServerContext(config=config, model=model_info(engine, config.served_model_name),
                        tokenizer=engine.tokenizer, client=client, reasoning=uses_reasoning(engine),
                        sampling_defaults=dict(engine.sampling_defaults), fingerprint=system_fingerprint(engine))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        client.start(asyncio.get_running_loop())
        await asyncio.to_thread(client.wait_ready)
        if not client.healthy:
            logger.error("the engine cannot generate: %s", client.dead_reason)
        yield
        preparer.close()
        await asyncio.to_thread(client.stop)

    # NOTE: no slash redirects: Starlette builds their Location from the client's Host header.
    app = FastAPI(title="fabrik", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", redirect_slashes=False)
    app.state.ctx = ctx
    drain = app.state.drain = Drain()  # ends what still runs when a shutdown's drain timeout passes
    app.add_middleware(GuardMiddleware, config=config)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["GET", "HEAD", "POST", "DELETE", "OPTIONS"], allow_headers=["*"],
                           expose_headers=["x-request-id", "x-should-retry", "retry-after"], max_age=600)
    app.add_middleware(RequestContextMiddleware)
    _add_error_handlers(app)

    @app.api_route("/health", methods=["GET", "HEAD"], include_in_schema=False)
    async def health() -> Response:
        if client.healthy:
            return Response(status_code=200)
        return APIError(503, f"the engine cannot generate: {client.dead_reason or 'starting'}",
                        "service_unavailable").response()

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses={200: {"model": ModelList}})
    async def list_models() -> Response:
        return _json(ModelList(data=[_model_card(ctx)]))

    @app.get("/v1/models/{model_id:any_text}", responses={200: {"model": ModelCard}})
    async def get_model(model_id: str) -> Response:
        ctx.check_model(model_id)
        return _json(_model_card(ctx))

    async def _serve(run: chat.ChatRun | completions.CompletionRun, arrival: float, stream: bool,
                     request: Request) -> Response:
        """Submit a prepared run, then stream its events or answer with its whole response."""
        await _start(run.start(arrival))
        if stream:
            return _stream(request, run.abort, drain.stream(run.events(), run.abort))
        result = await unless_disconnected(request, drain.response(run.response()))
        return Response(status_code=_CLIENT_CLOSED) if result is None else _json(result)

    @app.post("/v1/chat/completions", response_model=None, responses={200: {"model": ChatCompletionResponse}},
              openapi_extra=request_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        prepared, stream = await preparer.run(_prepare_chat, ctx, await request.body(), request.headers)
        return await _serve(chat.ChatRun(ctx, prepared, ctx.model.name), arrival, stream, request)

    @app.post("/v1/completions", response_model=None, responses={200: {"model": CompletionResponse}},
              openapi_extra=request_body(CompletionRequest))
    async def create_completion(request: Request) -> Response:
        arrival = time.monotonic()
        prepared, stream = await preparer.run(_prepare_completion, ctx, await request.body(), request.headers)
        return await _serve(completions.CompletionRun(ctx, prepared, ctx.model.name), arrival, stream, request)

    @app.post("/tokenize", responses={200: {"model": TokenizeResponse}}, openapi_extra=request_body(TokenizeRequest))
    async def tokenize_route(request: Request) -> Response:
        return _json(await preparer.run(_tokenize, ctx, await request.body(), request.headers))

    @app.post("/detokenize", responses={200: {"model": DetokenizeResponse}},
              openapi_extra=request_body(DetokenizeRequest))
    async def detokenize_route(request: Request) -> Response:
        return _json(await preparer.run(_detokenize, ctx, await request.body(), request.headers))

    install_openapi(app, [ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest])
    return app


# -- on the preparer's threads: parse, check and prepare a body --------------------------------------------------
_Body = TypeVar("_Body", bound=BaseModel)


def parse_body(model: type[_Body], raw: bytes, headers: Mapping[str, str], max_items: int | None = None) -> _Body:
    """The request body as ``model``, its strings checked (400s in OpenAI's shape, naming the field).

    ``max_items``: most ``messages`` or ``prompt`` entries worth validating (each costs at least one token, so more
    cannot fit the context); counted before validation, which holds the GIL (~0.3 s for 100,000 messages).
    """
    content_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise bad_request("the request body must be a JSON object, sent with Content-Type: application/json")
    # NOTE: json.loads, not pydantic's JSON parser: that one refuses a lone surrogate as bad JSON, where we can name
    # the field that holds it (check_unicode).
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("the request is nested too deeply") from None
    if max_items is not None:
        _check_list_lengths(data, max_items)
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    check_unicode(body)
    return body


def _check_list_lengths(data: Any, max_items: int) -> None:
    if not isinstance(data, dict):
        return
    for name in ("messages", "prompt"):
        items = data.get(name)
        if isinstance(items, list) and len(items) > max_items:
            raise APIError(400, f"{name} has {len(items)} entries; each takes at least one token of the context "
                                f"({max_items + 1} tokens)", "invalid_request_error", name, "context_length_exceeded")


def _prepare_chat(ctx: ServerContext, raw: bytes, headers: Mapping[str, str]) -> tuple[chat.PreparedChat, bool]:
    body = parse_body(ChatCompletionRequest, raw, headers, ctx.model.max_model_len)
    return chat.prepare(ctx, body), body.stream


def _prepare_completion(ctx: ServerContext, raw: bytes,
                        headers: Mapping[str, str]) -> tuple[completions.PreparedCompletion, bool]:
    body = parse_body(CompletionRequest, raw, headers, ctx.model.max_model_len)
    return completions.prepare(ctx, body), body.stream


def _tokenize(ctx: ServerContext, raw: bytes, headers: Mapping[str, str]) -> TokenizeResponse:
    return tokenize.tokenize(ctx, parse_body(TokenizeRequest, raw, headers, tokenize.token_limit(ctx)))


def _detokenize(ctx: ServerContext, raw: bytes, headers: Mapping[str, str]) -> DetokenizeResponse:
    return tokenize.detokenize(ctx, parse_body(DetokenizeRequest, raw, headers))


def _model_card(ctx: ServerContext) -> ModelCard:
    return ModelCard(id=ctx.model.name, created=ctx.model.created, max_model_len=ctx.model.max_model_len)


async def _start(admission: Any) -> None:
    """Admit a request; the engine's ValueError (a client error) becomes a 400."""
    try:
        await admission
    except ValueError as exc:
        raise from_value_error(exc) from None


def _stream(request: Request, abort: Any, events: AsyncIterator[str]) -> StreamingResponse:
    """An SSE response whose request is aborted as soon as the client disconnects (even before any event)."""

    async def abort_on_disconnect() -> None:
        await until_disconnected(request)
        abort()

    watcher = asyncio.ensure_future(abort_on_disconnect())

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        finally:
            watcher.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def request_validation(_request: Request, exc: RequestValidationError) -> Response:
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return APIError(exc.status_code, str(exc.detail), kind, headers=exc.headers).response()  # 405: Allow

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError) -> Response:
        retry_after = str(request.app.state.ctx.config.retry_after_seconds)
        return APIError(429, str(exc), "rate_limit_error", None, "rate_limit_exceeded",
                        headers={"Retry-After": retry_after}).response()

    @app.exception_handler(RecursionError)
    async def too_deep(_request: Request, _exc: RecursionError) -> Response:
        # JSON nested deeper than Python's recursion limit (in validation or in the chat template): bad input.
        return bad_request("the request is nested too deeply").response()

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_request: Request, exc: EngineDeadError) -> Response:
        return APIError(503, str(exc), "service_unavailable", should_retry=False).response()

    @app.exception_handler(EngineError)
    async def engine_error(_request: Request, exc: EngineError) -> Response:
        return APIError(500, str(exc), "internal_server_error").response()

    # NOTE: no handler for Exception: RequestContextMiddleware answers those (see its docstring).
