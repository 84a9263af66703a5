"""Which database backs jobs, events, keys and limits, decided from the settings alone.

``KLEINSERVE_DATABASE_URL`` unset (the embedded default): SQLite in ``DATA_DIR/jobs.sqlite3``, one
file holding every table; ``sqlite:///PATH`` names another file. ``postgresql://...``: PostgreSQL,
one connection pool shared by the stores of this process, so any number of ``api`` and ``worker``
processes on any hosts share one queue, one event log, one key table and the same limits.
PostgreSQL modules are imported only when chosen.

Each function returns one seam's implementation: :func:`job_store` (jobs, leases, workers, events,
admission), :func:`event_bus` (delivery of those events) and :func:`key_store`. Adding a backend means
implementing the protocols in ``jobs/store/base.py`` and ``keys.py``, passing their contract suites
(``tests/jobs/backends.py`` lists the backends they run against) and choosing it here by URL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kleinserve.jobs.events import EventBus, StoreEventBus
from kleinserve.jobs.store.base import JobStore
from kleinserve.keys import ApiKeyStore
from kleinserve.settings import Settings
from kleinserve.webhooks.store import WebhookStore

if TYPE_CHECKING:
    from kleinserve.postgres.database import PgDatabase

SQLITE_FILE = "jobs.sqlite3"


def uses_postgres(settings: Settings) -> bool:
    return bool(settings.database_url) and not str(settings.database_url).startswith("sqlite:///")


def sqlite_path(settings: Settings) -> Path:
    """The SQLite file (when SQLite is the backend)."""
    url = settings.database_url
    if url and url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return settings.data_dir / SQLITE_FILE


def job_store(settings: Settings) -> JobStore:
    """The job store the settings ask for (close it when done).

    On PostgreSQL it owns the process's connection pool (``KLEINSERVE_DATABASE_POOL`` connections);
    :func:`key_store` and :func:`webhook_store` given this store borrow that pool rather than open
    their own, so a process holds one pool, not one per store."""
    if uses_postgres(settings):
        from kleinserve.jobs.store.postgres import PgJobStore
        from kleinserve.postgres.database import PgDatabase

        assert settings.database_url is not None
        return PgJobStore(PgDatabase(settings.database_url, max_size=settings.database_pool), owned=True)
    from kleinserve.jobs.store.sqlite import SQLiteJobStore

    return SQLiteJobStore(sqlite_path(settings))


def event_bus(settings: Settings, store: JobStore) -> EventBus:
    """The event bus over ``store``: it reads the store's event log in order and polls for what
    other processes wrote (every ``KLEINSERVE_EVENT_POLL`` seconds). With PostgreSQL a ``LISTEN``
    thread also wakes it on every ``NOTIFY`` (``kleinserve.postgres.bus``), so events other processes
    write arrive at once and the poll (at least every second there) is only a safety net."""
    if uses_postgres(settings):
        from kleinserve.jobs.store.postgres import PgJobStore
        from kleinserve.postgres.bus import PgEventBus

        assert isinstance(store, PgJobStore)
        return PgEventBus(store, poll_interval=max(settings.event_poll, 1.0))
    return StoreEventBus(store, poll_interval=settings.event_poll)


def key_store(settings: Settings, jobs: JobStore | None = None) -> ApiKeyStore:
    """The API key store the settings ask for (close it when done); on PostgreSQL it shares the pool
    of ``jobs`` when given one (closing the key store then leaves the pool to ``jobs``)."""
    if uses_postgres(settings):
        from kleinserve.postgres.keys import PgKeyStore

        assert settings.database_url is not None
        return PgKeyStore(_pool_of(jobs) or settings.database_url)
    from kleinserve.keys import KeyStore

    return KeyStore(sqlite_path(settings))


def webhook_store(settings: Settings, jobs: JobStore | None = None) -> WebhookStore:
    """The webhook delivery store the settings ask for (close it when done); shares the pool of
    ``jobs`` on PostgreSQL, as :func:`key_store` does."""
    if uses_postgres(settings):
        from kleinserve.postgres.webhooks import PgWebhookStore

        assert settings.database_url is not None
        return PgWebhookStore(_pool_of(jobs) or settings.database_url)
    from kleinserve.webhooks.store import SQLiteWebhookStore

    return SQLiteWebhookStore(sqlite_path(settings))


def _pool_of(jobs: JobStore | None) -> PgDatabase | None:
    """The PostgreSQL pool of ``jobs``, when it is a PostgreSQL job store."""
    database = getattr(jobs, "database", None)
    from kleinserve.postgres.database import PgDatabase

    return database if isinstance(database, PgDatabase) else None


@contextlib.contextmanager
def opened_key_store(settings: Settings) -> Iterator[ApiKeyStore]:
    """:func:`key_store`, closed when the block ends."""
    store = key_store(settings)
    try:
        yield store
    finally:
        store.close()
