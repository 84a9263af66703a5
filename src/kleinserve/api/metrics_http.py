"""``GET /metrics``: this process's Prometheus metrics, behind ``KLEINSERVE_METRICS``.

``off`` (the default) answers 404 as if the route did not exist; ``open`` serves anyone who reaches
the server (put it behind the proxy's own rules); ``admin`` needs ``Authorization: Bearer
<KLEINSERVE_ADMIN_TOKEN>``, a secret of the operator's that is not an API key, so a key holder
cannot read other keys' traffic. The token is compared in constant time.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kleinserve import metrics
from kleinserve.api.auth import has_admin_token
from kleinserve.api.jobs_http import runtime_of
from kleinserve.errors import AuthenticationError, NotFoundError


def metrics_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get(
        "/metrics",
        summary="Prometheus metrics of this process (KLEINSERVE_METRICS: off, open or admin).",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}},
    )
    async def read_metrics(request: Request) -> Response:
        settings = runtime_of(request).settings
        if settings.metrics == "off":
            raise NotFoundError("metrics are off (KLEINSERVE_METRICS=open or admin turns them on)")
        if settings.metrics == "admin" and not has_admin_token(request.headers, settings):
            raise AuthenticationError("metrics need the admin token: 'Authorization: Bearer <token>'")
        body = await asyncio.to_thread(generate_latest, metrics.REGISTRY)  # the queue collector reads the store
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
