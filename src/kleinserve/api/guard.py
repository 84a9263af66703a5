"""The request guard: what is decided from a request's head alone, before any body byte is read.

One pure ASGI middleware, outermost of the app's own, checks in this order and answers in the
shape of the dialect that owns the path (``api/errors.py``):

1. **Host** (400 ``invalid_host``): the ``Host`` header must name this server, so a page on another
   site cannot reach an open loopback server through DNS rebinding. The allow-list is
   ``KLEINSERVE_ALLOWED_HOSTS``, or by default the loopback names, the bind address and the host of
   ``--public-url``; a wildcard bind (0.0.0.0, ::) without a list accepts any host (such servers
   require keys, see :mod:`kleinserve.access`).
2. **Browser cross-site writes** (403 ``forbidden``): a POST/PUT/PATCH/DELETE a browser marks as
   cross-site or same-site (``Sec-Fetch-Site``), or whose ``Origin`` is not this server's own (its
   ``Host`` or ``--public-url``), is refused unless the origin is in ``KLEINSERVE_CORS_ORIGINS``
   (the operator's CORS consent). Without this, any web page could make a visitor's browser queue
   work on an open server with a "simple" (``text/plain`` or multipart) request. Requests without
   ``Origin`` or ``Sec-Fetch-Site`` (SDKs, curl) are not browsers' and pass.
3. **API key** (401, 429 over the key's request rate), on every path but the public ones (health,
   docs, the Workbench page, signed ``/files`` links): so an unauthenticated body is never read
   (not even to find it is invalid JSON). The caller is kept in the scope for the route's
   dependency (``api.auth.authenticate``), which does not check again.
4. **Media type** (415): a body sent to a provider route must be ``application/json`` (or
   ``+json``); ``multipart/form-data`` only where a dialect takes uploads (``upload_paths``).
5. **Body size and time**: a declared ``Content-Length`` over ``KLEINSERVE_MAX_BODY_BYTES`` is 413
   at once, a streamed body is counted as it arrives (413), and the whole body must arrive within
   ``KLEINSERVE_BODY_TIMEOUT`` seconds (408), so a client dripping a body cannot hold a request.
   These two are raised from ``receive`` (where the endpoint reads), after the checks above.

Every response also gets headers that keep browsers from misusing it: no framing by other sites
(``X-Frame-Options: DENY``, ``Content-Security-Policy: frame-ancestors 'none'``: the Workbench keeps
a key in the page's storage, so clickjacking it would act with that key), no MIME sniffing, and no
``Referer`` (a page opened from a signed ``/files`` link must not pass the link on).
"""

from __future__ import annotations

import asyncio
import email.message
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kleinserve.api.auth import CALLER_SCOPE_KEY, caller_for
from kleinserve.api.errors import ErrorRenderer, HTTPStatusError
from kleinserve.errors import ForbiddenError, InvalidRequestError, KleinserveError, UnsupportedMediaTypeError
from kleinserve.runtime import Runtime
from kleinserve.settings import Settings

# /metrics checks its own admin token (api/metrics_http.py), which is not an API key.
PUBLIC_PATHS = frozenset(
    {"/", "/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/metrics"}
)
PUBLIC_PREFIXES = ("/files/", "/workbench/")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARD_BINDS = ("0.0.0.0", "::", "")
SECURITY_HEADERS = (
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)


