"""The webhook dispatcher: finished jobs become deliveries; due deliveries are sent and retried.

One background thread per API process (``kleinserve serve`` included), every ``poll`` seconds:

1. **Scan.** Read the job events after the stored cursor (in order, from the job store, so nothing
   is missed across restarts or when another process finished the job). Each terminal event
   (succeeded, failed, cancelled) of a job with a ``webhook_url`` becomes a :class:`Delivery`
   whose body is fixed now: ``{"type": "job.succeeded", "timestamp": ..., "data": <job view>}``.
   The store keeps one delivery per job, so several API processes scanning the same events
   notify once.
2. **Send.** Claim the due deliveries (with a lease) and POST each one, signed (``signing.py``),
   to an address the image-URL SSRF guard allows (``engine/fetch.vetted_targets``: private and
   local addresses only with ``KLEINSERVE_FETCH_ALLOW``), without following redirects. A 2xx answer
   delivers it; anything else (another status, a timeout, a refused address) is recorded as an
   attempt and retried after the next delay of ``KLEINSERVE_WEBHOOK_RETRY_SCHEDULE`` (by default
   5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: eight tries over about 28 hours, Standard Webhooks'
   suggested schedule); after the last one the delivery is ``failed``.
3. **Forget.** Every ``KLEINSERVE_CLEANUP_INTERVAL``, delivered and failed deliveries older than
   ``KLEINSERVE_RETENTION_SECONDS`` are removed with their attempts, as finished jobs are.

The job view's result links are signed for ``KLEINSERVE_URL_EXPIRY`` from when the job finished;
a receiver that comes later reads the job again (its API issues fresh links).
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from kleinserve.engine.fetch import vetted_targets
from kleinserve.engine.images import InputPolicy
from kleinserve.errors import KleinserveError
from kleinserve.jobs.events import TERMINAL_EVENTS
from kleinserve.jobs.job import Job, JobOutput
from kleinserve.jobs.store.base import JobStore
from kleinserve.settings import Settings
from kleinserve.webhooks import signing
from kleinserve.webhooks.store import Attempt, Delivery, DeliveryStatus, WebhookStore

log = logging.getLogger(__name__)

CURSOR = "job-events"
FIELD = "webhook_url"


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return (
        datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def job_view(job: Job, link: Callable[[JobOutput], str]) -> dict[str, Any]:
    """The job as a webhook receiver sees it (the same for every dialect)."""
    outputs = job.result.outputs if job.result else []
    return {
        "id": job.id,
        "status": job.status.value,
        "model": job.request.model,
        "dialect": job.dialect,
        "prompt": job.request.prompt,
        "request_id": job.request_id,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "completed_at": _iso(job.completed_at),
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "outputs": [
            {"url": link(o), "media_type": o.media_type, "width": o.width, "height": o.height, "seed": o.seed}
            for o in outputs
        ],
        "safety": job.safety.model_dump(mode="json") if job.safety else None,
    }


class WebhookDispatcher:
    """Scans finished jobs and sends their webhooks from a background thread."""

    def __init__(
        self,
        jobs: JobStore,
        deliveries: WebhookStore,
        settings: Settings,
        link: Callable[[JobOutput], str],
        *,
        poll: float = 1.0,
    ) -> None:
        self.jobs = jobs
        self.deliveries = deliveries
        self.settings = settings
        self.link = link
        self.poll = poll
        self.secret = signing.server_secret(
            settings.webhook_secret.get_secret_value() if settings.webhook_secret else None, settings.data_dir
        )
        self.policy = InputPolicy.from_settings(settings, field=FIELD)
        self.schedule = list(settings.webhook_retry_schedule)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_sweep = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.scan()
                self.send_due()
                if time.time() >= self._next_sweep:
                    self._next_sweep = time.time() + self.settings.cleanup_interval
                    self.deliveries.remove_finished_before(time.time() - self.settings.retention_seconds)
            except Exception:
                log.exception("webhooks: dispatch failed; retrying")
            self._stopping.wait(self.poll)

    # -- finished jobs -> deliveries ------------------------------------------------------------

    def scan(self) -> int:
        """Turn the finished jobs since the cursor into deliveries; return how many were added."""
        added = 0
        while True:
            after = self.deliveries.cursor(CURSOR) or 0
            events = self.jobs.events_after(after, any_owner=True, limit=500)
            if not events:
                return added
            for event in events:
                if event.type not in TERMINAL_EVENTS:
                    continue
                job = self.jobs.get(event.job_id)
                if job is None or not job.webhook_url or not job.terminal:
                    continue
                added += self.deliveries.add(self._delivery(job, event.type.value))
            self.deliveries.set_cursor(CURSOR, events[-1].seq)

    def _delivery(self, job: Job, event_type: str) -> Delivery:
        assert job.webhook_url is not None
        now = time.time()
        body = {"type": event_type, "timestamp": _iso(job.completed_at or now), "data": job_view(job, self.link)}
        return Delivery(
            job_id=job.id,
            owner=job.owner,
            url=job.webhook_url,
            event_type=event_type,
            payload=json.dumps(body, separators=(",", ":"), ensure_ascii=False),
            next_attempt_at=now,
            created_at=now,
        )

    # -- sending --------------------------------------------------------------------------------

    def send_due(self) -> int:
        """Send every due delivery once; return how many were tried."""
        lease = self.settings.webhook_timeout * 2 + 30
        due = self.deliveries.claim_due(time.time(), lease)
        for delivery in due:
            self.send(delivery)
        return len(due)

    def send(self, delivery: Delivery) -> Attempt:
        """One attempt at ``delivery``, recorded with what came of it."""
        started = time.time()
        number = delivery.attempts + 1
        status_code: int | None = None
        error: str | None = None
        try:
            status_code = self._post(delivery)
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
        except KleinserveError as err:  # refused by the SSRF guard
            error = err.message
        except httpx.HTTPError as err:
            error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        attempt = Attempt(
            delivery_id=delivery.id,
            number=number,
            at=started,
            status_code=status_code,
            error=error,
            duration=time.time() - started,
        )
        if error is None:
            self.deliveries.record(attempt, DeliveryStatus.DELIVERED, started)
            log.info("webhook delivered", extra={"job_id": delivery.job_id, "delivery": delivery.id, "attempt": number})
        elif number > len(self.schedule):
            self.deliveries.record(attempt, DeliveryStatus.FAILED, started, error)
            log.warning(
                "webhook failed for good after %d attempts: %s",
                number,
                error,
                extra={"job_id": delivery.job_id, "delivery": delivery.id},
            )
        else:
            retry_at = time.time() + self.schedule[number - 1]
            self.deliveries.record(attempt, DeliveryStatus.PENDING, retry_at, error)
            log.info(
                "webhook attempt %d failed (%s); next in %gs",
                number,
                error,
                self.schedule[number - 1],
                extra={"job_id": delivery.job_id, "delivery": delivery.id},
            )
        return attempt

    def _post(self, delivery: Delivery) -> int:
        body = delivery.payload.encode()
        secret = signing.secret_for(self.secret, delivery.owner)
        headers = signing.headers(secret, delivery.id, int(time.time()), body)
        headers["user-agent"] = "kleinserve-webhooks"
        targets = vetted_targets(delivery.url, self.policy)
        # Straight to the vetted address (no proxies from the environment, no redirects).
        with httpx.Client(timeout=self.settings.webhook_timeout, follow_redirects=False, trust_env=False) as client:
            last: httpx.HTTPError | None = None
            for url, target_headers, extensions in targets:
                merged = {**{k: v for k, v in target_headers.items() if k.lower() != "accept"}, **headers}
                try:
                    response = client.post(url, content=body, headers=merged, extensions=extensions)
                except httpx.ConnectError as err:
                    last = err
                    continue
                return response.status_code
            assert last is not None
            raise last
