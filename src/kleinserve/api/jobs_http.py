"""HTTP helpers every dialect shares: sync waits that cancel on disconnect, result URLs and bytes."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated

from fastapi import Depends, Request

from kleinserve.engine.images import ASSET_PREFIX
from kleinserve.errors import (
    ContentPolicyError,
    GenerationCancelledError,
    InvalidParameterError,
    InvalidRequestError,
    KleinserveError,
    ResourceExhaustedError,
    ServiceUnavailableError,
)
from kleinserve.jobs.job import Job, JobOutput, JobStatus
from kleinserve.keys import ApiKey
from kleinserve.loras import LORA_HEADER, parse_lora_header
from kleinserve.request import GenerationRequest
from kleinserve.runtime import Runtime
from kleinserve.settings import Settings

_DISCONNECT_POLL = 0.25
DEMO_HEADER = "X-Kleinserve-Demo"


def runtime_of(request: Request) -> Runtime:
    """The runtime serving ``request``."""
    runtime: Runtime = request.app.state.runtime
    return runtime


def ready_runtime(request: Request) -> Runtime:
    """The runtime, or 503 with Retry-After while models are still loading (or failed to)."""
    runtime = runtime_of(request)
    if not runtime.ready:
        why = f"models failed to load: {runtime.load_error}" if runtime.load_error else "models are still loading"
        raise ServiceUnavailableError(f"not ready: {why}", retry_after=5)
    return runtime


ReadyRuntime = Annotated[Runtime, Depends(ready_runtime)]


def job_error(job: Job) -> KleinserveError:
    """The domain error that ended a failed or cancelled job, for a sync response."""
    message = job.error_message or f"generation {job.status.value}"
    code = job.error_code or "generation_failed"
    if job.status is JobStatus.CANCELLED:
        return GenerationCancelledError("generation was cancelled")
    if code == ContentPolicyError.code:
        return ContentPolicyError(message)
    if code.startswith("invalid_") or code == "unknown_model":
        return InvalidRequestError(message, code=code)
    if code == "out_of_memory":
        return ResourceExhaustedError(message)
    return KleinserveError(message, code=code)


async def wait_for_jobs(request: Request, runtime: Runtime, jobs: list[Job]) -> list[Job]:
    """Wait for every job of a sync request; a client that disconnects cancels them.

    Raises the job's error when one fails, and 503 when the wait outlasts ``sync_timeout``.
    """
    service = runtime.service
    waits = [asyncio.ensure_future(service.wait(job.id)) for job in jobs]
    deadline = asyncio.get_running_loop().time() + runtime.settings.sync_timeout
    try:
        while not all(w.done() for w in waits):
            await asyncio.wait(waits, timeout=_DISCONNECT_POLL)
            if await request.is_disconnected():
                for job in jobs:
                    await asyncio.to_thread(service.cancel, job.id)
                raise GenerationCancelledError("the client disconnected; generation cancelled")
            if asyncio.get_running_loop().time() > deadline:
                for job in jobs:
                    await asyncio.to_thread(service.cancel, job.id)
                raise ServiceUnavailableError(
                    f"generation took longer than {runtime.settings.sync_timeout:g}s; use the async queue",
                    retry_after=30,
                )
    finally:
        for w in waits:
            if not w.done():
                w.cancel()
    finished = [w.result() for w in waits]
    for job in finished:
        if job.status is not JobStatus.SUCCEEDED:
            raise job_error(job)
    return finished


async def store_upload(
    runtime: Runtime,
    data: bytes,
    index: int | None,
    field: str,
    key: ApiKey | None,
    cost: float = 0.0,
    jobs: int = 0,
    size: tuple[int, int] | None = None,
) -> str:
    """Check an uploaded image and keep it as PNG in storage, as ``key``'s; return its ``asset:`` reference.

    The key's limits are checked first (``cost`` and ``jobs``: what the request will need), so a key
    that could not use the upload pays no decoding. Decoding runs off the event loop, bounded
    (kleinserve.inputs), and refuses bad uploads at once (naming ``field[index]``, or ``field`` for a
    single upload with ``index`` None); it stores the exact RGB pixels a URL to the same file would
    give, so every transport yields the same generation. ``size``: resized to (width, height) first.
    """
    await asyncio.to_thread(runtime.inputs.precheck, key, cost, jobs)
    owner = key.id if key else None
    return ASSET_PREFIX + await asyncio.to_thread(runtime.inputs.store_upload, data, index, owner, field, size)


def outputs_of(job: Job) -> list[JobOutput]:
    return list(job.result.outputs) if job.result else []


def result_url(runtime: Runtime, output: JobOutput) -> str:
    """An absolute, expiring URL of one result file, made by the storage backend (never from the
    request's Host header)."""
    return runtime.storage.url(output.key)


def result_b64(runtime: Runtime, output: JobOutput) -> str:
    """One result file's bytes, base64-encoded (blocking, maybe on the network: call it in a thread)."""
    return base64.b64encode(runtime.storage.read(output.key)).decode()


def with_lora_header(request: Request, gens: list[GenerationRequest], settings: Settings) -> list[GenerationRequest]:
    """Apply the ``X-Kleinserve-Loras`` header (``name=0.8, other``) to canonical requests: how the
    dialects without a body field for adapters (1min.ai, Verda, OpenAI multipart) name them."""
    text = request.headers.get(LORA_HEADER)
    if text is None or not text.strip():
        return gens
    choices = parse_lora_header(text)
    applied = []
    for gen in gens:
        if gen.loras:
            raise InvalidParameterError("loras", f"name adapters in the body or the {LORA_HEADER} header, not both")
        applied.append(GenerationRequest.parse({**gen.model_dump(), "loras": choices}, settings))
    return applied
