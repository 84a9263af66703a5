"""Previews of running jobs (jobs/previews.py): steps, files, events, retention, and no cost when off."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kleinserve.engine.engine import Engine
from kleinserve.engine.preview import Previewer
from kleinserve.jobs.events import EventType
from kleinserve.jobs.job import JobStatus
from kleinserve.jobs.previews import preview_steps
from kleinserve.request import GenerationRequest
from kleinserve.settings import Settings
from tests.jobs.test_service_worker import System, system  # noqa: F401  (the fixture)


@pytest.mark.parametrize(
    ("previews", "total", "steps"),
    [
        (0, 4, []),
        (1, 4, [2]),
        (2, 4, [2, 3]),
        (3, 4, [1, 2, 3]),
        (4, 4, [1, 2, 3, 4]),
        (9, 4, [1, 2, 3, 4]),  # at most one per step
        (3, 50, [13, 25, 38]),
        (1, 1, [1]),
    ],
)
def test_preview_steps_are_spread_evenly(previews: int, total: int, steps: list[int]) -> None:
    assert preview_steps(previews, total) == steps


def test_previews_field_is_bounded_by_the_step_limit() -> None:
    settings = Settings(max_steps=10)
    assert GenerationRequest.parse({"prompt": "x", "previews": 10}, settings).previews == 10
    with pytest.raises(Exception, match="previews"):
        GenerationRequest.parse({"prompt": "x", "previews": 11}, settings)
    with pytest.raises(Exception, match="previews"):
        GenerationRequest.parse({"prompt": "x", "previews": -1}, settings)


def test_job_with_two_previews_writes_two_files_and_events(system: System) -> None:  # noqa: F811
    system.worker()
    job = system.submit(steps=4, width=80, height=64, previews=2)
    done = system.finished(job.id)
    assert done.status is JobStatus.SUCCEEDED
    events = [e for e in system.events(job.id) if e.type is not EventType.QUEUED]
    previews = [e for e in events if e.type is EventType.PREVIEW]
    assert [(e.data["index"], e.data["step"], e.data["total"]) for e in previews] == [(0, 2, 4), (1, 3, 4)]
    # Each comes after its step's progress event, all before the end.
    types = [e.type for e in events]
    assert types.index(EventType.PREVIEW) > types.index(EventType.PROGRESS)
    assert types[-1] is EventType.SUCCEEDED
    for index, event in enumerate(previews):
        key = f"{job.id}/preview-{index}.jpg"
        assert event.data["key"] == key and event.data["media_type"] == "image/jpeg"
        assert event.data["url"].startswith(f"http://127.0.0.1:8000/files/{key}?expires=")
        assert event.owner == job.owner
        with Image.open(io.BytesIO(system.storage.read(key))) as image:
            assert (image.format, image.size) == ("JPEG", (80, 64))
    # The job's files are its results and its previews: retention deletes them together.
    names = [p.name for p in system.job_files(job.id)]
    assert names == ["0.png", "preview-0.jpg", "preview-1.jpg"]
    assert system.storage.delete_prefix(f"{job.id}/") == 3
    assert system.job_files(job.id) == []


def test_jobs_without_previews_decode_none(system: System, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    decoded: list[Any] = []
    monkeypatch.setattr(Previewer, "images", lambda self, *args: decoded.append(args) or [])
    system.worker()
    job = system.submit(steps=3)
    assert system.finished(job.id).status is JobStatus.SUCCEEDED
    assert decoded == []
    assert not [e for e in system.events(job.id) if e.type is EventType.PREVIEW]
    assert [p.name for p in system.job_files(job.id)] == ["0.png"]


def test_a_failed_preview_does_not_fail_the_job(system: System, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    def broken(self: Previewer, *args: Any) -> Any:
        raise RuntimeError("preview decoder exploded")

    monkeypatch.setattr(Previewer, "images", broken)
    system.worker()
    job = system.submit(steps=2, previews=2)
    assert system.finished(job.id).status is JobStatus.SUCCEEDED
    assert not [e for e in system.events(job.id) if e.type is EventType.PREVIEW]


def test_batched_jobs_write_their_own_previews(
    tmp_path: Path, distilled_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two compatible jobs in one batch: only the one that asked gets previews, of its own image."""
    from tests.jobs.test_batching import Batches
    from tests.jobs.test_batching import System as BatchSystem

    batches = Batches(monkeypatch)
    batched = BatchSystem(tmp_path, distilled_engine)
    try:
        wants = batched.submit("a red fox in snow", steps=3, previews=3)
        other = batched.submit("a cat wearing a hat", steps=3, seed=20)
        batched.worker(max_batch=2).start()
        done = [batched.finished(job.id) for job in (wants, other)]
        assert [job.status for job in done] == [JobStatus.SUCCEEDED] * 2
        assert batches.prompts == [["a red fox in snow", "a cat wearing a hat"]]
        events = batched.store.events_after(0)
        previews = [e for e in events if e.type is EventType.PREVIEW]
        assert [(e.job_id, e.data["step"]) for e in previews] == [(wants.id, 1), (wants.id, 2), (wants.id, 3)]
        # The last preview (sigma 0) shows the job's own final image, not its batch neighbour's.
        final = np.asarray(Image.open(io.BytesIO(batched.storage.read(f"{wants.id}/0.png"))).convert("RGB"), np.int16)
        neighbour = np.asarray(
            Image.open(io.BytesIO(batched.storage.read(f"{other.id}/0.png"))).convert("RGB"), np.int16
        )
        last = np.asarray(Image.open(io.BytesIO(batched.storage.read(f"{wants.id}/preview-2.jpg"))), np.int16)
        assert np.abs(last - final).mean() < np.abs(last - neighbour).mean()
    finally:
        batched.close()
