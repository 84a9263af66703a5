"""Who is calling: API keys as every provider sends them, and the per-request rate check.

With no active key in the key store the server runs open (and ``kleinserve serve`` allows that only
on a loopback address, unless ``--insecure-no-auth``); with keys, every dialect route needs one:
``Authorization: Bearer <key>`` (Oxen, OpenAI/AIgateway, Verda), ``API-KEY: <key>`` (1min.ai) or
``X-API-Key: <key>``. A key sees only its own jobs, events and usage.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from kleinserve.api.jobs_http import runtime_of
from kleinserve.errors import AuthenticationError
from kleinserve.keys import ApiKey


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


def key_from_headers(request: Request) -> str | None:
    """The API key in whichever header the caller's provider uses."""
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for header in ("api-key", "x-api-key"):
        value = request.headers.get(header, "").strip()
        if value:
            return value
    return None


async def authenticate(request: Request) -> Caller:
    """The caller of ``request``; 401 without a valid key when keys exist, 429 over its rate."""
    runtime = runtime_of(request)
    if not await asyncio.to_thread(runtime.keys.any_active):
        return Caller(None)
    secret = key_from_headers(request)
    if secret is None:
        raise AuthenticationError(
            "an API key is required: send it as 'Authorization: Bearer <key>', 'API-KEY: <key>' or 'X-API-Key: <key>'"
        )
    key = await asyncio.to_thread(runtime.keys.authenticate, secret)
    if key is None:
        raise AuthenticationError("the API key is not valid (unknown or revoked)")
    await asyncio.to_thread(runtime.quotas.check_request, key)  # a database write
    return Caller(key)


CallerDep = Annotated[Caller, Depends(authenticate)]


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server reachable from this machine only."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
