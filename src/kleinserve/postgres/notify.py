"""Wake-ups over ``LISTEN/NOTIFY``: a notification carries only an event number, never the event.

The events table stays the one source of events (for live delivery and for replay alike); a
notification only says "there is something at or below this number, go and read it". So a lost
notification (a dropped connection, a listener that reconnects) costs latency, never an event: the
reader also polls at a slow interval and always reads everything above the last number it delivered.
"""

from __future__ import annotations

import contextlib
import logging
import time

import psycopg

log = logging.getLogger(__name__)

#: The channel event inserts notify (payload: the new event's number).
EVENTS_CHANNEL = "kleinserve_events"


class PgNotifier:
    """Waits for notifications on one channel over a dedicated connection (one reader thread)."""

    def __init__(self, url: str, channel: str = EVENTS_CHANNEL) -> None:
        self.url = url
        self.channel = channel
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.url, autocommit=True)
            self._conn.execute(f'LISTEN "{self.channel}"')
        return self._conn

    def listen(self) -> None:
        """Start listening now (call before the first read, so nothing committed after it is missed)."""
        self._connect()

    def wait(self, timeout: float) -> int | None:
        """Block until a notification arrives or ``timeout`` passes; return the highest number
        notified, or ``None`` (timed out, or the connection dropped and will be reopened)."""
        try:
            conn = self._connect()
            highest: int | None = None
            for notify in conn.notifies(timeout=timeout, stop_after=1):
                highest = max(highest or 0, int(notify.payload or 0))
            # Drain whatever else is already there without waiting.
            for notify in conn.notifies(timeout=0):
                highest = max(highest or 0, int(notify.payload or 0))
            return highest
        except psycopg.Error as err:
            log.warning("event notifications interrupted (%s); reconnecting", err)
            self.close()
            time.sleep(min(timeout, 1.0))  # the database may be down: do not spin
            return None

    def wake(self) -> None:
        """Wake a :meth:`wait` blocked in another thread now (a notification of number 0, which every
        listener on the channel reads as "nothing new"), so closing a reader never waits out a timeout."""
        with contextlib.suppress(psycopg.Error), psycopg.connect(self.url, autocommit=True, connect_timeout=1) as conn:
            conn.execute("SELECT pg_notify(%s, '0')", (self.channel,))

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
