"""PostgreSQL event numbers become visible in order, and NOTIFY wakes readers with the number.

A reader that resumes after the highest number it has seen (an SSE client with ``Last-Event-ID``,
the bus's reader) must never find a smaller number appearing later. Writers here hold their
transactions open for a random moment after inserting, as real ones do (admission, job updates),
on separate connections, while a reader pages through ``events_after`` as fast as it can.
"""

from __future__ import annotations

import random
import threading

import psycopg

from kleinserve.jobs.events import Event, EventType
from kleinserve.jobs.store.postgres import PgJobStore, insert_events
from kleinserve.postgres.database import PgDatabase
from kleinserve.postgres.notify import EVENTS_CHANNEL, PgNotifier

WRITERS = 6
EACH = 25


def event(n: int) -> Event:
    return Event(type=EventType.PROGRESS, job_id=f"job-{n}", data={"n": n})


def test_event_numbers_never_become_visible_out_of_order(pg_url: str) -> None:
    store = PgJobStore(PgDatabase(pg_url, max_size=WRITERS + 2))
    done = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def write(writer: int) -> None:
        rng = random.Random(writer)
        try:
            for i in range(EACH):
                with store.database.transaction() as db:
                    insert_events(db, [event(writer * 1000 + i)])
                    db.execute("SELECT pg_sleep(%s)", (rng.random() * 0.004,))  # commit a little later
        except BaseException as err:
            errors.append(err)

    def read() -> None:
        last = 0
        while True:
            finished = done.is_set()  # read once more after the writers are done
            for stored in store.events_after(last):
                seen.append(stored.seq)
                last = stored.seq
            if finished:
                return

    writers = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
    reader = threading.Thread(target=read)
    reader.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    reader.join()
    try:
        assert errors == []
        with store.database.connection() as db:
            stored = [row[0] for row in db.execute("SELECT seq FROM events ORDER BY seq")]
        assert len(stored) == WRITERS * EACH
        # Every event was seen by the reader that only ever asked for numbers above the last it saw.
        assert seen == stored
    finally:
        store.database.close()


def test_notify_carries_only_the_number(pg_url: str) -> None:
    store = PgJobStore(pg_url)
    notifier = PgNotifier(pg_url)
    try:
        notifier.listen()
        assert notifier.wait(timeout=0.05) is None
        first = store.append_event(event(1))
        second = store.append_event(event(2))
        woken = [notifier.wait(timeout=10)]
        while woken[-1] != second.seq:  # one wake-up may cover both
            woken.append(notifier.wait(timeout=10))
        assert set(woken) <= {first.seq, second.seq}
        with psycopg.connect(pg_url, autocommit=True) as conn, conn.transaction():
            conn.execute("SELECT pg_notify(%s, '7')", (EVENTS_CHANNEL,))
            conn.execute("SELECT 1")
        assert notifier.wait(timeout=10) == 7
    finally:
        notifier.close()
        store.close()


def test_notifier_survives_a_dropped_connection(pg_url: str) -> None:
    store = PgJobStore(pg_url)
    notifier = PgNotifier(pg_url)
    try:
        notifier.listen()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()"
            )
        assert notifier.wait(timeout=1) is None  # noticed the drop; reconnects on the next wait
        notifier.listen()
        stored = store.append_event(event(3))
        assert notifier.wait(timeout=10) == stored.seq
    finally:
        notifier.close()
        store.close()
