"""The PostgreSQL connection pool and its start-up migration."""

from __future__ import annotations

import threading

from kleinserve.postgres.database import PgDatabase, advisory_key, is_postgres_url
from kleinserve.postgres.keys import SCHEMA


def test_urls_select_postgres() -> None:
    assert is_postgres_url("postgresql://u@h/db") and is_postgres_url("postgres://h/db")
    assert not is_postgres_url("sqlite:///x") and not is_postgres_url("") and not is_postgres_url(None)
    assert advisory_key("reap") == advisory_key("reap") != advisory_key("events")


def test_processes_starting_at_once_all_migrate(pg_url: str) -> None:
    """Replicas start together: each runs CREATE ... IF NOT EXISTS, and none fails on the catalog race."""
    errors: list[BaseException] = []
    databases: list[PgDatabase] = []
    lock = threading.Lock()

    def start() -> None:
        try:
            database = PgDatabase(pg_url, SCHEMA, max_size=1)
        except BaseException as err:
            errors.append(err)
            return
        with lock:
            databases.append(database)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == [] and len(databases) == 6
        with databases[0].transaction() as db:
            db.execute("INSERT INTO api_usage (key_id, job_id, model, images, cost, created_at) "
                       "VALUES ('k', 'j', 'm', 1, 0, 0)")  # fmt: skip
        with databases[1].connection() as db:
            assert db.execute("SELECT COUNT(*) FROM api_usage").fetchone() == (1,)
    finally:
        for database in databases:
            database.close()


def test_a_failed_transaction_leaves_nothing(pg_url: str) -> None:
    database = PgDatabase(pg_url, SCHEMA, max_size=1)
    try:
        try:
            with database.transaction() as db:
                db.execute("INSERT INTO api_usage (key_id, job_id, model, images, cost, created_at) "
                           "VALUES ('k', 'j', 'm', 1, 0, 0)")  # fmt: skip
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        with database.connection() as db:  # the same (only) pooled connection: no transaction left open
            assert db.execute("SELECT COUNT(*) FROM api_usage").fetchone() == (0,)
            assert db.info.transaction_status.name == "IDLE"
    finally:
        database.close()
