"""API keys: the key store, rate parsing, token buckets, and the `kleinserve keys` commands."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from kleinserve.cli import app
from kleinserve.errors import InvalidParameterError, NotFoundError
from kleinserve.jobs.admission import take_tokens
from kleinserve.keys import ApiKeyStore, KeyStore, hash_key, parse_rate
from kleinserve.postgres.keys import PgKeyStore

runner = CliRunner()


@pytest.fixture(params=["sqlite", "postgres"])
def key_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ApiKeyStore]:
    """Every ApiKeyStore implementation, each on a fresh database."""
    store: ApiKeyStore
    if request.param == "sqlite":
        store = KeyStore(tmp_path / "keys.sqlite3")
    else:
        store = PgKeyStore(request.getfixturevalue("pg_url"))
    assert isinstance(store, ApiKeyStore)
    yield store
    store.close()


def stored_text(store: ApiKeyStore, tmp_path: Path) -> bytes:
    """Everything the store wrote, as bytes: the SQLite file and its WAL, or every PostgreSQL row."""
    if isinstance(store, PgKeyStore):
        with psycopg.connect(store._database.url) as conn:
            rows = conn.execute("SELECT k::text FROM api_keys k").fetchall()
        return "".join(row[0] for row in rows).encode()
    return b"".join(path.read_bytes() for path in tmp_path.glob("keys.sqlite3*"))


@pytest.mark.parametrize(
    ("text", "per_minute"), [("60/min", 60), ("60", 60), ("2/s", 120), ("1000/hour", 1000 / 60), ("0.5/m", 0.5)]
)
def test_parse_rate(text: str, per_minute: float) -> None:
    assert parse_rate(text) == pytest.approx(per_minute)


@pytest.mark.parametrize("text", ["", "0/min", "-1/min", "ten/min", "5/week"])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(InvalidParameterError):
        parse_rate(text)


def test_keys_are_stored_only_as_hashes(key_store: ApiKeyStore, tmp_path: Path) -> None:
    store = key_store
    assert not store.any_key() and not store.any_active()
    key, secret = store.create("alice", credits=5, concurrency=2, requests_per_minute=6.5)
    assert secret.startswith("ks-") and len(secret) > 40
    raw = stored_text(store, tmp_path)
    assert secret.encode() not in raw and hash_key(secret).encode() in raw
    assert store.authenticate(secret) == key
    assert store.authenticate(secret + "x") is None and store.authenticate("") is None
    with pytest.raises(InvalidParameterError, match="exists already"):
        store.create("alice")
    store.revoke("alice")
    assert store.authenticate(secret) is None and not store.any_active()
    with pytest.raises(NotFoundError):
        store.revoke("nobody")
    assert store.get("alice").revoked_at == store.revoke("alice").revoked_at  # revoking twice keeps the first time
    assert store.any_key() and store.revoked_since(0) == [(key.id, store.get("alice").revoked_at)]
    assert store.revoked_since(time.time() + 1) == []
    assert [k.name for k in store.list()] == ["alice"] and store.list()[0].concurrency == 2


def test_revocations_are_listed_and_revoked_keys_still_count(key_store: ApiKeyStore) -> None:
    store = key_store
    assert not store.any_key() and store.revoked_since(0) == []
    store.create("kept")
    gone, _ = store.create("gone")
    before = time.time() - 1
    store.revoke("gone")
    assert store.revoked_since(before) == [(gone.id, store.get("gone").revoked_at)]
    assert store.revoked_since(time.time() + 60) == []
    store.revoke("kept")
    assert store.any_key() and not store.any_active()  # a table of revoked keys keeps a server closed


def test_usage_is_recorded_once_per_job(key_store: ApiKeyStore) -> None:
    store = key_store
    key, _ = store.create("bob")
    assert store.spent(key.id) == 0 and store.usage(key.id).jobs == 0
    store.record_usage(key.id, "job-1", "flux-2-klein-4b", 2, 0.08)
    store.record_usage(key.id, "job-1", "flux-2-klein-4b", 2, 0.08)  # a retried charge counts once
    store.record_usage(key.id, "job-2", "flux-2-klein-base-4b", 1, 0.04)
    usage = store.usage(key.id)
    assert (usage.images, usage.jobs) == (3, 2) and usage.spent == pytest.approx(0.12)
    assert usage.by_model["flux-2-klein-4b"] == {"jobs": 1, "images": 2, "spent": pytest.approx(0.08)}
    assert store.spent(key.id) == pytest.approx(0.12)


def test_token_bucket_bursts_then_refills() -> None:
    state = None
    waits = []
    for _ in range(7):
        wait, state = take_tokens(state, per_minute=6, amount=1, now=0.0)
        waits.append(wait)
    assert waits == [0.0] * 6 + [pytest.approx(10.0)]  # one token every 10 s
    assert take_tokens(state, 6, 1, now=10.0)[0] == 0.0
    assert take_tokens(state, 6, 7, now=10.0)[0] == 60.0  # more than a minute's allowance never fits


def test_keys_commands(tmp_path: Path) -> None:
    created = runner.invoke(app, ["keys", "create", "--name", "carol", "--rate", "10/min", "--credits", "3",
                                  "--concurrency", "2", "--data-dir", str(tmp_path)])  # fmt: skip
    assert created.exit_code == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("ks-") and "not shown again" in created.stderr
    listed = runner.invoke(app, ["keys", "list", "--data-dir", str(tmp_path)])
    assert "carol" in listed.stdout and secret not in listed.stdout and "requests/min 10" in listed.stdout
    usage = runner.invoke(app, ["keys", "usage", "carol", "--data-dir", str(tmp_path)])
    assert "0 images" in usage.stdout and "credits 3 of 3" in usage.stdout
    assert runner.invoke(app, ["keys", "revoke", "carol", "--data-dir", str(tmp_path)]).exit_code == 0
    assert "revoked" in runner.invoke(app, ["keys", "list", "--data-dir", str(tmp_path)]).stdout
    bad = runner.invoke(app, ["keys", "create", "--name", "x y", "--data-dir", str(tmp_path)])
    assert bad.exit_code == 1 and "name:" in bad.stderr
    bad_rate = runner.invoke(app, ["keys", "create", "--name", "d", "--rate", "fast", "--data-dir", str(tmp_path)])
    assert bad_rate.exit_code == 1 and "rate:" in bad_rate.stderr
    missing = runner.invoke(app, ["keys", "usage", "nobody", "--data-dir", str(tmp_path)])
    assert missing.exit_code == 1 and "no API key named 'nobody'" in missing.stderr


def test_keys_commands_against_postgres(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KLEINSERVE_DATABASE_URL=postgresql://... puts keys in PostgreSQL, where every api process sees them."""
    monkeypatch.setenv("KLEINSERVE_DATABASE_URL", pg_url)
    created = runner.invoke(app, ["keys", "create", "--name", "erin", "--rate", "4/hour", "--data-dir", str(tmp_path)])
    assert created.exit_code == 0, created.stderr
    secret = created.stdout.strip()
    store = PgKeyStore(pg_url)
    try:
        key = store.authenticate(secret)
        assert key is not None and key.name == "erin" and key.requests_per_minute == pytest.approx(4 / 60)
        listed = runner.invoke(app, ["keys", "list", "--data-dir", str(tmp_path)])
        assert "erin" in listed.stdout and secret not in listed.stdout
        assert runner.invoke(app, ["keys", "revoke", "erin", "--data-dir", str(tmp_path)]).exit_code == 0
        assert store.authenticate(secret) is None
    finally:
        store.close()
    assert not list(tmp_path.glob("*.sqlite3"))  # nothing went to SQLite


def test_database_url_must_name_a_known_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLEINSERVE_DATABASE_URL", "mysql://db/x")
    bad = runner.invoke(app, ["keys", "list"])
    assert bad.exit_code == 1 and "postgresql://" in bad.stderr
