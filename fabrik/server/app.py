"""The FastAPI application: routes, the API-key and body-size guard, and errors in OpenAI's shape.

Routes::

    GET  /health                 200 when the engine can generate, else 503 (no API key needed)
    GET  /metrics                Prometheus text
    GET  /v1/models[/{id}]       the served model
    POST /v1/chat/completions    chat.py
    POST /v1/completions         completions.py
    POST /tokenize, /detokenize  vLLM's shapes
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fabrik.engine.llm_engine import LLMEngine
from fabrik.server import chat, completions
from fabrik.server.common import ServerContext, encode, unless_disconnected, until_disconnected
from fabrik.server.config import ModelInfo, ServerConfig
from fabrik.server.engine_client import EngineClient, EngineDeadError, EngineError, QueueFullError
from fabrik.server.errors import APIError, bad_request, from_value_error, validation_error
from fabrik.server.metrics import ServerMetrics
from fabrik.server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
    TokenizeRequest, TokenizeResponse)
from fabrik.server.shutdown import Drain

logger = logging.getLogger(__name__)

_OPEN_PATHS = frozenset({"/health"})
# Status of a response nobody reads: the client disconnected before the result was ready (nginx's convention).
_CLIENT_CLOSED = 499


class GuardMiddleware:
    """Checks the API key (401) and the body size (413) before a route sees the request.

    The body is read here, up to the limit, and replayed to the app; a larger body is refused as soon as its
    Content-Length or its bytes so far pass the limit, without reading or storing the rest.
    """

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.config = config
        self.keys = [key.encode() for key in config.api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.keys and scope["path"] not in _OPEN_PATHS:
            error = self._check_key(headers.get(b"authorization"))
            if error is not None:
                await error.response()(scope, receive, send)
                return
        limit = self.config.max_request_bytes
        too_large = APIError(413, f"the request body is larger than the limit of {limit} bytes",
                             "invalid_request_error", None, "request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large.response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await too_large.response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            error = bad_request(f"the request body is not valid UTF-8 (byte {exc.start})")
            await error.response()(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _check_key(self, authorization: bytes | None) -> APIError | None:
        if not authorization:
            return APIError(401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY'",
                            "invalid_request_error", None, "invalid_api_key")
        scheme, _, token = authorization.partition(b" ")
        token = token.strip()
        # NOTE: compare_digest against every key, without stopping early, so timing tells nothing about them.
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        if scheme.lower() != b"bearer" or not any(matches):
            return APIError(401, "Incorrect API key provided", "invalid_request_error", None, "invalid_api_key")
        return None


def _json(model: Any, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def model_info(engine: LLMEngine, name: str) -> ModelInfo:
    return ModelInfo(name=name, max_model_len=engine.max_model_len, vocab_size=engine.model_config.vocab_size,
                     kv_capacity_tokens=engine.num_blocks * engine.config.block_size, created=int(time.time()))


def uses_reasoning(engine: LLMEngine) -> bool:
    """Whether the model's chat template knows ``<think>`` blocks (Qwen3 and its kind)."""
    template = engine.tokenizer.chat_template if engine.tokenizer is not None else None
    return template is not None and any("<think>" in source for source in template.templates.values())


def build_app(engine: LLMEngine, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving ``engine``; the engine thread starts with the app (its lifespan)."""
    metrics = ServerMetrics(config.served_model_name)
    client = EngineClient(engine, metrics, config.max_waiting_requests)
    ctx = ServerContext(config=config, model=model_info(engine, config.served_model_name),
                        tokenizer=engine.tokenizer, client=client, reasoning=uses_reasoning(engine),
                        sampling_defaults=dict(engine.sampling_defaults))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        client.start(asyncio.get_running_loop())
        await asyncio.to_thread(client.wait_ready)
        if not client.healthy:
            logger.error("the engine cannot generate: %s", client.dead_reason)
        yield
        await asyncio.to_thread(client.stop)

    app = FastAPI(title="fabrik", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    drain = app.state.drain = Drain()  # ends what still runs when a shutdown's drain timeout passes
    app.add_middleware(GuardMiddleware, config=config)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if client.healthy:
            return Response(status_code=200)
        return APIError(503, f"the engine cannot generate: {client.dead_reason or 'starting'}",
                        "service_unavailable").response()

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models() -> Response:
        return _json(ModelList(data=[_model_card(ctx)]))

    @app.get("/v1/models/{model_id:path}")
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

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        run = chat.ChatRun(ctx, chat.prepare(ctx, body), ctx.model.name)
        return await _serve(run, arrival, body.stream, request)

    @app.post("/v1/completions", response_model=None)
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        run = completions.CompletionRun(ctx, completions.prepare(ctx, body), ctx.model.name)
        return await _serve(run, arrival, body.stream, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        ctx.check_model(body.model)
        tokenizer = ctx.need_tokenizer("tokenize")
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if body.messages is not None:
            text = chat.render_prompt(ctx, body.messages, body.tools, body.chat_template_kwargs,
                                      add_generation_prompt=body.add_generation_prompt)
            add_special = bool(body.add_special_tokens)
        else:
            text = body.prompt or ""
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = encode(tokenizer, text, "messages" if body.messages is not None else "prompt", add_special)
        strs = [tokenizer.token_to_text(t) for t in ids] if body.return_token_strs else None
        return _json(TokenizeResponse(count=len(ids), max_model_len=ctx.model.max_model_len, tokens=ids,
                                      token_strs=strs))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        ctx.check_model(body.model)
        tokenizer = ctx.need_tokenizer("detokenize")
        bad = next((t for t in body.tokens if not 0 <= t < ctx.model.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of range [0, {ctx.model.vocab_size})", "tokens")
        return _json(DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False)))

    return app


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
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return APIError(exc.status_code, str(exc.detail), kind).response()

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

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error", exc_info=exc)
        return APIError(500, f"internal error: {type(exc).__name__}", "internal_server_error").response()
