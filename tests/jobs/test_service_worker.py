"""The job service and a worker, wired to a real SQLite store, event bus, local storage and the
tiny distilled engine from the session fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kleinserve.engine.engine import Engine
from kleinserve.engine.images import InputPolicy
from kleinserve.errors import NotFoundError, ServiceUnavailableError, UnknownModelError
from kleinserve.jobs.events import Event, EventType, StoreEventBus
from kleinserve.jobs.job import Job, JobStatus
from kleinserve.jobs.service import JobService
from kleinserve.jobs.store import SQLiteJobStore
from kleinserve.jobs.worker import Worker
from kleinserve.request import GenerationRequest
from kleinserve.storage.local import LocalStorage

MODEL = "flux-2-klein-4b"
TIMEOUT = 60.0  # generous: the CPU may be shared with other work
# Long enough to be caught mid-run (~10 ms a step on CPU), short enough to finish quickly.
LONG = {"width": 256, "height": 256, "steps": 40}


@dataclass
class System:
    tmp_path: Path
    engine: Engine
    store: SQLiteJobStore
    bus: StoreEventBus
    storage: LocalStorage
    service: JobService
    workers: list[Worker] = field(default_factory=list)

    def worker(self, engines: dict[str, Engine] | None = None, *, start: bool = True) -> Worker:
        worker = Worker(
            self.store,
            self.bus,
            self.storage,
            engines if engines is not None else {MODEL: self.engine},
            InputPolicy(),
            name=f"test-worker-{len(self.workers)}",
            idle_poll=0.05,
            claim_any=True,
        )
        self.workers.append(worker)
        self.service.on_queued.append(worker.wake)
        if start:
            worker.start()
        return worker

    def submit(self, owner: str | None = None, **fields: Any) -> Job:
        data = {"prompt": "a red square", "model": MODEL, "width": 64, "height": 64, "steps": 2, **fields}
        [job] = self.service.submit([GenerationRequest.parse(data)], owner=owner)
        return job

    def events(self, job_id: str) -> list[Event]:
        return [e for e in self.store.events_after(0) if e.job_id == job_id]

    def finished(self, job_id: str, timeout: float = TIMEOUT) -> Job:
        return asyncio.run(self.service.wait(job_id, timeout))

    def job_files(self, job_id: str) -> list[Path]:
        directory = self.storage.root / job_id
        return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


@pytest.fixture
def system(tmp_path: Path, distilled_engine: Engine) -> Iterator[System]:
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    bus = StoreEventBus(store, poll_interval=0.05)
    sys = System(
        tmp_path=tmp_path,
        engine=distilled_engine,
        store=store,
        bus=bus,
        storage=LocalStorage(tmp_path / "files", secret=b"x" * 32, base_url="http://127.0.0.1:8000"),
        service=JobService(store, bus, [MODEL], max_queue=10, retry_after=7),
    )
    try:
        yield sys
    finally:
        for worker in sys.workers:
            worker.stop(TIMEOUT)
        bus.close()
        store.close()


def poll(condition: Callable[[], Any], timeout: float = TIMEOUT, interval: float = 0.002) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def running(system: System, job_id: str) -> Job:
    """Wait until the job has done at least one denoising step (and is still processing)."""

    def check() -> Job | None:
        job = system.store.get(job_id)
        assert job is not None
        return job if job.status is JobStatus.PROCESSING and job.progress_step >= 1 else None

    return poll(check)


# -- submission -----------------------------------------------------------------------------------


def test_submit_queues_jobs_with_seeds_and_publishes(system: System) -> None:
    fixed = system.submit(owner="alice", seed=1234)
    free = system.submit(owner="alice")
    other = system.submit()
    for job in (fixed, free, other):
        stored = system.store.get(job.id)
        assert stored == job
        assert job.status is JobStatus.QUEUED and job.attempts == 0
        assert job.request.model == MODEL and job.dialect == "kleinserve"
    assert fixed.request.seed == 1234
    assert free.request.seed is not None and 0 <= free.request.seed < 2**32
    assert other.request.seed is not None and other.request.seed != free.request.seed
    assert fixed.owner == "alice" and other.owner is None
    for job in (fixed, free, other):
        [queued] = system.events(job.id)
        assert queued.type is EventType.QUEUED
        assert queued.owner == job.owner and queued.data == {"model": MODEL}


def test_submit_canonicalises_model_alias_and_keeps_extra(system: System) -> None:
    alias = "black-forest-labs/FLUX.2-klein-4B"
    request = GenerationRequest.parse({"prompt": "x", "model": alias, "seed": 5})
    [job] = system.service.submit([request], owner="k", dialect="oxen", extra={"aspect_ratio": "1:1"})
    assert job.request.model == MODEL
    assert job.dialect == "oxen" and job.extra == {"aspect_ratio": "1:1"}
    assert system.store.get(job.id) == job


@pytest.mark.parametrize("model", ["no-such-model", "flux-2-klein-9b"])
def test_submit_unknown_or_unserved_model(system: System, model: str) -> None:
    good = GenerationRequest.parse({"prompt": "x", "model": MODEL})
    bad = GenerationRequest.parse({"prompt": "x", "model": model})
    with pytest.raises(UnknownModelError) as info:
        system.service.submit([good, bad])
    assert info.value.known == [MODEL]
    assert info.value.model == model
    assert MODEL in info.value.message and model in info.value.message
    assert system.store.list() == []
    assert system.store.events_after(0) == []


def test_queue_bound_is_all_or_none(system: System) -> None:
    service = JobService(system.store, system.bus, [MODEL], max_queue=2, retry_after=9)
    request = GenerationRequest.parse({"prompt": "x", "model": MODEL})
    with pytest.raises(ServiceUnavailableError) as info:
        service.submit([request, request, request])
    assert info.value.retry_after == 9
    assert system.store.list() == []
    assert system.store.events_after(0) == []
    # Two fit; then one more does not, and the two stay.
    jobs = service.submit([request, request])
    assert len(jobs) == 2
    with pytest.raises(ServiceUnavailableError) as info:
        service.submit([request])
    assert info.value.retry_after == 9
    assert {j.id for j in system.store.list()} == {j.id for j in jobs}
    # A finished job frees its place.
    service.cancel(jobs[0].id)
    [third] = service.submit([request])
    assert system.store.count([JobStatus.QUEUED]) == 2 and system.store.get(third.id) is not None


def test_queue_bound_holds_under_concurrent_submissions(system: System) -> None:
    request = GenerationRequest.parse({"prompt": "x", "model": MODEL})
    counts = []
    for _ in range(20):
        for job in system.store.list(statuses=[JobStatus.QUEUED]):
            system.store.transition(job.id, JobStatus.CANCELLED)
        service = JobService(system.store, system.bus, [MODEL], max_queue=2)
        barrier = threading.Barrier(8)

        def submit_one(service: JobService = service, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            with contextlib.suppress(ServiceUnavailableError):
                service.submit([request])

        threads = [threading.Thread(target=submit_one) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        counts.append(system.store.count([JobStatus.QUEUED]))
    assert counts == [2] * 20


def test_get_and_list(system: System) -> None:
    a = system.submit(owner="alice")
    b = system.submit(owner="bob")
    assert system.service.get(a.id) == a
    assert system.service.get(a.id, owner="alice", any_owner=False) == a
    with pytest.raises(NotFoundError):
        system.service.get(a.id, owner="bob", any_owner=False)
    with pytest.raises(NotFoundError):
        system.service.get("nope")
    assert [j.id for j in system.service.list()] == [b.id, a.id]
    assert [j.id for j in system.service.list(owner="bob", any_owner=False)] == [b.id]


def test_queue_positions(system: System) -> None:
    jobs = [system.submit() for _ in range(3)]
    assert system.service.queue_positions(jobs) == {jobs[0].id: 0, jobs[1].id: 1, jobs[2].id: 2}
    system.service.cancel(jobs[0].id)
    fresh = [system.store.get(j.id) for j in jobs]
    assert system.service.queue_positions(fresh) == {jobs[1].id: 0, jobs[2].id: 1}  # type: ignore[arg-type]
    [claimed] = system.store.claim("w", None, 30.0)
    assert claimed is not None and claimed.id == jobs[1].id
    fresh = [system.store.get(j.id) for j in jobs]
    assert system.service.queue_positions(fresh) == {jobs[2].id: 0}  # type: ignore[arg-type]


# -- running --------------------------------------------------------------------------------------


def test_worker_runs_job_to_success(system: System) -> None:
    system.worker()
    job = system.submit(owner="alice", seed=77)
    done = system.finished(job.id)
    assert done.status is JobStatus.SUCCEEDED
    assert done.attempts == 1 and done.started_at is not None and done.completed_at is not None
    assert done.error_code is None and done.error_message is None
    assert (done.progress_step, done.progress_total) == (2, 2)
    assert done.result is not None and done.result.steps == 2
    [output] = done.result.outputs
    assert output.key == f"{job.id}/0.png" and output.media_type == "image/png"
    assert (output.seed, output.width, output.height) == (77, 64, 64)
    stored = system.storage.read(output.key)
    assert len(stored) == output.size_bytes
    with Image.open(io.BytesIO(stored)) as image:
        assert image.size == (64, 64)
    assert system.store.get(job.id) == done

    events = system.events(job.id)
    assert all(e.owner == "alice" for e in events)
    assert [e.type for e in events].count(EventType.QUEUED) == 1
    # (job.queued itself may land after job.started: see test_queued_event_comes_before_started.)
    events = [e for e in events if e.type is not EventType.QUEUED]
    assert [e.type for e in events] == [
        EventType.STARTED,
        EventType.PROGRESS,
        EventType.PROGRESS,
        EventType.SUCCEEDED,
    ]
    assert [(e.data["step"], e.data["total"]) for e in events[1:3]] == [(1, 2), (2, 2)]
    assert events[0].data == {"model": MODEL, "attempt": 1}
    assert events[-1].data["outputs"] == [output.key]


def test_queued_event_comes_before_started(system: System) -> None:
    """Forces the interleaving real scheduling sometimes produces: the submitting thread is held
    (by a profiler hook, no code replaced) right after the job row is committed."""
    system.worker()
    add_code = SQLiteJobStore.add.__code__

    def hold_after_add(frame: Any, event: str, arg: Any) -> None:
        if event == "return" and frame.f_code is add_code:
            job_id = frame.f_locals["job"].id
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                if any(e.type is EventType.STARTED for e in system.events(job_id)):
                    break
                time.sleep(0.005)

    sys.setprofile(hold_after_add)
    try:
        job = system.submit()
    finally:
        sys.setprofile(None)
    system.finished(job.id)
    types = [e.type for e in system.events(job.id)]
    assert types[:2] == [EventType.QUEUED, EventType.STARTED]


def test_worker_runs_several_images_and_jobs_in_order(system: System) -> None:
    first = system.submit(seed=10, num_images=2)
    second = system.submit(seed=20)
    system.worker()
    done_second = system.finished(second.id)
    done_first = system.store.get(first.id)
    assert done_first is not None and done_first.status is JobStatus.SUCCEEDED
    assert done_second.status is JobStatus.SUCCEEDED
    assert done_first.started_at <= done_second.started_at  # type: ignore[operator]
    assert done_first.result is not None
    assert [o.seed for o in done_first.result.outputs] == [10, 11]
    assert [o.key for o in done_first.result.outputs] == [f"{first.id}/0.png", f"{first.id}/1.png"]
    assert len(system.job_files(first.id)) == 2


def test_wait_returns_finished_job_and_times_out(system: System) -> None:
    job = system.submit()
    with pytest.raises(TimeoutError):
        asyncio.run(system.service.wait(job.id, 0.2))
    system.worker()
    done = system.finished(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.id == job.id
    # Waiting for a job that is already finished returns at once.
    again = asyncio.run(system.service.wait(job.id, 1.0))
    assert again == done
    with pytest.raises(NotFoundError):
        asyncio.run(system.service.wait("nope", 1.0))


# -- cancelling -------------------------------------------------------------------------------------


def test_cancel_queued_job(system: System) -> None:
    job = system.submit(owner="alice")
    cancelled = system.service.cancel(job.id)
    assert cancelled.status is JobStatus.CANCELLED and cancelled.completed_at is not None
    assert system.store.get(job.id) == cancelled
    assert [e.type for e in system.events(job.id)] == [EventType.QUEUED, EventType.CANCELLED]
    assert system.events(job.id)[-1].owner == "alice"
    # A worker started later does not run it.
    other = system.submit()
    system.worker()
    assert system.finished(other.id).status is JobStatus.SUCCEEDED
    assert system.store.get(job.id) == cancelled
    assert system.job_files(job.id) == []


def test_cancel_checks_owner(system: System) -> None:
    job = system.submit(owner="alice")
    with pytest.raises(NotFoundError):
        system.service.cancel(job.id, owner="bob", any_owner=False)
    assert system.store.get(job.id) == job
    assert system.service.cancel(job.id, owner="alice", any_owner=False).status is JobStatus.CANCELLED


def test_cancel_processing_job(system: System) -> None:
    system.worker()
    job = system.submit(**LONG)
    running(system, job.id)
    answer = system.service.cancel(job.id)
    assert answer.status is JobStatus.PROCESSING  # the worker stops it at its next step
    done = system.finished(job.id)
    assert done.status is JobStatus.CANCELLED
    assert done.completed_at is not None and done.result is None
    assert done.progress_step < LONG["steps"]
    types = [e.type for e in system.events(job.id)]
    assert types.count(EventType.QUEUED) == 1 and types.count(EventType.STARTED) == 1
    assert types[-1] is EventType.CANCELLED and types.count(EventType.CANCELLED) == 1
    assert EventType.SUCCEEDED not in types
    assert system.job_files(job.id) == []
    assert system.store.cancel_requested(job.id)
    # The worker goes on with the next job.
    after = system.submit()
    assert system.finished(after.id).status is JobStatus.SUCCEEDED


def test_cancel_finished_job_changes_nothing(system: System) -> None:
    system.worker()
    job = system.submit()
    done = system.finished(job.id)
    events_before = system.store.events_after(0)
    answer = system.service.cancel(job.id)
    assert answer == done
    assert system.store.get(job.id) == done
    assert system.store.events_after(0) == events_before
    assert done.result is not None
    assert len(system.storage.read(done.result.outputs[0].key)) == done.result.outputs[0].size_bytes
    assert not system.store.cancel_requested(job.id)


# -- stopping and failing ----------------------------------------------------------------------------


def test_stop_requeues_running_job_without_counting_the_attempt(system: System) -> None:
    job = system.submit(**LONG)
    system.store.update(job.id, attempts=1)  # as if a crash had already interrupted it once
    worker = system.worker()
    started = running(system, job.id)
    assert started.attempts == 2
    worker.stop(TIMEOUT)
    stopped = system.store.get(job.id)
    assert stopped is not None
    assert stopped.status is JobStatus.QUEUED
    assert stopped.attempts == 1
    assert stopped.progress_step == 0 and stopped.completed_at is None
    assert system.job_files(job.id) == []
    types = [e.type for e in system.events(job.id)]
    assert not set(types) & {EventType.CANCELLED, EventType.FAILED, EventType.SUCCEEDED}

    system.worker()
    done = system.finished(job.id)
    assert done.status is JobStatus.SUCCEEDED
    assert done.attempts == 2
    assert done.result is not None and len(system.job_files(job.id)) == 1


def test_job_for_unserved_model_fails(system: System) -> None:
    service = JobService(system.store, system.bus, [MODEL, "flux-2-klein-9b"])
    request = GenerationRequest.parse({"prompt": "x", "model": "flux-2-klein-9b", "width": 64, "height": 64})
    [job] = service.submit([request])
    system.worker()  # serves flux-2-klein-4b only
    done = system.finished(job.id)
    assert done.status is JobStatus.FAILED
    assert done.error_code == "model_unavailable"
    assert done.error_message is not None and "flux-2-klein-9b" in done.error_message
    assert done.completed_at is not None and done.result is None
    failed = system.events(job.id)[-1]
    assert failed.type is EventType.FAILED
    assert {k: failed.data[k] for k in ("error", "code")} == {"error": done.error_message, "code": "model_unavailable"}
    assert failed.data["state"]["status"] == "failed"  # waiters need not reload the job


def test_job_with_bad_reference_image_fails(system: System) -> None:
    system.worker()
    job = system.submit(images=["not base64!"])
    done = system.finished(job.id)
    assert done.status is JobStatus.FAILED
    assert done.error_code == "invalid_image"
    assert done.error_message is not None and "images[0]" in done.error_message
    assert system.events(job.id)[-1].type is EventType.FAILED
    assert system.job_files(job.id) == []
    # The worker survives and runs the next job.
    after = system.submit()
    assert system.finished(after.id).status is JobStatus.SUCCEEDED
