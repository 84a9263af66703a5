"""The job service: what dialects call to submit, read, list, cancel and wait for jobs.

Sync endpoints are jobs too (submit, then wait), so every request shares one queue, one bound and
one set of limits. The service never touches tensors; the workers do.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kleinserve import logs, metrics
from kleinserve.engine.variants import find_variant
from kleinserve.errors import NotFoundError, ServiceUnavailableError, UnknownModelError
from kleinserve.jobs.events import Event, EventBus, EventType
from kleinserve.jobs.job import Job, JobStatus
from kleinserve.jobs.store.base import JobStore
from kleinserve.jobs.worker import CancelRequests, Worker
from kleinserve.keys import ApiKey
from kleinserve.loras import check_choices
from kleinserve.quotas import Quotas
from kleinserve.request import GenerationRequest, random_seed

ACTIVE = (JobStatus.QUEUED, JobStatus.PROCESSING)
log = logging.getLogger(__name__)


class JobService:
    """Submits jobs to the durable queue and reports on them."""

    def __init__(
        self,
        store: JobStore,
        bus: EventBus,
        cancels: CancelRequests,
        served_models: Iterable[str],
        *,
        max_queue: int = 100,
        retry_after: int = 10,
    ) -> None:
        self.store = store
        self.bus = bus
        self.cancels = cancels
        self.served_models = list(served_models)
        self.served_loras: builtins.list[str] = []  # LoRA adapter names requests may use
        self.max_queue = max_queue
        self.retry_after = retry_after
        self.workers: builtins.list[Worker] = []
        self.quotas: Quotas | None = None
        # Called first by submit: stores the requests' references (kleinserve.inputs.InputStager).
        self.prepare: (
            Callable[[Sequence[GenerationRequest], ApiKey | None], builtins.list[GenerationRequest]] | None
        ) = None
        # Admission (quota checks) and enqueueing happen together, so one key's concurrent
        # requests cannot all pass a check that only one of them should.
        self._admission = threading.Lock()

    # -- submission -----------------------------------------------------------------------------

    def check_model(self, model: str) -> str:
        """The canonical id of ``model`` if this server serves it; else :class:`UnknownModelError`."""
        try:
            variant_id = find_variant(model).id
        except UnknownModelError:
            raise UnknownModelError(model, self.served_models) from None
        if variant_id not in self.served_models:
            raise UnknownModelError(model, self.served_models)
        return variant_id

    def submit(
        self,
        requests: Sequence[GenerationRequest],
        *,
        key: ApiKey | None = None,
        owner: str | None = None,
        dialect: str = "kleinserve",
        extra: dict[str, Any] | None = None,
    ) -> builtins.list[Job]:
        """Queue one job per request (all or none); each gets a fixed seed now if it has none.

        With an API ``key`` the jobs are that key's (``owner`` is its id), priced, and admitted by
        its quotas; without one, ``owner`` (if any) is recorded as given.
        """
        for request in requests:
            self.check_model(request.model)
        if self.prepare is not None:
            requests = self.prepare(requests, key)
        jobs = []
        context = logs.current()  # the HTTP request's log context: its id goes onto the jobs
        for request in requests:
            model = self.check_model(request.model)
            check_choices((choice.name for choice in request.loras), self.served_loras)
            seed = request.seed if request.seed is not None else random_seed()
            request = request.model_copy(update={"model": model, "seed": seed})
            cost = self.quotas.price(model, request.num_images) if self.quotas and key else 0.0
            jobs.append(
                Job(
                    request=request,
                    owner=key.id if key else owner,
                    dialect=dialect,
                    extra=dict(extra or {}),
                    cost=cost,
                    request_id=context.request_id,
                )
            )
        with self._admission:
            if key is not None and self.quotas is not None:
                self.quotas.admit(key, jobs)
            queued = self._enqueue(jobs)
        context.job_id = ",".join(job.id for job in queued)
        for job in queued:
            metrics.job_submitted(job)
            log.info("job queued", extra={"job_id": job.id, "model": job.request.model, "dialect": job.dialect})
        return queued

    def _enqueue(self, jobs: builtins.list[Job]) -> builtins.list[Job]:
        # Jobs and their queued events are stored together, under the bound, in one transaction:
        # concurrent submissions cannot overshoot it, and job.queued always precedes job.started.
        queued = [Event.for_job(EventType.QUEUED, job, model=job.request.model) for job in jobs]
        stored = self.store.enqueue(jobs, queued, self.max_queue)
        if stored is None:
            raise ServiceUnavailableError(
                f"the queue is full (at most {self.max_queue} jobs waiting or running); retry later",
                retry_after=self.retry_after,
            )
        for event in stored:
            self.bus.deliver(event)
        for worker in self.workers:
            worker.wake()
        return jobs

    # -- reading --------------------------------------------------------------------------------

    def get(self, job_id: str, *, owner: str | None = None, any_owner: bool = True) -> Job:
        """The job, if it exists and (unless ``any_owner``) belongs to ``owner``; else 404."""
        job = self.store.get(job_id)
        if job is None or (not any_owner and job.owner != owner):
            raise NotFoundError(f"generation {job_id} not found")
        return job

    def list(
        self,
        *,
        owner: str | None = None,
        any_owner: bool = True,
        statuses: Iterable[JobStatus] | None = None,
        model: str | None = None,
        limit: int = 100,
    ) -> builtins.list[Job]:
        return self.store.list(owner=owner, any_owner=any_owner, statuses=statuses, model=model, limit=limit)

    def queue_positions(self, jobs: Iterable[Job]) -> dict[str, int]:
        """How many queued jobs are ahead of each queued job in ``jobs`` (one store query)."""
        return self.store.queue_positions([job.id for job in jobs if job.status is JobStatus.QUEUED])

    # -- cancelling and waiting -----------------------------------------------------------------

    def cancel(self, job_id: str, *, owner: str | None = None, any_owner: bool = True) -> Job:
        """Cancel a queued job now, or ask its worker to stop a running one at the next step.

        A finished job is returned unchanged: cancelling it has no effect.
        """
        job = self.get(job_id, owner=owner, any_owner=any_owner)
        if job.status is JobStatus.QUEUED:
            cancelled = self.store.transition(job_id, JobStatus.CANCELLED, expect=[JobStatus.QUEUED])
            if cancelled is not None:
                metrics.job_finished(cancelled)
                self.bus.publish(Event.for_job(EventType.CANCELLED, cancelled))
                return cancelled
            job = self.get(job_id)  # a worker claimed it meanwhile
        if job.status is JobStatus.PROCESSING:
            self.cancels.request(job_id)
            job = self.get(job_id)
            if job.terminal:  # it finished meanwhile: its worker will never look for this request
                self.cancels.discard(job_id)
        return job

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Wait until the job is finished and return it (``TimeoutError`` after ``timeout``)."""
        async with self.bus.subscribe() as events:
            job = await asyncio.to_thread(self.get, job_id)
            if job.terminal:
                return job

            async def until_done() -> Job:
                async for event in events:
                    if event.job_id == job_id and event.type in (
                        EventType.SUCCEEDED,
                        EventType.FAILED,
                        EventType.CANCELLED,
                    ):
                        break
                return await asyncio.to_thread(self.get, job_id)

            return await asyncio.wait_for(until_done(), timeout)
