"""Job events, and the bus that hands them to subscribers (SSE streams, sync waiters).

Every event is a row in the job store, which numbers it; the number is the SSE ``id``, so a client
that reconnects with ``Last-Event-ID`` gets everything it missed, across restarts and from any API
process. Status events are written by the store in the same transaction as the change they report
(:func:`lifecycle_event`), so the log and the jobs never disagree.

:class:`EventBus` is the protocol; :class:`StoreEventBus` implements it over any job store: one
reader thread per process reads the log in order (woken by :meth:`StoreEventBus.notify` when this
process wrote, else polling) and hands each event to every subscriber it concerns. Delivery is
strictly by number with no gaps, because it *is* the stored order: nothing is pushed around the
store, so no event can overtake another or be dropped. A terminal event carries what a client needs
(the result or the error), so neither SSE nor sync waiters reload the job per subscriber.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

import anyio.to_thread
from pydantic import BaseModel, Field

from kleinserve.jobs.job import Job, JobStatus, now

if TYPE_CHECKING:
    from kleinserve.jobs.store.base import JobStore

log = logging.getLogger(__name__)


class EventType(StrEnum):
    """What happened to a job."""

    QUEUED = "job.queued"
    STARTED = "job.started"
    PROGRESS = "job.progress"
    PREVIEW = "job.preview"  # a preview image of a running job (jobs/previews.py)
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


def lifecycle_event(before: Job | None, after: Job) -> Event | None:
    """The event a status change produces (``None`` for a job handed back to the queue).

    Stores call it inside the transaction that saves ``after``. Terminal events carry everything a
    client renders: the result (succeeded), the error (failed), and the dialect's echoed fields.
    """
    if before is not None and before.status is after.status:
        return None
    status = after.status
    if status is JobStatus.QUEUED:
        return None if before is not None else Event.for_job(EventType.QUEUED, after, model=after.request.model)
    if status is JobStatus.PROCESSING:
        return Event.for_job(EventType.STARTED, after, model=after.request.model, attempt=after.attempts)
    # Terminal events carry the job's final state, so waiters need not reload it.
    state = after.model_dump(mode="json", include=_FINAL_FIELDS)
    if status is JobStatus.SUCCEEDED:
        outputs = after.result.outputs if after.result else []
        return Event.for_job(
            EventType.SUCCEEDED,
            after,
            model=after.request.model,
            outputs=[o.key for o in outputs],
            extra=after.extra,
            state=state,
        )
    if status is JobStatus.FAILED:
        return Event.for_job(EventType.FAILED, after, error=after.error_message, code=after.error_code, state=state)
    return Event.for_job(EventType.CANCELLED, after, state=state)


# What a terminal event carries of the job (everything that can change after submission).
_FINAL_FIELDS = {
    "status",
    "started_at",
    "completed_at",
    "attempts",
    "progress_step",
    "progress_total",
    "error_code",
    "error_message",
    "result",
    "safety",
    "worker_id",
    "cancel_requested",
}


def finished_job(job: Job, event: Event) -> Job:
    """``job`` as its terminal ``event`` left it (what a sync waiter returns, without a reload)."""
    if event.type not in TERMINAL_EVENTS:
        raise ValueError(f"{event.type.value} is not a terminal event")
    state = event.data.get("state")
    if not isinstance(state, dict):  # an event stored before events carried the state
        raise ValueError("this event does not carry the job's final state")
    return Job.model_validate({**job.model_dump(mode="json"), **state, "lease_until": None})


class EventBus(Protocol):
    """Delivers stored events to subscribers in order, from any process's writes."""

    def publish(self, event: Event) -> Event:
        """Store an event (numbering it) and deliver it."""

    def notify(self) -> None:
        """This process just stored events (through the store): deliver them now, not at the next poll."""

    def subscribe(
        self, *, after: int | None = None, owner: str | None = None, all_owners: bool = True
    ) -> AbstractAsyncContextManager[AsyncIterator[Event]]:
        """Events from now on, or (``after``) every event numbered above it, then live ones:
        a replay. ``all_owners=False`` keeps only events of jobs owned by ``owner``."""

    def close(self) -> None:
        """Stop delivering."""


