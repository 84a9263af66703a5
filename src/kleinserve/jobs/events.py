"""Job events and the in-process bus that fans them out to subscribers (SSE streams, sync waiters).

Every event is first written to the job store, which numbers it; the number is the SSE ``id``, so
a client that reconnects with ``Last-Event-ID`` gets everything it missed, across restarts too.
Workers publish from their own threads; subscribers are asyncio tasks on the server's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from kleinserve.jobs.job import Job, now

if TYPE_CHECKING:
    from kleinserve.jobs.store.base import JobStore


class EventType(StrEnum):
    """What happened to a job."""

    QUEUED = "job.queued"
    STARTED = "job.started"
    PROGRESS = "job.progress"
    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    CANCELLED = "job.cancelled"


TERMINAL_EVENTS = frozenset({EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED})


class Event(BaseModel):
    """One thing that happened to one job; ``seq`` is given by the store and orders all events."""

    seq: int = 0
    type: EventType
    job_id: str
    owner: str | None = None
    created_at: float = Field(default_factory=now)
    data: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def for_job(cls, type: EventType, job: Job, **data: Any) -> Event:
        return cls(type=type, job_id=job.id, owner=job.owner, data=data)


_REPLAY_PAGE = 1000


@dataclass(eq=False)  # identity-hashed: each subscription is its own entry in the set
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    owner: str | None = None
    all_owners: bool = True


class EventBus:
    """Stores every published event, then hands it to every live subscriber."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._subscribers: set[_Subscriber] = set()
        self._lock = threading.Lock()

    def publish(self, event: Event) -> Event:
        """Persist and deliver ``event``; safe to call from any thread."""
        stored = self.store.append_event(event)
        self.deliver(stored)
        return stored

    def deliver(self, stored: Event) -> None:
        """Hand an already stored (numbered) event to every live subscriber that may see it."""
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            if sub.all_owners or sub.owner == stored.owner:
                # RuntimeError: the subscriber's loop has closed; it is going away.
                with contextlib.suppress(RuntimeError):
                    sub.loop.call_soon_threadsafe(sub.queue.put_nowait, stored)

    @asynccontextmanager
    async def subscribe(
        self, *, after: int | None = None, owner: str | None = None, all_owners: bool = True
    ) -> AsyncIterator[AsyncIterator[Event]]:
        """Events from now on (and, with ``after``, every stored event numbered above it).

        ``all_owners=False`` restricts the stream to events of jobs owned by ``owner``.
        """
        sub = _Subscriber(asyncio.get_running_loop(), owner=owner, all_owners=all_owners)
        with self._lock:
            self._subscribers.add(sub)
        try:
            yield self._iterate(sub, after)
        finally:
            with self._lock:
                self._subscribers.discard(sub)

    async def _iterate(self, sub: _Subscriber, after: int | None) -> AsyncIterator[Event]:
        last = -1
        if after is not None:
            # Registered before replaying, so nothing published meanwhile is lost; seq dedupes.
            last = after
            while True:
                page = await asyncio.to_thread(
                    self.store.events_after, last, owner=sub.owner, any_owner=sub.all_owners, limit=_REPLAY_PAGE
                )
                for event in page:
                    last = event.seq
                    yield event
                if len(page) < _REPLAY_PAGE:
                    break
        while True:
            event = await sub.queue.get()
            if event.seq > last:
                last = event.seq
                yield event