def is_public(path: str) -> bool:
    """Paths served without a key: health, docs, the Workbench page and signed file links."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def host_name(value: str) -> str:
    """The host of a ``Host`` header or URL netloc, lower-cased, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The host names this server answers to; ``None`` for any."""
    if settings.allowed_hosts:
        hosts = [host_name(h) for h in settings.allowed_hosts]
        return None if "*" in hosts else frozenset(hosts)
    if settings.host.strip("[]") in _WILDCARD_BINDS:
        return None
    named = {*_LOOPBACK_NAMES, host_name(settings.host)}
    if settings.public_url:
        named.add(host_name(urlsplit(settings.public_url).netloc))
    return frozenset(named)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class RequestGuard:
    """Pure ASGI middleware performing the checks of the module docstring."""

    def __init__(
        self, app: ASGIApp, runtime: Runtime, renderer: ErrorRenderer, upload_paths: Iterable[str] = ()
    ) -> None:
        self.app = app
        self.runtime = runtime
        self.renderer = renderer
        settings = runtime.settings
        self.hosts = allowed_hosts(settings)
        self.cors_origins = frozenset(_origin(o) for o in settings.cors_origins)
        self.public_origin = _origin(settings.public_url) if settings.public_url else None
        self.upload_paths = frozenset(upload_paths)
        self.max_body = settings.max_body_bytes
        self.body_timeout = settings.body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._with_security_headers(send)
        headers = Headers(scope=scope)
        path: str = scope["path"]
        try:
            self._check_host(headers)
            self._check_cross_site(scope, headers)
            if not is_public(path):
                caller = await caller_for(self.runtime, headers)
                scope.setdefault("state", {})[CALLER_SCOPE_KEY] = caller
                self._check_media_type(scope["method"], path, headers)
            declared = headers.get("content-length", "")
            if declared.isdigit() and (len(declared) > 18 or int(declared) > self.max_body):
                raise StarletteHTTPException(413, self._too_big)
        except KleinserveError as error:
            await self.renderer.response(path, error)(scope, receive, send)
            return
        except StarletteHTTPException as error:
            status_error = HTTPStatusError(error.status_code, str(error.detail))
            await self.renderer.response(path, status_error, error.status_code)(scope, receive, send)
            return
        await self.app(scope, self._bounded(receive), send)

    @staticmethod
    def _with_security_headers(send: Send) -> Send:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS:
                    if name not in headers:
                        headers[name] = value
            await send(message)

        return send_with_headers

    @property
    def _too_big(self) -> str:
        return f"request body is over the limit of {self.max_body} bytes"

    def _check_host(self, headers: Headers) -> None:
        if self.hosts is None:
            return
        host = headers.get("host")
        if host is not None and host_name(host) not in self.hosts:
            raise InvalidRequestError(
                f"this server does not answer to host {host_name(host)!r}; add it to KLEINSERVE_ALLOWED_HOSTS "
                "or set KLEINSERVE_PUBLIC_URL",
                code="invalid_host",
            )

    def _check_cross_site(self, scope: Scope, headers: Headers) -> None:
        if scope["method"] in SAFE_METHODS:
            return
        origin = headers.get("origin")
        if origin is not None and _origin(origin) in self.cors_origins:
            return
        site = headers.get("sec-fetch-site", "").lower()
        refused = site in ("cross-site", "same-site")
        if origin is not None and not refused:
            own = {_origin(f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"), self.public_origin}
            refused = origin.strip().lower() == "null" or _origin(origin) not in own
        if refused:
            raise ForbiddenError(
                "cross-site requests from browsers are refused; the server's operator can allow an origin "
                "with KLEINSERVE_CORS_ORIGINS"
            )

    def _check_media_type(self, method: str, path: str, headers: Headers) -> None:
        if method not in BODY_METHODS:
            return
        if headers.get("content-length", "") in ("0", "") and "transfer-encoding" not in headers:
            return  # no body
        message = email.message.Message()
        message["content-type"] = headers.get("content-type", "")
        media = message.get_content_type() if headers.get("content-type") else ""
        if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
            return
        if path in self.upload_paths:
            if media == "multipart/form-data":
                return
            raise UnsupportedMediaTypeError("the request body must be application/json or multipart/form-data")
        raise UnsupportedMediaTypeError(f"the request body must be application/json, not {media or 'untyped'}")

    def _bounded(self, receive: Receive) -> Receive:
        """``receive`` with the body's size cap and deadline (both only while the body arrives)."""
        received = 0
        complete = False
        deadline: float | None = None
        loop = asyncio.get_running_loop()

        async def bounded() -> Message:
            nonlocal received, complete, deadline
            if complete:
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.body_timeout
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except TimeoutError:
                raise StarletteHTTPException(
                    408, f"the request body did not arrive within {self.body_timeout:g} seconds"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise StarletteHTTPException(413, self._too_big)
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        return bounded
