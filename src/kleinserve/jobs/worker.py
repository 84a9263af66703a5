"""The worker: claims queued jobs for its models under a lease and runs them on one device.

It runs in its own thread, so an event loop beside it (``serve``) stays responsive while a GPU (or
CPU) is busy; ``kleinserve worker`` runs the same class without HTTP. Each job goes claim -> engine
-> storage -> store. Every write after the claim is fenced by the worker's id and the attempt
number (the store returns ``None`` when the lease was lost, and the worker then writes nothing).

- Leases: a heartbeat thread records the worker (``workers`` table) and renews the running job's
  lease every ``heartbeat_seconds``, independent of how long a step takes; each denoising step also
  renews it with the progress. A worker killed with -9 stops renewing; the reaper requeues its job.
- Cancellation is the stored ``cancel_requested`` flag, read at every step, so a cancel from any
  API process stops the job within one step.
- Shutdown (:meth:`Worker.stop`, SIGTERM): the running job stops at its next step and goes back to
  the queue without using an attempt.
- Any error ends the job as failed with a reason.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from kleinserve import logs, metrics
from kleinserve.engine.engine import Engine, Progress
from kleinserve.engine.images import InputPolicy, load_references
from kleinserve.engine.masks import load_mask
from kleinserve.errors import GenerationCancelledError, KleinserveError
from kleinserve.generation import run_request
from kleinserve.jobs.events import EventBus
from kleinserve.jobs.job import Job, JobOutput, JobResult, JobStatus
from kleinserve.jobs.store.base import JobStore
from kleinserve.safety import SafetyChecker, SafetyRefusal
from kleinserve.storage.base import Storage

log = logging.getLogger(__name__)

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


def new_worker_id(name: str = "worker") -> str:
    """A worker id unique across hosts and restarts: ``host:pid:name:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{name}:{uuid.uuid4().hex[:8]}"


def process_info() -> dict[str, Any]:
    """What a heartbeat says about this process (the reaper uses host and pid to spot dead ones)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


class _LostLease(Exception):
    """The job was reaped and may run elsewhere: stop without writing anything."""


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
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._current: tuple[str, int] | None = None  # (job id, attempt) being run
        self._lost = threading.Event()
        self._lock = threading.Lock()

    @property
    def current_job_id(self) -> str | None:
        current = self._current
        return current[0] if current else None

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
        """Take no more jobs; the running one stops at its next step and goes back to the queue."""
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
            try:
                claimed = self.store.claim(self.id, None if self.claim_any else self.engines, self.lease_seconds)
            except Exception:
                log.exception("%s: cannot claim a job", self.name)
                claimed = []
            if not claimed:
                self._wake.wait(self.idle_poll)
                self._wake.clear()
                continue
            job = claimed[0]
            self.bus.notify()
            with self._lock:
                self._current = (job.id, job.attempts)
                self._lost.clear()
            try:
                with logs.log_context(request_id=job.request_id, job_id=job.id, key_id=job.owner):
                    self._process(job)
            except Exception:  # e.g. the store was unreachable when the outcome was written
                # The thread lives on; the job's lease runs out and the reaper hands it back.
                log.exception("%s: job %s could not be finished; its lease will expire", self.name, job.id)
            finally:
                with self._lock:
                    self._current = None
                self.bus.notify()

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.heartbeat_seconds):
            try:
                self.store.heartbeat(self.id, self.engines, self.info)
                with self._lock:
                    current = self._current
                if (
                    current is not None
                    and self.store.renew(current[0], self.id, current[1], self.lease_seconds) is None
                ):
                    with self._lock:
                        if self._current == current:
                            self._lost.set()
            except Exception:
                log.exception("%s: heartbeat failed", self.name)

    # -- one job --------------------------------------------------------------------------------

    def _should_stop(self, job: Job) -> bool:
        return self._stopping.is_set() or self._lost.is_set() or self.store.cancel_requested(job.id)

    def _process(self, job: Job) -> None:
        metrics.job_started(job)
        log.info(
            "job started",
            extra={"model": job.request.model, "attempt": job.attempts, **logs.prompt_fields(job.request.prompt)},
        )
        engine = self.engines.get(job.request.model)
        # Keys do not name the attempt (clients see them, e.g. 1min.ai's paths): a newer attempt
        # writes the same keys, so a worker that lost its lease must not delete them.
        prefix = f"{job.id}/"
        try:
            if engine is None:
                raise KleinserveError(
                    f"model {job.request.model} is not served by this worker", code="model_unavailable"
                )
            if self._should_stop(job):
                raise GenerationCancelledError()
            references = load_references(job.request.images, self.policy)
            mask = load_mask(job.request.mask, self.policy) if job.request.mask else None

            def on_progress(progress: Progress) -> None:
                if progress.stage == "denoise":
                    renewed = self.store.renew(
                        job.id, self.id, job.attempts, self.lease_seconds, step=progress.step, total=progress.total
                    )
                    if renewed is None:
                        self._lost.set()
                        raise _LostLease()
                    self.bus.notify()

            result = run_request(
                job.request,
                engine,
                references,
                mask=mask,
                on_progress=on_progress,
                should_cancel=lambda: self._should_stop(job),
            )
            metrics.job_ran(job, result.timings, result.steps)
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
        except (GenerationCancelledError, _LostLease):
            self._stopped(job)
            return
        except SafetyRefusal as err:
            self._complete(job, JobStatus.FAILED, error_code=err.code, error_message=err.message, safety=err.report)
            return
        except KleinserveError as err:
            self._complete(job, JobStatus.FAILED, error_code=err.code, error_message=err.message)
            return
        except Exception:
            log.exception("%s: job %s failed", self.name, job.id)
            self._complete(
                job,
                JobStatus.FAILED,
                error_code="internal_error",
                error_message="internal error while generating; see the server log",
            )
            return
        done = self._complete(job, JobStatus.SUCCEEDED, result=job_result, safety=safety)
        if done is None:  # the lease was lost meanwhile; the files belong to the newer attempt
            return
        if self.on_succeeded is not None:
            try:
                self.on_succeeded(done)
            except Exception:
                log.exception("%s: could not record usage of job %s", self.name, job.id)

    def _complete(self, job: Job, new: JobStatus, **fields: Any) -> Job | None:
        done = self.store.complete(job.id, self.id, job.attempts, new, **fields)
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
        if self._lost.is_set():
            return
        if self.store.cancel_requested(job.id):
            self._complete(job, JobStatus.CANCELLED)
            return
        # Shutting down: the job goes back to the queue, and this run does not count as an attempt.
        if self._complete(job, JobStatus.QUEUED) is not None:
            log.info("%s: job %s requeued at shutdown", self.name, job.id)
