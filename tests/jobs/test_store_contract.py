"""The JobStore contract (kleinserve.jobs.store.base), run against every backend in
tests/jobs/backends.py: jobs, the leased queue (claim, renew, complete, fenced by worker and
attempt), cancellation flags, the reaper, worker heartbeats, admission's queue bound and the event log.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from kleinserve.errors import ServiceUnavailableError
from kleinserve.jobs.admission import Admission
from kleinserve.jobs.events import Event, EventType, finished_job
from kleinserve.jobs.job import Job, JobOutput, JobResult, JobStatus
from kleinserve.jobs.store import JobStore
from kleinserve.request import GenerationRequest

Q, P, S, F, C = (JobStatus.QUEUED, JobStatus.PROCESSING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
LEASE = 30.0


@pytest.fixture
def store(backend_store: JobStore) -> JobStore:
    return backend_store


def make_job(
    created_at: float,
    *,
    owner: str | None = None,
    status: JobStatus = Q,
    model: str = "flux-2-klein-4b",
    **fields: Any,
) -> Job:
    request = GenerationRequest.parse({"prompt": f"job at {created_at}", "model": model, "seed": 1})
    return Job(request=request, owner=owner, status=status, created_at=created_at, **fields)


def make_event(job: Job, created_at: float | None = None, type_: EventType = EventType.PROGRESS, **data: Any) -> Event:
    event = Event.for_job(type_, job, **data)
    if created_at is not None:
        event = event.model_copy(update={"created_at": created_at})
    return event


def result_for(job: Job) -> JobResult:
    output = JobOutput(key=f"{job.id}/0.png", media_type="image/png", seed=1, width=64, height=64, size_bytes=10)
    return JobResult(outputs=[output], steps=2, guidance=1.0)


def test_is_a_job_store(store: JobStore) -> None:
    assert isinstance(store, JobStore)


# -- enqueue and admission ----------------------------------------------------------------------


def test_enqueue_stores_jobs_and_events_together_under_the_bound(store: JobStore) -> None:
    jobs = [make_job(float(i)) for i in range(3)]
    events = store.enqueue(jobs[:2], [make_event(j, type_=EventType.QUEUED) for j in jobs[:2]], Admission(max_queue=2))
    assert [e.job_id for e in events] == [j.id for j in jobs[:2]] and events[0].seq < events[1].seq
    with pytest.raises(ServiceUnavailableError) as refused:
        store.enqueue([jobs[2]], [make_event(jobs[2], type_=EventType.QUEUED)], Admission(max_queue=2, retry_after=7))
    assert refused.value.retry_after == 7
    assert store.get(jobs[2].id) is None and len(store.events_after(0)) == 2  # nothing of it stored


def test_queue_bound_holds_under_concurrent_enqueues(store: JobStore) -> None:
    admitted: list[str] = []
    barrier = threading.Barrier(8)

    def submit() -> None:
        barrier.wait()
        for i in range(5):
            job = make_job(time.time() + i)
            try:
                store.enqueue([job], [], Admission(max_queue=10))
                admitted.append(job.id)
            except ServiceUnavailableError:
                pass

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(admitted) == 10 == store.count([Q])


# -- the leased queue ---------------------------------------------------------------------------


def test_claim_takes_oldest_queued_for_its_models_and_writes_started(store: JobStore) -> None:
    assert store.claim("w1", None, LEASE) == []
    newer = make_job(30.0)
    oldest = make_job(10.0, attempts=1)
    other_model = make_job(5.0, model="flux-2-klein-9b")
    done = make_job(1.0, status=S)
    for job in (newer, oldest, other_model, done):
        store.add(job)
    before = time.time()
    [claimed] = store.claim("w1", ["flux-2-klein-4b"], LEASE)
    assert claimed.id == oldest.id and claimed.status is P and claimed.attempts == 2
    assert claimed.worker_id == "w1" and claimed.started_at is not None and claimed.started_at >= before
    assert claimed.lease_until is not None and claimed.lease_until >= before + LEASE
    assert store.get(oldest.id) == claimed
    [started] = store.events_after(0)
    assert started.type is EventType.STARTED and started.job_id == oldest.id and started.data["attempt"] == 2
    assert [j.id for j in store.claim("w2", ["flux-2-klein-4b"], LEASE, limit=5)] == [newer.id]
    assert store.claim("w2", ["flux-2-klein-4b"], LEASE) == []
    assert store.claim("w2", [], LEASE) == []
    assert [j.id for j in store.claim("w3", None, LEASE)] == [other_model.id]


def test_claim_limit_takes_that_many_oldest_in_queue_order(store: JobStore) -> None:
    """A batching worker claims several jobs at once: the oldest first, never more than ``limit``."""
    jobs = [make_job(float(t)) for t in (40, 10, 30, 20)]
    other_model = make_job(15.0, model="flux-2-klein-9b")
    for job in (*jobs, other_model):
        store.add(job)
    assert store.claim("w1", None, LEASE, limit=0) == []
    first = store.claim("w1", ["flux-2-klein-4b"], LEASE, limit=2)
    assert [j.created_at for j in first] == [10.0, 20.0]
    assert all(j.status is P and j.worker_id == "w1" and j.attempts == 1 for j in first)
    assert all(store.get(j.id) == j for j in first)
    started = [e.job_id for e in store.events_after(0) if e.type is EventType.STARTED]
    assert started == [j.id for j in first]  # one job.started each, in queue order
    # A later claim goes on where this one stopped; ``None`` takes any model, still oldest first.
    assert [j.created_at for j in store.claim("w2", None, LEASE, limit=2)] == [15.0, 30.0]
    assert [j.created_at for j in store.claim("w2", None, LEASE, limit=3)] == [40.0]
    assert store.count([Q]) == 0 and store.count([P]) == 5


def test_concurrent_claims_never_share_a_job(store: JobStore) -> None:
    jobs = [make_job(float(i)) for i in range(20)]
    for job in jobs:
        store.add(job)
    barrier = threading.Barrier(4)
    claimed: list[list[str]] = [[] for _ in range(4)]

    def claim_all(index: int) -> None:
        barrier.wait()
        while got := store.claim(f"w{index}", None, LEASE):
            claimed[index].extend(j.id for j in got)

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    everything = [job_id for ids in claimed for job_id in ids]
    assert sorted(everything) == sorted(j.id for j in jobs)


def test_renew_extends_the_lease_records_progress_and_is_fenced(store: JobStore) -> None:
    store.add(make_job(1.0))
    [job] = store.claim("w1", None, 1.0)
    renewed = store.renew(job.id, "w1", job.attempts, LEASE, step=3, total=8)
    assert renewed is not None and renewed.progress_step == 3 and renewed.progress_total == 8
    assert renewed.lease_until is not None and job.lease_until is not None and renewed.lease_until > job.lease_until
    progress = store.events_after(0)[-1]
    assert progress.type is EventType.PROGRESS and progress.data == {"step": 3, "total": 8}
    assert store.renew(job.id, "w1", job.attempts, LEASE) is not None  # a heartbeat: no event
    assert store.events_after(progress.seq) == []
    assert store.renew(job.id, "w2", job.attempts, LEASE) is None  # another worker
    assert store.renew(job.id, "w1", job.attempts + 1, LEASE) is None  # another attempt
    assert store.renew("missing", "w1", 1, LEASE) is None


def test_complete_succeeds_fails_or_hands_back_fenced_by_worker_and_attempt(store: JobStore) -> None:
    a, b, c = make_job(1.0), make_job(2.0), make_job(3.0, attempts=1)
    for job in (a, b, c):
        store.add(job)
    [ja] = store.claim("w1", None, LEASE)
    done = store.complete(ja.id, "w1", ja.attempts, S, result=result_for(ja))
    assert done is not None and done.status is S and done.completed_at is not None and done.lease_until is None
    succeeded = store.events_after(0)[-1]
    assert succeeded.type is EventType.SUCCEEDED and succeeded.data["outputs"] == [f"{ja.id}/0.png"]
    assert finished_job(a, succeeded) == done  # the event carries the final state
    assert store.complete(ja.id, "w1", ja.attempts, F, error_code="x", error_message="y") is None  # finished

    [jb] = store.claim("w1", None, LEASE)
    failed = store.complete(jb.id, "w1", jb.attempts, F, error_code="boom", error_message="it broke")
    assert failed is not None and failed.status is F and failed.error_code == "boom"
    assert store.events_after(0)[-1].data["error"] == "it broke"

    [jc] = store.claim("w1", None, LEASE)
    assert jc.attempts == 2
    assert store.complete(jc.id, "w2", jc.attempts, S, result=result_for(jc)) is None
    back = store.complete(jc.id, "w1", jc.attempts, Q)  # shutdown: the attempt is not counted
    assert back is not None and back.status is Q and back.attempts == 1 and back.worker_id is None
    assert store.events_after(0)[-1].type is EventType.STARTED  # handing back writes no event


def test_a_worker_presumed_dead_cannot_overwrite_a_newer_attempt(store: JobStore) -> None:
    store.add(make_job(1.0))
    [first] = store.claim("w1", None, 0.01)
    requeued, _ = store.reap(max_attempts=3, now=time.time() + 1)
    assert [j.id for j in requeued] == [first.id]
    [second] = store.claim("w2", None, LEASE)
    assert second.attempts == first.attempts + 1
    assert store.renew(first.id, "w1", first.attempts, LEASE, step=9, total=9) is None
    assert store.complete(first.id, "w1", first.attempts, S, result=result_for(first)) is None
    assert store.complete(second.id, "w2", second.attempts, S, result=result_for(second)) is not None


# -- cancellation ------------------------------------------------------------------------------


def test_request_cancel(store: JobStore) -> None:
    queued, running, done = make_job(1.0), make_job(2.0), make_job(3.0, status=S, completed_at=4.0)
    store.add(running)
    [running] = store.claim("w1", None, LEASE)
    for job in (queued, done):
        store.add(job)
    cancelled = store.request_cancel(queued.id)
    assert cancelled is not None and cancelled.status is C and cancelled.completed_at is not None
    assert store.events_after(0)[-1].type is EventType.CANCELLED
    assert not store.cancel_requested(running.id)
    flagged = store.request_cancel(running.id)
    assert flagged is not None and flagged.status is P and flagged.cancel_requested
    assert store.cancel_requested(running.id)
    assert store.request_cancel(done.id) == done
    assert store.request_cancel("missing") is None
    assert not store.cancel_requested("missing")
    stopped = store.complete(running.id, "w1", running.attempts, C)
    assert stopped is not None and stopped.status is C


# -- the reaper --------------------------------------------------------------------------------


def test_reap_requeues_expired_leases_and_fails_them_at_max_attempts(store: JobStore) -> None:
    jobs = [make_job(float(i), attempts=a) for i, a in enumerate((0, 1, 2, 0))]
    for job in jobs:
        store.add(job)
    claimed = [store.claim("w1", None, LEASE)[0] for _ in jobs]
    now = time.time()
    for job in claimed[:3]:
        assert store.renew(job.id, "w1", job.attempts, -1.0) is not None  # its lease ran out
    requeued, ended = store.reap(max_attempts=3, now=now)
    assert [j.id for j in requeued] == [claimed[0].id, claimed[1].id]
    assert [j.id for j in ended] == [claimed[2].id]
    back = store.get(claimed[0].id)
    assert back is not None and back.status is Q and back.attempts == 1 and back.worker_id is None
    failed = store.get(claimed[2].id)
    assert failed is not None and failed.status is F and failed.error_code == "interrupted"
    assert failed.error_message is not None and failed.error_message.startswith("interrupted")
    assert store.events_after(0)[-1].type is EventType.FAILED
    assert store.get(claimed[3].id) == claimed[3]  # lease still running: untouched
    assert store.reap(max_attempts=3, now=now) == ([], [])


def test_reap_takes_jobs_of_dead_workers_at_once_and_ends_cancelled_ones(store: JobStore) -> None:
    a, b = make_job(1.0), make_job(2.0)
    store.add(a)
    store.add(b)
    [ja] = store.claim("dead", None, LEASE)
    [jb] = store.claim("alive", None, LEASE)
    store.request_cancel(jb.id)
    requeued, ended = store.reap(max_attempts=3, now=time.time(), dead_workers=["dead", "unknown"])
    assert [j.id for j in requeued] == [ja.id] and ended == []
    requeued, ended = store.reap(max_attempts=3, now=time.time() + 2 * LEASE)
    assert requeued == [] and [j.id for j in ended] == [jb.id] and ended[0].status is C


# -- workers -----------------------------------------------------------------------------------


def test_heartbeats_and_live_workers(store: JobStore) -> None:
    before = time.time()
    store.heartbeat("w1", ["flux-2-klein-4b"], {"host": "h", "pid": 1})
    store.heartbeat("w2", ["flux-2-klein-9b"], {})
    store.heartbeat("w1", ["flux-2-klein-4b", "flux-2-klein-9b"], {"host": "h", "pid": 1})
    workers = store.live_workers(since=before - 1)
    assert [w.id for w in workers] == ["w1", "w2"]
    assert workers[0].models == ["flux-2-klein-4b", "flux-2-klein-9b"] and workers[0].info == {"host": "h", "pid": 1}
    assert workers[0].started_at <= workers[0].seen_at
    assert store.live_workers(since=time.time() + 60) == []
    store.forget_worker("w1")
    assert [w.id for w in store.live_workers(since=0)] == ["w2"]


# -- moved from the SQLite tests: jobs, cleanup, events ----------------------------------------


def test_add_and_get(store: JobStore) -> None:
    job = make_job(100.0, owner="alice", extra={"k": "v"})
    store.add(job)
    got = store.get(job.id)
    assert got == job
    assert store.get("no-such-id") is None


def test_add_twice_is_refused(store: JobStore) -> None:
    job = make_job(100.0)
    store.add(job)
    with pytest.raises(Exception):  # noqa: B017 - each backend's own integrity error
        store.add(job)
    assert len(store.list()) == 1


def test_list_newest_first_and_filters(store: JobStore) -> None:
    a = make_job(1.0, owner="alice")
    b = make_job(2.0, owner="bob", status=P)
    c = make_job(3.0, owner=None, status=S, model="flux-2-klein-9b")
    d = make_job(4.0, owner="alice", status=F, model="flux-2-klein-9b")
    e = make_job(5.0, owner=None)
    for job in (c, a, e, b, d):  # insertion order does not matter
        store.add(job)

    def ids(jobs: list[Job]) -> list[str]:
        return [j.id for j in jobs]

    assert ids(store.list()) == [e.id, d.id, c.id, b.id, a.id]
    # The owner filter is ignored unless any_owner=False.
    assert ids(store.list(owner="alice")) == [e.id, d.id, c.id, b.id, a.id]
    assert ids(store.list(owner="alice", any_owner=False)) == [d.id, a.id]
    assert ids(store.list(owner="bob", any_owner=False)) == [b.id]
    assert ids(store.list(owner=None, any_owner=False)) == [e.id, c.id]
    assert ids(store.list(owner="nobody", any_owner=False)) == []
    assert ids(store.list(statuses=[Q])) == [e.id, a.id]
    assert ids(store.list(statuses=[S, F, C])) == [d.id, c.id]
    assert ids(store.list(statuses=[])) == []
    assert ids(store.list(model="flux-2-klein-9b")) == [d.id, c.id]
    assert ids(store.list(model="flux-2-klein-base-4b")) == []
    assert ids(store.list(limit=2)) == [e.id, d.id]
    assert ids(store.list(owner="alice", any_owner=False, statuses=[Q], model="flux-2-klein-4b")) == [a.id]
    assert ids(store.list(owner=None, any_owner=False, model="flux-2-klein-9b", limit=5)) == [c.id]


def test_count(store: JobStore) -> None:
    assert store.count([Q, P]) == 0
    statuses = [Q, Q, P, S, F, C, C]
    for i, status in enumerate(statuses):
        store.add(make_job(float(i), status=status))
    assert store.count([Q]) == 2
    assert store.count([Q, P]) == 3
    assert store.count([C]) == 2
    assert store.count(list(JobStatus)) == len(statuses)
    assert store.count([]) == 0


def test_remove_finished_before(store: JobStore) -> None:
    old_done = make_job(1.0, status=S, completed_at=100.0)
    old_failed = make_job(2.0, status=F, completed_at=150.0)
    old_cancelled = make_job(3.0, status=C, completed_at=199.0)
    new_done = make_job(4.0, status=S, completed_at=300.0)
    at_cutoff = make_job(5.0, status=F, completed_at=200.0)
    old_queued = make_job(6.0, status=Q)
    old_processing = make_job(7.0, status=P, started_at=50.0)
    jobs = (old_done, old_failed, old_cancelled, new_done, at_cutoff, old_queued, old_processing)
    for job in jobs:
        store.add(job)
    e_old = store.append_event(make_event(old_done, created_at=150.0))
    e_old_active = store.append_event(make_event(old_queued, created_at=199.0))
    e_cutoff = store.append_event(make_event(new_done, created_at=200.0))
    e_new = store.append_event(make_event(new_done, created_at=250.0))
    assert e_old.seq < e_old_active.seq

    removed = store.remove_finished_before(200.0)
    assert {j.id for j in removed} == {old_done.id, old_failed.id, old_cancelled.id}
    assert next(j for j in removed if j.id == old_done.id) == old_done
    for job in (old_done, old_failed, old_cancelled):
        assert store.get(job.id) is None
    for job in (new_done, at_cutoff, old_queued, old_processing):
        assert store.get(job.id) == job
    assert store.events_after(0) == [e_cutoff, e_new]
    assert store.remove_finished_before(200.0) == []


def test_append_event_numbers_increasingly(store: JobStore) -> None:
    job = make_job(1.0, owner="alice")
    stored = [store.append_event(make_event(job, step=i)) for i in range(5)]
    seqs = [e.seq for e in stored]
    assert seqs[0] >= 1
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    for i, event in enumerate(stored):
        assert event.data == {"step": i} and event.job_id == job.id and event.owner == "alice"
    assert store.events_after(0) == stored


def test_events_after_and_owner_filter(store: JobStore) -> None:
    alice = make_job(1.0, owner="alice")
    bob = make_job(2.0, owner="bob")
    anon = make_job(3.0, owner=None)
    stored = []
    for i, job in enumerate([alice, bob, anon, alice, bob, alice]):
        type_ = EventType.QUEUED if i < 3 else EventType.STARTED
        stored.append(store.append_event(make_event(job, type_=type_, i=i)))
    assert store.events_after(0) == stored
    assert store.events_after(stored[2].seq) == stored[3:]
    assert store.events_after(stored[-1].seq) == []
    assert store.events_after(stored[0].seq, owner="alice", any_owner=False) == [stored[3], stored[5]]
    assert store.events_after(0, owner="bob", any_owner=False) == [stored[1], stored[4]]
    assert store.events_after(0, owner="nobody", any_owner=False) == []
    assert store.events_after(0, owner=None, any_owner=False) == [stored[2]]  # jobs without an owner
    assert [e.type for e in store.events_after(0)] == [EventType.QUEUED] * 3 + [EventType.STARTED] * 3
    assert store.events_after(stored[3].seq)[0].data == {"i": 4}


def test_last_seq_before(store: JobStore) -> None:
    assert store.last_seq_before(1e12) == 0
    job = make_job(1.0)
    e1 = store.append_event(make_event(job, created_at=10.0))
    e2 = store.append_event(make_event(job, created_at=20.0))
    e3 = store.append_event(make_event(job, created_at=30.0))
    assert store.last_seq_before(5.0) == 0
    assert store.last_seq_before(10.0) == 0  # strictly before
    assert store.last_seq_before(10.5) == e1.seq
    assert store.last_seq_before(25.0) == e2.seq
    assert store.last_seq_before(30.0) == e2.seq
    assert store.last_seq_before(31.0) == e3.seq
    # Replaying from that number gives exactly the events at or after the time.
    assert store.events_after(store.last_seq_before(20.0)) == [e2, e3]


def test_lower_prompt_limit_does_not_stop_the_queue(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    long_prompt = "a lighthouse at dusk, " * 20
    request = GenerationRequest.parse({"prompt": long_prompt, "model": "flux-2-klein-4b", "seed": 1})
    job = Job(request=request, created_at=1.0)
    store.enqueue([job], [make_event(job, type_=EventType.QUEUED)], Admission(max_queue=10))
    # The operator lowers the limit below the queued prompt: new requests are refused...
    monkeypatch.setenv("KLEINSERVE_MAX_PROMPT_CHARS", "10")
    from kleinserve.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError):
        GenerationRequest.parse({"prompt": long_prompt})
    # ...but the job already accepted still reads, lists and runs, without rebuilding settings.
    from kleinserve.settings import Settings

    def no_settings(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("stored jobs must load without building Settings()")

    monkeypatch.setattr(Settings, "__init__", no_settings)
    assert store.get(job.id) == job
    assert [j.id for j in store.list()] == [job.id]
    [claimed] = store.claim("w1", None, 30.0)
    assert claimed.id == job.id and claimed.request.prompt == long_prompt


def test_queue_positions_in_one_query(store: JobStore) -> None:
    jobs = [make_job(float(t)) for t in (3, 1, 2, 4)]
    for job in jobs:
        store.add(job)
    store.request_cancel(jobs[3].id)
    positions = store.queue_positions([j.id for j in jobs] + ["no-such-id"])
    assert positions == {jobs[1].id: 0, jobs[2].id: 1, jobs[0].id: 2}
    assert store.queue_positions([]) == {}


def test_last_seq(store: JobStore) -> None:
    assert store.last_seq() == 0
    job = make_job(1.0)
    stored = [store.append_event(make_event(job)) for _ in range(3)]
    assert store.last_seq() == stored[-1].seq
