"""The worker: claims queued jobs for its models under a lease and runs them on one device.

It runs in its own thread, so an event loop beside it (``serve``) stays responsive while a GPU (or
CPU) is busy; ``kleinserve worker`` runs the same class without HTTP. Each job goes claim -> engine
-> storage -> store. Every write after the claim is fenced by the worker's id and the attempt
number (the store returns ``None`` when the lease was lost, and the worker then writes nothing).

- Batching: the worker claims up to ``max_batch`` queued jobs at once (oldest first), waits up to
  ``batch_window`` seconds for more when the oldest one could share a batch, and runs each group of
  compatible jobs (:func:`~kleinserve.engine.batch.batch_key`) as one batch; the others run alone,
  in queue order, right after. Each job keeps its own progress, cancellation, lease, outputs.
- Leases: a heartbeat thread records the worker (``workers`` table) and renews the lease of every
  job it holds (running or claimed and waiting for its turn) every ``heartbeat_seconds``,
  independent of how long a step takes; each denoising step also renews a job's lease with its
  progress. A job whose lease was lost leaves its batch at the next step and nothing of it is
  written. A worker killed with -9 stops renewing; the reaper requeues its jobs.
- Cancellation is the stored ``cancel_requested`` flag, read for every job at every step, so a
  cancel from any API process stops that job (only) within one step.
- Shutdown (:meth:`Worker.stop`, SIGTERM): the running jobs stop at their next step and go back to
  the queue without using an attempt, as do the claimed ones that had not started.
- Any error ends the job as failed with a reason.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from kleinserve import logs, metrics
from kleinserve.engine.batch import BatchItem, Outcome, batch_key, generate_batch
from kleinserve.engine.engine import Engine, EngineOutput
from kleinserve.engine.images import InputPolicy, load_references
from kleinserve.engine.masks import load_mask
from kleinserve.engine.progress import Progress
from kleinserve.errors import GenerationCancelledError, KleinserveError, ResourceExhaustedError
from kleinserve.generation import activate_loras, encode_output, lora_key, prepare_inputs
from kleinserve.jobs.batches import Run, auto_max_batch, batch_groups
from kleinserve.jobs.events import EventBus
from kleinserve.jobs.job import Job, JobOutput, JobResult, JobStatus
from kleinserve.jobs.previews import PreviewWriter
from kleinserve.jobs.store.base import JobStore
from kleinserve.safety import SafetyChecker, SafetyRefusal
from kleinserve.storage.base import Storage

log = logging.getLogger(__name__)

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
DEFAULT_BATCH_WINDOW = 0.02  # seconds (KLEINSERVE_BATCH_WINDOW_MS)


def new_worker_id(name: str = "worker") -> str:
    """A worker id unique across hosts and restarts: ``host:pid:name:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{name}:{uuid.uuid4().hex[:8]}"


