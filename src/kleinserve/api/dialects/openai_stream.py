"""OpenAI's streamed image responses (``stream: true``): Server-Sent Events the ``openai`` SDK parses.

The request is queued like any other before the stream starts, so refusals (bad parameters, a full
queue, rate limits) are ordinary error responses. The stream then carries, per image,
``image_generation.completed`` (or ``image_edit.completed``) with ``b64_json`` and OpenAI's fields;
``usage`` is all zeros (klein is not billed in tokens). A failure after the stream started is an
``error`` event with ``{"type": "error", "error": {"message", "type", "param", "code"}}``, which the
SDK raises as ``APIError``.

``partial_images`` (0-3) is accepted; no partial image events are sent yet. OpenAI documents that the
final image may arrive before the requested partial images, so clients handle a stream without them.
Compatibility notes: docs/api/openai.md.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from kleinserve.api.auth import Caller
from kleinserve.api.dialects.base import client_image_error
from kleinserve.api.errors import status_for
from kleinserve.api.jobs_http import outputs_of, result_b64, wait_for_jobs
from kleinserve.errors import InvalidRequestError, KleinserveError
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
    """Queue ``gen`` and stream its images as OpenAI's completed events.

    ``fields`` are the request's echoed values (``background``, ``quality``, ``output_format``,
    ``safety_identifier``) put on every event.
    """
    jobs = await asyncio.to_thread(runtime.service.submit, [gen], key=caller.key, dialect=dialect, extra=extra)

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            (job,) = await wait_for_jobs(request, runtime, jobs)
        except KleinserveError as err:
            error = client_image_error(err, "image") if isinstance(err, InvalidRequestError) else err
            yield _event("error", {"type": "error", **error_body(error, status_for(error))})
            return
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
