"""Oxen.ai's queue as clients see it: generation objects (queue items) and the SSE frames of job events."""

from __future__ import annotations

import json
from typing import Any

from sse_starlette import ServerSentEvent

from kleinserve.api.dialects.oxen_models import oxen_id
from kleinserve.api.jobs_http import outputs_of, result_url
from kleinserve.engine.variants import find_variant
from kleinserve.jobs.events import Event, EventType
from kleinserve.jobs.job import Job, JobOutput, JobStatus
from kleinserve.runtime import Runtime

COMPLETED = "media_generation_completed"


def progress_fraction(job: Job) -> float:
    """How far a job is, 0..1: 1 once it succeeded, else its denoising step over the total."""
    if job.status is JobStatus.SUCCEEDED:
        return 1.0
    if job.progress_total <= 0:
        return 0.0
    return round(min(1.0, job.progress_step / job.progress_total), 4)


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


def generation_objects(runtime: Runtime, jobs: list[Job]) -> list[dict[str, Any]]:
    """Queue items for ``jobs``, with every queue position from one store query (blocking: call it
    from a worker thread, never on the event loop)."""
    positions = runtime.service.queue_positions(jobs)
    return [generation_object(runtime, job, positions.get(job.id)) for job in jobs]


def generation_object(runtime: Runtime, job: Job, queue_position: int | None = None) -> dict[str, Any]:
    """A queue item as Oxen shapes it, plus kleinserve's extras (progress, queue position, size)."""
    outputs = outputs_of(job)
    item: dict[str, Any] = {
        "generation_id": job.id,
        "model_name": job.extra.get("model", oxen_id(find_variant(job.request.model))),
        "prompt": job.request.prompt,
        "media_type": "image",
        "status": job.status.value,
        "result_url": result_url(runtime, outputs[0]) if outputs else None,
        "error_message": job.error_message,
        "enqueued_at": _ts(job.created_at),
        "started_at": _ts(job.started_at),
        "completed_at": _ts(job.completed_at),
    }
    echoed = {k: v for k, v in job.extra.items() if k not in item and k not in ("model", "response_format")}
    item.update(echoed)
    item["seed"] = job.request.seed
    # A number, as Oxen's queue clients parse it; the step counts in their own fields.
    item["progress"] = progress_fraction(job)
    item["progress_step"], item["progress_total"] = job.progress_step, job.progress_total
    if job.status is JobStatus.QUEUED:
        item["queue_position"] = queue_position or 0
    if outputs:
        item["width"], item["height"] = outputs[0].width, outputs[0].height
    if job.safety is not None:  # kleinserve's extension: the safety checker's verdict and scores
        item["safety"] = job.safety.model_dump(mode="json")
    return item


def frame(**fields: Any) -> ServerSentEvent:
    # Plain "\n" line ends: the seeds' awk client matches "^event: media_generation_completed$".
    return ServerSentEvent(sep="\n", **fields)


def _compact(data: dict[str, Any]) -> str:
    # One line, no spaces: the seeds' awk client greps for "generation_id":"<id>" literally.
    return json.dumps(data, separators=(",", ":"))


# Event data for waiters inside the server (the job's final state), not for SSE clients.
_INTERNAL_DATA = frozenset({"state", "extra"})
_OWN_EVENTS = {
    EventType.QUEUED: "kleinserve.generation.queued",
    EventType.STARTED: "kleinserve.generation.started",
    EventType.PROGRESS: "kleinserve.generation.progress",
    EventType.FAILED: "kleinserve.generation.failed",
    EventType.CANCELLED: "kleinserve.generation.cancelled",
    EventType.PREVIEW: "kleinserve.generation.preview",  # only with ?previews=true
}


def to_sse(runtime: Runtime, event: Event) -> list[ServerSentEvent]:
    """The SSE frames for one job event: Oxen's completion event, then kleinserve's own."""
    frames: list[ServerSentEvent] = []
    job_id = event.job_id
    if event.type is EventType.SUCCEEDED:
        # The event carries the result: no store read per subscriber (see jobs/events.py).
        result = (event.data.get("state") or {}).get("result") or {}
        outputs = [JobOutput.model_validate(o) for o in result.get("outputs", [])]
        model = event.data.get("model")
        extra = event.data.get("extra") or {}
        payload: dict[str, Any] = {
            "generation_id": job_id,
            "status": "succeeded",
            "media_type": "image",
            "model": extra.get("model") or (oxen_id(find_variant(model)) if model else None),
            "url": result_url(runtime, outputs[0]) if outputs else None,
        }
        frames.append(frame(data=_compact(payload), event=COMPLETED, id=str(event.seq)))
    elif event.type is EventType.FAILED:
        payload = {"generation_id": job_id, "status": "failed", "media_type": "image", "error": event.data.get("error")}
        frames.append(frame(data=_compact(payload), event=COMPLETED, id=str(event.seq)))
    own = _OWN_EVENTS.get(event.type)
    if own is not None:
        shown = {k: v for k, v in event.data.items() if k not in _INTERNAL_DATA}
        data = {"generation_id": job_id, "status": event.type.value.removeprefix("job."), **shown}
        if event.type is EventType.PREVIEW and isinstance(event.data.get("key"), str):
            data["url"] = runtime.storage.url(event.data["key"])  # signed here, by the API's storage
        frames.append(frame(data=_compact(data), event=own, id=str(event.seq)))
    return frames
