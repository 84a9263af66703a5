"""The worker: takes queued jobs from the store and runs them on one device, one at a time.

It runs in its own thread, so the server's event loop stays responsive while a GPU (or CPU) is busy.
Each job goes queue -> engine -> storage -> store -> events; any error ends the job as failed with
a reason, a cancel request ends it as cancelled, and a shutdown puts it back in the queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from kleinserve import logs, metrics
from kleinserve.engine.engine import Engine, Progress
from kleinserve.engine.images import InputPolicy, load_references
from kleinserve.errors import GenerationCancelledError, KleinserveError
from kleinserve.generation import run_request
from kleinserve.jobs.events import Event, EventBus, EventType
from kleinserve.jobs.job import Job, JobOutput, JobResult, JobStatus
from kleinserve.jobs.store.base import JobStore
from kleinserve.safety import SafetyChecker, SafetyRefusal
from kleinserve.storage.base import Storage

log = logging.getLogger(__name__)

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class CancelRequests:
    """Ids of running jobs whose cancellation was asked for; shared by the service and workers."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def request(self, job_id: str) -> None:
        with self._lock:
            self._ids.add(job_id)

    def requested(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._ids

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._ids.discard(job_id)


class Worker:
    """Runs queued jobs for the models in ``engines`` (all on one device) in a background thread."""

    def __init__(
        self,
        store: JobStore,
        bus: EventBus,
        storage: Storage,
        engines: Mapping[str, Engine],
        policy: InputPolicy,
        cancels: CancelRequests,
        name: str = "worker-0",
        idle_poll: float = 1.0,
        on_succeeded: Callable[[Job], None] | None = None,
        safety: SafetyChecker | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.storage = storage
        self.engines = dict(engines)
        self.policy = policy
        self.cancels = cancels
        self.name = name
        self.idle_poll = idle_poll
        self.on_succeeded = on_succeeded  # e.g. charging the job to its API key
        self.safety = safety  # the operator's safety checker, if any (kleinserve/safety.py)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.current_job_id: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Take no more jobs; the running one stops at its next step and goes back to the queue."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.store.claim_next()
            except Exception:
                log.exception("%s: cannot claim a job", self.name)
                job = None
            if job is None:
                self._wake.wait(self.idle_poll)
                self._wake.clear()
                continue
            self.current_job_id = job.id
            try:
                with logs.log_context(request_id=job.request_id, job_id=job.id, key_id=job.owner):
                    self._process(job)
            finally:
                self.current_job_id = None
                self.cancels.discard(job.id)

    def _should_stop(self, job_id: str) -> bool:
        return self._stopping.is_set() or self.cancels.requested(job_id)

    def _process(self, job: Job) -> None:
        metrics.job_started(job)
        log.info(
            "job started",
            extra={"model": job.request.model, "attempt": job.attempts, **logs.prompt_fields(job.request.prompt)},
        )
        self.bus.publish(Event.for_job(EventType.STARTED, job, model=job.request.model, attempt=job.attempts))
        engine = self.engines.get(job.request.model)
        try:
            if engine is None:
                raise KleinserveError(
                    f"model {job.request.model} is not served by this server", code="model_unavailable"
                )
            if self._should_stop(job.id):
                raise GenerationCancelledError()
            references = load_references(job.request.images, self.policy)

            def on_progress(progress: Progress) -> None:
                if progress.stage == "denoise":
                    self.store.update(job.id, progress_step=progress.step, progress_total=progress.total)
                    self.bus.publish(Event.for_job(EventType.PROGRESS, job, step=progress.step, total=progress.total))

            result = run_request(
                job.request,
                engine,
                references,
                on_progress=on_progress,
                should_cancel=lambda: self._should_stop(job.id),
            )
            metrics.job_ran(job, result.timings, result.steps)
            safety = self.safety.review(job.request, result) if self.safety else None  # may blur or refuse
            outputs = []
            for index, encoded in enumerate(result.images):
                key = f"{job.id}/{index}.{_EXTENSIONS[encoded.media_type]}"
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
        except GenerationCancelledError:
            self._stopped(job)
            return
        except SafetyRefusal as err:
            self._fail(job, err.code, err.message, safety=err.report)
            return
        except KleinserveError as err:
            self._fail(job, err.code, err.message)
            return
        except Exception:
            log.exception("%s: job %s failed", self.name, job.id)
            self._fail(job, "internal_error", "internal error while generating; see the server log")
            return
        done = self.store.transition(
            job.id, JobStatus.SUCCEEDED, expect=[JobStatus.PROCESSING], result=job_result, safety=safety
        )
        if done is None:  # cancelled meanwhile: the result files are not wanted
            self.storage.delete_prefix(f"{job.id}/")
            return
        if self.on_succeeded is not None:
            try:
                self.on_succeeded(done)
            except Exception:
                log.exception("%s: could not record usage of job %s", self.name, job.id)
        metrics.job_finished(done)
        log.info("job succeeded", extra={"images": len(outputs), "timings": result.timings})
        self.bus.publish(Event.for_job(EventType.SUCCEEDED, done, outputs=[o.key for o in outputs]))

    def _stopped(self, job: Job) -> None:
        if self.cancels.requested(job.id):
            cancelled = self.store.transition(job.id, JobStatus.CANCELLED, expect=[JobStatus.PROCESSING])
            if cancelled is not None:
                metrics.job_finished(cancelled)
                log.info("job cancelled")
                self.bus.publish(Event.for_job(EventType.CANCELLED, cancelled))
            return
        # Shutting down: the job goes back to the queue, and this run does not count as an attempt.
        requeued = self.store.transition(
            job.id, JobStatus.QUEUED, expect=[JobStatus.PROCESSING], attempts=max(0, job.attempts - 1), progress_step=0
        )
        if requeued is not None:
            log.info("%s: job %s requeued at shutdown", self.name, job.id)

    def _fail(self, job: Job, code: str, message: str, **fields: Any) -> None:
        failed = self.store.transition(
            job.id, JobStatus.FAILED, expect=[JobStatus.PROCESSING], error_code=code, error_message=message, **fields
        )
        if failed is not None:
            metrics.job_finished(failed)
            log.info("job failed: %s", message, extra={"code": code})
            self.bus.publish(Event.for_job(EventType.FAILED, failed, error=message, code=code))
