"""Which database backs jobs, events, keys and limits, decided from the settings alone.

``KLEINSERVE_DATABASE_URL`` unset (the embedded default): SQLite in ``DATA_DIR/jobs.sqlite3``, one
file holding every table; ``sqlite:///PATH`` names another file. ``postgresql://...``: PostgreSQL,
one connection pool shared by the stores of this process, so any number of ``api`` and ``worker``
processes on any hosts share one queue, one event log, one key table and the same limits.
PostgreSQL modules are imported only when chosen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from kleinserve.keys import ApiKeyStore
from kleinserve.settings import Settings

SQLITE_FILE = "jobs.sqlite3"


def uses_postgres(settings: Settings) -> bool:
    return bool(settings.database_url) and not str(settings.database_url).startswith("sqlite:///")


def sqlite_path(settings: Settings) -> Path:
    """The SQLite file (when SQLite is the backend)."""
    url = settings.database_url
    if url and url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return settings.data_dir / SQLITE_FILE


def key_store(settings: Settings) -> ApiKeyStore:
    """The API key store the settings ask for (close it when done)."""
    if uses_postgres(settings):
        from kleinserve.postgres.keys import PgKeyStore

        assert settings.database_url is not None
        return PgKeyStore(settings.database_url)
    from kleinserve.keys import KeyStore

    return KeyStore(sqlite_path(settings))


@contextlib.contextmanager
def opened_key_store(settings: Settings) -> Iterator[ApiKeyStore]:
    """:func:`key_store`, closed when the block ends."""
    store = key_store(settings)
    try:
        yield store
    finally:
        store.close()
