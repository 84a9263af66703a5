"""The PostgreSQL connection pool and its start-up migration."""

from __future__ import annotations

import threading
from pathlib import Path

from kleinserve import backends
from kleinserve.postgres.database import PgDatabase, advisory_key, is_postgres_url
from kleinserve.postgres.keys import SCHEMA
from kleinserve.runtime import Runtime
from kleinserve.settings import Settings


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


def test_a_process_holds_one_pool_shared_by_its_stores(pg_url: str, tmp_path: Path) -> None:
    """Job, key and webhook stores of one Runtime borrow one pool of KLEINSERVE_DATABASE_POOL
    connections (three pools of 10 each used to open up to 30 connections per process)."""
    runtime = Runtime(Settings(data_dir=tmp_path, database_url=pg_url, database_pool=4))
    webhooks = backends.webhook_store(runtime.settings, runtime.store)
    try:
        database = runtime.store.database  # type: ignore[attr-defined]
        assert database.pool.max_size == 4
        assert runtime.keys._database is database and webhooks._database is database  # type: ignore[attr-defined]
        webhooks.close()
        runtime.keys.close()  # borrowers leave the pool open for the job store
        with database.connection() as db:
            assert db.execute("SELECT 1").fetchone() == (1,)
    finally:
        runtime.stop()
    assert database.pool.closed
