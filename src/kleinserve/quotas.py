"""Per-key quotas as the HTTP layer sees them: prices, and the request rate checked per request.

Every limit is enforced in the job store, in one transaction, so it holds across API processes:
the request rate here (:meth:`~kleinserve.jobs.store.base.JobStore.admit_request`), and everything a
submission is admitted under (queue share, concurrency, credits, image rate) in
:mod:`kleinserve.jobs.admission`, inside the store's enqueue. Rate buckets live in the database.
Credits and usage live in the key store; a job is priced when it is submitted, its credits are
reserved while it is queued or running and charged only if it succeeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from kleinserve.jobs.store.base import JobStore
from kleinserve.keys import ApiKey


class Quotas:
    """Prices jobs and counts requests against their key's request rate (429 when over it)."""

    def __init__(self, store: JobStore, prices: Mapping[str, float], clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.prices = dict(prices)
        self.clock = clock

    def price(self, model: str, images: int) -> float:
        return self.prices.get(model, 0.0) * images

    def check_request(self, key: ApiKey) -> None:
        """Count one request against the key's request rate (blocking: a database write)."""
        if key.requests_per_minute is not None:
            self.store.admit_request(key, self.clock())
