"""Several devices, one worker each, one queue: tested as two workers on the CPU (`--devices cpu,cpu`)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kleinserve.engine.catalog import ServedModel
from kleinserve.engine.device import pick_devices
from kleinserve.engine.variants import find_variant
from kleinserve.errors import InvalidParameterError
from kleinserve.jobs.job import JobStatus
from kleinserve.placement import memory_plan_for
from kleinserve.request import GenerationRequest
from kleinserve.runtime import Runtime
from kleinserve.settings import Settings

KLEIN_4B = find_variant("flux-2-klein-4b")


def test_device_lists() -> None:
    assert pick_devices("cpu, cpu") == [torch.device("cpu"), torch.device("cpu")]
    if not torch.cuda.is_available():
        assert pick_devices("auto") == [torch.device("cpu")] or torch.backends.mps.is_available()
        with pytest.raises(InvalidParameterError, match="CUDA"):
            pick_devices("cuda:0,cuda:1")
    with pytest.raises(InvalidParameterError, match="at least one device"):
        pick_devices(" , ")


def test_workers_sharing_a_device_each_count_in_its_memory_plan(tmp_path: Path, tiny_distilled: Path) -> None:
    served = [ServedModel(KLEIN_4B, tiny_distilled)]
    one = memory_plan_for(Settings(data_dir=tmp_path, device="cpu"), served)
    two = memory_plan_for(Settings(data_dir=tmp_path, devices="cpu,cpu"), served)
    weights = sum(c.weight_bytes for m in one.models for c in m.components)
    assert len(two.models) == 2 and two.peak_bytes == one.peak_bytes + weights


def test_two_cpu_workers_take_jobs_from_one_queue_at_once(tmp_path: Path, tiny_distilled: Path) -> None:
    settings = Settings(data_dir=tmp_path, devices="cpu,cpu", dtype="float32")
    runtime = Runtime(settings, [ServedModel(KLEIN_4B, tiny_distilled)])
    try:
        asyncio.run(runtime.start())
        assert runtime.ready, runtime.load_error
        # What /readyz lists under "devices".
        assert [
            (s.describe()["device"], s.describe()["state"], s.describe()["worker"]) for s in runtime.device_states
        ] == [
            ("cpu", "ready", "worker-0"),
            ("cpu", "ready", "worker-1"),
        ]
        first, second = (w.engines[KLEIN_4B.id] for w in runtime.workers)
        assert first.pipeline is not second.pipeline  # each worker has its own weights

        # Each generation waits until both workers are inside one: it only passes if two jobs run at once.
        both_running = threading.Barrier(2, timeout=120)
        seen: set[str] = set()
        for worker in runtime.workers:
            engine = worker.engines[KLEIN_4B.id]
            original = engine.generate

            def generate(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                seen.add(threading.current_thread().name)
                both_running.wait()
                return _original(*args, **kwargs)

            engine.generate = generate  # type: ignore[method-assign]
        request = GenerationRequest.parse({"prompt": "two at once", "steps": 2, "width": 64, "height": 64})
        jobs = runtime.service.submit([request, request])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = [runtime.store.get(job.id) for job in jobs]
            if all(job is not None and job.status not in (JobStatus.QUEUED, JobStatus.PROCESSING) for job in done):
                break
            time.sleep(0.2)
        assert [job.status for job in done if job is not None] == [JobStatus.SUCCEEDED] * 2
        assert seen == {"worker-0", "worker-1"}
    finally:
        runtime.stop()


def test_readyz_reports_each_device(tmp_path: Path, tiny_distilled: Path) -> None:
    from fastapi.testclient import TestClient

    from kleinserve.api.app import create_app

    settings = Settings(data_dir=tmp_path, devices="cpu,cpu", dtype="float32", admin_token="operator")
    # A loopback Host: the request guard refuses TestClient's default "testserver" with a 400.
    app = create_app(settings, [ServedModel(KLEIN_4B, tiny_distilled)])
    with TestClient(app, base_url="http://localhost") as client:
        deadline = time.monotonic() + 300
        while (public := client.get("/readyz")).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        # The job each worker runs only with the admin token.
        response = client.get("/readyz", headers={"Authorization": "Bearer operator"})
        body = response.json()
        (listed,) = client.get("/v1/models").json()["data"]
        (oxen,) = client.get("/api/ai/models").json()["data"]
    assert response.status_code == 200, body
    assert body["device"] == "cpu,cpu"
    assert [(d["device"], d["state"], d["worker"], d["job"]) for d in body["devices"]] == [
        ("cpu", "ready", "worker-0", None),
        ("cpu", "ready", "worker-1", None),
    ]
    assert public.json()["devices"] == [{k: v for k, v in d.items() if k != "job"} for d in body["devices"]]
    # The model list says where the model runs: on each device's worker, ready and idle.
    assert listed["devices"] == [
        {"device": "cpu", "state": "ready", "worker": "worker-0", "busy": False},
        {"device": "cpu", "state": "ready", "worker": "worker-1", "busy": False},
    ]
    assert [(d["status"], d["device"], d["worker"]) for d in oxen["deployments"]] == [
        ("active", "cpu", "worker-0"),
        ("active", "cpu", "worker-1"),
    ]
