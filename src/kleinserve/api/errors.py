"""The one table from domain errors to HTTP statuses, and each dialect's error body.

Starlette looks exception handlers up along the exception's MRO; here the status table is looked
up the same way, and the body is rendered by the dialect that owns the request's path, so a
client always gets errors in the shape of the API it called. Unknown exceptions become a logged
500 with a generic message; FastAPI's own validation errors become ``InvalidParameterError``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kleinserve.api.access_log import REQUEST_ID_HEADER, SCOPE_KEY
from kleinserve.api.dialects.base import Dialect, parameter_error
from kleinserve.errors import (
    AuthenticationError,
    ForbiddenError,
    GenerationCancelledError,
    InsufficientCreditsError,
    InvalidImageError,
    InvalidParameterError,
    InvalidRequestError,
    KleinserveError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    RequestTimeoutError,
    ResourceExhaustedError,
    ServiceUnavailableError,
    UnknownModelError,
    UnsupportedMediaTypeError,
    WeightsUnavailableError,
)
from kleinserve.storage.base import SignatureError

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[KleinserveError], int] = {
    InvalidParameterError: 400,
    InvalidImageError: 400,
    UnknownModelError: 404,
    NotFoundError: 404,
    PayloadTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    RequestTimeoutError: 408,
    InvalidRequestError: 400,
    AuthenticationError: 401,
    ForbiddenError: 403,
    InsufficientCreditsError: 402,
    RateLimitedError: 429,
    SignatureError: 403,
    GenerationCancelledError: 409,
    ServiceUnavailableError: 503,
    ResourceExhaustedError: 503,
    WeightsUnavailableError: 503,
    KleinserveError: 500,
}


def status_for(error: KleinserveError) -> int:
    """The HTTP status of ``error``: the entry of its nearest class in :data:`STATUS_BY_ERROR`."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


class NativeDialect:
    """kleinserve's own error shape, for paths no provider dialect owns (/files, /readyz, ...)."""

    name = "kleinserve"
    prefixes: tuple[str, ...] = ()

    def error_body(self, error: KleinserveError, status: int) -> dict[str, Any]:
        body: dict[str, Any] = {"code": error.code, "message": error.message}
        if isinstance(error, InvalidParameterError):
            body["param"] = error.field
        return {"error": body}


class HTTPStatusError(KleinserveError):
    """An HTTP-level refusal from the framework itself (unknown route, wrong method)."""

    def __init__(self, status: int, message: str) -> None:
        codes = {
            404: "not_found",
            405: "method_not_allowed",
            408: "request_timeout",
            413: "payload_too_large",
            415: "unsupported_media_type",
        }
        super().__init__(message, code=codes.get(status, "http_error"))
        self.status = status


class ErrorRenderer:
    """Errors as responses in the shape of the dialect that owns a path (also used by api/guard.py,
    which answers some requests before any route runs)."""

    def __init__(self, dialects: Sequence[Dialect]) -> None:
        self.native = NativeDialect()
        self.dialects = list(dialects)
        # (prefix, dialect, whole segments only); the longest prefix wins. A dialect's optional
        # ``loose_prefixes`` also match inside a segment: BFL owns every ``/v1/flux-...`` model route,
        # served or not, so an unknown model is answered in BFL's shape rather than OpenAI's (``/v1``).
        prefixes = [(p, d, True) for d in dialects for p in d.prefixes]
        prefixes += [(p, d, False) for d in dialects for p in getattr(d, "loose_prefixes", ())]
        self._by_prefix = sorted(prefixes, key=lambda entry: -len(entry[0]))

    def dialect_for(self, path: str) -> Dialect | NativeDialect:
        for prefix, dialect, whole in self._by_prefix:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/" if whole else prefix):
                return dialect
        return self.native

    def response(self, path: str, error: KleinserveError, status: int | None = None) -> JSONResponse:
        status = status if status is not None else status_for(error)
        headers = {}
        retry_after = getattr(error, "retry_after", None)
        if isinstance(error, ServiceUnavailableError | RateLimitedError) and retry_after:
            headers["Retry-After"] = str(retry_after)
        if isinstance(error, AuthenticationError):
            headers["WWW-Authenticate"] = 'Bearer realm="kleinserve"'
        if isinstance(error, RequestTimeoutError):
            headers["Connection"] = "close"
        body = self.dialect_for(path).error_body(error, status)
        return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, renderer: ErrorRenderer) -> None:
    """Render every error in the shape of the dialect owning the request path."""

    def respond(request: Request, error: KleinserveError, status: int) -> JSONResponse:
        return renderer.response(request.url.path, error, status)

    @app.exception_handler(KleinserveError)
    async def domain_error(request: Request, error: KleinserveError) -> JSONResponse:
        return respond(request, error, status_for(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return respond(request, parameter_error(error.errors(), from_request=True), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = str(error.detail) if error.detail else "request refused"
        return respond(request, HTTPStatusError(error.status_code, message), error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        response = respond(request, KleinserveError("internal server error"), 500)
        # Rendered outside AccessMiddleware (Starlette's ServerErrorMiddleware), so the id is added here.
        if SCOPE_KEY in request.scope:
            response.headers[REQUEST_ID_HEADER] = request.scope[SCOPE_KEY]
        return response
