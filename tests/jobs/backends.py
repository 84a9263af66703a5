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
