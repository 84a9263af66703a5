"""The event bus on PostgreSQL: the store's event log, woken by ``LISTEN/NOTIFY`` from any process.

:class:`PgEventBus` is :class:`~kleinserve.jobs.events.StoreEventBus` (one reader per process,
delivery strictly by event number, gaps filled from the events table) with one more wake-up source:
a listener thread turns each ``NOTIFY`` (which carries only an event number, see
``postgres/notify.py``) into :meth:`~kleinserve.jobs.events.StoreEventBus.notify`. So an SSE client
on one API replica sees a worker's progress at once, and the slow poll remains only as a safety net
for a lost notification.
"""

from __future__ import annotations

import threading

from kleinserve.jobs.events import StoreEventBus
from kleinserve.jobs.store.postgres import PgJobStore
from kleinserve.postgres.notify import PgNotifier

#: With notifications, polling is only the fallback for a dropped listener connection.
FALLBACK_POLL_SECONDS = 2.0


class PgEventBus(StoreEventBus):
    """:class:`~kleinserve.jobs.events.EventBus` on a :class:`PgJobStore`, woken by NOTIFY."""

    def __init__(self, store: PgJobStore, poll_interval: float = FALLBACK_POLL_SECONDS) -> None:
        self._notifier = PgNotifier(store.database.url)
        self._notifier.listen()  # before the first read, so nothing committed after it is missed
        super().__init__(store, poll_interval=poll_interval)
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="event-notify", daemon=True)
        self._listener.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            if self._notifier.wait(timeout=0.5) is not None:
                self.notify()

    def close(self) -> None:
        self._stop.set()
        self._notifier.wake()  # the listener would otherwise finish its 0.5 s wait first
        self._listener.join(5)
        self._notifier.close()
        super().close()
