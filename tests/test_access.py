"""The access rule: decided at start, only tightened by the key table (never loosened)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kleinserve.access import Access, is_loopback
from kleinserve.keys import KeyStore


@pytest.mark.parametrize(
    ("host", "insecure", "with_key", "required"),
    [
        ("127.0.0.1", False, False, False),
        ("localhost", False, False, False),
        ("127.0.0.1", False, True, True),
        ("0.0.0.0", False, False, True),  # never open on a non-loopback address...
        ("0.0.0.0", True, False, False),  # ...unless the operator says so explicitly
        ("::", False, False, True),
    ],
)
def test_decided_at_start(tmp_path: Path, host: str, insecure: bool, with_key: bool, required: bool) -> None:
    keys = KeyStore(tmp_path / "jobs.sqlite3")
    if with_key:
        keys.create("k")
    assert Access.at_start(keys, host, insecure).keys_required() is required


def test_tightened_by_a_new_key_and_never_loosened(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "jobs.sqlite3")
    access = Access.at_start(keys, "127.0.0.1")
    assert not access.keys_required()
    keys.create("k")
    assert access.keys_required() and access.keys_required_now()
    keys.revoke("k")
    assert access.keys_required()  # revoking the last key does not open the server...
    assert Access.at_start(keys, "127.0.0.1").keys_required()  # ...nor a restart


def test_revoked_ids_are_remembered(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "jobs.sqlite3")
    key, _ = keys.create("k")
    keys.revoke("k")
    (revoked,) = keys.revoked_since(0)
    access = Access.at_start(keys, "127.0.0.1")
    access.note_revoked(frozenset({revoked[0]}))
    assert revoked[0] == key.id and access.is_revoked(key.id) and not access.is_revoked("other")


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.2") and is_loopback("[::1]") and not is_loopback("0.0.0.0")
    assert not is_loopback("example.com")
