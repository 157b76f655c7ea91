"""ASGI middleware around every route: request ids and unexpected errors (outermost), the API key and body size.

Order, outside in::

    RequestContextMiddleware  x-request-id on every response; any exception a route lets through is a 500 here
      [CORSMiddleware]        only with --allowed-origins: preflights answered before the key is asked for
        GuardMiddleware       401 without a valid key (all but /health), 413 above the body limit, 400 if not UTF-8
          the app
"""

from __future__ import annotations

import hmac
import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fabrik.server.config import ServerConfig
from fabrik.server.errors import APIError, bad_request, log_unexpected

logger = logging.getLogger("fabrik.server")

OPEN_PATHS = frozenset({"/health"})
"""Paths served without an API key."""

_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class RequestContextMiddleware:
    """Gives every response an ``x-request-id`` and turns an exception that escaped the routes into a 500.

    The id is the client's own ``X-Request-Id`` when it is a short plain token, else a new ``req_...``. An unexpected
    error is logged with its type and where it was raised, never its message (which may quote the request), and
    answered with ``x-should-retry: false``: the same request would meet the same bug. NOTE: Starlette's own handler
    for ``Exception`` re-raises after answering, which logs the request's text and resets keep-alive connections;
    catching here avoids both.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = given if _CLIENT_REQUEST_ID.fullmatch(given) else f"req_{uuid.uuid4().hex}".encode()
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log_unexpected(logger, exc, request_id.decode())
            if not started:
                error = APIError(500, f"internal error ({type(exc).__name__}); request id {request_id.decode()}",
                                 "internal_server_error", should_retry=False)
                await error.response()(scope, receive, send_with_id)


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
        if self.keys and scope["path"] not in OPEN_PATHS:
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
