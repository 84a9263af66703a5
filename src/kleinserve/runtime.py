"""The server's moving parts, wired together and started in order (no HTTP here).

``Runtime`` owns the job store, event bus, result storage, job service, the loaded engines and the
workers. ``start()`` loads the models (off the event loop), recovers jobs a crash interrupted, and
starts the workers; ``stop()`` stops them so the running job goes back to the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from kleinserve import metrics
from kleinserve.access import Access
from kleinserve.engine.cache import PromptCache
from kleinserve.engine.catalog import ServedModel, load_engines, plan_models
from kleinserve.engine.classifier import safety_checker_from_settings
from kleinserve.engine.device import dtype_name, pick_device, pick_devices, pick_dtype
from kleinserve.engine.engine import Engine
from kleinserve.engine.images import InputPolicy
from kleinserve.engine.loading import LoadOptions, check_options, warm_up
from kleinserve.engine.lora import check_sources
from kleinserve.engine.memory import MemoryMode, MemoryPlan, plan_served
from kleinserve.engine.variants import find_variant
from kleinserve.errors import KleinserveError, UnknownModelError
from kleinserve.jobs.events import Event, EventBus, EventType
from kleinserve.jobs.job import Job
from kleinserve.jobs.service import ACTIVE, JobService
from kleinserve.jobs.store.sqlite import SQLiteJobStore
from kleinserve.jobs.worker import CancelRequests, Worker
from kleinserve.keys import KeyStore
from kleinserve.loras import LoraSource, parse_lora_options
from kleinserve.quotas import Quotas
from kleinserve.safety import SafetyChecker
from kleinserve.settings import Settings
from kleinserve.storage.base import Storage
from kleinserve.storage.factory import storage_from_settings

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

UPLOADS = "uploads"  # storage folder of images clients upload (1min.ai assets, OpenAI edit files)


@dataclass
class ModelInfo:
    """A served model as the API layer describes it."""

    served: ServedModel
    loaded: bool = False

    @property
    def id(self) -> str:
        return self.served.variant.id


def devices_for(settings: Settings) -> list[torch.device]:
    """The devices to run workers on: ``--devices`` (one worker each), else the one ``--device``."""
    return pick_devices(settings.devices) if settings.devices else [pick_device(settings.device)]


def load_options_for(settings: Settings, device: torch.device | None = None) -> tuple[torch.device, LoadOptions]:
    """The device and load options (dtype, memory mode, compile, attention) the settings ask for, checked."""
    device = device if device is not None else devices_for(settings)[0]
    mode = MemoryMode(settings.offload, settings.quantize, settings.quantize_text_encoder, settings.text_encoder_device)
    options = LoadOptions(pick_dtype(device, settings.dtype), mode, settings.compile, settings.attention_backend)
    check_options(device, options)
    return device, options


def memory_plan_for(settings: Settings, served: list[ServedModel], device: torch.device | None = None) -> MemoryPlan:
    """The memory plan of ``served`` on one of the settings' devices (default: the first); workers
    sharing that device (``--devices cpu,cpu``) each hold their own copy, so the plan holds them all."""
    device, options = load_options_for(settings, device)
    plan = plan_served(served, device, options.dtype, options.mode, device_memory_gb=settings.device_memory)
    sharing = sum(1 for other in devices_for(settings) if other == device)
    if sharing > 1:
        plan = replace(plan, models=plan.models * sharing)
    return plan


@dataclass
class DeviceState:
    """One device's worker as /readyz reports it."""

    device: str
    state: str = "loading"  # loading, ready or error
    error: str | None = None
    worker: Worker | None = None

    def describe(self) -> dict[str, object]:
        body: dict[str, object] = {"device": self.device, "state": self.state}
        if self.worker is not None:
            body["worker"] = self.worker.name
            body["job"] = self.worker.current_job_id
        if self.error:
            body["error"] = self.error
        return body


