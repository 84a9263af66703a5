"""Admission: whether new jobs may enter the queue, decided inside the store's enqueue transaction.

The decision is pure and lives here; a store only offers the reads it needs (:class:`AdmissionReads`)
over the transaction it is inserting in, so every backend enforces the same limits, and they hold
across API processes (two replicas cannot both take the last place in the queue, nor both spend a
key's last credit or last token).

Limits, in the order they are checked:

1. the queue bound: at most ``max_queue`` jobs queued or running (503, Retry-After);
2. the per-key queue share: one key may hold at most ``max_queue_per_key`` of them
   (``KLEINSERVE_MAX_QUEUE_PER_KEY``, default half the queue), so one key cannot fill the queue for
   everyone (429);
3. the key's own concurrency (429), credits (402: the key's credits minus what it spent minus what
   its queued and running jobs reserve) and image rate (429).

Rates are token buckets holding one minute's allowance, refilled continuously, stored per key and
kind in the database, so a key may burst up to its per-minute rate and then proceeds at that rate
whichever API process it talks to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kleinserve.errors import InsufficientCreditsError, RateLimitedError, ServiceUnavailableError

if TYPE_CHECKING:
    from kleinserve.jobs.job import Job
    from kleinserve.keys import ApiKey

CONCURRENCY_RETRY = 5  # seconds: a tiny-to-medium job's run time; clients poll again after it


class AdmissionReads(Protocol):
    """What a store reads and writes for admission, inside its enqueue transaction."""

    def active(self) -> int:
        """Queued and processing jobs, all owners."""

    def owner_active(self, owner: str) -> tuple[int, float]:
        """Queued and processing jobs of ``owner``: how many, and the credits they reserve."""

    def spent(self, owner: str) -> float:
        """Credits ``owner`` has spent (the usage recorded for its succeeded jobs)."""

    def bucket(self, owner: str, kind: str) -> tuple[float, float] | None:
        """The stored ``(tokens, updated)`` of a rate bucket, or ``None`` when it has none yet."""

    def save_bucket(self, owner: str, kind: str, tokens: float, updated: float) -> None:
        """Store a rate bucket's new state."""


def take_tokens(
    state: tuple[float, float] | None, per_minute: float, amount: float, now: float
) -> tuple[float, tuple[float, float]]:
    """Take ``amount`` tokens from a bucket of ``per_minute`` holding at most one minute's worth.

    Returns ``(wait, new_state)``: ``wait`` is 0 when the tokens were taken, else the seconds until
    there would be enough (nothing is taken then).
    """
    tokens, updated = state if state is not None else (per_minute, now)
    tokens = min(per_minute, tokens + max(0.0, now - updated) * per_minute / 60)
    if amount > per_minute:  # can never fit: say when a full bucket would be back
        return 60.0, (tokens, now)
    if tokens >= amount:
        return 0.0, (tokens - amount, now)
    return (amount - tokens) * 60 / per_minute, (tokens, now)


def take_or_refuse(
    reads: AdmissionReads, key: ApiKey, kind: str, per_minute: float | None, amount: float, now: float
) -> None:
    """Take ``amount`` from the key's ``kind`` bucket, or raise 429 naming when to retry."""
    if per_minute is None:
        return
    wait, state = take_tokens(reads.bucket(key.id, kind), per_minute, amount, now)
    reads.save_bucket(key.id, kind, *state)
    if wait > 0:
        raise RateLimitedError(
            f"rate limit of {per_minute:g} {kind} per minute for key {key.name!r} reached; "
            f"retry in {math.ceil(wait)} s",
            retry_after=math.ceil(wait),
        )


@dataclass(frozen=True)
class Admission:
    """The limits new jobs are admitted under (``key``: the submitting API key, if any)."""

    max_queue: int
    retry_after: int = 10
    key: ApiKey | None = None
    max_queue_per_key: int | None = None
    now: float = 0.0  # when the request arrived (rate buckets refill up to it)

    def check(self, reads: AdmissionReads, jobs: Sequence[Job]) -> None:
        """Raise the refusal (a :class:`~kleinserve.errors.KleinserveError`) unless ``jobs`` fit;
        record the tokens they take."""
        count = len(jobs)
        if reads.active() + count > self.max_queue:
            raise ServiceUnavailableError(
                f"the queue is full (at most {self.max_queue} jobs waiting or running); retry later",
                retry_after=self.retry_after,
            )
        key = self.key
        if key is None:
            return
        active, reserved = reads.owner_active(key.id)
        share = self.max_queue_per_key
        if share is not None and active + count > share:
            raise RateLimitedError(
                f"key {key.name!r} may have {share} jobs queued or running at once (its share of the "
                f"queue) and has {active}; retry when one finishes",
                retry_after=CONCURRENCY_RETRY,
            )
        if key.concurrency is not None and active + count > key.concurrency:
            raise RateLimitedError(
                f"key {key.name!r} may have {key.concurrency} jobs queued or running at once and has "
                f"{active}; retry when one finishes",
                retry_after=CONCURRENCY_RETRY,
            )
        if key.credits is not None:
            cost = sum(job.cost for job in jobs)
            left = key.credits - reads.spent(key.id) - reserved
            if cost > left + 1e-9:
                raise InsufficientCreditsError(
                    f"this request costs {cost:g} credits; key {key.name!r} has {max(left, 0):g} left"
                )
        images = sum(job.request.num_images for job in jobs)
        take_or_refuse(reads, key, "images", key.images_per_minute, images, self.now)
