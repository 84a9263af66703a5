"""OpenAI's streamed image responses (``stream: true``): Server-Sent Events the ``openai`` SDK parses.

The request is queued like any other before the stream starts, so refusals (bad parameters, a full
queue, rate limits) are ordinary error responses. The stream then carries, per image,
``image_generation.completed`` (or ``image_edit.completed``) with ``b64_json`` and OpenAI's fields;
``usage`` is all zeros (klein is not billed in tokens). A failure after the stream started is an
``error`` event with ``{"type": "error", "error": {"message", "type", "param", "code"}}``, which the
SDK raises as ``APIError``.

``partial_images`` (0-3) becomes the job's ``previews``: before the completed events come up to that
many ``image_generation.partial_image`` (``image_edit.partial_image``) events with ``b64_json`` (a JPEG
preview of the first image, decoded from the denoising loop's x0 estimate; engine/preview.py),
``partial_image_index`` from 0, ``output_format: "jpeg"`` and the preview's ``size``. The worker
stores each preview and announces it as a ``job.preview`` event (jobs/previews.py); this process
reads the bytes from storage, so the API and the worker may be different processes. Previews are best
effort: OpenAI documents that the final image may arrive before the requested partial images, and
clients handle a stream with fewer. Compatibility notes: docs/api/openai.md.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import Request
from PIL import Image
from sse_starlette import EventSourceResponse, ServerSentEvent

from kleinserve.api.auth import Caller
from kleinserve.api.dialects.base import client_image_error
from kleinserve.api.errors import status_for
from kleinserve.api.jobs_http import outputs_of, result_b64, wait_for_jobs
from kleinserve.errors import InvalidRequestError, KleinserveError
from kleinserve.jobs.events import TERMINAL_EVENTS, Event, EventType
from kleinserve.jobs.job import Job
from kleinserve.request import GenerationRequest
from kleinserve.runtime import Runtime

Kind = Literal["image_generation", "image_edit"]
ErrorBody = Callable[[KleinserveError, int], dict[str, Any]]
NO_TOKENS = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}
# After the job's waiter returned, how long its terminal event may take to reach this stream's own
# subscription (both read the same log; this only bounds a stream whose store went away).
_DRAIN_SECONDS = 5.0


def _event(name: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(event=name, data=json.dumps(data, separators=(",", ":")))


async def image_stream(
    request: Request,
    runtime: Runtime,
    caller: Caller,
    gen: GenerationRequest,
    *,
    kind: Kind,
    dialect: str,
    extra: dict[str, Any],
    fields: dict[str, Any],
    error_body: ErrorBody,
) -> EventSourceResponse:
    """Queue ``gen`` and stream its previews as partial image events (``gen.previews``), then its
    images as OpenAI's completed events.

    ``fields`` are the request's echoed values (``background``, ``quality``, ``output_format``,
    ``safety_identifier``) put on every event.
    """
    jobs = await asyncio.to_thread(runtime.service.submit, [gen], key=caller.key, dialect=dialect, extra=extra)

    async def events() -> AsyncIterator[ServerSentEvent]:
        waiting = asyncio.ensure_future(wait_for_jobs(request, runtime, jobs))
        try:
            if gen.previews:
                async for preview in _previews(runtime, jobs[0], waiting):
                    b64, size = await asyncio.to_thread(_preview_b64, runtime, preview)
                    if b64 is not None:  # else lost (deleted already): previews are best effort
                        yield _event(
                            f"{kind}.partial_image",
                            {
                                "type": f"{kind}.partial_image",
                                "b64_json": b64,
                                "partial_image_index": preview.data.get("index", 0),
                                "created_at": int(preview.created_at),
                                "size": size,
                                **fields,
                                "output_format": "jpeg",
                            },
                        )
            (job,) = await waiting
        except KleinserveError as err:
            error = client_image_error(err, "image") if isinstance(err, InvalidRequestError) else err
            yield _event("error", {"type": "error", **error_body(error, status_for(error))})
            return
        finally:
            if not waiting.done():  # the client went away mid-stream
                waiting.cancel()
        for output in outputs_of(job):
            b64 = await asyncio.to_thread(result_b64, runtime, output)  # may be a network read (S3)
            yield _event(
                f"{kind}.completed",
                {
                    "type": f"{kind}.completed",
                    "b64_json": b64,
                    "created_at": int(job.completed_at or job.created_at),
                    "size": f"{output.width}x{output.height}",
                    "usage": NO_TOKENS,
                    **fields,
                },
            )

    return EventSourceResponse(
        events(),
        ping=runtime.settings.keepalive_interval,
        sep="\n",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _previews(runtime: Runtime, job: Job, waiting: asyncio.Future[Any]) -> AsyncIterator[Event]:
    """``job``'s ``job.preview`` events, from its creation on, until its terminal event (or, once
    ``waiting`` is done, until that has had :data:`_DRAIN_SECONDS` to arrive)."""
    after = await asyncio.to_thread(runtime.store.last_seq_before, job.created_at)
    async with runtime.bus.subscribe(after=after) as subscription:
        events = aiter(subscription)
        while True:
            following = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({following, waiting}, return_when=asyncio.FIRST_COMPLETED)
            if following not in done:
                try:
                    await asyncio.wait_for(asyncio.shield(following), _DRAIN_SECONDS)
                except TimeoutError:
                    following.cancel()
                    return
            event: Event = following.result()
            if event.job_id != job.id:
                continue
            if event.type is EventType.PREVIEW:
                yield event
            elif event.type in TERMINAL_EVENTS:
                return


def _preview_b64(runtime: Runtime, event: Event) -> tuple[str | None, str]:
    """A preview's bytes as base64 and its ``WxH`` (blocking: storage may be S3)."""
    key = event.data.get("key")
    try:
        data = runtime.storage.read(str(key))
        with Image.open(io.BytesIO(data)) as image:
            size = f"{image.width}x{image.height}"
    except Exception:
        return None, "auto"
    return base64.b64encode(data).decode(), size
