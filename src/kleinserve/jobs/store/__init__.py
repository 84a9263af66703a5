"""Job stores: where jobs and their events persist (SQLite by default)."""

from kleinserve.jobs.store.base import JobStore
from kleinserve.jobs.store.sqlite import SQLiteJobStore

__all__ = ["JobStore", "SQLiteJobStore"]
