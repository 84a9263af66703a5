"""Process roles: ``kleinserve api`` (HTTP only, no torch) and ``kleinserve worker`` (no HTTP) as two
real processes sharing one SQLite data dir, end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import free_port

MODEL = "flux-2-klein-4b"
SMALL = {"model": MODEL, "prompt": "a small test", "image_size": {"width": 64, "height": 64}}
# Short heartbeats so the api notices the worker (and its going away) quickly; a reaper that looks often.
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "KLEINSERVE_HEARTBEAT_SECONDS": "0.5",
    "KLEINSERVE_EVENT_POLL": "0.05",
    "KLEINSERVE_REAP_INTERVAL": "0.5",
}


def test_api_imports_no_torch() -> None:
    code = (
        "import sys; from kleinserve.api.app import create_app; from kleinserve.settings import Settings; "
        "import tempfile; create_app(Settings(data_dir=tempfile.mkdtemp()), role='api'); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kleinserve", *args], stdout=out, stderr=subprocess.STDOUT, env=ENV
        )


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def _models(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{url}/v1/models", timeout=10).json()["data"])


def _until(condition: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    port = free_port()
    process = _start(["api", "--port", str(port), "--data-dir", str(tmp_path)], tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, (tmp_path / "api.log").read_text()
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    _until(ready)
    yield url, process, tmp_path
    _stop(process)


def test_api_and_worker_processes_share_the_queue(
    api: tuple[str, subprocess.Popen[bytes], Path], tiny_distilled: Path, classifiers: dict[str, Path]
) -> None:
    url, api_process, data_dir = api
    # No live worker: the api has no models, and a known model is unavailable (503, Oxen's shape).
    assert httpx.get(f"{url}/api/ai/models").json()["data"] == []
    refused = httpx.post(f"{url}/api/ai/queue", json=SMALL, timeout=30)
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0, refused.text
    assert "no live worker serves model flux-2-klein-4b" in refused.json()["error"]["detail"], refused.text

    maps = Path(f"/proc/{api_process.pid}/maps")
    if maps.exists():
        assert "libtorch" not in maps.read_text()

    metrics_port = free_port()
    worker = _start(
        [
            "worker",
            "--model",
            f"{MODEL}={tiny_distilled}",
            "--data-dir",
            str(data_dir),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--metrics-port",
            str(metrics_port),
            "--safety-checker",  # the safety checker runs where the images are made
            str(classifiers["normal"]),
        ],
        data_dir / "worker.log",
    )
    try:
        models = _until(lambda: httpx.get(f"{url}/api/ai/models").json()["data"])
        assert [m["id"] for m in models] == ["black-forest-labs/flux.2-klein-4b"] or len(models) == 1
        # The api lists each live worker serving the model, with its device.
        (listed,) = httpx.get(f"{url}/v1/models").json()["data"]
        assert [(d["device"], d["state"]) for d in listed["devices"]] == [("cpu", "ready")]
        assert isinstance(listed["devices"][0]["worker"], str)
        # Sync and async submissions through the api are run by the worker.
        sync = httpx.post(f"{url}/api/ai/images/generate", json={**SMALL, "seed": 3}, timeout=120)
        assert sync.status_code == 200, sync.text
        image = httpx.get(sync.json()["images"][0]["url"], timeout=30)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        (done_item,) = httpx.get(f"{url}/api/ai/queue", params={"status": "succeeded"}, timeout=10).json()[
            "generations"
        ]
        assert done_item["safety"]["flagged"] == [False] and done_item["safety"]["policy"] == "blur"
        # The worker counted the job it ran, on its own metrics port (it has no HTTP API).
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(scraped)
            for sample in family.samples
        }
        finished = (("dialect", "oxen"), ("model", MODEL), ("outcome", "succeeded"))
        assert samples[("kleinserve_jobs_finished_total", finished)] == 1
        assert samples[("kleinserve_stage_seconds_count", (("model", MODEL), ("stage", "denoise")))] == 1
        response = httpx.post(
            f"{url}/api/ai/queue",
            json={**SMALL, "image_size": {"width": 512, "height": 512}, "num_inference_steps": 50},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        generation_id = response.json()["generations"][0]["generation_id"]

        def running() -> bool:
            item = httpx.get(f"{url}/api/ai/queue/{generation_id}", timeout=10).json()
            return item["status"] == "processing" and item["progress_step"] >= 1

        _until(running)
        # A cancel through the api reaches the worker through the stored flag.
        httpx.delete(f"{url}/api/ai/queue/{generation_id}", timeout=10)
        done = _until(
            lambda: (
                (j := httpx.get(f"{url}/api/ai/queue/{generation_id}", timeout=10).json())["status"]
                in ("cancelled", "succeeded", "failed")
                and j
            )
        )
        assert done["status"] == "cancelled"
    finally:
        assert _stop(worker) == 0, (data_dir / "worker.log").read_text()
    assert "Traceback" not in (data_dir / "worker.log").read_text()
    # The worker said goodbye: the api stops advertising its model.
    _until(lambda: httpx.get(f"{url}/api/ai/models").json()["data"] == [])


def test_a_job_of_a_killed_worker_finishes_on_another(
    api: tuple[str, subprocess.Popen[bytes], Path], tiny_distilled: Path
) -> None:
    """kill -9 of a worker mid-job: the reaper of a live process hands the job back and the second
    worker (started beside the first) finishes it, the interrupted run counted as an attempt."""
    from kleinserve.jobs.store.sqlite import SQLiteJobStore

    url, _, data_dir = api
    args = ["worker", "--model", f"{MODEL}={tiny_distilled}", "--data-dir", str(data_dir), "--device", "cpu"]
    workers = [_start([*args, "--dtype", "float32"], data_dir / f"worker{n}.log") for n in (1, 2)]
    store = SQLiteJobStore(data_dir / "jobs.sqlite3")
    try:

        def both_live() -> bool:
            models = _models(url)
            return bool(models) and len(models[0]["devices"]) == 2

        _until(both_live)
        response = httpx.post(
            f"{url}/api/ai/queue",
            json={**SMALL, "image_size": {"width": 256, "height": 256}, "num_inference_steps": 40, "seed": 5},
            timeout=30,
        )
        generation_id = response.json()["generations"][0]["generation_id"]
        _until(lambda: httpx.get(f"{url}/api/ai/queue/{generation_id}", timeout=10).json()["progress_step"] >= 1)
        job = store.get(generation_id)
        assert job is not None and job.worker_id is not None
        (holder,) = [w for w in store.live_workers(since=0) if w.id == job.worker_id]
        (victim,) = [w for w in workers if w.pid == holder.info["pid"]]
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        done = _until(
            lambda: (
                (j := httpx.get(f"{url}/api/ai/queue/{generation_id}", timeout=10).json())["status"]
                in ("succeeded", "failed", "cancelled")
                and j
            ),
            timeout=300,
        )
        assert done["status"] == "succeeded", done
        (survivor,) = [w for w in workers if w is not victim]
        assert _stop(survivor) == 0
        job = store.get(generation_id)
        assert job is not None and job.attempts == 2 and job.worker_id != holder.id
    finally:
        for worker in workers:
            _stop(worker)
        store.close()
