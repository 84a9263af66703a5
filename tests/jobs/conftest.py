"""Fixtures of the job tests: a fresh store (and bus) of every backend in ``backends.py``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kleinserve.jobs.events import EventBus
from kleinserve.jobs.store import JobStore
from tests.jobs.backends import BACKENDS, Backend


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each backend in turn (the contract suites run once per backend)."""
    return BACKENDS[request.param]


@pytest.fixture
def backend_store(backend: Backend, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    """A fresh job store of the backend."""
    store = backend.make_store(request, tmp_path)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def make_bus(backend: Backend, backend_store: JobStore) -> Iterator[Callable[[], EventBus]]:
    """Event buses of the backend's kind over ``backend_store`` (closed after the test)."""
    buses: list[EventBus] = []

    def make() -> EventBus:
        bus = backend.make_bus(backend_store)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        bus.close()
