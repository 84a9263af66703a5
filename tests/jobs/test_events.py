"""The EventBus contract (kleinserve.jobs.events), run against every backend in tests/jobs/backends.py."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from kleinserve.jobs import events as events_module
from kleinserve.jobs.events import Event, EventBus, EventType
from kleinserve.jobs.job import Job, JobOutput, JobResult, JobStatus
from kleinserve.jobs.service import JobService
from kleinserve.jobs.store import JobStore
from kleinserve.request import GenerationRequest

TIMEOUT = 30.0  # an upper bound only: a loaded machine can be slow


@pytest.fixture
def store(backend_store: JobStore) -> JobStore:
    return backend_store


def job_of(owner: str | None) -> Job:
    return Job(request=GenerationRequest.parse({"prompt": "x"}), owner=owner)


def event(job: Job, i: int) -> Event:
    return Event.for_job(EventType.PROGRESS, job, step=i)


async def take(events: AsyncIterator[Event], n: int, timeout: float = TIMEOUT) -> list[Event]:
    """The next ``n`` events, or TimeoutError."""

    async def collect() -> list[Event]:
        got = []
        async for e in events:
            got.append(e)
            if len(got) == n:
                break
        return got

    return await asyncio.wait_for(collect(), timeout)


async def nothing_more(events: AsyncIterator[Event], wait: float = 0.3) -> bool:
    """True when no event arrives within ``wait`` seconds."""
    try:
        await asyncio.wait_for(anext(events), wait)
    except TimeoutError:
        return True
    return False


def publish_in_thread(bus: EventBus, events: list[Event], start: threading.Event | None = None) -> threading.Thread:
    def run() -> None:
        if start is not None:
            start.wait(TIMEOUT)
        for e in events:
            bus.publish(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_publish_stores_and_numbers(store: JobStore, make_bus: Callable[[], EventBus]) -> None:
    bus = make_bus()
    job = job_of("alice")
    first = bus.publish(event(job, 0))
    second = bus.publish(event(job, 1))
    assert 0 < first.seq < second.seq
    assert store.events_after(0) == [first, second]


def test_subscriber_gets_events_from_another_thread_in_order(store: JobStore, make_bus: Callable[[], EventBus]) -> None:
    bus = make_bus()
    job = job_of("alice")

    async def main() -> list[Event]:
        async with bus.subscribe() as events:
            thread = publish_in_thread(bus, [event(job, i) for i in range(30)])
            try:
                return await take(events, 30)
            finally:
                await asyncio.to_thread(thread.join)

    got = asyncio.run(main())
    assert [e.data["step"] for e in got] == list(range(30))
    seqs = [e.seq for e in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 30
    assert got == store.events_after(0)


def test_subscriber_without_after_gets_no_earlier_events(store: JobStore, make_bus: Callable[[], EventBus]) -> None:
    bus = make_bus()
    job = job_of(None)
    bus.publish(event(job, -1))

    async def main() -> tuple[list[Event], bool]:
        async with bus.subscribe() as events:
            thread = publish_in_thread(bus, [event(job, 0)])
            got = await take(events, 1)
            await asyncio.to_thread(thread.join)
            return got, await nothing_more(events, 0.2)

    got, quiet = asyncio.run(main())
    assert [e.data["step"] for e in got] == [0]
    assert quiet


def test_subscribe_after_replays_then_goes_live(store: JobStore, make_bus: Callable[[], EventBus]) -> None:
    bus = make_bus()
    job = job_of("alice")
    stored = [bus.publish(event(job, i)) for i in range(10)]
    after = stored[3].seq

    async def main() -> tuple[list[Event], bool]:
        async with bus.subscribe(after=after) as events:
            thread = publish_in_thread(bus, [event(job, i) for i in range(10, 15)])
            got = await take(events, 11)
            await asyncio.to_thread(thread.join)
            return got, await nothing_more(events, 0.2)

    got, quiet = asyncio.run(main())
    assert [e.data["step"] for e in got] == list(range(4, 15))
    assert got[:6] == stored[4:]
    assert quiet


@pytest.mark.parametrize("round_", range(3))
def test_subscribe_after_no_gaps_or_duplicates_while_publishing(
    store: JobStore, make_bus: Callable[[], EventBus], round_: int
) -> None:
    """Events published while the replay is being read arrive exactly once, in order."""
    bus = make_bus()
    job = job_of("alice")
    for i in range(300):
        bus.publish(event(job, i))
    total = 300 + 300

    async def main() -> tuple[list[Event], bool]:
        go = threading.Event()
        async with bus.subscribe(after=0) as events:
            thread = publish_in_thread(bus, [event(job, i) for i in range(300, total)], go)
            go.set()  # publishing races the replay, which starts on the first anext()
            got = await take(events, total)
            await asyncio.to_thread(thread.join)
            return got, await nothing_more(events, 0.2)

    got, quiet = asyncio.run(main())
    assert [e.data["step"] for e in got] == list(range(total))
    seqs = [e.seq for e in got]
    assert seqs == list(range(seqs[0], seqs[0] + total))
    assert quiet


def test_subscribe_after_last_seq_gets_only_live(store: JobStore, make_bus: Callable[[], EventBus]) -> None:
    bus = make_bus()
    job = job_of(None)
    last = [bus.publish(event(job, i)) for i in range(3)][-1]

    async def main() -> list[Event]:
        async with bus.subscribe(after=last.seq) as events:
            thread = publish_in_thread(bus, [event(job, 3)])
            got = await take(events, 1)
            await asyncio.to_thread(thread.join)
            return got

    assert [e.data["step"] for e in asyncio.run(main())] == [3]


def test_owner_filter(store: JobStore, make_bus: Callable[[], EventBus]) -> None:
    bus = make_bus()
    alice, bob, anon = job_of("alice"), job_of("bob"), job_of(None)
    bus.publish(event(alice, 0))
    bus.publish(event(bob, 1))
    bus.publish(event(anon, 2))
    live = [event(bob, 3), event(alice, 4), event(anon, 5), event(alice, 6), event(bob, 7)]

    async def main() -> tuple[list[Event], list[Event], list[Event], bool, bool]:
        async with (
            bus.subscribe(owner="alice", all_owners=False) as alice_live,
            bus.subscribe(after=0, owner="alice", all_owners=False) as alice_replay,
            bus.subscribe(owner="alice") as everyone,  # all_owners=True ignores owner
        ):
            thread = publish_in_thread(bus, live)
            a = await take(alice_live, 2)
            r = await take(alice_replay, 3)
            e = await take(everyone, 5)
            await asyncio.to_thread(thread.join)
            return a, r, e, await nothing_more(alice_live, 0.2), await nothing_more(alice_replay, 0.05)

    a, r, e, quiet_live, quiet_replay = asyncio.run(main())
    assert [x.data["step"] for x in a] == [4, 6]
    assert [x.data["step"] for x in r] == [0, 4, 6]
    assert [x.data["step"] for x in e] == [3, 4, 5, 6, 7]
    assert all(x.owner == "alice" for x in a + r)
    assert quiet_live and quiet_replay


def test_owner_filter_live_for_ownerless(store: JobStore, make_bus: Callable[[], EventBus]) -> None:
    """owner=None with all_owners=False means jobs without an owner (live events)."""
    bus = make_bus()
    alice, anon = job_of("alice"), job_of(None)

    async def main() -> tuple[list[Event], bool]:
        async with bus.subscribe(owner=None, all_owners=False) as events:
            thread = publish_in_thread(bus, [event(alice, 0), event(anon, 1), event(alice, 2)])
            got = await take(events, 1)
            await asyncio.to_thread(thread.join)
            return got, await nothing_more(events, 0.2)

    got, quiet = asyncio.run(main())
    assert [x.data["step"] for x in got] == [1]
    assert quiet


def test_owner_filter_replay_for_ownerless(store: JobStore, make_bus: Callable[[], EventBus]) -> None:
    bus = make_bus()
    alice, anon = job_of("alice"), job_of(None)
    bus.publish(event(alice, 0))
    bus.publish(event(anon, 1))
    bus.publish(event(alice, 2))

    async def main() -> list[Event]:
        got: list[Event] = []
        async with bus.subscribe(after=0, owner=None, all_owners=False) as events:
            try:
                while True:  # everything delivered until the stream goes quiet
                    got.append(await asyncio.wait_for(anext(events), 0.3))
            except TimeoutError:
                return got

    got = asyncio.run(main())
    assert [x.owner for x in got] == [None]
    assert [x.data.get("step") for x in got] == [1]


def test_subscribe_after_replays_everything_when_far_behind(store: JobStore, make_bus: Callable[[], EventBus]) -> None:
    bus = make_bus()
    job = job_of(None)
    total = (
        3 * events_module._PAGE + 5
    )  # several full pages of replay, then a partial one (was 10_005: 10 s on PostgreSQL)
    for i in range(total):
        store.append_event(event(job, i))

    async def main() -> list[Event]:
        async with bus.subscribe(after=0) as events:
            thread = publish_in_thread(bus, [event(job, total)])

            async def until_live() -> list[Event]:
                got = []
                async for e in events:
                    got.append(e)
                    if e.data["step"] == total:  # the live event comes after the whole replay
                        break
                return got

            got = await asyncio.wait_for(until_live(), TIMEOUT)
            await asyncio.to_thread(thread.join)
            return got

    got = asyncio.run(main())
    assert [e.data["step"] for e in got] == list(range(total + 1))


def test_subscription_gets_nothing_after_its_context_exits(store: JobStore, make_bus: Callable[[], EventBus]) -> None:
    bus = make_bus()
    job = job_of("alice")

    async def main() -> tuple[list[Event], bool, list[Event]]:
        async with bus.subscribe() as events:
            async with bus.subscribe() as other:
                thread = publish_in_thread(bus, [event(job, 0)])
                got = await take(events, 1)
                await asyncio.to_thread(thread.join)
                kept = events
            # `other` is gone; `events` is still subscribed.
            thread = publish_in_thread(bus, [event(job, 1)])
            await asyncio.to_thread(thread.join)
            still = await take(events, 1)
            assert await take(other, 1)  # the event from before exit was already queued
        thread = publish_in_thread(bus, [event(job, 2), event(job, 3)])
        await asyncio.to_thread(thread.join)
        return got, await nothing_more(kept, 0.3) and await nothing_more(other, 0.1), still

    got, quiet, still = asyncio.run(main())
    assert [e.data["step"] for e in got] == [0]
    assert [e.data["step"] for e in still] == [1]
    assert quiet
    # Publishing with no subscribers (and with their loop closed) still stores the event.
    stored = bus.publish(event(job, 4))
    assert store.events_after(stored.seq - 1) == [stored]


def test_events_stored_by_others_are_delivered_without_notify(
    store: JobStore, make_bus: Callable[[], EventBus]
) -> None:
    """Another process writes straight to the store: the bus finds the events by polling."""
    bus = make_bus()
    job = job_of(None)

    async def scenario() -> list[Event]:
        async with bus.subscribe() as events:
            thread = threading.Thread(target=lambda: [store.append_event(event(job, i)) for i in range(5)])
            thread.start()
            got = await take(events, 5)
            thread.join()
            return got

    got = asyncio.run(scenario())
    assert [e.data["step"] for e in got] == [0, 1, 2, 3, 4]


def test_flood_of_submits_cancels_and_completions_reaches_every_subscriber(
    store: JobStore, make_bus: Callable[[], EventBus]
) -> None:
    """Submitters, cancellers and a worker write concurrently from threads while many subscribers
    and sync waiters listen: each subscriber gets every event of the jobs it may see, strictly in
    order and without gaps, and every sync waiter of a succeeded job gets its result."""
    bus = make_bus()
    service = JobService(store, bus, ["flux-2-klein-4b"], max_queue=10_000)
    jobs_total, subscribers = 60, 40
    request = GenerationRequest.parse({"prompt": "x", "model": "flux-2-klein-4b", "seed": 1})
    submitted: list[Job] = []
    lock = threading.Lock()
    done_writing = threading.Event()

    def submit_and_cancel(offset: int) -> None:
        for i in range(offset, jobs_total, 3):
            [job] = service.submit([request], owner="alice" if i % 2 else None)
            with lock:
                submitted.append(job)
            if i % 5 == 0:
                service.cancel(job.id)

    def work() -> None:
        while not done_writing.is_set() or store.count([JobStatus.QUEUED]):
            for job in store.claim("w1", None, 30.0):
                store.renew(job.id, "w1", job.attempts, 30.0, step=1, total=1)
                output = JobOutput(
                    key=f"{job.id}/1/0.png", media_type="image/png", seed=1, width=1, height=1, size_bytes=1
                )
                store.complete(
                    job.id,
                    "w1",
                    job.attempts,
                    JobStatus.SUCCEEDED,
                    result=JobResult(outputs=[output], steps=1, guidance=1.0),
                )
                bus.notify()

    async def scenario() -> tuple[list[list[Event]], list[Job]]:
        start = store.last_seq()
        async with contextlib.AsyncExitStack() as stack:
            streams = [
                await stack.enter_async_context(bus.subscribe(after=start, owner="alice", all_owners=i % 2 == 0))
                for i in range(subscribers)
            ]
            threads = [threading.Thread(target=submit_and_cancel, args=(k,)) for k in range(3)]
            threads.append(threading.Thread(target=work))
            for thread in threads:
                thread.start()
            waiters: list[asyncio.Task[Job]] = []
            while any(t.is_alive() for t in threads[:3]):
                with lock:
                    new = submitted[len(waiters) :]
                waiters += [asyncio.ensure_future(service.wait(j.id, TIMEOUT)) for j in new]
                await asyncio.sleep(0.01)
            waiters += [asyncio.ensure_future(service.wait(j.id, TIMEOUT)) for j in submitted[len(waiters) :]]
            done_writing.set()
            await asyncio.to_thread(threads[3].join, TIMEOUT)
            finished = await asyncio.gather(*waiters)
            everything = store.events_after(start, limit=100_000)
            got = []
            for i, stream in enumerate(streams):
                visible = [e for e in everything if i % 2 == 0 or e.owner == "alice"]
                got.append(await take(stream, len(visible)))
            return got, finished

    got, finished = asyncio.run(scenario())
    everything = store.events_after(0, limit=100_000)
    assert {e.type for e in everything} >= {EventType.QUEUED, EventType.SUCCEEDED, EventType.CANCELLED}
    for i, events in enumerate(got):
        expected = everything if i % 2 == 0 else [e for e in everything if e.owner == "alice"]
        assert [e.seq for e in events] == [e.seq for e in expected]
    assert len(finished) == jobs_total
    for job in finished:
        assert job.status in (JobStatus.SUCCEEDED, JobStatus.CANCELLED)
        if job.status is JobStatus.SUCCEEDED:
            assert job.result is not None and job.result.outputs[0].key.startswith(job.id)
    assert sum(j.status is JobStatus.CANCELLED for j in finished) >= 1
