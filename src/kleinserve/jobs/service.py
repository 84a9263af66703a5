"""The job service: what dialects call to submit, read, list, cancel and wait for jobs.

Sync endpoints are jobs too (submit, then wait), so every request shares one queue, one bound and
one set of limits. The service never touches tensors; the workers do.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import anyio.to_thread

from kleinserve import logs, metrics
from kleinserve.engine.variants import find_variant
from kleinserve.errors import NotFoundError, ServiceUnavailableError, UnknownModelError
from kleinserve.jobs.admission import Admission
from kleinserve.jobs.events import TERMINAL_EVENTS, Event, EventBus, EventType, finished_job
from kleinserve.jobs.job import Job, JobStatus
from kleinserve.jobs.store.base import JobStore
from kleinserve.keys import ApiKey
from kleinserve.loras import check_choices
from kleinserve.quotas import Quotas
from kleinserve.request import GenerationRequest, random_seed

ACTIVE = (JobStatus.QUEUED, JobStatus.PROCESSING)
# A sync waiter re-reads its job this often in case it missed the terminal event (it cannot, as
# events are delivered from the store in order; this only bounds the cost of a bug).
_WAIT_RECHECK = 30.0
log = logging.getLogger(__name__)


class JobService:
    """Submits jobs to the durable queue and reports on them."""

    def __init__(
        self,
        store: JobStore,
        bus: EventBus,
        served_models: Iterable[str],
        *,
        max_queue: int = 100,
        max_queue_per_key: int | None = None,
        retry_after: int = 10,
    ) -> None:
        self.store = store
        self.bus = bus
        self.served_models = list(served_models)
        self.served_loras: builtins.list[str] = []  # LoRA adapter names requests may use
        self.max_queue = max_queue
        self.max_queue_per_key = max_queue_per_key
        self.retry_after = retry_after
        self.on_queued: builtins.list[Callable[[], None]] = []  # in-process workers' wake-ups
        self.quotas: Quotas | None = None
        # Called first by submit: stores the requests' references (kleinserve.inputs.InputStager).
        self.prepare: (
            Callable[[Sequence[GenerationRequest], ApiKey | None], builtins.list[GenerationRequest]] | None
        ) = None
        # ``api`` processes: models are served by workers elsewhere, so a known model no live
        # worker serves is "unavailable, retry" (503), not "unknown" (404).
        self.models_elsewhere = False

    # -- submission -----------------------------------------------------------------------------

    def check_model(self, model: str) -> str:
        """The canonical id of ``model`` if this server serves it; else :class:`UnknownModelError`."""
        try:
            variant_id = find_variant(model).id
        except UnknownModelError:
            raise UnknownModelError(model, self.served_models) from None
        if variant_id not in self.served_models:
            if self.models_elsewhere:
                raise ServiceUnavailableError(
                    f"no live worker serves model {variant_id} now; retry later", retry_after=self.retry_after
                )
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
        webhook_url: str | None = None,
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
                    webhook_url=webhook_url,
                )
            )
        admission = Admission(
            self.max_queue,
            retry_after=self.retry_after,
            key=key,
            max_queue_per_key=self.max_queue_per_key,
            now=time.time(),
        )
        # Jobs and their queued events are stored together, admitted (queue bound and the key's
        # limits), in one transaction: concurrent submissions, from any number of API processes,
        # cannot overshoot a limit, and job.queued always precedes job.started.
        queued = [Event.for_job(EventType.QUEUED, job, model=job.request.model) for job in jobs]
        self.store.enqueue(jobs, queued, admission)
        self.bus.notify()
        for wake in self.on_queued:
            wake()
        context.job_id = ",".join(job.id for job in jobs)
        for job in jobs:
            metrics.job_submitted(job)
            log.info("job queued", extra={"job_id": job.id, "model": job.request.model, "dialect": job.dialect})
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
        """Cancel a queued job now, or flag a running one: its worker, in whichever process, stops
        at the next step. A finished job is returned unchanged: cancelling it has no effect."""
        before = self.get(job_id, owner=owner, any_owner=any_owner)  # 404 unless it is the caller's
        job = self.store.request_cancel(job_id)
        if job is None:
            raise NotFoundError(f"generation {job_id} not found")
        if job.status is JobStatus.CANCELLED and not before.terminal:
            metrics.job_finished(job)
        self.bus.notify()
        return job

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Wait until the job is finished and return it (``TimeoutError`` after ``timeout``).

        The job is read once; its terminal event carries the outcome, so no reload follows.
        """
        async with self.bus.subscribe() as events:
            job = await anyio.to_thread.run_sync(self.get, job_id)
            if job.terminal:
                return job

            async def until_done() -> Job:
                async for event in events:
                    if event.job_id == job_id and event.type in TERMINAL_EVENTS:
                        try:
                            return finished_job(job, event)
                        except ValueError:  # an event from before events carried the state
                            return await anyio.to_thread.run_sync(self.get, job_id)
                raise AssertionError("event subscriptions do not end")

            async def until_done_or_recheck() -> Job:
                while True:
                    try:
                        return await asyncio.wait_for(asyncio.shield(done), _WAIT_RECHECK)
                    except TimeoutError:
                        fresh = await anyio.to_thread.run_sync(self.get, job_id)
                        if fresh.terminal:
                            return fresh

            done = asyncio.ensure_future(until_done())
            try:
                return await asyncio.wait_for(until_done_or_recheck(), timeout)
            finally:
                done.cancel()
