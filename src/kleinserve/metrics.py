"""Prometheus metrics (``prometheus_client``): what is counted, and the one registry holding it.

Every metric lives in :data:`REGISTRY`, this process's own registry (with the standard ``process_*``
collector, whose ``process_resident_memory_bytes`` is the RSS). It is exposed at ``GET /metrics`` of
the HTTP server (``KLEINSERVE_METRICS=open|admin``, default ``off``; ``api/metrics_http.py``) and,
with ``--metrics-port``, on a plain port of its own (:func:`serve_port`).

**Several processes.** Each process counts what *it* did and is scraped on its own; no process
aggregates another's numbers. An API process counts HTTP requests, submissions and cancellations
of queued jobs; a worker process counts the jobs it ran (started, finished, stage latencies, steps
per second, batch sizes, device memory) and exposes them on ``--metrics-port``, having no HTTP API.
``kleinserve serve`` is both in one process, so ``/metrics`` has everything. Sum counters over
processes in PromQL (``sum by (model, outcome) (rate(kleinserve_jobs_finished_total[5m]))``); the
queue gauges are read from the shared job store by every API process, so take ``max`` of them.
This was chosen over aggregating in the store because counting in place costs no writes per job
and stays correct when a process dies (Prometheus handles counter resets); the price is one scrape
target per worker.

Labels are bounded: models are the served variants, dialects the provider APIs, routes the route
*templates* (``/api/ai/queue/{generation_id}``, never a raw path with an id; unknown paths are
``<unmatched>``), outcomes the three terminal statuses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kleinserve.jobs.job import Job, JobStatus

if TYPE_CHECKING:
    from kleinserve.api.access_log import FinishedRequest
    from kleinserve.engine.cache import CacheStats
    from kleinserve.runtime import Runtime

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

# 0.1 s to 10 min: a tiny model's stage on a GPU up to a big one on a CPU.
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Engine stage names (engine timings) -> the stage label; queue_wait and total are measured here.
ENGINE_STAGES = {
    "encode_prompt": "encode_prompt",
    "encode_references": "encode_references",
    "denoise": "denoise",
    "decode": "decode",
    "encode": "encode_image",
}

JOBS_SUBMITTED = Counter(
    "kleinserve_jobs_submitted", "Jobs accepted into the queue.", ["model", "dialect"], registry=REGISTRY
)
JOBS_STARTED = Counter(
    "kleinserve_jobs_started", "Job runs a worker started (a requeued job starts again).", ["model"], registry=REGISTRY
)
JOBS_FINISHED = Counter(
    "kleinserve_jobs_finished",
    "Jobs that ended, by outcome (succeeded, failed, cancelled).",
    ["model", "dialect", "outcome"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "kleinserve_stage_seconds",
    "Seconds per stage: queue_wait, encode_prompt, encode_references, denoise, decode, encode_image, total "
    "(submission to success).",
    ["model", "stage"],
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
STEPS_PER_SECOND = Histogram(
    "kleinserve_denoise_steps_per_second",
    "Denoising speed of each run (steps x 1 / denoise seconds; one step covers the whole batch).",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0),
    registry=REGISTRY,
)
BATCH_IMAGES = Histogram(
    "kleinserve_batch_images",
    "Images generated together in one engine run (all the jobs of a batch).",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 10, 16, 32, 64),
    registry=REGISTRY,
)
BATCH_JOBS = Histogram(
    "kleinserve_batch_jobs",
    "Jobs denoised together in one engine run (1: alone; at most KLEINSERVE_MAX_BATCH).",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
    registry=REGISTRY,
)
HTTP_REQUESTS = Counter(
    "kleinserve_http_requests", "HTTP requests answered.", ["method", "route", "status"], registry=REGISTRY
)
HTTP_SECONDS = Histogram(
    "kleinserve_http_request_duration_seconds",
    "Seconds from request to the end of the response (sync waits and SSE streams included).",
    ["method", "route"],
    buckets=HTTP_BUCKETS,
    registry=REGISTRY,
)


def job_submitted(job: Job) -> None:
    JOBS_SUBMITTED.labels(job.request.model, job.dialect).inc()


def job_started(job: Job) -> None:
    """A worker took ``job``: count it and how long it waited in the queue."""
    JOBS_STARTED.labels(job.request.model).inc()
    if job.started_at is not None:
        STAGE_SECONDS.labels(job.request.model, "queue_wait").observe(max(0.0, job.started_at - job.created_at))


def job_ran(job: Job, timings: Mapping[str, float]) -> None:
    """The engine finished ``job``'s images: the latency of each stage (a batch's stages are each of its jobs')."""
    model = job.request.model
    for name, stage in ENGINE_STAGES.items():
        if name in timings:
            STAGE_SECONDS.labels(model, stage).observe(timings[name])


def engine_ran(model: str, images: int, jobs: int, steps: int, timings: Mapping[str, float]) -> None:
    """One engine run made images: its size (``images`` of ``jobs`` jobs denoised together) and speed."""
    if timings.get("denoise", 0) > 0 and steps > 0:
        STEPS_PER_SECOND.labels(model).observe(steps / timings["denoise"])
    BATCH_IMAGES.labels(model).observe(images)
    BATCH_JOBS.labels(model).observe(jobs)


