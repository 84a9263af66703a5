"""The admission contract (kleinserve.jobs.admission) inside every backend's enqueue transaction:
queue bound, per-key queue share, per-key concurrency, credits, image and request rates. Limits are
read and buckets stored in the database, so they hold across processes sharing it (tested here with
threads racing on one store)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kleinserve.errors import InsufficientCreditsError, KleinserveError, RateLimitedError, ServiceUnavailableError
from kleinserve.jobs.admission import Admission
from kleinserve.jobs.job import Job, JobStatus
from kleinserve.jobs.store import JobStore
from kleinserve.keys import ApiKey, ApiKeyStore
from kleinserve.request import GenerationRequest
from tests.jobs.backends import Backend

Q, P = JobStatus.QUEUED, JobStatus.PROCESSING


@pytest.fixture
def store(backend_store: JobStore) -> JobStore:
    return backend_store


@pytest.fixture
def keys(
    backend: Backend, backend_store: JobStore, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[ApiKeyStore]:
    key_store = backend.make_keys(request, tmp_path)
    yield key_store
    key_store.close()


def jobs_for(key: ApiKey | None, n: int = 1, *, images: int = 1, cost: float = 0.0) -> list[Job]:
    request = GenerationRequest.parse({"prompt": "x", "model": "flux-2-klein-4b", "seed": 1, "num_images": images})
    return [Job(request=request, owner=key.id if key else None, cost=cost) for _ in range(n)]


def admit(store: JobStore, jobs: list[Job], key: ApiKey | None = None, **limits: int | None) -> None:
    admission = Admission(
        max_queue=limits.get("max_queue") or 100,
        key=key,
        max_queue_per_key=limits.get("max_queue_per_key"),
        now=time.time(),
    )
    store.enqueue(jobs, [], admission)


def test_queue_share_keeps_one_key_from_filling_the_queue(store: JobStore, keys: ApiKeyStore) -> None:
    greedy, _ = keys.create("greedy")
    other, _ = keys.create("other")
    admit(store, jobs_for(greedy, 5), greedy, max_queue=10, max_queue_per_key=5)
    with pytest.raises(RateLimitedError) as refused:
        admit(store, jobs_for(greedy), greedy, max_queue=10, max_queue_per_key=5)
    assert "share" in refused.value.message and refused.value.retry_after
    admit(store, jobs_for(other, 5), other, max_queue=10, max_queue_per_key=5)
    with pytest.raises(ServiceUnavailableError):
        admit(store, jobs_for(None), max_queue=10)
    assert store.count([Q]) == 10


def test_concurrency_counts_queued_and_running_jobs(store: JobStore, keys: ApiKeyStore) -> None:
    key, _ = keys.create("single", concurrency=2)
    admit(store, jobs_for(key, 2), key)
    with pytest.raises(RateLimitedError):
        admit(store, jobs_for(key), key)
    [running] = store.claim("w1", None, 30.0)
    with pytest.raises(RateLimitedError):
        admit(store, jobs_for(key), key)
    store.complete(running.id, "w1", running.attempts, JobStatus.FAILED, error_code="x", error_message="y")
    admit(store, jobs_for(key), key)  # a place came free


def test_credits_count_spent_and_reserved(store: JobStore, keys: ApiKeyStore) -> None:
    key, _ = keys.create("thrifty", credits=1.0)
    admit(store, jobs_for(key, 2, cost=0.3), key)  # 0.6 reserved
    with pytest.raises(InsufficientCreditsError) as refused:
        admit(store, jobs_for(key, cost=0.5), key)
    assert "0.4" in refused.value.message
    keys.record_usage(key.id, "some-old-job", "flux-2-klein-4b", 1, 0.3)  # 0.3 spent
    with pytest.raises(InsufficientCreditsError):
        admit(store, jobs_for(key, cost=0.2), key)
    admit(store, jobs_for(key, cost=0.1), key)


def test_image_rate_bucket_is_stored(store: JobStore, keys: ApiKeyStore) -> None:
    key, _ = keys.create("painter", images_per_minute=4)
    admit(store, jobs_for(key, images=3), key)
    with pytest.raises(RateLimitedError) as refused:
        admit(store, jobs_for(key, images=2), key)
    assert refused.value.retry_after and refused.value.retry_after > 0
    admit(store, jobs_for(key, images=1), key)
    assert store.count([Q]) == 2


def test_request_rate_is_shared_by_every_caller_of_the_store(store: JobStore, keys: ApiKeyStore) -> None:
    key, _ = keys.create("slow", requests_per_minute=5)
    outcomes: list[bool] = []
    barrier = threading.Barrier(4)

    def call() -> None:
        barrier.wait()
        for _ in range(3):
            try:
                store.admit_request(key, time.time())
                outcomes.append(True)
            except RateLimitedError:
                outcomes.append(False)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcomes.count(True) == 5 and outcomes.count(False) == 7


def test_limits_hold_under_concurrent_submissions(store: JobStore, keys: ApiKeyStore) -> None:
    key, _ = keys.create("racer", concurrency=3)
    admitted: list[int] = []
    barrier = threading.Barrier(6)

    def submit() -> None:
        barrier.wait()
        try:
            admit(store, jobs_for(key), key)
            admitted.append(1)
        except KleinserveError:
            pass

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(admitted) == 3 == store.count([Q])
