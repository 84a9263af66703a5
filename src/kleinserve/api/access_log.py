"""Per-request bookkeeping: the request id, the log context, and one access log line per request.

``X-Request-ID``: a client's id is kept when it is a plausible id (1-128 characters of letters,
digits and ``-_.:``; anything else could forge log lines, so it is replaced); otherwise one is
generated (32 hex digits). It is returned on every response (the unhandled-error handler in
``api/errors.py`` adds it to the 500s it renders outside this middleware), stored on the jobs the
request submits (``Job.request_id``) and carried by every log line written for the request or its job.

The access line (logger ``kleinserve.access``, level info) is written when the response has been
sent, so a sync generation or an SSE stream is logged with its whole duration. It carries the
method, the path with secret-looking query values redacted (signed result URLs), the route
*template* (``/api/images/generations/{generation_id}``), the status, the duration and the client
address; never headers, bodies or keys (the key's id comes from the log context).

Observers (``observers``) are called with each finished request; the metrics module uses this.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kleinserve.logs import log_context, redact_query

REQUEST_ID_HEADER = "X-Request-ID"
SCOPE_KEY = "kleinserve.request_id"
_VALID_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

access_log = logging.getLogger("kleinserve.access")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` when it is a plausible id, else a new one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1").strip()
            if _VALID_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


def route_template(scope: Scope) -> str:
    """The path template of the route that answered (never a raw path with ids in it)."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(path) if path else "<unmatched>"


@dataclass(frozen=True)
class FinishedRequest:
    """What an observer learns about a request once its response is sent (or it failed)."""

    method: str
    route: str
    status: int
    duration: float


class AccessMiddleware:
    """Request ids, the log context and the access log line, around every HTTP request."""

    def __init__(self, app: ASGIApp, observers: list[Callable[[FinishedRequest], None]] | None = None) -> None:
        self.app = app
        self.observers = observers if observers is not None else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope.get("headers", []))
        scope[SCOPE_KEY] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        with log_context(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                self._finish(scope, status, time.perf_counter() - started)

    def _finish(self, scope: Scope, status: int, duration: float) -> None:
        method = scope.get("method", "")
        route = route_template(scope)
        query = redact_query(scope.get("query_string", b"").decode("latin-1"))
        path = scope.get("path", "") + (f"?{query}" if query else "")
        client = scope.get("client")
        access_log.info(
            "%s %s %d %.3fs",
            method,
            path,
            status,
            duration,
            extra={
                "method": method,
                "path": path,
                "route": route,
                "status": status,
                "duration_ms": round(duration * 1000, 3),
                "client": client[0] if client else None,
            },
        )
        finished = FinishedRequest(method=method, route=route, status=status, duration=duration)
        for observer in self.observers:
            try:
                observer(finished)
            except Exception:
                access_log.exception("request observer failed")
