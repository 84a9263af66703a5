"""Runtime housekeeping: the retention sweep removes old finished jobs, their files and old uploads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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


def test_reap_hands_back_jobs_of_dead_processes_on_this_host_at_once(tmp_path: Path) -> None:
    runtime = Runtime(Settings(data_dir=tmp_path, lease_seconds=3600))
    try:
        finished = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        )
        dead_pid = int(finished.stdout)
        store = runtime.store
        for worker_id, pid in (("dead", dead_pid), ("restarted", os.getpid()), ("alive", os.getppid())):
            store.heartbeat(worker_id, ["flux-2-klein-4b"], {"host": socket.gethostname(), "pid": pid})
            store.add(Job(request=GenerationRequest.parse({"prompt": worker_id})))
            store.claim(worker_id, None, 3600)
        assert runtime.reap() == (2, 0)  # leases are far from expiring: only the dead are reaped
        assert {j.worker_id for j in store.list(statuses=[JobStatus.PROCESSING])} == {"alive"}
        assert [w.id for w in store.live_workers(since=0)] == ["alive"]
    finally:
        runtime.stop()