def job_finished(job: Job) -> None:
    """``job`` reached a terminal status in this process (a success also observes the total time)."""
    if not job.status.terminal:
        return
    JOBS_FINISHED.labels(job.request.model, job.dialect, job.status.value).inc()
    if job.status is JobStatus.SUCCEEDED:
        end = job.completed_at if job.completed_at is not None else time.time()
        STAGE_SECONDS.labels(job.request.model, "total").observe(max(0.0, end - job.created_at))


def observe_request(request: FinishedRequest) -> None:
    """An HTTP request was answered (an ``AccessMiddleware`` observer)."""
    HTTP_REQUESTS.labels(request.method, request.route, str(request.status)).inc()
    HTTP_SECONDS.labels(request.method, request.route).observe(request.duration)


class QueueCollector(Collector):
    """Queue depth, running jobs and the age of the oldest queued job, read from the store at scrape time."""

    def __init__(self, read: Callable[[], tuple[int, int, float | None]]) -> None:
        self.read = read  # -> (queued, processing, created_at of the oldest queued job or None)

    def collect(self) -> Iterator[Metric]:
        try:
            queued, processing, oldest = self.read()
        except Exception:
            log.exception("metrics: cannot read the queue")
            return
        yield GaugeMetricFamily("kleinserve_queue_depth", "Jobs waiting in the queue.", value=queued)
        yield GaugeMetricFamily("kleinserve_jobs_running", "Jobs being processed.", value=processing)
        age = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "kleinserve_queue_oldest_age_seconds", "Seconds the oldest queued job has waited (0: none).", value=age
        )


class DeviceMemoryCollector(Collector):
    """Device memory by device and kind (allocated, reserved, peak), from a callback at scrape time."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self.read = read  # -> (device, kind, bytes) rows

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "kleinserve_device_memory_bytes",
            "Device (CUDA/MPS) memory held by this process: allocated, reserved by the caching allocator, peak.",
            labels=["device", "kind"],
        )
        try:
            for device, kind, value in self.read():
                family.add_metric([device, kind], value)
        except Exception:
            log.exception("metrics: cannot read device memory")
        yield family


class PromptCacheCollector(Collector):
    """The engines' prompt-embedding caches, one per device: hits and misses (counters), entries and
    bytes held (gauges), each labelled by device."""

    def __init__(self, read: Callable[[], list[tuple[str, CacheStats]]]) -> None:
        self.read = read  # -> [(device, stats)]

    def collect(self) -> Iterator[Metric]:
        families = (
            (CounterMetricFamily, "kleinserve_prompt_cache_hits", "Prompts whose embedding was cached.", "hits"),
            (CounterMetricFamily, "kleinserve_prompt_cache_misses", "Prompts encoded anew.", "misses"),
            (GaugeMetricFamily, "kleinserve_prompt_cache_entries", "Embeddings held.", "entries"),
            (GaugeMetricFamily, "kleinserve_prompt_cache_bytes", "Bytes the held embeddings take.", "bytes"),
        )
        caches = self.read()
        for kind, name, documentation, attribute in families:
            family = kind(name, documentation, labels=["device"])
            for device, stats in caches:
                family.add_metric([device], getattr(stats, attribute))
            yield family


def watch(collector: Collector) -> Callable[[], None]:
    """Register ``collector``; returns the function that unregisters it."""
    REGISTRY.register(collector)
    return lambda: REGISTRY.unregister(collector)


def watch_runtime(runtime: Runtime, *, queue: bool = True) -> Callable[[], None]:
    """Register the scrape-time collectors of ``runtime`` (the queue unless ``queue=False``: a worker
    leaves it to the API processes; device memory; the prompt cache); returns the undo."""

    def queue_state() -> tuple[int, int, float | None]:
        store = runtime.store
        queued = store.list(statuses=[JobStatus.QUEUED], any_owner=True, limit=runtime.settings.max_queue + 1)
        oldest = min((job.created_at for job in queued), default=None)
        return store.count([JobStatus.QUEUED]), store.count([JobStatus.PROCESSING]), oldest

    def device_memory() -> list[tuple[str, str, int]]:
        if not runtime.device:  # models not loaded (or an API-only process): nothing to report
            return []
        from kleinserve.engine.device import memory_rows  # torch is loaded once a device is chosen

        return [row for device in runtime.device.split(",") for row in memory_rows(device)]  # "cuda:0,cuda:1"

    def prompt_caches() -> list[tuple[str, CacheStats]]:  # none in an API process: the workers hold them
        return [(device, cache.stats()) for device, cache in runtime.prompt_caches.items()]

    undo = [watch(DeviceMemoryCollector(device_memory)), watch(PromptCacheCollector(prompt_caches))]
    if queue:
        undo.append(watch(QueueCollector(queue_state)))

    def unwatch() -> None:
        for step in undo:
            step()

    return unwatch


def serve_port(port: int, host: str = "127.0.0.1") -> None:
    """Expose :data:`REGISTRY` on ``http://host:port/metrics`` from a background thread (no auth:
    bind it to an address only Prometheus reaches)."""
    start_http_server(port, addr=host, registry=REGISTRY)
    log.info("metrics on http://%s:%d/metrics", host, port)
