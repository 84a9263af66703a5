"""Per-key limits: request and image rates (token buckets), concurrency, and credits.

Rates are token buckets holding one minute's allowance, refilled continuously, so a key may burst
up to its per-minute rate and then proceeds at that rate. Buckets live in memory (one process);
credits and usage live in the key store, so they survive restarts. A job is priced when it is
submitted; its credits are reserved while it is queued or running and charged only if it succeeds.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kleinserve.errors import InsufficientCreditsError, RateLimitedError
from kleinserve.jobs.job import Job, JobStatus
from kleinserve.jobs.store.base import JobStore
from kleinserve.keys import ApiKey, KeyStore

_ACTIVE = (JobStatus.QUEUED, JobStatus.PROCESSING)
_CONCURRENCY_RETRY = 5  # seconds: a tiny-to-medium job's run time; clients poll again after it


@dataclass
class TokenBucket:
    """``per_minute`` tokens a minute, holding at most one minute's worth."""

    per_minute: float
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.per_minute
        self.updated = -math.inf

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens if there are enough and return 0; else the seconds to wait."""
        if self.updated != -math.inf:
            self.tokens = min(self.per_minute, self.tokens + (now - self.updated) * self.per_minute / 60)
        self.updated = now
        if amount > self.per_minute:  # can never fit: say when a full bucket would be back
            return 60.0
        if self.tokens >= amount:
            self.tokens -= amount
            return 0.0
        return (amount - self.tokens) * 60 / self.per_minute


class Quotas:
    """Admits requests and jobs for API keys, or refuses them with 429 / 402 errors."""

    def __init__(
        self,
        keys: KeyStore,
        store: JobStore,
        prices: Mapping[str, float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys = keys
        self.store = store
        self.prices = dict(prices)
        self.clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    def price(self, model: str, images: int) -> float:
        return self.prices.get(model, 0.0) * images

    def _take(self, key: ApiKey, kind: str, per_minute: float | None, amount: float) -> None:
        if per_minute is None:
            return
        with self._lock:
            bucket = self._buckets.get((key.id, kind))
            if bucket is None or bucket.per_minute != per_minute:
                bucket = self._buckets[(key.id, kind)] = TokenBucket(per_minute)
            wait = bucket.take(amount, self.clock())
        if wait > 0:
            raise RateLimitedError(
                f"rate limit of {per_minute:g} {kind} per minute for key {key.name!r} reached; "
                f"retry in {math.ceil(wait)} s",
                retry_after=math.ceil(wait),
            )

    def check_request(self, key: ApiKey) -> None:
        """Count one request against the key's request rate."""
        self._take(key, "requests", key.requests_per_minute, 1)

    def admit(self, key: ApiKey, jobs: Sequence[Job]) -> None:
        """Check concurrency, image rate and credits for new ``jobs`` (already priced)."""
        active = self.store.list(owner=key.id, any_owner=False, statuses=_ACTIVE, limit=100_000)
        if key.concurrency is not None and len(active) + len(jobs) > key.concurrency:
            raise RateLimitedError(
                f"key {key.name!r} may have {key.concurrency} jobs queued or running at once and has "
                f"{len(active)}; retry when one finishes",
                retry_after=_CONCURRENCY_RETRY,
            )
        if key.credits is not None:
            reserved = sum(job.cost for job in active)
            cost = sum(job.cost for job in jobs)
            left = key.credits - self.keys.spent(key.id) - reserved
            if cost > left + 1e-9:
                raise InsufficientCreditsError(
                    f"this request costs {cost:g} credits; key {key.name!r} has {max(left, 0):g} left"
                )
        self._take(key, "images", key.images_per_minute, sum(job.request.num_images for job in jobs))
