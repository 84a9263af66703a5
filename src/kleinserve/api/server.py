"""How the HTTP server runs the app: uvicorn with its limits taken from :class:`Settings`.

uvicorn closes idle keep-alive connections (``KLEINSERVE_KEEP_ALIVE_TIMEOUT``) and answers 503 past
``KLEINSERVE_LIMIT_CONCURRENCY`` connections or requests, but it has no deadline for a request's
headers: every byte received cancels its keep-alive timer, so a client dripping one header byte a
second holds a connection for ever. :class:`HeadDeadlineProtocol` adds that deadline
(``KLEINSERVE_REQUEST_HEAD_TIMEOUT``): from the connection's start, or the end of its previous
response, until a request's headers are complete; past it the connection is closed. The body's
own deadline is the request guard's (``api/guard.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from kleinserve.settings import Settings


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers."""

    head_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm_head_timer()  # a request's headers are in: the app (and the guard) has it now

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is None or self.cycle.response_complete:  # no pipelined request started meanwhile
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol_for(settings: Settings) -> type[HeadDeadlineProtocol]:
    """The protocol class with this server's header deadline."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout": settings.request_head_timeout})


def run(app: Any, settings: Settings) -> None:
    """Serve ``app`` on the settings' host and port until interrupted."""
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep configure_logging's handler; uvicorn's records go through it
        access_log=False,  # api/access_log.py writes the access lines (with request ids and durations)
        http=protocol_for(settings),
        timeout_keep_alive=int(max(1, settings.keep_alive_timeout)),
        limit_concurrency=settings.limit_concurrency,
        timeout_graceful_shutdown=30,
    )
