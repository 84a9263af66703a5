"""Runtime housekeeping: the retention sweep removes old finished jobs, their files and old uploads."""

from __future__ import annotations

import os
import time
from pathlib import Path

from kleinserve.jobs.job import Job, JobOutput, JobResult, JobStatus
from kleinserve.request import GenerationRequest
from kleinserve.runtime import UPLOADS, Runtime
from kleinserve.settings import Settings


def finished_job(runtime: Runtime, completed_at: float) -> Job:
    job = Job(request=GenerationRequest.parse({"prompt": "x"}), status=JobStatus.SUCCEEDED, completed_at=completed_at)
    key = f"{job.id}/0.png"
    runtime.storage.put(key, b"\x89PNG fake bytes", "image/png")
    output = JobOutput(key=key, media_type="image/png", seed=0, width=64, height=64, size_bytes=15)
    job.result = JobResult(outputs=[output], steps=4, guidance=1.0)
    runtime.store.add(job)
    return job


def test_sweep_removes_only_what_outlived_retention(tmp_path: Path) -> None:
    runtime = Runtime(Settings(data_dir=tmp_path, retention_seconds=3600))
    try:
        old = finished_job(runtime, time.time() - 7200)
        recent = finished_job(runtime, time.time() - 60)
        queued = Job(request=GenerationRequest.parse({"prompt": "waiting"}), created_at=time.time() - 99999)
        runtime.store.add(queued)
        runtime.storage.put(f"{UPLOADS}/old/image.png", b"old", "image/png")
        runtime.storage.put(f"{UPLOADS}/new/image.png", b"new", "image/png")
        stale = time.time() - 7200
        for path in (tmp_path / "files" / UPLOADS / "old" / "image.png", tmp_path / "files" / UPLOADS / "old"):
            os.utime(path, (stale, stale))

        assert runtime.sweep() == 1

        assert runtime.store.get(old.id) is None and not (tmp_path / "files" / old.id).exists()
        assert runtime.store.get(recent.id) is not None and (tmp_path / "files" / recent.id / "0.png").is_file()
        assert runtime.store.get(queued.id) is not None  # unfinished jobs are never swept
        assert not (tmp_path / "files" / UPLOADS / "old").exists()
        assert (tmp_path / "files" / UPLOADS / "new" / "image.png").is_file()
    finally:
        runtime.store.close()
