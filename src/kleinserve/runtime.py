"""The server's moving parts, wired together and started in order (no HTTP here).

``Runtime`` owns the job store, event bus, result storage, job service, the loaded engines and the
workers. ``start()`` loads the models (off the event loop), reaps jobs a crash interrupted, and
starts the workers; ``stop()`` stops them so the running job goes back to the queue.

Beside it: placement.py (the devices, load options and memory plan, loading a device's models),
reaper.py (handing back the jobs of workers that are gone, every ``KLEINSERVE_REAP_INTERVAL``
seconds), roster.py (the models live workers serve, for an ``api`` process).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from kleinserve import backends, logs, metrics, reaper
from kleinserve.access import Access
from kleinserve.engine.images import InputPolicy
from kleinserve.engine.variants import find_variant
from kleinserve.errors import KleinserveError, UnknownModelError
from kleinserve.inputs import InputStager
from kleinserve.jobs.events import EventBus
from kleinserve.jobs.job import Job
from kleinserve.jobs.service import ACTIVE, JobService
from kleinserve.jobs.store.base import JobStore
from kleinserve.keys import ApiKeyStore
from kleinserve.loras import LoraSource, parse_lora_options
from kleinserve.placement import DeviceState, devices_for, load_device, load_options_for, memory_plan_for
from kleinserve.quotas import Quotas
from kleinserve.roster import AdvertisedModel, advertised_models
from kleinserve.safety import SafetyChecker
from kleinserve.settings import Settings
from kleinserve.storage.base import Storage
from kleinserve.storage.factory import storage_from_settings
from kleinserve.webhooks.store import WebhookStore

if TYPE_CHECKING:  # the engine (torch) is imported only by roles that load models
    import torch

    from kleinserve.engine.cache import PromptCache
    from kleinserve.engine.catalog import ServedModel
    from kleinserve.engine.engine import Engine
    from kleinserve.engine.memory import MemoryPlan
    from kleinserve.jobs.worker import Worker

log = logging.getLogger(__name__)

UPLOADS = "uploads"  # storage folder of images clients upload (1min.ai assets, OpenAI edit files)

Role = Literal["serve", "api", "worker"]


@dataclass
class Runtime:
    """Everything a running process holds, built from :class:`Settings`, for its role:

    - ``serve``: HTTP, the models and a worker in one process (the embedded default); its worker
      takes every queued job and fails those for models it does not serve.
    - ``api``: HTTP only, no models and no torch; it advertises the models live workers serve (their
      heartbeats) and answers 503 for a model no live worker serves.
    - ``worker``: no HTTP; loads its models and takes only jobs for them.
    """

    settings: Settings
    served: list[ServedModel] | None = None
    role: Role = "serve"
    store: JobStore = field(init=False)
    keys: ApiKeyStore = field(init=False)
    access: Access = field(init=False)
    inputs: InputStager = field(init=False)
    quotas: Quotas = field(init=False)
    bus: EventBus = field(init=False)
    storage: Storage = field(init=False)
    service: JobService = field(init=False)
    engines: dict[str, Engine] = field(default_factory=dict, init=False)
    # Built by roles that load models, one per distinct device (entries live on their device); their
    # stats() are /metrics' prompt-cache series, labelled by device.
    prompt_caches: dict[str, PromptCache] = field(default_factory=dict, init=False)
    workers: list[Worker] = field(default_factory=list, init=False)
    safety: SafetyChecker | None = field(default=None, init=False)
    webhooks: WebhookStore | None = field(default=None, init=False)  # set while the dispatcher runs
    webhook_secret: str | None = field(default=None, init=False)
    ready: bool = field(default=False, init=False)
    load_error: str | None = field(default=None, init=False)
    device: str = field(default="", init=False)
    dtype: str = field(default="", init=False)
    memory: MemoryPlan | None = field(default=None, init=False)
    loras: dict[str, LoraSource] = field(default_factory=dict, init=False)  # offered LoRA adapters
    device_states: list[DeviceState] = field(default_factory=list, init=False)  # one per worker
    started_at: float = field(default_factory=time.time, init=False)
    advertised: list[AdvertisedModel] = field(default_factory=list, init=False)
    # ``api``: per model, the live workers serving it (refresh_models), as model_devices() lists them.
    advertised_devices: dict[str, list[dict[str, object]]] = field(default_factory=dict, init=False)
    # Engines already loaded by the caller (``kleinserve bench`` serves the modules it times in
    # process); every worker then uses them instead of loading ``served`` again.
    preloaded: dict[str, Engine] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = backends.job_store(self.settings)
        self.bus = backends.event_bus(self.settings, self.store)
        self.storage = storage_from_settings(self.settings)
        self.service = JobService(
            self.store,
            self.bus,
            self.served_ids(),
            max_queue=self.settings.max_queue,
            max_queue_per_key=self.settings.queue_share(),
        )
        self.service.models_elsewhere = self.role == "api"
        self.keys = backends.key_store(self.settings, self.store)
        self.access = Access.at_start(self.keys, self.settings.host, self.settings.insecure_no_auth)
        self._revocations_seen = 0.0
        self.quotas = Quotas(self.store, self.settings.price_per_image)
        self.service.quotas = self.quotas
        # References are checked, fetched and stored before a job is queued (inputs.py).
        self.inputs = InputStager(self.settings, self.storage, self.store, self.keys)
        self.service.prepare = self.inputs.stage

    def served_ids(self) -> list[str]:
        return [m.variant.id for m in self.models()]

    @property
    def demo(self) -> bool:
        return any(m.demo for m in self.models())

    def models(self) -> list[ServedModel | AdvertisedModel]:
        """The models this process serves (``api``: those live workers serve)."""
        return list(self.advertised) if self.role == "api" else list(self.served or [])

    def model_devices(self, variant_id: str) -> list[dict[str, object]]:
        """Per device, where ``variant_id`` runs, for the model lists: ``serve`` and ``worker``: each
        device's worker (every worker loads every served model) with its state (loading, ready,
        error) and whether it is running a job; ``api``: the live workers that serve it."""
        if self.role == "api":
            return [dict(entry) for entry in self.advertised_devices.get(variant_id, [])]
        return [state.listed() for state in self.device_states]

    def served_model(self, name: str) -> ServedModel | AdvertisedModel | None:
        """The served model called ``name`` in any provider's spelling, or ``None``."""
        try:
            variant_id = find_variant(name).id
        except UnknownModelError:
            return None
        return next((m for m in self.models() if m.variant.id == variant_id), None)

    async def start(self) -> None:
        """Plan and load the models, reap interrupted jobs, start the worker (``api``: only reap
        and learn the live workers' models)."""
        if self.role == "api":
            await asyncio.to_thread(self.reap)
            await asyncio.to_thread(self.refresh_models)
            self.ready = True
            log.info("ready: api; models of live workers: %s", ", ".join(self.served_ids()) or "none yet")
            return
        from kleinserve.engine.catalog import plan_models
        from kleinserve.engine.device import dtype_name
        from kleinserve.engine.lora import check_sources

        try:
            if self.served is None:
                self.served = await asyncio.to_thread(plan_models, self.settings.models, self.settings.data_dir)
            self.service.served_models = self.served_ids()
            self.loras = parse_lora_options(self.settings.loras)
            check_sources(self.loras)
            self.service.served_loras = list(self.loras)
            devices = devices_for(self.settings)
            self.device_states = [DeviceState(str(device)) for device in devices]
            _, options = load_options_for(self.settings, devices[0])
            self.device, self.dtype = ",".join(str(d) for d in devices), dtype_name(options.dtype)
            for device in dict.fromkeys(devices):  # every distinct device must hold its workers' models
                plan = await asyncio.to_thread(memory_plan_for, self.settings, self.served, device)
                self.memory = self.memory or plan
                plan.check()
            caches: dict[str, PromptCache] = {}  # one per device: entries live on their device
            loaded = []
            for device in devices:
                loaded.append(await asyncio.to_thread(self._load_device, device, caches))
            self.engines, self.safety = loaded[0]
            self.prompt_caches = caches
            logs.adopt_library_loggers()  # imported by now: their later lines take our format too
        except KleinserveError as err:
            self.load_error = err.message
            for state in self.device_states:
                state.state, state.error = "error", err.message
            log.error("cannot load models: %s", err.message)
            return
        await asyncio.to_thread(self.reap)
        for index, (engines, safety) in enumerate(loaded):
            await self._start_worker(index, engines, safety)
        self.ready = True
        log.info("ready: %s on %s (%s)", ", ".join(self.served_ids()), self.device, self.dtype)

    def _load_device(
        self, device: torch.device, caches: dict[str, PromptCache]
    ) -> tuple[dict[str, Engine], SafetyChecker | None]:
        """Load every served model onto ``device`` (placement.py), with its prompt cache."""
        assert self.served is not None
        return load_device(self.settings, self.served, self.loras, device, caches, self.preloaded)

    async def _start_worker(self, index: int, engines: dict[str, Engine], safety: SafetyChecker | None) -> None:
        """Start the worker of device ``index``; every worker claims from the same queue."""
        from kleinserve.jobs.worker import Worker

        assert self.served is not None
        state = self.device_states[index]
        worker = Worker(
            self.store,
            self.bus,
            self.storage,
            engines,
            InputPolicy.from_settings(self.settings, read_asset=self.read_asset),
            name=f"worker-{index}",
            lease_seconds=self.settings.lease_seconds,
            heartbeat_seconds=self.settings.heartbeat_seconds,
            max_batch=self.settings.max_batch,
            batch_window=self.settings.batch_window_ms / 1000,
            on_succeeded=self.charge,
            info={"device": state.device, "dtype": self.dtype, "demo": [m.variant.id for m in self.served if m.demo]},
            claim_any=self.role == "serve",
            safety=safety,
        )
        self.workers.append(worker)
        await asyncio.to_thread(worker.start)
        self.service.on_queued.append(worker.wake)
        state.state, state.worker = "ready", worker

    def reap(self) -> tuple[int, int]:
        """Hand back jobs whose worker is gone (reaper.py): requeued, or failed as interrupted at
        ``max_attempts``. Returns (requeued, ended)."""
        return reaper.reap(self.store, self.bus, self.settings.max_attempts, self.workers)

    def refresh_models(self) -> list[str]:
        """``api``: learn which models live workers serve (heartbeats of the last three intervals)."""
        since = time.time() - 3 * self.settings.heartbeat_seconds
        self.advertised, self.advertised_devices = advertised_models(self.store, since)
        self.service.served_models = self.served_ids()
        return self.service.served_models

    async def refresh_models_forever(self) -> None:
        """``api``: keep the advertised models current (other roles know their own)."""
        if self.role != "api":
            return
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                await asyncio.to_thread(self.refresh_models)
            except Exception:
                log.exception("reading live workers failed")

    async def reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reap_interval)
            try:
                await asyncio.to_thread(self.reap)
            except Exception:
                log.exception("reaping interrupted jobs failed")

    def charge(self, job: Job) -> None:
        """Record a succeeded job's usage (and cost) against the API key that submitted it."""
        if job.owner is not None:
            self.keys.record_usage(job.owner, job.id, job.request.model, job.request.num_images, job.cost)

    def read_asset(self, key: str) -> bytes:
        """The bytes of a stored file (an uploaded reference image, or an earlier result)."""
        return self.storage.read(key)

    def stop(self) -> None:
        """Stop the workers (the running job is requeued) and close the stores."""
        for worker in self.workers:
            worker.stop()
        self.workers.clear()
        self.bus.close()
        self.store.close()
        self.keys.close()

    def sweep(self) -> int:
        """Remove finished jobs and their files past the retention time; return how many."""
        cutoff = time.time() - self.settings.retention_seconds
        removed = self.store.remove_finished_before(cutoff)
        for job in removed:
            self.storage.delete_prefix(f"{job.id}/")
        self.storage.delete_older_than(f"{UPLOADS}/", cutoff)
        return len(removed)

    def enforce_revocations(self) -> int:
        """Cancel the queued and running jobs of keys revoked since the last check; return how many.

        Also tightens :attr:`access` when a key was created, and records the revoked ids, so the
        revoked keys' event streams end (``api.auth.while_allowed``). The first check covers every
        key revoked before this start; later ones look a minute back, so clock skew between the
        process that revoked and this one loses nothing (cancelling twice is harmless).
        """
        self.access.keys_required()
        revoked = self.keys.revoked_since(self._revocations_seen)
        if not revoked:
            return 0
        self.access.note_revoked(frozenset(key_id for key_id, _ in revoked))
        self._revocations_seen = max(at for _, at in revoked) - 60
        cancelled = 0
        for key_id, _ in revoked:
            for job in self.store.list(owner=key_id, any_owner=False, statuses=ACTIVE, limit=100_000):
                self.service.cancel(job.id)  # queued: cancelled now; running: stops at its next step
                cancelled += 1
        if cancelled:
            log.info("revoked keys: cancelled %d job(s)", cancelled)
        return cancelled

    async def enforce_revocations_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.enforce_revocations)
            except Exception:
                log.exception("revocation check failed")
            await asyncio.sleep(self.settings.revocation_interval)

    async def sweep_forever(self) -> None:
        while True:
            try:
                removed = await asyncio.to_thread(self.sweep)
                if removed:
                    log.info("retention: removed %d finished job(s)", removed)
            except Exception:
                log.exception("retention sweep failed")
            await asyncio.sleep(self.settings.cleanup_interval)


async def run_worker(settings: Settings, served: list[ServedModel] | None = None) -> int:
    """``kleinserve worker``: load the models, take jobs for them until SIGTERM or SIGINT, then hand
    the running job back to the queue (no attempt used). Returns the exit status."""
    import signal

    runtime = Runtime(settings, served, role="worker")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await runtime.start()
    if not runtime.ready:
        await asyncio.to_thread(runtime.stop)
        return 1
    # A worker has no HTTP API: its own metrics (jobs it ran, stages, device memory, the prompt
    # cache) are on --metrics-port; the queue gauges come from the API processes.
    metrics.watch_runtime(runtime, queue=False)
    if settings.metrics_port is not None:
        metrics.serve_port(settings.metrics_port, settings.metrics_host)
    log.info("worker %s serving %s", runtime.workers[0].id, ", ".join(runtime.served_ids()))
    tasks = [asyncio.create_task(runtime.reap_forever()), asyncio.create_task(runtime.sweep_forever())]
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(runtime.stop)
    return 0
