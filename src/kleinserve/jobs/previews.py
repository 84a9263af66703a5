"""Live previews of running jobs: small JPEGs in storage, announced as ``job.preview`` events.

A job that asks for ``previews = N`` (``GenerationRequest.previews``; OpenAI's ``partial_images``)
gets up to N previews, at most one per denoising step, spread evenly over the steps
(:func:`preview_steps`). At each chosen step the worker calls the step's ``Progress.preview`` (the
engine's decode of the current x0 estimate, engine/preview.py), stores the first image of the request
as ``{job_id}/preview-{index}.jpg`` (so the job's retention deletes it with the results) and publishes
``job.preview`` with ``{"step", "total", "index", "key", "url", "media_type"}``. ``index`` counts the
previews of the attempt from 0; a retried job writes the same keys again.

Previews are not durable state: a failure to decode, store or announce one is logged and the job
goes on. Jobs without previews cost nothing here (no decode, no write).
"""

from __future__ import annotations

import io
import logging
import math
from typing import TYPE_CHECKING

from kleinserve.jobs.events import Event, EventBus, EventType
from kleinserve.jobs.job import Job
from kleinserve.storage.base import Storage

if TYPE_CHECKING:  # no torch on import: API processes may read this module's names
    from kleinserve.engine.progress import Progress

log = logging.getLogger(__name__)

PREVIEW_MEDIA_TYPE = "image/jpeg"
PREVIEW_QUALITY = 80


def preview_steps(previews: int, total: int) -> list[int]:
    """The denoising steps (1-based) that get a preview: ``previews`` of ``total`` (capped at it),
    evenly spread; with fewer previews than steps the last one comes before the final step."""
    count = min(max(previews, 0), total)
    return [math.ceil((k + 1) * total / (count + 1)) for k in range(count)]


def preview_key(job_id: str, index: int) -> str:
    return f"{job_id}/preview-{index}.jpg"


class PreviewWriter:
    """Writes a job's previews as its denoising steps report (the worker's one hook)."""

    def __init__(self, storage: Storage, bus: EventBus) -> None:
        self.storage = storage
        self.bus = bus

    def on_progress(self, job: Job, progress: Progress) -> None:
        """Store and announce a preview if ``progress`` is one of the job's preview steps."""
        wanted = job.request.previews
        if not wanted or progress.stage != "denoise" or progress.preview is None:
            return
        steps = preview_steps(wanted, progress.total)
        if progress.step not in steps:
            return
        index = steps.index(progress.step)
        key = preview_key(job.id, index)
        try:
            image = progress.preview()[0]
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
            self.storage.put(key, buffer.getvalue(), PREVIEW_MEDIA_TYPE)
            data = {
                "step": progress.step,
                "total": progress.total,
                "index": index,
                "key": key,
                "url": self.storage.url(key),
                "media_type": PREVIEW_MEDIA_TYPE,
            }
            self.bus.publish(Event.for_job(EventType.PREVIEW, job, **data))
        except Exception:  # a lost preview is fine; the job is not
            log.warning("job %s: preview %d at step %d not written", job.id, index, progress.step, exc_info=True)