_PAGE = 1000


@dataclass(eq=False)  # identity-hashed: each subscription is its own entry in the set
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    owner: str | None
    all_owners: bool
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)

    def sees(self, event: Event) -> bool:
        return self.all_owners or event.owner == self.owner


class StoreEventBus:
    """:class:`EventBus` over a :class:`JobStore`'s event log (any backend).

    One reader thread per bus, started with the first subscriber, reads every event above the last
    one it delivered, in pages, and queues each on the loop of every subscriber that may see it
    (``call_soon_threadsafe`` keeps their order). It wakes when :meth:`notify` is called, and polls
    every ``poll_interval`` seconds for events other processes wrote (a PostgreSQL bus calls
    :meth:`notify` on ``NOTIFY`` instead of waiting for the poll).
    """

    def __init__(self, store: JobStore, poll_interval: float = 0.1) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self._subscribers: set[_Subscriber] = set()
        self._lock = threading.Lock()  # guards _subscribers and _last together
        self._last = store.last_seq()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self, event: Event) -> Event:
        stored = self.store.append_event(event)
        self.notify()
        return stored

    def notify(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="event-bus", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.poll_interval)
            self._wake.clear()
            try:
                self.pump()
            except Exception:  # the store is briefly unavailable: try again at the next poll
                log.exception("event bus: cannot read events")

    def pump(self) -> None:
        """Deliver every stored event above the last delivered one (the reader thread calls it)."""
        while True:
            with self._lock:
                if not self._subscribers:
                    self._last = max(self._last, self.store.last_seq())
                    return
                last = self._last
            page = self.store.events_after(last, limit=_PAGE)
            with self._lock:
                for event in page:
                    if event.seq <= self._last:
                        continue
                    for sub in list(self._subscribers):
                        if sub.sees(event):
                            try:
                                sub.loop.call_soon_threadsafe(sub.queue.put_nowait, event)
                            except RuntimeError:  # its loop has closed: it is going away
                                self._subscribers.discard(sub)
                    self._last = event.seq
            if len(page) < _PAGE:
                return

    @asynccontextmanager
    async def subscribe(
        self, *, after: int | None = None, owner: str | None = None, all_owners: bool = True
    ) -> AsyncIterator[AsyncIterator[Event]]:
        sub = _Subscriber(asyncio.get_running_loop(), owner, all_owners)
        self._start()
        stored = await anyio.to_thread.run_sync(self.store.last_seq)  # never a store call on the loop
        with self._lock:
            if not self._subscribers:  # nobody listened: the reader may not have kept up
                self._last = max(self._last, stored)
            self._subscribers.add(sub)
            # Everything numbered up to here was delivered before this subscriber existed; it
            # replays that part from the store, and gets everything above it live.
            joined_at = self._last
        try:
            yield self._iterate(sub, after, joined_at)
        finally:
            with self._lock:
                self._subscribers.discard(sub)

    async def _iterate(self, sub: _Subscriber, after: int | None, joined_at: int) -> AsyncIterator[Event]:
        last = joined_at if after is None else after
        while last < joined_at:
            read = functools.partial(
                self.store.events_after, last, owner=sub.owner, any_owner=sub.all_owners, limit=_PAGE
            )
            page = await anyio.to_thread.run_sync(read)
            for event in page:
                if event.seq > joined_at:
                    break
                last = event.seq
                yield event
            if len(page) < _PAGE or (page and page[-1].seq >= joined_at):
                break
        last = max(last, joined_at) if after is None or after <= joined_at else after
        while True:
            event = await sub.queue.get()
            if event.seq > last:
                last = event.seq
                yield event
