"""Who is calling: API keys as every provider sends them, and the per-request rate check.

Whether keys are required is decided at start and only tightened afterwards (see
:mod:`kleinserve.access`): a server started with keys, or on a non-loopback address, never becomes
open, not even when its last key is revoked. When keys are required, every dialect route needs one:
``Authorization: Bearer <key>`` (Oxen, OpenAI/AIgateway, Verda), ``API-KEY: <key>`` (1min.ai) or
``X-API-Key: <key>``, ``x-key: <key>`` (BFL), ``Authorization: Key <key>`` (fal) or ``Authorization: Token <key>``
(Replicate's older clients). A key sees only its own jobs, events and usage.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from starlette.datastructures import Headers

from kleinserve import logs
from kleinserve.api.jobs_http import runtime_of
from kleinserve.errors import AuthenticationError
from kleinserve.keys import ApiKey
from kleinserve.runtime import Runtime
from kleinserve.settings import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class Caller:
    """The caller of a request: an API key, or nobody on an open server."""

    key: ApiKey | None

    @property
    def owner(self) -> str | None:
        return self.key.id if self.key else None

    @property
    def scope(self) -> dict[str, Any]:
        """Keyword arguments that limit job reads to the caller's own jobs (all of them when open)."""
        return {"owner": self.owner, "any_owner": self.key is None}


CALLER_SCOPE_KEY = "kleinserve.caller"  # where api/guard.py leaves the caller it authenticated


def key_from_headers(headers: Headers) -> str | None:
    """The API key in whichever header the caller's provider uses."""
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    # Bearer (most), Key (fal), Token (Replicate's older clients).
    if scheme.lower() in ("bearer", "key", "token") and token.strip():
        return token.strip()
    for header in ("api-key", "x-api-key", "x-key"):  # x-key: Black Forest Labs' API
        value = headers.get(header, "").strip()
        if value:
            return value
    return None


def has_admin_token(headers: Headers, settings: Settings) -> bool:
    """Whether ``headers`` carry ``Authorization: Bearer <KLEINSERVE_ADMIN_TOKEN>``, the operator's
    secret, which is not an API key (compared in constant time; never true without a configured token).
    It opens /metrics (``KLEINSERVE_METRICS=admin``) and the job ids of /readyz."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    expected = settings.admin_token.get_secret_value() if settings.admin_token else ""
    return scheme.lower() == "bearer" and bool(expected) and hmac.compare_digest(token.strip(), expected)


async def authenticate(request: Request) -> Caller:
    """The caller of ``request``: the one api/guard.py authenticated before the body was read.

    Checked here too when the guard did not run (a route it treats as public, or an app built
    without it), so a route with this dependency is never served without the check.
    """
    cached = request.scope.get("state", {}).get(CALLER_SCOPE_KEY)
    if isinstance(cached, Caller):
        return cached
    return await caller_for(runtime_of(request), request.headers)


async def caller_for(runtime: Runtime, headers: Headers) -> Caller:
    """The caller sending ``headers``; 401 without a valid key when keys are required, 429 over its rate."""
    if not await asyncio.to_thread(runtime.access.keys_required):
        return Caller(None)
    secret = key_from_headers(headers)
    if secret is None:
        raise AuthenticationError(
            "an API key is required: send it as 'Authorization: Bearer <key>', 'API-KEY: <key>' or 'X-API-Key: <key>'"
        )
    key = await asyncio.to_thread(runtime.keys.authenticate, secret)
    if key is None:
        raise AuthenticationError("the API key is not valid (unknown or revoked)")
    logs.current().key_id = key.id  # the key's id (never its secret) on this request's log lines
    await asyncio.to_thread(runtime.quotas.check_request, key)  # a database write
    return Caller(key)


CallerDep = Annotated[Caller, Depends(authenticate)]


def still_allowed(runtime: Runtime, caller: Caller) -> bool:
    """Whether ``caller``, admitted earlier, may still receive data (its key not revoked since;
    an anonymous caller of an open server: keys not required since)."""
    if caller.key is None:
        return not runtime.access.keys_required_now()
    return not runtime.access.is_revoked(caller.key.id)


async def while_allowed(runtime: Runtime, caller: Caller, source: AsyncIterator[T]) -> AsyncIterator[T]:
    """``source``'s items until the caller's key is revoked (or an open server starts requiring keys).

    For long-lived responses (SSE): checked between items and every ``revocation_interval``
    seconds while waiting, so a revoked key's stream ends within about that time.
    """
    interval = runtime.settings.revocation_interval
    pending: asyncio.Future[T] | None = None
    try:
        while still_allowed(runtime, caller):
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            if not still_allowed(runtime, caller):
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
