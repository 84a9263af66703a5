"""The HTTP application: ``create_app(settings)`` builds it; the lifespan starts the runtime.

No work happens at import time. The lifespan loads the models in the background so ``/healthz``
answers at once, while ``/readyz`` (and every generation endpoint) answers 503 until they are loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kleinserve import __version__, metrics
from kleinserve.api.access_log import AccessMiddleware
from kleinserve.api.auth import authenticate, has_admin_token
from kleinserve.api.dialects.base import Dialect
from kleinserve.api.dialects.bfl import BflDialect
from kleinserve.api.dialects.fal import FalDialect
from kleinserve.api.dialects.onemin import OneMinDialect
from kleinserve.api.dialects.openai import OpenAIDialect
from kleinserve.api.dialects.oxen import OxenDialect
from kleinserve.api.dialects.replicate import ReplicateDialect
from kleinserve.api.dialects.verda import VerdaDialect
from kleinserve.api.errors import ErrorRenderer, install_error_handlers
from kleinserve.api.guard import RequestGuard
from kleinserve.api.jobs_http import DEMO_HEADER
from kleinserve.api.loras_http import loras_router
from kleinserve.api.metrics_http import metrics_router
from kleinserve.api.webhooks_http import router as webhooks_router
from kleinserve.api.webhooks_http import start_dispatcher
from kleinserve.api.workbench import workbench_router
from kleinserve.errors import NotFoundError
from kleinserve.runtime import Role, Runtime
from kleinserve.settings import Settings
from kleinserve.storage.base import media_type_for
from kleinserve.storage.local import LocalStorage

if TYPE_CHECKING:
    from kleinserve.engine.catalog import ServedModel

log = logging.getLogger(__name__)


class DemoHeaderMiddleware:
    """Marks every response ``X-Kleinserve-Demo: true`` while the server runs on demo weights.

    Pure ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware wraps
    ``receive`` so that endpoints no longer see a client disconnect, which sync endpoints need.
    """

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.runtime.demo:
            await self.app(scope, receive, send)
            return

        async def send_marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(DEMO_HEADER, "true")
            await send(message)

        await self.app(scope, receive, send_marked)


_ERROR_RESPONSES = {
    "400": "Invalid parameters, in the error shape of the route's provider API.",
    "401": "No valid API key (when the server has keys).",
    "402": "The key's credits do not cover the request.",
    "403": "A browser's cross-site write without CORS consent (KLEINSERVE_CORS_ORIGINS).",
    "404": "Unknown model, generation or resource.",
    "408": "The request body did not arrive within KLEINSERVE_BODY_TIMEOUT.",
    "413": "Request body over the configured cap.",
    "415": "A body that is not application/json (or multipart/form-data where uploads are taken).",
    "429": "Over the key's rate or concurrency limit; see Retry-After.",
    "503": "Not ready yet, or the queue is full; see Retry-After.",
}


def _openapi_with_our_errors(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document with the statuses kleinserve really sends.

    FastAPI documents a 422 on every route with parameters; kleinserve answers invalid input with
    400 (as every provider does) and has a fixed set of refusals, documented here instead.
    """
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                had_params = responses.pop("422", None) is not None
                if had_params or not path.startswith(("/healthz", "/readyz", "/files", "/openapi")):
                    for status, text in _ERROR_RESPONSES.items():
                        responses.setdefault(status, {"description": text})
        schema["paths"].get("/readyz", {}).get("get", {}).get("responses", {}).setdefault(
            "503", {"description": "Models are still loading, or failed to load."}
        )
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(
    settings: Settings | None = None, served: list[ServedModel] | None = None, role: Role = "serve"
) -> FastAPI:
    """Build the kleinserve application. ``served`` skips model planning (the CLI plans first);
    ``role="api"`` serves HTTP only, for models that ``kleinserve worker`` processes run."""
    settings = settings or Settings()
    runtime = Runtime(settings, served, role)
    # Verda last: its catch-all POST /{slug}/generate must not shadow routes registered after it.
    dialects: list[Dialect] = [
        OxenDialect(),
        OpenAIDialect(),
        OneMinDialect(),
        BflDialect(),
        ReplicateDialect(),
        FalDialect(),
        VerdaDialect(),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        unwatch = metrics.watch_runtime(runtime)  # queue, device and cache gauges, read at scrape time
        stop_webhooks = start_dispatcher(runtime)  # finished jobs -> signed POSTs, retried durably
        tasks = [
            asyncio.create_task(runtime.start()),
            asyncio.create_task(runtime.sweep_forever()),
            asyncio.create_task(runtime.reap_forever()),
            asyncio.create_task(runtime.refresh_models_forever()),
            asyncio.create_task(runtime.enforce_revocations_forever()),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(runtime.stop)
            unwatch()
            await asyncio.to_thread(stop_webhooks)

    app = FastAPI(
        title="kleinserve",
        version=__version__,
        description="FLUX.2 [klein] inference server speaking the Oxen.ai, OpenAI, 1min.ai and Verda APIs.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    renderer = ErrorRenderer(dialects)
    install_error_handlers(app, renderer)

    app.add_middleware(DemoHeaderMiddleware, runtime=runtime)
    # Host, cross-site, key, media type, body size and time: before any body byte (api/guard.py).
    upload_paths = [path for d in dialects for path in getattr(d, "upload_paths", ())]
    app.add_middleware(RequestGuard, runtime=runtime, renderer=renderer, upload_paths=upload_paths)
    if settings.cors_origins:  # outside the guard: it answers preflights, which carry no key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["Retry-After", DEMO_HEADER],
        )
    # Outermost of ours: request id, access log and HTTP metrics around everything.
    app.add_middleware(AccessMiddleware, observers=[metrics.observe_request])

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: 200 once every model is loaded, else 503.")
    async def readyz(request: Request) -> JSONResponse:
        # Public, for orchestrators: ready or not, the models, each device's state. The job each
        # worker runs only with the admin token: an unauthenticated probe learns no job ids.
        jobs = has_admin_token(request.headers, settings)
        body = {
            "status": "ready" if runtime.ready else ("error" if runtime.load_error else "loading"),
            "demo": runtime.demo,
            "models": runtime.served_ids(),
            "device": runtime.device,
            "dtype": runtime.dtype,
            "devices": [state.describe(jobs) for state in runtime.device_states],
        }
        if runtime.load_error:
            body["error"] = runtime.load_error
        return JSONResponse(body, status_code=200 if runtime.ready else 503)

    @app.get(
        "/files/{key:path}",
        tags=["files"],
        summary="A result file, through a signed, expiring URL.",
        response_class=FileResponse,
        responses={
            200: {"description": "The image.", "content": {t: {} for t in ("image/png", "image/jpeg", "image/webp")}},
            403: {"description": "Missing, tampered or expired signature."},
            404: {"description": "No such file."},
        },
    )
    async def files(key: str, expires: str | None = None, sig: str | None = None) -> FileResponse:
        storage = runtime.storage
        if not isinstance(storage, LocalStorage):  # other backends hand out their own URLs
            raise NotFoundError("no such file")
        remaining = storage.verify(key, expires, sig)
        path = await asyncio.to_thread(storage.path, key)
        # Cacheable for exactly as long as the link is valid, so no cache serves it after expiry.
        return FileResponse(
            path, media_type=media_type_for(key), headers={"Cache-Control": f"private, max-age={remaining}"}
        )

    app.openapi = lambda: _openapi_with_our_errors(app)  # type: ignore[method-assign]

    for dialect in dialects:
        # Every provider route needs an API key once keys exist (see api/auth.py).
        app.include_router(dialect.router(), dependencies=[Depends(authenticate)])
    # The Workbench page at /: public on purpose (it must load to ask for a key); it calls the
    # authenticated Oxen routes like any client.
    app.include_router(loras_router(), dependencies=[Depends(authenticate)])
    app.include_router(workbench_router(dialects))
    app.include_router(metrics_router())
    app.include_router(webhooks_router)
    return app
