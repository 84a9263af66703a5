"""Attacks from the security probe (issue 10), each performed against a real server process.

One module server, started open on loopback, is tightened by the first test (a key is created
while it runs), so every test here runs against a server that requires keys and whose key table
the tests change; the shared session server is used where an open server is the point.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kleinserve.jobs.store.sqlite import SQLiteJobStore
from kleinserve.keys import KeyStore
from tests.api.conftest import ServerProcess

MODEL = "black-forest-labs-flux-2-klein-4b"
SMALL = {"model": MODEL, "prompt": "guarded", "image_size": {"width": 64, "height": 64}}
SLOW = {**SMALL, "image_size": {"width": 512, "height": 512}, "num_inference_steps": 50}


class Guarded:
    """The module's server and a handle on its key table and job store."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.keys = KeyStore(server.data_dir / "jobs.sqlite3")
        self.secrets: dict[str, str] = {}

    @property
    def url(self) -> str:
        return self.server.url

    def create(self, name: str, **limits: Any) -> dict[str, str]:
        _, secret = self.keys.create(name, **limits)
        self.secrets[name] = secret
        return self.auth(name)

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[name]}"}

    def job_status(self, job_id: str) -> str:
        store = SQLiteJobStore(self.server.data_dir / "jobs.sqlite3")
        try:
            job = store.get(job_id)
            assert job is not None
            return job.status.value
        finally:
            store.close()


@pytest.fixture(scope="module")
def guarded(tiny_distilled: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    server = ServerProcess(
        tmp_path_factory.mktemp("guarded"),
        [f"flux-2-klein-4b={tiny_distilled}"],
        "--dtype",
        "float32",
        env={"KLEINSERVE_REVOCATION_INTERVAL": "0.2", "KLEINSERVE_KEEPALIVE_INTERVAL": "0.5"},
    ).start()
    yield Guarded(server)
    server.stop()


class Stream:
    """An SSE stream read in a thread; ``ended`` is set when the server closes it."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.status = 0
        self.opened = threading.Event()
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(url, headers or {}), daemon=True)
        self.thread.start()
        assert self.opened.wait(30), "the stream did not open"

    def _read(self, url: str, headers: dict[str, str]) -> None:
        try:
            with httpx.stream("GET", f"{url}/api/events", headers=headers, timeout=30) as response:
                self.status = response.status_code
                self.opened.set()
                for line in response.iter_lines():
                    self.lines.append(line)
        except httpx.HTTPError as err:  # the server went away (module teardown), not a clean end
            self.lines.append(f"error: {err!r}")
        finally:
            self.opened.set()
            self.ended.set()


def until(predicate: Any, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_open_server_tightens_and_revoking_the_last_key_never_reopens_it(guarded: Guarded) -> None:
    anonymous = httpx.get(f"{guarded.url}/api/ai/queue", params={"status": "succeeded"})
    assert anonymous.status_code == 200  # started open: loopback, no keys
    stream = Stream(guarded.url)
    assert stream.status == 200

    headers = guarded.create("first")  # created while the server runs: keys are required from now on
    assert httpx.get(f"{guarded.url}/api/ai/queue").status_code == 401
    assert stream.ended.wait(30), "an anonymous event stream outlived the server's switch to keys"

    done = httpx.post(f"{guarded.url}/api/ai/images/generate", json=SMALL, headers=headers, timeout=60)
    assert done.status_code == 200
    guarded.keys.revoke("first")  # the last (only) active key
    time.sleep(1)  # several revocation checks
    for path in ("/api/ai/queue?status=succeeded", "/v1/models", "/api/ai/models"):
        response = httpx.get(guarded.url + path)
        assert response.status_code == 401, (path, response.text)
    assert httpx.get(f"{guarded.url}/api/ai/queue", headers=headers).status_code == 401


def test_revoking_a_key_cancels_its_jobs_and_ends_its_streams(guarded: Guarded) -> None:
    doomed = guarded.create("doomed")
    bystander = guarded.create("bystander")
    running = httpx.post(f"{guarded.url}/api/ai/queue", json=SLOW, headers=doomed, timeout=60)
    waiting = httpx.post(f"{guarded.url}/api/ai/queue", json=SLOW, headers=doomed, timeout=60)
    assert running.status_code == 200 and waiting.status_code == 200
    ids = [r.json()["generations"][0]["generation_id"] for r in (running, waiting)]
    stream = Stream(guarded.url, doomed)
    assert stream.status == 200
    other = Stream(guarded.url, bystander)

    guarded.keys.revoke("doomed")
    assert until(lambda: all(guarded.job_status(i) == "cancelled" for i in ids)), [guarded.job_status(i) for i in ids]
    assert stream.ended.wait(30), "a revoked key's event stream stayed open"
    assert not other.ended.is_set()  # other keys' streams are untouched
    assert httpx.get(f"{guarded.url}/api/ai/queue", headers=doomed).status_code == 401
