"""Storage backends for the contract suite: each one real, each reached over HTTP as clients reach it.

A :class:`Backend` is a storage plus ``get(url)``, the way a client downloads a link: for local disk,
the server's own ``/files`` route (the real app, in process); for S3, a plain HTTP GET against the
session's SeaweedFS server (tests/services/seaweed.py), under a prefix of the test's own. Add a
backend here and every test in ``test_contract.py`` runs against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from kleinserve.api.app import create_app
from kleinserve.settings import Settings
from kleinserve.storage.base import Storage
from tests.services.seaweed import S3Server


@dataclass
class Backend:
    name: str
    storage: Storage
    get: Callable[[str], httpx.Response]


def local_backend(tmp_path: Path) -> Iterator[Backend]:
    # The whole app without its lifespan: no models load, but /files and the error handlers are real.
    app = create_app(Settings(data_dir=tmp_path / "data", public_url="http://testserver"), served=[])
    client = TestClient(app)
    try:
        yield Backend("local", app.state.runtime.storage, client.get)
    finally:
        client.close()
        app.state.runtime.store.close()


def s3_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    server: S3Server = request.getfixturevalue("seaweed")
    prefix: str = request.getfixturevalue("s3_prefix")
    with httpx.Client(timeout=30) as client:
        yield Backend("s3", server.storage(prefix), client.get)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Iterator[Backend]]] = {
    "local": lambda request, tmp_path: local_backend(tmp_path),
    "s3": lambda request, tmp_path: s3_backend(request),
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from BACKENDS[request.param](request, tmp_path)
