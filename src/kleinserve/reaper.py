"""Handing back the jobs of workers that are gone.

:func:`reap` (any process, every ``KLEINSERVE_REAP_INTERVAL`` seconds) hands back jobs whose lease
expired: requeued, or failed as ``interrupted`` at ``max_attempts``. Workers on this host whose process
is gone (its pid no longer runs, or it is ours but not one of our workers: a restart) count as dead at
once, so a restarted ``serve`` resumes its interrupted job without waiting for the lease to run out.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kleinserve import metrics
from kleinserve.jobs.events import EventBus
from kleinserve.jobs.store.base import JobStore, WorkerInfo

if TYPE_CHECKING:
    from kleinserve.jobs.worker import Worker

log = logging.getLogger(__name__)


def reap(store: JobStore, bus: EventBus, max_attempts: int, ours: Sequence[Worker]) -> tuple[int, int]:
    """Hand back jobs whose worker is gone (lease expired, or a dead process on this host):
    requeued, or failed as interrupted at ``max_attempts``; ``ours``, this process's live workers,
    are woken for the requeued ones. Returns (requeued, ended)."""
    dead = dead_local_workers(store, {worker.id for worker in ours})
    requeued, ended = store.reap(max_attempts, time.time(), dead)
    for job in ended:
        metrics.job_finished(job)
    for worker_id in dead:
        store.forget_worker(worker_id)
    if requeued or ended:
        bus.notify()
        for worker in ours:
            worker.wake()
        log.warning("reaped interrupted jobs: %d requeued, %d failed", len(requeued), len(ended))
    return len(requeued), len(ended)


def dead_local_workers(store: JobStore, ours: set[str]) -> list[str]:
    """Ids of workers registered from this host whose process is no longer running (``ours``: the
    ids of this process's live workers)."""
    return [w.id for w in store.live_workers(since=0) if w.id not in ours and process_gone(w)]


def process_gone(worker: WorkerInfo) -> bool:
    """Whether ``worker`` ran on this host in a process that no longer exists (or is this process,
    which it cannot be any more: a process that restarted under the same pid)."""
    if worker.info.get("host") != socket.gethostname():
        return False
    pid = worker.info.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
