"""What the PostgreSQL job store adds to the shared contract (tests/jobs): many connections at once.

The contract suites run against PostgreSQL too (tests/jobs/backends.py); these tests cover what
only a shared server has: claims from many connections at once, the single reaper, and replicas
migrating the same database.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from kleinserve.jobs.admission import Admission
from kleinserve.jobs.events import Event, EventType
from kleinserve.jobs.job import Job, JobStatus
from kleinserve.jobs.store.postgres import PgJobStore
from kleinserve.postgres.database import PgDatabase, advisory_key
from kleinserve.request import GenerationRequest

MODEL = "flux-2-klein-4b"


def make_job(n: int, model: str = MODEL) -> Job:
    request = GenerationRequest.parse({"prompt": f"job {n}", "model": model, "seed": 1})
    return Job(request=request, created_at=1000.0 + n)


@pytest.fixture
def store(pg_url: str) -> Iterator[PgJobStore]:
    s = PgJobStore(PgDatabase(pg_url, max_size=4))
    yield s
    s.database.close()


def enqueue(store: PgJobStore, jobs: list[Job]) -> None:
    events = [Event.for_job(EventType.QUEUED, job, model=job.request.model) for job in jobs]
    store.enqueue(jobs, events, Admission(max_queue=10_000))


def test_workers_on_separate_connections_never_share_a_job(store: PgJobStore, pg_url: str) -> None:
    enqueue(store, [make_job(n) for n in range(60)])
    workers = [PgJobStore(PgDatabase(pg_url, max_size=1)) for _ in range(6)]
    taken: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        while claimed := workers[i].claim(f"w{i}", [MODEL], lease_seconds=60, limit=2):
            with lock:
                taken.extend((job.id, f"w{i}") for job in claimed)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in workers:
        worker.database.close()
    assert len(taken) == 60 and len({job_id for job_id, _ in taken}) == 60
    assert store.count([JobStatus.PROCESSING]) == 60
    started = [e for e in store.events_after(0, limit=10_000) if e.type is EventType.STARTED]
    assert len(started) == 60


def test_claims_skip_rows_another_transaction_holds(store: PgJobStore) -> None:
    first, second = make_job(1), make_job(2)
    enqueue(store, [first, second])
    with store.database.transaction() as db:
        db.execute("SELECT 1 FROM jobs WHERE id=%s FOR UPDATE", (first.id,))
        # Not blocked by the locked row: takes the next one at once.
        assert [job.id for job in store.claim("w", [MODEL], 60)] == [second.id]
    assert [job.id for job in store.claim("w", [MODEL], 60)] == [first.id]


def test_only_one_process_reaps_at_a_time(store: PgJobStore, pg_url: str) -> None:
    enqueue(store, [make_job(1)])
    (job,) = store.claim("gone", [MODEL], lease_seconds=1)
    other = PgJobStore(PgDatabase(pg_url, max_size=1))
    try:
        with other.database.transaction() as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key("reap"),))  # someone is reaping
            assert store.reap(max_attempts=3, now=job.lease_until + 10) == ([], [])
        requeued, ended = store.reap(max_attempts=3, now=(job.lease_until or 0) + 10)
        assert [j.id for j in requeued] == [job.id] and ended == []
    finally:
        other.database.close()


def test_admission_holds_across_connections(store: PgJobStore, pg_url: str) -> None:
    """Eight replicas submit at once; the queue bound of 5 admits exactly 5 jobs."""
    replicas = [PgJobStore(PgDatabase(pg_url, max_size=1)) for _ in range(8)]
    results: list[bool] = []
    barrier = threading.Barrier(len(replicas))

    def submit(i: int) -> None:
        job = make_job(i)
        barrier.wait()
        try:
            replicas[i].enqueue([job], [Event.for_job(EventType.QUEUED, job)], Admission(max_queue=5))
            results.append(True)
        except Exception:
            results.append(False)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(replicas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for replica in replicas:
        replica.database.close()
    assert sorted(results) == [False] * 3 + [True] * 5
    assert store.count([JobStatus.QUEUED]) == 5
