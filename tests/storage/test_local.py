"""LocalStorage specifics: files on disk, key rules, signed links, the persisted secret, the /files route.

What every backend must do is in test_contract.py; this file holds what only local disk has.
"""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from kleinserve.errors import NotFoundError
from kleinserve.settings import Settings
from kleinserve.storage import LocalStorage, SignatureError, validate_key

from .conftest import local_backend

SECRET = b"k" * 32


class Clock:
    """A hand-driven clock, so expiry is tested without sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> LocalStorage:
    return LocalStorage(tmp_path / "files", SECRET, "http://127.0.0.1:8000", default_expiry=600.0, clock=clock)


def query(url: str) -> tuple[str, str, str]:
    """(url path, expires, sig) of a signed link."""
    parts = urlsplit(url)
    values = parse_qs(parts.query, strict_parsing=True)
    return parts.path, values["expires"][0], values["sig"][0]


def test_files_on_disk_and_no_temp_files_left(store: LocalStorage) -> None:
    store.put("job-1/0.png", b"first", "image/png")
    store.put("job-1/0.png", b"png bytes", "image/png")
    assert store.path("job-1/0.png") == store.root / "job-1" / "0.png"
    assert (store.root / "job-1" / "0.png").read_bytes() == b"png bytes"
    assert sorted(p.name for p in (store.root / "job-1").iterdir()) == ["0.png"]
    with pytest.raises(NotFoundError):
        store.path("job-1")  # a directory is not a file
    with pytest.raises(NotFoundError):
        store.path("job-1/1.png")


def test_delete_prefix_removes_the_directory(store: LocalStorage) -> None:
    store.put("job1/0.png", b"a", "image/png")
    store.put("job10/0.png", b"b", "image/png")
    assert store.delete_prefix("job1/") == 1
    assert not (store.root / "job1").exists()
    assert (store.root / "job10" / "0.png").is_file()


def test_delete_older_than_goes_by_each_file_and_keeps_young_directories(store: LocalStorage) -> None:
    store.put("uploads/old/image.png", b"old", "image/png")
    store.put("uploads/mixed/a.png", b"old", "image/png")
    store.put("uploads/mixed/b.png", b"new", "image/png")
    (store.root / "uploads" / "fresh").mkdir()  # as a concurrent put makes it, before its file lands
    stale = 1_000_000.0
    for path in ("uploads/old/image.png", "uploads/old", "uploads/mixed/a.png", "uploads/mixed"):
        os.utime(store.root / path, (stale, stale))

    assert store.delete_older_than("uploads", stale + 1) == 2
    assert not (store.root / "uploads" / "old").exists()
    assert sorted(p.name for p in (store.root / "uploads" / "mixed").iterdir()) == ["b.png"]
    assert (store.root / "uploads" / "fresh").is_dir()
    assert store.delete_older_than("nothing-here/", stale + 1) == 0


def test_delete_prefix_does_not_follow_symlinks(store: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.png").write_bytes(b"precious")
    store.put("job/0.png", b"a", "image/png")
    (store.root / "job" / "link").symlink_to(outside, target_is_directory=True)

    store.delete_prefix("job/")
    assert (outside / "keep.png").read_bytes() == b"precious"
    assert not (store.root / "job").exists()


def test_url_form_and_verify(store: LocalStorage, clock: Clock) -> None:
    signed = store.url("job-1/0.png")
    path, expires, sig = query(signed)
    assert signed == f"http://127.0.0.1:8000/files/job-1/0.png?expires={expires}&sig={sig}"
    assert path == "/files/job-1/0.png"
    assert int(expires) == int(clock.now + 600)
    assert len(sig) == 64 and all(c in "0123456789abcdef" for c in sig)
    assert store.verify("job-1/0.png", expires, sig) == 600

    _, expires, sig = query(store.url("job-1/0.png", expires_in=5))
    assert int(expires) == int(clock.now + 5)
    clock.now += 2.5
    assert store.verify("job-1/0.png", expires, sig) == 2  # whole seconds left, for Cache-Control


def test_url_prefix_and_base_url_are_used(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path, SECRET, "https://img.example.com/base/", url_prefix="/v1/results/")
    assert store.url("a/0.png").startswith("https://img.example.com/base/v1/results/a/0.png?expires=")
    with pytest.raises(ValueError):
        LocalStorage(tmp_path, SECRET, "/relative")


@pytest.mark.parametrize(
    ("settings", "base"),
    [
        (Settings(), "http://127.0.0.1:8000"),
        (Settings(host="0.0.0.0", port=9000), "http://0.0.0.0:9000"),
        (Settings(host="::1", port=81), "http://[::1]:81"),
        (Settings(host="0.0.0.0", public_url="https://img.example.com/k/"), "https://img.example.com/k"),
    ],
)
def test_link_base_url_is_the_public_url_or_the_bind_address(settings: Settings, base: str) -> None:
    assert settings.link_base_url() == base


def test_public_url_must_be_absolute() -> None:
    with pytest.raises(ValueError):
        Settings(public_url="img.example.com")


def test_files_route_caches_only_while_the_link_is_valid(tmp_path: Path) -> None:
    for backend in local_backend(tmp_path):
        backend.storage.put("job/0.png", b"png", "image/png")
        long = backend.get(backend.storage.url("job/0.png", expires_in=600))
        assert long.status_code == 200
        age = int(long.headers["cache-control"].removeprefix("private, max-age="))
        assert 590 <= age <= 600
        short = backend.get(backend.storage.url("job/0.png", expires_in=30))
        assert 20 <= int(short.headers["cache-control"].removeprefix("private, max-age=")) <= 30


def test_tampered_signature(store: LocalStorage) -> None:
    _, expires, sig = query(store.url("job/0.png"))
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    with pytest.raises(SignatureError) as caught:
        store.verify("job/0.png", expires, flipped)
    assert caught.value.code == "forbidden"
    with pytest.raises(SignatureError):
        store.verify("job/0.png", expires, sig.upper())
    with pytest.raises(SignatureError):
        store.verify("job/0.png", expires, sig[:-2])
    with pytest.raises(SignatureError):
        store.verify("job/0.png", expires, sig[:-1] + "é")


def test_signature_of_another_key(store: LocalStorage) -> None:
    _, expires, sig = query(store.url("job/1.png"))
    with pytest.raises(SignatureError):
        store.verify("job/0.png", expires, sig)


def test_tampered_expires(store: LocalStorage) -> None:
    _, expires, sig = query(store.url("job/0.png"))
    with pytest.raises(SignatureError):
        store.verify("job/0.png", str(int(expires) + 3600), sig)
    with pytest.raises(SignatureError):
        store.verify("job/0.png", "0" + expires, sig)


@pytest.mark.parametrize(
    ("expires", "sig"),
    [(None, "valid"), ("valid", None), (None, None), ("", "valid"), ("valid", "")],
)
def test_missing_signature_parts(store: LocalStorage, expires: str | None, sig: str | None) -> None:
    _, good_expires, good_sig = query(store.url("job/0.png"))
    with pytest.raises(SignatureError):
        store.verify(
            "job/0.png",
            good_expires if expires == "valid" else expires,
            good_sig if sig == "valid" else sig,
        )


@pytest.mark.parametrize("bad", ["soon", "1.5e9", "-1", " 1700000600", "+1700000600", "١٧", "9" * 40])
def test_non_integer_expires(store: LocalStorage, bad: str) -> None:
    _, _, sig = query(store.url("job/0.png"))
    with pytest.raises(SignatureError):
        store.verify("job/0.png", bad, sig)


def test_expiry(store: LocalStorage, clock: Clock) -> None:
    _, expires, sig = query(store.url("job/0.png", expires_in=60))
    clock.now = float(expires)
    store.verify("job/0.png", expires, sig)  # valid up to and including the expiry second
    clock.now = float(expires) + 0.001
    with pytest.raises(SignatureError, match="expired"):
        store.verify("job/0.png", expires, sig)


def test_bad_expiry_argument(store: LocalStorage) -> None:
    with pytest.raises(ValueError):
        store.url("job/0.png", expires_in=0)
    with pytest.raises(ValueError):
        store.url("job/0.png", expires_in=float("inf"))


BAD_KEYS = [
    "../x",
    "a/../../x",
    "/etc/passwd",
    "a//b",
    "a/./b",
    "..",
    ".",
    "a\\b",
    "%2e%2e/x",
    "a/b%2fc",
    "a\x00b",
    "",
    "a" * 600,
    "a/",
    "a//",
    "a/b\n",
    "a b",
    "c:/x",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_traversal_refused(store: LocalStorage, key: str, tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"outside")
    with pytest.raises(NotFoundError):
        validate_key(key)
    with pytest.raises(NotFoundError):
        store.read(key)
    with pytest.raises(NotFoundError):
        store.put(key, b"evil", "image/png")
    with pytest.raises(NotFoundError):
        store.url(key)
    with pytest.raises(NotFoundError):
        store.verify(key, "1", "0" * 64)
    if key != "a/":  # "a/" is a well-formed prefix (the directory "a"), just not a key
        with pytest.raises(NotFoundError):
            store.delete_prefix(key)
    assert (tmp_path / "x").read_bytes() == b"outside"


def test_good_keys_accepted() -> None:
    for key in ["a", "job-1/0.png", "A.b_c-d/e/f.webp", "a" * 512, ".hidden/x.png"]:
        assert validate_key(key) == key


def test_symlink_escaping_root_refused(store: LocalStorage, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    (store.root / "job").mkdir()
    (store.root / "job" / "0.png").symlink_to(secret)
    (store.root / "evil").symlink_to(tmp_path, target_is_directory=True)

    with pytest.raises(NotFoundError):
        store.read("job/0.png")
    with pytest.raises(NotFoundError):
        store.read("evil/secret.png")
    with pytest.raises(NotFoundError):
        store.put("evil/new.png", b"x", "image/png")
    assert not (tmp_path / "new.png").exists()
    assert secret.read_bytes() == b"not yours"


def test_secret_file_created_private_and_reused(tmp_path: Path) -> None:
    first = LocalStorage.in_data_dir(tmp_path / "data", "http://127.0.0.1:8000")
    secret_file = tmp_path / "data" / "secret.key"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert len(secret_file.read_bytes()) == 32
    assert first.root == (tmp_path / "data" / "files").resolve()

    _, expires, sig = query(first.url("job/0.png"))
    second = LocalStorage.in_data_dir(tmp_path / "data", "http://127.0.0.1:8000")
    second.verify("job/0.png", expires, sig)
    assert sorted(os.listdir(tmp_path / "data")) == ["files", "secret.key"]

    other = LocalStorage.in_data_dir(tmp_path / "other", "http://127.0.0.1:8000")
    assert (tmp_path / "other" / "secret.key").read_bytes() != secret_file.read_bytes()
    with pytest.raises(SignatureError):
        other.verify("job/0.png", expires, sig)


def test_concurrent_puts_leave_a_complete_file(store: LocalStorage) -> None:
    size = 256 * 1024
    payloads = [bytes([i]) * size for i in range(8)]
    barrier = threading.Barrier(len(payloads) + 1, timeout=30)
    writing = threading.Event()
    writing.set()
    torn: list[int] = []

    def writer(data: bytes) -> None:
        barrier.wait()
        for _ in range(10):
            store.put("job/0.png", data, "image/png")

    def reader() -> None:
        # Readers racing the writers must only ever see one whole payload, never a torn file.
        barrier.wait()
        while writing.is_set():
            try:
                data = store.read("job/0.png")
            except NotFoundError:  # before the first put lands
                continue
            if data not in payloads:
                torn.append(len(data))

    read_thread = threading.Thread(target=reader)
    read_thread.start()
    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        futures = [pool.submit(writer, data) for data in payloads]
    writing.clear()
    read_thread.join()

    for future in futures:
        future.result()  # re-raises anything a writer raised
    assert torn == []
    assert store.read("job/0.png") in payloads
    assert sorted(p.name for p in (store.root / "job").iterdir()) == ["0.png"]
