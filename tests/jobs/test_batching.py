"""Cross-request batching through a real Worker: SQLite store, event bus, local storage and the tiny
engines of the session fixtures. Which jobs ran together is seen by a spy on generate_batch and by the
batch-size metric; each batched image is held to 2 uint8 levels of the same request run alone."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kleinserve import metrics
from kleinserve.engine import batch
from kleinserve.engine.engine import Engine
from kleinserve.engine.images import InputPolicy
from kleinserve.engine.lora import Adapters
from kleinserve.engine.variants import find_variant
from kleinserve.engine.weights import load_pipeline
from kleinserve.errors import ResourceExhaustedError
from kleinserve.generation import run_request
from kleinserve.jobs import worker as worker_module
from kleinserve.jobs.batches import auto_max_batch
from kleinserve.jobs.events import EventType, StoreEventBus
from kleinserve.jobs.job import Job, JobStatus
from kleinserve.jobs.service import JobService
from kleinserve.jobs.store import SQLiteJobStore
from kleinserve.jobs.worker import Worker
from kleinserve.loras import LoraSource
from kleinserve.request import GenerationRequest
from kleinserve.storage.local import LocalStorage

MODEL = "flux-2-klein-4b"
TIMEOUT = 120.0  # generous: the CPU is shared
SMALL = {"width": 64, "height": 64, "steps": 2}
LONG = {"width": 192, "height": 192, "steps": 30}  # a batch long enough to be caught mid-run


@pytest.fixture(scope="module")
def lora_engine(tiny_distilled: Path, tiny_lora: Path) -> Engine:
    """An engine of its own offering a LoRA (adapters change its pipeline; the shared engine must not see them)."""
    engine = Engine(load_pipeline(tiny_distilled, torch.device("cpu"), torch.float32), find_variant(MODEL))
    engine.adapters = Adapters(engine.pipeline, {"tiny": LoraSource("tiny", str(tiny_lora))}, capacity=2)
    return engine


@pytest.fixture(scope="module")
def second_engine(tiny_distilled: Path) -> Engine:
    """The same weights loaded again, as a second device's worker has them (an Engine serves one thread)."""
    return Engine(load_pipeline(tiny_distilled, torch.device("cpu"), torch.float32), find_variant(MODEL))


class Batches:
    """Records the size of every engine run the worker makes (a spy on generate_batch)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.prompts: list[list[str]] = []
        real = batch.generate_batch

        def spy(engine: Engine, items: Sequence[batch.BatchItem]) -> list[batch.Outcome]:
            self.prompts.append([item.inputs.prompt for item in items])
            return real(engine, items)

        monkeypatch.setattr(worker_module, "generate_batch", spy)


class System:
    def __init__(self, tmp_path: Path, engine: Engine) -> None:
        self.engine = engine
        self.store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
        self.bus = StoreEventBus(self.store, poll_interval=0.05)
        self.storage = LocalStorage(tmp_path / "files", secret=b"x" * 32, base_url="http://127.0.0.1:8000")
        self.service = JobService(self.store, self.bus, [MODEL], max_queue=20, retry_after=7)
        self.service.served_loras = ["tiny"] if engine.adapters is not None else []
        self.workers: list[Worker] = []

    def worker(self, max_batch: int, engine: Engine | None = None, **options: Any) -> Worker:
        worker = Worker(
            self.store,
            self.bus,
            self.storage,
            {MODEL: engine or self.engine},
            InputPolicy(),
            name=f"batch-worker-{len(self.workers)}",
            idle_poll=0.05,
            max_batch=max_batch,
            **options,
        )
        self.workers.append(worker)
        self.service.on_queued.append(worker.wake)
        return worker

    def submit(self, prompt: str, **fields: Any) -> Job:
        data = {"prompt": prompt, "model": MODEL, "seed": 7, **SMALL, **fields}
        [job] = self.service.submit([GenerationRequest.parse(data)])
        return job

    def finished(self, job_id: str) -> Job:
        return asyncio.run(self.service.wait(job_id, TIMEOUT))

    def pixels(self, job: Job) -> list[np.ndarray]:
        assert job.result is not None
        return [
            np.asarray(Image.open(io.BytesIO(self.storage.read(output.key))).convert("RGB"), dtype=np.int16)
            for output in job.result.outputs
        ]

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(TIMEOUT)
        self.bus.close()
        self.store.close()


@pytest.fixture
def system(tmp_path: Path, distilled_engine: Engine) -> Iterator[System]:
    system = System(tmp_path, distilled_engine)
    try:
        yield system
    finally:
        system.close()


def alone(engine: Engine, job: Job) -> list[np.ndarray]:
    """The job's images generated alone (its unbatched twin)."""
    result = run_request(job.request, engine)
    return [np.asarray(Image.open(io.BytesIO(e.data)).convert("RGB"), dtype=np.int16) for e in result.images]


