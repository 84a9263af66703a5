"""The job store backends every contract suite runs against (``JobStore``, ``EventBus``, admission).

Each backend is a name and a :class:`Backend`: how to make a fresh store for one test, the event bus
that goes with it, and a key store on the same database (credits are read from its usage). To run
the suites against another backend, add an entry to ``BACKENDS`` (PostgreSQL: factories that ask for
the ``pg_url`` fixture through ``request``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from kleinserve.jobs.events import EventBus, StoreEventBus
from kleinserve.jobs.store import JobStore, SQLiteJobStore
from kleinserve.keys import ApiKeyStore, KeyStore


@dataclass(frozen=True)
class Backend:
    make_store: Callable[[pytest.FixtureRequest, Path], JobStore]
    make_bus: Callable[[JobStore], EventBus]
    make_keys: Callable[[pytest.FixtureRequest, Path], ApiKeyStore]  # on the same database


def _sqlite_store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    return SQLiteJobStore(tmp_path / "jobs.sqlite3")


def _sqlite_keys(request: pytest.FixtureRequest, tmp_path: Path) -> ApiKeyStore:
    return KeyStore(tmp_path / "jobs.sqlite3")


def _store_bus(store: JobStore) -> EventBus:
    return StoreEventBus(store, poll_interval=0.05)


BACKENDS: dict[str, Backend] = {
    "sqlite": Backend(_sqlite_store, _store_bus, _sqlite_keys),
}


def _postgres_store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    from kleinserve.jobs.store.postgres import PgJobStore

    return PgJobStore(request.getfixturevalue("pg_url"))  # a fresh database for the test


def _postgres_bus(store: JobStore) -> EventBus:
    from kleinserve.jobs.store.postgres import PgJobStore
    from kleinserve.postgres.bus import PgEventBus

    assert isinstance(store, PgJobStore)
    return PgEventBus(store, poll_interval=30)  # a poll too slow for any test: NOTIFY alone must wake it


def _postgres_keys(request: pytest.FixtureRequest, tmp_path: Path) -> ApiKeyStore:
    from kleinserve.postgres.keys import PgKeyStore

    return PgKeyStore(request.getfixturevalue("pg_url"))  # the same database as the store


BACKENDS["postgres"] = Backend(_postgres_store, _postgres_bus, _postgres_keys)
