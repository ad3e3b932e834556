"""Per-request context as one pure-ASGI middleware (cheap on the hot path): the request id,
body size limits, latency and in-flight metrics, and the access log.

Body limits are enforced before a body is read whole: a ``Content-Length`` over the limit is
refused at once, and a body that grows past it while streaming (chunked, or a lying header)
stops being read at the first byte too many.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_bytes
from app.logs import request_id_var
from app.metrics import UNMATCHED_ROUTE, Metrics

access_log = logging.getLogger("app.access")

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_REQUEST_ID_HEADER = b"x-request-id"


class RequestContextMiddleware:
    """Request id in, request id out; body limits; metrics; access log."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        body_limit: Callable[[str, str], int],
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        # The same dict reaches every handler, the 500 handler of ServerErrorMiddleware included.
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        header = (_REQUEST_ID_HEADER, request_id.encode())
        status = 500
        method = scope["method"]

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                if not any(name.lower() == _REQUEST_ID_HEADER for name, _ in headers):
                    headers.append(header)
                message["headers"] = headers
            await send(message)

        self.metrics.in_flight.inc()
        try:
            limit = self.body_limit(method, scope["path"])
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                await _refuse_too_large(send_with_id, request_id, limit)
                return
            await self.app(scope, _limited(receive, limit), send_with_id)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info("%s %s %d %.1f ms", method, scope["path"], status, elapsed * 1000)
            request_id_var.reset(token)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == _REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            if _VALID_REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _limited(receive: Receive, limit: int) -> Receive:
    received = 0

    async def receive_limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, f"the request body is over the limit of {limit:,} bytes")
        return message

    return receive_limited


async def _refuse_too_large(send: Send, request_id: str, limit: int) -> None:
    body = error_bytes(
        "payload_too_large", f"the request body is over the limit of {limit:,} bytes", request_id
    )
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
