"""Webhooks over HTTP: where a job's ``webhook_url`` comes from, its check, the secret, the log.

- Oxen (the native API) takes ``webhook_url`` in the queue request body, as an extension; every
  dialect (Oxen's sync routes, OpenAI, 1min.ai, Verda) also takes the header
  ``X-Kleinserve-Webhook: <url>``, since their bodies are the providers' and stay strict.
- The URL must be http(s), at most 2048 characters, and pass the image-URL SSRF guard now (a 400
  in the dialect's shape names the field or header) and again at every delivery.
- ``GET /api/webhooks/secret``: the caller's signing secret (its API key's own; the server's when
  the server is open), to verify deliveries with any Standard Webhooks library.
- ``GET /api/webhooks/{job_id}``: the job's delivery and every attempt (status, error, timing).

The dispatcher runs in each API process (:func:`start_dispatcher`, called from the app's lifespan).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request

from kleinserve import backends
from kleinserve.api.auth import CallerDep, authenticate
from kleinserve.api.jobs_http import result_url, runtime_of
from kleinserve.engine.fetch import vetted_targets
from kleinserve.engine.images import InputPolicy
from kleinserve.errors import InvalidImageError, InvalidParameterError
from kleinserve.runtime import Runtime
from kleinserve.webhooks import signing
from kleinserve.webhooks.dispatcher import WebhookDispatcher

HEADER = "X-Kleinserve-Webhook"
MAX_URL = 2048


async def checked_webhook(runtime: Runtime, url: str | None, field: str, source: str = "body") -> str | None:
    """``url`` if it may receive webhooks (see the module docstring), else a 400 naming ``field``
    (which came from ``source``: body, query or header)."""
    if url is None or not url.strip():
        return None
    url = url.strip()
    if len(url) > MAX_URL:
        raise InvalidParameterError(field, f"must be at most {MAX_URL} characters", source=source)
    policy = InputPolicy.from_settings(runtime.settings, field=field)
    try:
        await asyncio.to_thread(vetted_targets, url, policy)
    except InvalidImageError as err:
        raise InvalidParameterError(field, err.message.removeprefix(f"{field}: "), source=source) from None
    return url


async def webhook_from_header(request: Request, runtime: Runtime) -> str | None:
    """The checked ``X-Kleinserve-Webhook`` of ``request``, if any."""
    return await checked_webhook(runtime, request.headers.get(HEADER), HEADER, "header")


def start_dispatcher(runtime: Runtime) -> Callable[[], None]:
    """Start sending ``runtime``'s webhooks in the background; returns the function that stops it."""
    store = backends.webhook_store(runtime.settings, runtime.store)
    dispatcher = WebhookDispatcher(runtime.store, store, runtime.settings, lambda output: result_url(runtime, output))
    runtime.webhook_secret = dispatcher.secret
    runtime.webhooks = store
    dispatcher.start()

    def stop() -> None:
        dispatcher.stop()
        store.close()

    return stop


router = APIRouter(prefix="/api/webhooks", tags=["webhooks"], dependencies=[Depends(authenticate)])


@router.get("/secret", summary="The secret that signs your webhooks (Standard Webhooks, whsec_...).")
async def secret(request: Request, caller: CallerDep) -> dict[str, str]:
    runtime = runtime_of(request)
    if runtime.webhook_secret is None:
        raise InvalidParameterError("webhooks", "webhooks are not running in this process")
    return {"secret": signing.secret_for(runtime.webhook_secret, caller.owner)}


@router.get("/{job_id}", summary="A job's webhook delivery and every attempt.")
async def deliveries(job_id: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    runtime = runtime_of(request)
    await asyncio.to_thread(runtime.service.get, job_id, **caller.scope)  # 404 unless the caller's
    store = runtime.webhooks
    if store is None:
        return {"job_id": job_id, "deliveries": []}
    found = await asyncio.to_thread(store.for_job, job_id)
    items = []
    for delivery in found:
        attempts = await asyncio.to_thread(store.attempts, delivery.id)
        item = delivery.model_dump(mode="json", exclude={"payload", "owner"})
        item["attempts_log"] = [a.model_dump(mode="json", exclude={"delivery_id"}) for a in attempts]
        items.append(item)
    return {"job_id": job_id, "deliveries": items}