@dataclass
class Runtime:
    """Everything a running server holds, built from :class:`Settings`."""

    settings: Settings
    served: list[ServedModel] | None = None
    store: SQLiteJobStore = field(init=False)
    keys: KeyStore = field(init=False)
    access: Access = field(init=False)
    quotas: Quotas = field(init=False)
    bus: EventBus = field(init=False)
    storage: Storage = field(init=False)
    cancels: CancelRequests = field(init=False)
    service: JobService = field(init=False)
    engines: dict[str, Engine] = field(default_factory=dict, init=False)
    prompt_cache: PromptCache = field(init=False)  # hits/misses: prompt_cache.stats(), for /metrics
    workers: list[Worker] = field(default_factory=list, init=False)
    safety: SafetyChecker | None = field(default=None, init=False)
    device_states: list[DeviceState] = field(default_factory=list, init=False)  # one per worker
    ready: bool = field(default=False, init=False)
    load_error: str | None = field(default=None, init=False)
    device: str = field(default="", init=False)
    dtype: str = field(default="", init=False)
    memory: MemoryPlan | None = field(default=None, init=False)
    loras: dict[str, LoraSource] = field(default_factory=dict, init=False)  # offered LoRA adapters
    started_at: float = field(default_factory=time.time, init=False)

    def __post_init__(self) -> None:
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = SQLiteJobStore(data_dir / "jobs.sqlite3")
        self.bus = EventBus(self.store)
        self.storage = storage_from_settings(self.settings)
        self.cancels = CancelRequests()
        self.prompt_cache = PromptCache(self.settings.prompt_cache_bytes)
        self.service = JobService(
            self.store, self.bus, self.cancels, self.served_ids(), max_queue=self.settings.max_queue
        )
        self.keys = KeyStore(data_dir / "jobs.sqlite3")
        self.access = Access.at_start(self.keys, self.settings.host, self.settings.insecure_no_auth)
        self._revocations_seen = 0.0
        self.quotas = Quotas(self.keys, self.store, self.settings.price_per_image)
        self.service.quotas = self.quotas

    def served_ids(self) -> list[str]:
        return [m.variant.id for m in self.served or []]

    @property
    def demo(self) -> bool:
        return any(m.demo for m in self.served or [])

    def models(self) -> list[ServedModel]:
        return list(self.served or [])

    def served_model(self, name: str) -> ServedModel | None:
        """The served model called ``name`` in any provider's spelling, or ``None``."""
        try:
            variant_id = find_variant(name).id
        except UnknownModelError:
            return None
        return next((m for m in self.models() if m.variant.id == variant_id), None)

    async def start(self) -> None:
        """Plan and load the models on every device, recover interrupted jobs, start one worker per
        device (all take jobs from the same queue)."""
        try:
            if self.served is None:
                self.served = await asyncio.to_thread(plan_models, self.settings.models, self.settings.data_dir)
            self.service.served_models = self.served_ids()
            self.loras = parse_lora_options(self.settings.loras)
            check_sources(self.loras)
            self.service.served_loras = list(self.loras)
            devices = devices_for(self.settings)
            self.device_states = [DeviceState(str(device)) for device in devices]
            first, options = load_options_for(self.settings, devices[0])
            self.device, self.dtype = ",".join(str(d) for d in devices), dtype_name(options.dtype)
            for device in dict.fromkeys(devices):  # every distinct device must hold its workers' models
                plan = await asyncio.to_thread(memory_plan_for, self.settings, self.served, device)
                self.memory = self.memory or plan
                plan.check()
            caches: dict[str, PromptCache] = {str(first): self.prompt_cache}  # entries live on their device
            for index, device in enumerate(devices):
                engines, safety = await asyncio.to_thread(self._load_device, device, caches)
                if index == 0:
                    self.engines, self.safety = engines, safety
                self._start_worker(index, engines, safety)
        except KleinserveError as err:
            self.load_error = err.message
            for state in self.device_states:
                if state.state == "loading":
                    state.state, state.error = "error", err.message
            log.error("cannot load models: %s", err.message)
            for worker in self.workers:  # no half-started server: every device or none
                worker.stop()
            self.workers.clear()
            return
        self.service.workers = self.workers
        self.ready = True
        log.info("ready: %s on %s (%s)", ", ".join(self.served_ids()), self.device, self.dtype)

    def _load_device(
        self, device: torch.device, caches: dict[str, PromptCache]
    ) -> tuple[dict[str, Engine], SafetyChecker | None]:
        """Load every served model onto ``device`` (warmed up when compiled), with its prompt cache."""
        assert self.served is not None
        _, options = load_options_for(self.settings, device)
        engines = load_engines(self.served, device, options.dtype, options, self.loras, self.settings.lora_cache)
        cache = caches.setdefault(str(device), PromptCache(self.settings.prompt_cache_bytes))
        for engine in engines.values():
            engine.prompt_cache = cache
            engine.cfg_batch = {"on": True, "off": False}.get(self.settings.cfg_batch)
        if options.compile:  # compile now, not in the first request
            for engine in {id(e.pipeline): e for e in engines.values()}.values():
                warm_up(engine)
        return engines, safety_checker_from_settings(self.settings, device)

    def _start_worker(self, index: int, engines: dict[str, Engine], safety: SafetyChecker | None) -> None:
        if index == 0:
            self.recover()  # before any worker claims
        worker = Worker(
            self.store,
            self.bus,
            self.storage,
            engines,
            InputPolicy.from_settings(self.settings, read_asset=self.read_asset),
            self.cancels,
            name=f"worker-{index}",
            on_succeeded=self.charge,
            safety=safety,
        )
        worker.start()
        self.workers.append(worker)
        self.service.workers = self.workers
        state = self.device_states[index]
        state.state, state.worker = "ready", worker

    def recover(self) -> None:
        """Jobs a crash left running go back to the queue, or fail once out of attempts."""
        requeued, failed = self.store.recover(self.settings.max_attempts)
        for job in failed:
            metrics.job_finished(job)
            self.bus.publish(Event.for_job(EventType.FAILED, job, error=job.error_message, code=job.error_code))
        # Queued jobs for a model this start does not serve fail in the worker, with that reason.
        if requeued or failed:
            log.warning("recovered after a restart: %d job(s) requeued, %d failed", len(requeued), len(failed))

    def charge(self, job: Job) -> None:
        """Record a succeeded job's usage (and cost) against the API key that submitted it."""
        if job.owner is not None:
            self.keys.record_usage(job.owner, job.id, job.request.model, job.request.num_images, job.cost)

    def read_asset(self, key: str) -> bytes:
        """The bytes of a stored file (an uploaded reference image, or an earlier result)."""
        return self.storage.read(key)

    def stop(self) -> None:
        """Stop the workers (the running job is requeued) and close the store."""
        for worker in self.workers:
            worker.stop()
        self.workers.clear()
        self.store.close()

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
