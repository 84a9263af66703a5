"""A job accepted is never lost: kill -9 and SIGTERM mid-job, restart, and every job ends well."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import ServerProcess, running_together
from tests.conftest import ImageServer, png_bytes

MODEL = "black-forest-labs-flux-2-klein-4b"
# Slow enough on a tiny model (a few seconds) to be caught mid-run.
SLOW = {"model": MODEL, "prompt": "slow", "image_size": {"width": 512, "height": 512}, "num_inference_steps": 40}
QUICK = {"model": MODEL, "prompt": "quick", "image_size": {"width": 64, "height": 64}}


def enqueue(server: ServerProcess, body: dict[str, Any]) -> str:
    response = httpx.post(f"{server.url}/api/ai/queue", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return str(response.json()["generations"][0]["generation_id"])


def item(server: ServerProcess, generation_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/api/ai/queue/{generation_id}", timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_until_running(server: ServerProcess, generation_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while item(server, generation_id)["progress_step"] < 1:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)


def wait_terminal(server: ServerProcess, generation_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = item(server, generation_id)
        if current["status"] in ("succeeded", "failed", "cancelled"):
            return current
        time.sleep(0.1)
    raise TimeoutError(generation_id)


def assert_graceful(server: ServerProcess, returncode: int) -> None:
    # uvicorn re-raises the signal it caught once its graceful shutdown is done.
    assert returncode in (0, -signal.SIGTERM, -signal.SIGINT), returncode
    assert "Application shutdown complete." in server.log()


@pytest.fixture(scope="module")
def servers(tiny_distilled: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """The module's servers, each on a data dir of its own (so its restarts see its jobs), started side
    by side: ``restarted`` (defaults), ``one_attempt`` (one attempt per job) and ``bounded`` (room for two
    jobs). No fetch allow-list on any. A test stops and restarts a server as it needs (see :func:`running`)."""
    env = {"restarted": {}, "one_attempt": {"KLEINSERVE_MAX_ATTEMPTS": "1"}, "bounded": {"KLEINSERVE_MAX_QUEUE": "2"}}
    made = {
        name: ServerProcess(
            tmp_path_factory.mktemp(name), [f"flux-2-klein-4b={tiny_distilled}"], "--dtype", "float32", env=extra
        )
        for name, extra in env.items()
    }
    with running_together(made.values(), stop=signal.SIGKILL):
        yield made


def running(server: ServerProcess) -> ServerProcess:
    """``server``, started unless it runs already (an earlier test may have stopped it)."""
    if server.process is None or server.process.poll() is not None:
        server.start()
    return server


@pytest.fixture
def bounded(servers: dict[str, ServerProcess]) -> ServerProcess:
    return running(servers["bounded"])


def test_kill_9_mid_job_then_restart_finishes_every_job(servers: dict[str, ServerProcess]) -> None:
    server = running(servers["restarted"])
    done_before = enqueue(server, QUICK)
    wait_terminal(server, done_before)
    slow = enqueue(server, SLOW)
    waiting = enqueue(server, QUICK)
    wait_until_running(server, slow)
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL

    server.start()  # same data dir, new process
    finished = wait_terminal(server, slow)
    assert finished["status"] == "succeeded" and finished["result_url"]
    assert wait_terminal(server, waiting)["status"] == "succeeded"
    before = item(server, done_before)
    assert before["status"] == "succeeded" and httpx.get(before["result_url"]).status_code == 200
    assert "requeued" in server.log() or "recovered" in server.log()
    # SIGTERM's graceful stop is checked below (with a running job); Ctrl-C must stop as cleanly.
    assert_graceful(server, server.stop(signal.SIGINT))


def test_sigterm_requeues_the_running_job_without_spending_an_attempt(servers: dict[str, ServerProcess]) -> None:
    server = running(servers["one_attempt"])
    job = enqueue(server, SLOW)
    wait_until_running(server, job)
    assert_graceful(server, server.stop(signal.SIGTERM))
    assert "requeued at shutdown" in server.log()

    server.start()
    # With one attempt allowed, only a graceful requeue (which spends none) lets it run again.
    assert wait_terminal(server, job)["status"] == "succeeded"


def test_a_job_interrupted_too_often_fails_with_a_reason(servers: dict[str, ServerProcess]) -> None:
    server = running(servers["one_attempt"])
    job = enqueue(server, SLOW)
    wait_until_running(server, job)
    server.stop(signal.SIGKILL)

    server.start()
    failed = wait_terminal(server, job)
    assert failed["status"] == "failed" and failed["error_message"].startswith("interrupted")
    assert_graceful(server, server.stop())


def test_full_queue_is_503_with_retry_after(bounded: ServerProcess) -> None:
    server = bounded
    enqueue(server, SLOW)
    enqueue(server, QUICK)
    response = httpx.post(f"{server.url}/api/ai/queue", json=QUICK, timeout=30)
    assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
    assert response.json()["error"]["type"] == "service_unavailable"
    # Sync requests share the same queue and the same bound.
    sync = httpx.post(f"{server.url}/api/ai/images/generate", json=QUICK, timeout=30)
    assert sync.status_code == 503 and "queue is full" in sync.json()["error"]["detail"]
    # A known variant this server does not serve is an unknown model here, listing what is served.
    other = httpx.post(f"{server.url}/api/ai/queue", json={**QUICK, "model": "flux2-klein-base-9b"}, timeout=30)
    assert other.status_code == 404 and "known models: flux-2-klein-4b" in other.json()["error"]["detail"]


def test_without_an_allow_list_loopback_images_are_refused(bounded: ServerProcess, image_server: ImageServer) -> None:
    server = bounded
    url = image_server.add("private.png", png_bytes(64, 64))
    # URLs are fetched (and refused) when the job is submitted: a 400 at once, no job.
    response = httpx.post(f"{server.url}/api/ai/queue", json={**QUICK, "input_image": url}, timeout=30)
    assert response.status_code == 400
    detail = response.json()["error"]["detail"]
    assert "loopback address" in detail and "KLEINSERVE_FETCH_ALLOW" in detail
