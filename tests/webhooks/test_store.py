"""The webhook delivery store contract, run on SQLite and on PostgreSQL alike."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kleinserve.webhooks.store import Attempt, Delivery, DeliveryStatus, SQLiteWebhookStore, WebhookStore


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WebhookStore]:
    if request.param == "sqlite":
        made: WebhookStore = SQLiteWebhookStore(tmp_path / "jobs.sqlite3")
    else:
        from kleinserve.postgres.webhooks import PgWebhookStore

        made = PgWebhookStore(request.getfixturevalue("pg_url"))
    yield made
    made.close()


def delivery(job_id: str, at: float) -> Delivery:
    return Delivery(
        job_id=job_id, url="https://example.com/hook", event_type="job.succeeded", payload="{}",
        next_attempt_at=at, created_at=at,
    )  # fmt: skip


def test_one_delivery_per_job(store: WebhookStore) -> None:
    now = time.time()
    first = delivery("job-1", now)
    assert store.add(first) is True
    assert store.add(delivery("job-1", now)) is False  # a second scanner of the same events
    assert [d.id for d in store.for_job("job-1")] == [first.id]
    assert store.get(first.id) == first and store.get("msg_none") is None


def test_claims_are_leased_and_attempts_recorded(store: WebhookStore) -> None:
    now = time.time()
    due, later = delivery("due", now - 1), delivery("later", now + 3600)
    store.add(due)
    store.add(later)
    assert [d.id for d in store.claim_due(now, lease=60)] == [due.id]
    assert store.claim_due(now, lease=60) == []  # leased: nobody else sends it meanwhile
    assert [d.id for d in store.claim_due(now + 61, lease=60)] == [due.id]  # the lease ran out

    store.record(Attempt(delivery_id=due.id, number=1, at=now, status_code=500, error="HTTP 500"),
                 DeliveryStatus.PENDING, now + 5, "HTTP 500")  # fmt: skip
    store.record(Attempt(delivery_id=due.id, number=2, at=now + 5, status_code=200, duration=0.1),
                 DeliveryStatus.DELIVERED, now + 5)  # fmt: skip
    stored = store.get(due.id)
    assert stored is not None and stored.status is DeliveryStatus.DELIVERED and stored.attempts == 2
    assert [(a.number, a.status_code, a.error) for a in store.attempts(due.id)] == [
        (1, 500, "HTTP 500"),
        (2, 200, None),
    ]
    assert [d.id for d in store.claim_due(now + 10_000, lease=60)] == [later.id]  # delivered ones never again


def test_the_cursor_only_moves_forward(store: WebhookStore) -> None:
    assert store.cursor("job-events") is None
    store.set_cursor("job-events", 10)
    store.set_cursor("job-events", 7)  # a slower scanner in another process
    assert store.cursor("job-events") == 10


def test_retention_forgets_only_finished_deliveries(store: WebhookStore) -> None:
    now = time.time()
    done, gone, waiting = delivery("done", now - 100), delivery("gone", now - 100), delivery("waiting", now - 100)
    for item in (done, gone, waiting):
        store.add(item)
    store.record(Attempt(delivery_id=done.id, number=1, at=now), DeliveryStatus.DELIVERED, now)
    store.record(Attempt(delivery_id=gone.id, number=1, at=now, error="HTTP 500"), DeliveryStatus.FAILED, now)
    assert store.remove_finished_before(now - 200) == 0  # none that old
    assert store.remove_finished_before(now - 50) == 2
    assert store.get(done.id) is None and store.attempts(done.id) == [] and store.get(gone.id) is None
    assert store.get(waiting.id) is not None  # still being retried