def batch_jobs_count() -> tuple[float, float]:
    """(engine runs, jobs in them) observed so far by the batch-size metric."""
    count = metrics.REGISTRY.get_sample_value("kleinserve_batch_jobs_count", {"model": MODEL}) or 0.0
    total = metrics.REGISTRY.get_sample_value("kleinserve_batch_jobs_sum", {"model": MODEL}) or 0.0
    return count, total


def poll(condition: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.005)
    raise AssertionError("condition not met in time")


def test_compatible_jobs_queued_together_run_as_one_batch(system: System, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = Batches(monkeypatch)
    jobs = [
        system.submit("a red fox in snow"),
        system.submit("a cat wearing a hat", seed=20, num_images=2, output_format="webp", quality=100),
        system.submit("a mountain lake", seed=30),
    ]
    runs_before, jobs_before = batch_jobs_count()
    charged: list[Job] = []  # on_succeeded (charging the key) once per job
    system.worker(max_batch=4, on_succeeded=charged.append).start()
    done = [system.finished(job.id) for job in jobs]
    assert [job.status for job in done] == [JobStatus.SUCCEEDED] * 3
    poll(lambda: len(charged) == 3)
    assert sorted(job.id for job in charged) == sorted(job.id for job in jobs)
    assert batches.prompts == [["a red fox in snow", "a cat wearing a hat", "a mountain lake"]]
    runs, jobs_total = batch_jobs_count()
    assert (runs - runs_before, jobs_total - jobs_before) == (1, 3)
    for job in done:
        assert job.result is not None and job.attempts == 1
        assert [o.seed for o in job.result.outputs] == [job.request.seed + i for i in range(job.request.num_images)]
        # Each job its own progress events: every step reported for it.
        events = [e for e in system.store.events_after(0) if e.job_id == job.id and e.type is EventType.PROGRESS]
        assert [(e.data["step"], e.data["total"]) for e in events] == [(1, 2), (2, 2)]
    # Formats are per job (webp at quality 100 is lossy: compare the PNG jobs' pixels exactly to 2 levels).
    assert [o.media_type for o in done[1].result.outputs] == ["image/webp"] * 2  # type: ignore[union-attr]
    for job in (done[0], done[2]):
        for image, twin in zip(system.pixels(job), alone(system.engine, job), strict=True):
            assert np.abs(image - twin).max() <= 2


def test_incompatible_jobs_are_not_batched(
    tmp_path: Path, lora_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = System(tmp_path, lora_engine)
    try:
        batches = Batches(monkeypatch)
        jobs = [
            system.submit("plain one"),
            system.submit("with a lora", loras=[{"name": "tiny", "scale": 1.0}]),
            system.submit("another size", width=80),
            system.submit("plain two"),
            system.submit("lora at another scale", loras=[{"name": "tiny", "scale": 0.5}]),
            system.submit("same lora again", loras=[{"name": "tiny", "scale": 1.0}]),
        ]
        system.worker(max_batch=6).start()
        done = [system.finished(job.id) for job in jobs]
        assert all(job.status is JobStatus.SUCCEEDED for job in done), [j.error_message for j in done]
        # Groups in the order of their oldest job; each group one engine run.
        assert batches.prompts == [
            ["plain one", "plain two"],
            ["with a lora", "same lora again"],
            ["another size"],
            ["lora at another scale"],
        ]
        # The LoRA group really ran with its adapter (and the plain group without).
        for job in (done[0], done[1]):
            for image, twin in zip(system.pixels(job), alone(lora_engine, job), strict=True):
                assert np.abs(image - twin).max() <= 2
    finally:
        system.close()


def test_a_batch_takes_at_most_max_batch_jobs(system: System, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = Batches(monkeypatch)
    jobs = [system.submit(f"prompt {i}") for i in range(5)]
    system.worker(max_batch=2).start()
    assert all(system.finished(job.id).status is JobStatus.SUCCEEDED for job in jobs)
    assert batches.prompts == [["prompt 0", "prompt 1"], ["prompt 2", "prompt 3"], ["prompt 4"]]


def test_the_window_waits_for_a_job_submitted_just_after(system: System, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = Batches(monkeypatch)
    worker = system.worker(max_batch=2, batch_window=TIMEOUT)  # full before the window ends
    worker.start()
    first = system.submit("first")
    poll(lambda: worker.current_job_ids)  # claimed, waiting for a partner
    second = system.submit("second")
    assert system.finished(first.id).status is JobStatus.SUCCEEDED
    assert system.finished(second.id).status is JobStatus.SUCCEEDED
    assert batches.prompts == [["first", "second"]]


def test_cancelling_one_job_of_a_batch_cancels_only_it(system: System) -> None:
    jobs = [system.submit(f"long prompt {i}", **LONG) for i in range(3)]
    worker = system.worker(max_batch=3)
    worker.start()

    def running() -> bool:
        states = [system.store.get(job.id) for job in jobs]
        return all(s is not None and s.status is JobStatus.PROCESSING and s.progress_step >= 1 for s in states)

    poll(running)
    system.service.cancel(jobs[1].id)
    done = [system.finished(job.id) for job in jobs]
    assert [job.status for job in done] == [JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.SUCCEEDED]
    assert done[1].progress_step < LONG["steps"]
    assert not system.storage.exists(f"{jobs[1].id}/0.png")


def test_a_lost_lease_drops_only_that_job_and_waiting_jobs_keep_theirs(system: System) -> None:
    # Two long compatible jobs and one of another size, which waits for its turn while they run.
    jobs = [system.submit(f"long prompt {i}", **LONG) for i in range(2)]
    waiting = system.submit("another size", width=80)
    worker = system.worker(max_batch=3, heartbeat_seconds=0.05)
    worker.start()
    poll(lambda: (job := system.store.get(jobs[0].id)) is not None and job.progress_step >= 1)
    claimed = system.store.get(waiting.id)
    assert claimed is not None and claimed.status is JobStatus.PROCESSING and claimed.progress_step == 0
    # The heartbeat renews the waiting job's lease too, not only the running ones'.
    poll(lambda: (job := system.store.get(waiting.id)) is not None and job.lease_until > claimed.lease_until)  # type: ignore[operator]
    # Job 0 is taken from this worker (handed back and claimed by another): its lease is lost.
    taken = system.store.get(jobs[0].id)
    assert taken is not None
    system.store.complete(taken.id, worker.id, taken.attempts, JobStatus.QUEUED)
    [other] = system.store.claim("another-worker", None, 30.0)
    assert other.id == jobs[0].id
    assert system.finished(jobs[1].id).status is JobStatus.SUCCEEDED
    assert system.finished(waiting.id).status is JobStatus.SUCCEEDED
    poll(lambda: not worker.current_job_ids)
    after = system.store.get(jobs[0].id)
    assert after is not None and after.status is JobStatus.PROCESSING and after.worker_id == "another-worker"
    assert after.result is None


def test_the_settings_reach_the_runtime_worker(tmp_path: Path, tiny_distilled: Path) -> None:
    """KLEINSERVE_MAX_BATCH / KLEINSERVE_BATCH_WINDOW_MS as a server gets them: jobs submitted at once batch."""
    from kleinserve.engine.catalog import ServedModel
    from kleinserve.runtime import Runtime
    from kleinserve.settings import Settings

    settings = Settings(data_dir=tmp_path, device="cpu", dtype="float32", max_batch=3, batch_window_ms=50)
    runtime = Runtime(settings, [ServedModel(find_variant(MODEL), tiny_distilled)])
    try:
        asyncio.run(runtime.start())
        assert runtime.ready, runtime.load_error
        [worker] = runtime.workers
        assert (worker.max_batch, worker.batch_window) == (3, 0.05)
        runs_before, jobs_before = batch_jobs_count()
        requests = [GenerationRequest.parse({"prompt": f"at once {i}", "seed": i, **SMALL}) for i in range(2)]
        jobs = runtime.service.submit(requests)
        done = [asyncio.run(runtime.service.wait(job.id, TIMEOUT)) for job in jobs]
        assert [job.status for job in done] == [JobStatus.SUCCEEDED] * 2
        runs, jobs_total = batch_jobs_count()
        assert (runs - runs_before, jobs_total - jobs_before) == (1, 2)
    finally:
        runtime.stop()
    # Without the setting, a CPU server does not batch (CUDA ones batch 4).
    assert Settings(data_dir=tmp_path).max_batch is None and auto_max_batch(worker.engines) == 1


def test_a_batch_out_of_memory_runs_its_jobs_one_at_a_time(system: System, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = batch.generate_batch

    def small_device(engine: Engine, items: Sequence[batch.BatchItem]) -> list[batch.Outcome]:
        sizes.append(len(items))
        if len(items) > 1:  # as generate_batch answers torch.OutOfMemoryError
            return [ResourceExhaustedError("out of memory for a batch") for _ in items]
        return real(engine, items)

    monkeypatch.setattr(worker_module, "generate_batch", small_device)
    jobs = [system.submit(f"prompt {i}") for i in range(3)]
    system.worker(max_batch=3).start()
    assert [system.finished(job.id).status for job in jobs] == [JobStatus.SUCCEEDED] * 3
    assert sizes == [3, 1, 1, 1]


def test_jobs_that_cannot_join_the_batch_go_back_for_another_live_worker(
    system: System, second_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several devices, a worker that claimed jobs its batch can't take hands them back at once
    (without using an attempt) rather than holding them while another worker sits idle."""
    batches = Batches(monkeypatch)
    first = system.submit("the long one", **LONG)
    other_size = system.submit("another size", width=80)
    a = system.worker(max_batch=4)
    b = system.worker(max_batch=4, engine=second_engine)  # another device: an engine of its own
    system.store.heartbeat(b.id, [MODEL], {})  # b is live (it will start once a has handed back)
    a.start()
    poll(lambda: batches.prompts == [["the long one"]])  # a runs its batch ...
    assert system.store.get(other_size.id).status is JobStatus.QUEUED  # type: ignore[union-attr]
    b.start()  # ... and b, idle, takes the job a handed back
    done = system.finished(other_size.id)
    assert done.status is JobStatus.SUCCEEDED and done.worker_id == b.id and done.attempts == 1
    assert system.finished(first.id).worker_id == a.id


def test_a_lone_worker_keeps_what_it_claimed(system: System, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = Batches(monkeypatch)
    jobs = [system.submit("one"), system.submit("another size", width=80)]
    system.worker(max_batch=4).start()
    assert all(system.finished(job.id).attempts == 1 for job in jobs)
    assert batches.prompts == [["one"], ["another size"]]