def process_info() -> dict[str, Any]:
    """What a heartbeat says about this process (the reaper uses host and pid to spot dead ones)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


class Worker:
    """Runs queued jobs for the models in ``engines`` (all on one device) in a background thread."""

    def __init__(
        self,
        store: JobStore,
        bus: EventBus,
        storage: Storage,
        engines: Mapping[str, Engine],
        policy: InputPolicy,
        name: str = "worker-0",
        *,
        lease_seconds: float = 30.0,
        heartbeat_seconds: float = 5.0,
        idle_poll: float = 1.0,
        on_succeeded: Callable[[Job], None] | None = None,
        info: dict[str, Any] | None = None,
        claim_any: bool = False,
        safety: SafetyChecker | None = None,
        max_batch: int | None = None,
        batch_window: float = DEFAULT_BATCH_WINDOW,
    ) -> None:
        self.store = store
        self.bus = bus
        self.storage = storage
        self.engines = dict(engines)
        self.policy = policy
        self.name = name
        self.id = new_worker_id(name)
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.idle_poll = idle_poll
        self.on_succeeded = on_succeeded  # e.g. charging the job to its API key
        self.safety = safety  # the operator's safety checker, if any (kleinserve/safety.py)
        self.info = {**process_info(), **(info or {})}
        # ``serve`` (all in one) takes every queued job and fails those for models it lacks, so no
        # job waits forever; a ``worker`` takes only jobs for its own models.
        self.claim_any = claim_any
        self.max_batch = max_batch if max_batch is not None else auto_max_batch(self.engines)
        self.batch_window = batch_window  # seconds to wait for more compatible jobs after a claim
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._held: dict[str, int] = {}  # job id -> attempt, for every job claimed and not yet finished
        self._lost: set[str] = set()  # held jobs whose lease was lost: they stop, and nothing is written
        self._lock = threading.Lock()

    @property
    def current_job_ids(self) -> list[str]:
        """The jobs this worker holds (running, or claimed and waiting for their batch's turn)."""
        with self._lock:
            return list(self._held)

    @property
    def current_job_id(self) -> str | None:
        held = self.current_job_ids
        return held[0] if held else None

    def start(self) -> None:
        self.store.heartbeat(self.id, self.engines, self.info)
        for target, suffix in ((self._loop, ""), (self._heartbeat_loop, "-heartbeat")):
            thread = threading.Thread(target=target, name=self.name + suffix, daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Take no more jobs; the running ones stop at their next step and go back to the queue."""
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
        try:
            self.store.forget_worker(self.id)
        except Exception:
            log.exception("%s: cannot remove its worker row", self.name)

    # -- threads --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            claimed = self._claim(self.max_batch)
            if not claimed:
                self._wake.wait(self.idle_poll)
                self._wake.clear()
                continue
            try:
                runs = self._prepare(claimed)
                groups = batch_groups(self._fill(runs, len(claimed)), self.max_batch)
                if len(groups) > 1 and self._others_can_run(groups[1:]):
                    self._hand_back(groups[1:])
                    groups = groups[:1]
                for group in groups:
                    self._run_group(group)
            except Exception:  # e.g. the store was unreachable when an outcome was written
                # The thread lives on; the jobs' leases run out and the reaper hands them back.
                log.exception("%s: jobs %s could not be finished; their leases will expire", self.name, self._held)
            finally:
                with self._lock:
                    self._held.clear()
                    self._lost.clear()
                self.bus.notify()

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.heartbeat_seconds):
            try:
                self.store.heartbeat(self.id, self.engines, self.info)
                with self._lock:
                    held = dict(self._held)
                for job_id, attempt in held.items():
                    if self.store.renew(job_id, self.id, attempt, self.lease_seconds) is None:
                        self._lose(job_id, attempt)
            except Exception:
                log.exception("%s: heartbeat failed", self.name)

    # -- claiming and batching ------------------------------------------------------------------

    def _claim(self, limit: int) -> list[Job]:
        """Up to ``limit`` of the oldest queued jobs, held (their leases renewed) from now on."""
        try:
            claimed = self.store.claim(self.id, None if self.claim_any else self.engines, self.lease_seconds, limit)
        except Exception:
            log.exception("%s: cannot claim a job", self.name)
            return []
        if claimed:
            with self._lock:
                self._held.update((job.id, job.attempts) for job in claimed)
            self.bus.notify()
        return claimed

    def _fill(self, runs: list[Run], claimed: int) -> list[Run]:
        """Wait up to the batch window for more jobs while the oldest claimed one could share a batch.

        A submission in this process wakes the worker at once; other processes' submissions are
        seen by the claim at the end of the window.
        """
        deadline = time.monotonic() + self.batch_window
        while runs and runs[0].key is not None and claimed < self.max_batch and not self._stopping.is_set():
            if sum(run.key == runs[0].key for run in runs) >= self.max_batch:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.wait(remaining)
            self._wake.clear()
            more = self._claim(self.max_batch - claimed)
            claimed += len(more)
            runs += self._prepare(more)
        return runs

    def _others_can_run(self, groups: Sequence[Sequence[Run]]) -> bool:
        """Whether another live worker serves a model of these claimed-but-waiting jobs (with several
        devices, one worker must not sit on jobs that can't join its batch while another is idle)."""
        models = {run.job.request.model for group in groups for run in group}
        since = time.time() - 3 * self.heartbeat_seconds
        try:
            others = [w for w in self.store.live_workers(since=since) if w.id != self.id]
        except Exception:
            log.exception("%s: cannot list live workers", self.name)
            return False
        return any(models & set(w.models) for w in others)

    def _hand_back(self, groups: Sequence[Sequence[Run]]) -> None:
        """Return jobs that would wait for this worker's current batch to the queue at once, without
        using an attempt, so an idle worker takes them (the oldest still go first)."""
        for group in groups:
            for run in group:
                if self._complete(run.job, JobStatus.QUEUED) is not None:
                    log.info("%s: job %s handed back for another worker", self.name, run.job.id)

    # -- each job -------------------------------------------------------------------------------

    def _prepare(self, jobs: Sequence[Job]) -> list[Run]:
        """Each job's engine inputs and batch key; a job that cannot run ends here (failed or stopped)."""
        runs = []
        for job in jobs:
            with logs.log_context(request_id=job.request_id, job_id=job.id, key_id=job.owner):
                metrics.job_started(job)
                log.info(
                    "job started",
                    extra={
                        "model": job.request.model,
                        "attempt": job.attempts,
                        **logs.prompt_fields(job.request.prompt),
                    },
                )
                try:
                    engine = self.engines.get(job.request.model)
                    if engine is None:
                        raise KleinserveError(
                            f"model {job.request.model} is not served by this worker", code="model_unavailable"
                        )
                    if self._should_stop(job):
                        raise GenerationCancelledError()
                    references = load_references(job.request.images, self.policy)
                    mask = load_mask(job.request.mask, self.policy) if job.request.mask else None
                    inputs = prepare_inputs(job.request, engine, references, mask)
                    key = batch_key(engine, inputs, lora_key(job.request)) if self.max_batch > 1 else None
                except Exception as err:
                    self._ended(job, err)
                    continue
            runs.append(Run(job, engine, inputs, key))
        return runs

    def _run_group(self, runs: Sequence[Run]) -> None:
        """One engine run for compatible ``runs`` (one batch, or a job alone), then each job's outcome."""
        engine = runs[0].engine
        items = [
            BatchItem(run.inputs, partial(self._on_progress, run.job), partial(self._should_stop, run.job))
            for run in runs
        ]
        outcomes: list[Outcome]
        try:
            activate_loras(runs[0].job.request, engine)  # the group shares its adapters (batch_key)
            outcomes = generate_batch(engine, items)
            if len(items) > 1 and all(isinstance(o, ResourceExhaustedError) for o in outcomes):
                # Too big for the device together: each alone may still fit.
                outcomes = [generate_batch(engine, [item])[0] for item in items]
        except Exception as err:  # e.g. a LoRA that cannot be loaded: every job of the group fails
            outcomes = [err for _ in items]
        done = [outcome for outcome in outcomes if isinstance(outcome, EngineOutput)]
        if done:
            images = sum(run.inputs.num_images for run in runs)
            metrics.engine_ran(runs[0].job.request.model, images, len(runs), done[0].steps, done[0].timings)
        for run, outcome in zip(runs, outcomes, strict=True):
            job = run.job
            with logs.log_context(request_id=job.request_id, job_id=job.id, key_id=job.owner):
                self._finish(job, outcome)

    def _on_progress(self, job: Job, progress: Progress) -> None:
        """Every job's progress, alone or in a batch: a denoising step renews its lease with the step.

        A lost lease marks the job lost; it stops at its next step and nothing of it is written.
        """
        if progress.stage != "denoise":
            return
        renewed = self.store.renew(
            job.id, self.id, job.attempts, self.lease_seconds, step=progress.step, total=progress.total
        )
        if renewed is None:
            self._lose(job.id, job.attempts)
            return
        self.bus.notify()
        PreviewWriter(self.storage, self.bus).on_progress(job, progress)  # only if the job asked (jobs/previews.py)

    def _should_stop(self, job: Job) -> bool:
        return self._stopping.is_set() or self._is_lost(job.id) or self.store.cancel_requested(job.id)

    def _lose(self, job_id: str, attempt: int) -> None:
        with self._lock:
            if self._held.get(job_id) == attempt:
                self._lost.add(job_id)

    def _is_lost(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._lost

    def _finish(self, job: Job, outcome: Outcome) -> None:
        """Store ``job``'s images and record its outcome (or end it with the error it got)."""
        # Keys do not name the attempt (clients see them, e.g. 1min.ai's paths): a newer attempt
        # writes the same keys, so a worker that lost its lease must not write or delete them.
        prefix = f"{job.id}/"
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            if self._is_lost(job.id):
                raise GenerationCancelledError()
            result = encode_output(job.request, outcome)
            metrics.job_ran(job, result.timings)
            safety = self.safety.review(job.request, result) if self.safety else None  # may blur or refuse
            outputs = []
            for index, encoded in enumerate(result.images):
                key = f"{prefix}{index}.{_EXTENSIONS[encoded.media_type]}"
                self.storage.put(key, encoded.data, encoded.media_type)
                outputs.append(
                    JobOutput(
                        key=key,
                        media_type=encoded.media_type,
                        seed=result.seeds[index],
                        width=encoded.width,
                        height=encoded.height,
                        size_bytes=len(encoded.data),
                    )
                )
            job_result = JobResult(
                outputs=outputs, steps=result.steps, guidance=result.guidance, timings=result.timings
            )
        except Exception as err:
            self._ended(job, err)
            return
        done = self._complete(job, JobStatus.SUCCEEDED, result=job_result, safety=safety)
        if done is None:  # the lease was lost meanwhile; the files belong to the newer attempt
            return
        if self.on_succeeded is not None:
            try:
                self.on_succeeded(done)
            except Exception:
                log.exception("%s: could not record usage of job %s", self.name, job.id)

    def _ended(self, job: Job, err: Exception) -> None:
        """``job`` stopped with ``err``: stopped (cancelled, lease lost, shutdown) or failed."""
        if isinstance(err, GenerationCancelledError):
            self._stopped(job)
        elif isinstance(err, SafetyRefusal):
            self._complete(job, JobStatus.FAILED, error_code=err.code, error_message=err.message, safety=err.report)
        elif isinstance(err, KleinserveError):
            self._complete(job, JobStatus.FAILED, error_code=err.code, error_message=err.message)
        else:
            log.error("%s: job %s failed", self.name, job.id, exc_info=err)
            self._complete(
                job,
                JobStatus.FAILED,
                error_code="internal_error",
                error_message="internal error while generating; see the server log",
            )

    def _complete(self, job: Job, new: JobStatus, **fields: Any) -> Job | None:
        done = self.store.complete(job.id, self.id, job.attempts, new, **fields)
        with self._lock:  # finished here: no more lease renewals for it
            self._held.pop(job.id, None)
        self.bus.notify()
        if done is None:
            log.warning("%s: job %s attempt %d was taken from this worker", self.name, job.id, job.attempts)
        elif done.terminal:
            metrics.job_finished(done)
            if done.status is JobStatus.FAILED:
                log.info("job failed: %s", done.error_message, extra={"code": done.error_code})
            elif done.status is JobStatus.SUCCEEDED and done.result is not None:
                log.info("job succeeded", extra={"images": len(done.result.outputs), "timings": done.result.timings})
            else:
                log.info("job %s", done.status.value)
        return done

    def _stopped(self, job: Job) -> None:
        if self._is_lost(job.id):
            with self._lock:
                self._held.pop(job.id, None)
            return
        if self.store.cancel_requested(job.id):
            self._complete(job, JobStatus.CANCELLED)
            return
        # Shutting down: the job goes back to the queue, and this run does not count as an attempt.
        if self._complete(job, JobStatus.QUEUED) is not None:
            log.info("%s: job %s requeued at shutdown", self.name, job.id)
