"""LocalStorage: files on disk, key rules, signed URLs and the persisted secret."""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from kleinserve.errors import NotFoundError
from kleinserve.storage import LocalStorage, SignatureError, Storage, StoredFile, validate_key

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
    return LocalStorage(tmp_path / "files", SECRET, default_expiry=600.0, clock=clock)


def query(path: str) -> tuple[str, str, str]:
    """(url path, expires, sig) of a signed path."""
    parts = urlsplit(path)
    values = parse_qs(parts.query, strict_parsing=True)
    return parts.path, values["expires"][0], values["sig"][0]


def test_is_a_storage(store: LocalStorage) -> None:
    assert isinstance(store, Storage)


def test_put_open_round_trip(store: LocalStorage) -> None:
    store.put("job-1/0.png", b"png bytes", "image/png")
    store.put("job-1/1.jpg", b"jpeg!", "image/jpeg")
    store.put("job-1/2.webp", b"webp", "image/webp")

    png = store.open("job-1/0.png")
    assert isinstance(png, StoredFile)
    assert png.media_type == "image/png"
    assert png.size == len(b"png bytes")
    assert png.path is not None and png.path.read_bytes() == b"png bytes"
    assert png.path == store.root / "job-1" / "0.png"
    assert store.open("job-1/1.jpg").media_type == "image/jpeg"
    assert store.open("job-1/2.webp").media_type == "image/webp"


def test_put_replaces_and_leaves_no_temp_files(store: LocalStorage) -> None:
    store.put("job/0.png", b"first", "image/png")
    store.put("job/0.png", b"second", "image/png")
    assert store.open("job/0.png").size == len(b"second")
    assert sorted(p.name for p in (store.root / "job").iterdir()) == ["0.png"]


def test_put_refuses_media_type_the_extension_cannot_keep(store: LocalStorage) -> None:
    with pytest.raises(ValueError):
        store.put("job/0.png", b"x", "image/jpeg")
    with pytest.raises(ValueError):
        store.put("job/0.bin", b"x", "application/octet-stream")
    assert not (store.root / "job" / "0.png").exists()


def test_open_missing_key(store: LocalStorage) -> None:
    with pytest.raises(NotFoundError):
        store.open("nope/0.png")
    store.put("job/0.png", b"x", "image/png")
    with pytest.raises(NotFoundError):
        store.open("job/1.png")
    with pytest.raises(NotFoundError):
        store.open("job")  # a directory is not a file


def test_delete_prefix_removes_only_that_prefix(store: LocalStorage) -> None:
    for i in range(3):
        store.put(f"job1/{i}.png", b"a", "image/png")
    store.put("job10/0.png", b"b", "image/png")
    store.put("job2/0.png", b"c", "image/png")

    assert store.delete_prefix("job1/") == 3
    for i in range(3):
        with pytest.raises(NotFoundError):
            store.open(f"job1/{i}.png")
    assert not (store.root / "job1").exists()
    assert store.open("job10/0.png").size == 1
    assert store.open("job2/0.png").size == 1
    assert store.delete_prefix("job1/") == 0
    assert store.delete_prefix("job2") == 1


def test_delete_prefix_does_not_follow_symlinks(store: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.png").write_bytes(b"precious")
    store.put("job/0.png", b"a", "image/png")
    (store.root / "job" / "link").symlink_to(outside, target_is_directory=True)

    store.delete_prefix("job/")
    assert (outside / "keep.png").read_bytes() == b"precious"
    assert not (store.root / "job").exists()


def test_signed_path_form_and_verify(store: LocalStorage, clock: Clock) -> None:
    signed = store.signed_path("job-1/0.png")
    path, expires, sig = query(signed)
    assert signed == f"/files/job-1/0.png?expires={expires}&sig={sig}"
    assert path == "/files/job-1/0.png"
    assert int(expires) == int(clock.now + 600)
    assert len(sig) == 64 and all(c in "0123456789abcdef" for c in sig)
    store.verify("job-1/0.png", expires, sig)

    _, expires, sig = query(store.signed_path("job-1/0.png", expires_in=5))
    assert int(expires) == int(clock.now + 5)
    store.verify("job-1/0.png", expires, sig)


def test_url_prefix_is_used(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path, SECRET, url_prefix="/v1/results/")
    assert store.signed_path("a/0.png").startswith("/v1/results/a/0.png?expires=")


def test_tampered_signature(store: LocalStorage) -> None:
    _, expires, sig = query(store.signed_path("job/0.png"))
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
    _, expires, sig = query(store.signed_path("job/1.png"))
    with pytest.raises(SignatureError):
        store.verify("job/0.png", expires, sig)


def test_tampered_expires(store: LocalStorage) -> None:
    _, expires, sig = query(store.signed_path("job/0.png"))
    with pytest.raises(SignatureError):
        store.verify("job/0.png", str(int(expires) + 3600), sig)
    with pytest.raises(SignatureError):
        store.verify("job/0.png", "0" + expires, sig)


@pytest.mark.parametrize(
    ("expires", "sig"),
    [(None, "valid"), ("valid", None), (None, None), ("", "valid"), ("valid", "")],
)
def test_missing_signature_parts(store: LocalStorage, expires: str | None, sig: str | None) -> None:
    _, good_expires, good_sig = query(store.signed_path("job/0.png"))
    with pytest.raises(SignatureError):
        store.verify(
            "job/0.png",
            good_expires if expires == "valid" else expires,
            good_sig if sig == "valid" else sig,
        )


@pytest.mark.parametrize("bad", ["soon", "1.5e9", "-1", " 1700000600", "+1700000600", "١٧", "9" * 40])
def test_non_integer_expires(store: LocalStorage, bad: str) -> None:
    _, _, sig = query(store.signed_path("job/0.png"))
    with pytest.raises(SignatureError):
        store.verify("job/0.png", bad, sig)


def test_expiry(store: LocalStorage, clock: Clock) -> None:
    _, expires, sig = query(store.signed_path("job/0.png", expires_in=60))
    clock.now = float(expires)
    store.verify("job/0.png", expires, sig)  # valid up to and including the expiry second
    clock.now = float(expires) + 0.001
    with pytest.raises(SignatureError, match="expired"):
        store.verify("job/0.png", expires, sig)


def test_bad_expiry_argument(store: LocalStorage) -> None:
    with pytest.raises(ValueError):
        store.signed_path("job/0.png", expires_in=0)
    with pytest.raises(ValueError):
        store.signed_path("job/0.png", expires_in=float("inf"))


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
        store.open(key)
    with pytest.raises(NotFoundError):
        store.put(key, b"evil", "image/png")
    with pytest.raises(NotFoundError):
        store.signed_path(key)
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
        store.open("job/0.png")
    with pytest.raises(NotFoundError):
        store.open("evil/secret.png")
    with pytest.raises(NotFoundError):
        store.put("evil/new.png", b"x", "image/png")
    assert not (tmp_path / "new.png").exists()
    assert secret.read_bytes() == b"not yours"


def test_secret_file_created_private_and_reused(tmp_path: Path) -> None:
    first = LocalStorage.in_data_dir(tmp_path / "data")
    secret_file = tmp_path / "data" / "secret.key"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert len(secret_file.read_bytes()) == 32
    assert first.root == (tmp_path / "data" / "files").resolve()

    _, expires, sig = query(first.signed_path("job/0.png"))
    second = LocalStorage.in_data_dir(tmp_path / "data")
    second.verify("job/0.png", expires, sig)
    assert sorted(os.listdir(tmp_path / "data")) == ["files", "secret.key"]

    other = LocalStorage.in_data_dir(tmp_path / "other")
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
                path = store.open("job/0.png").path
            except NotFoundError:  # before the first put lands
                continue
            data = path.read_bytes() if path is not None else b""
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
    stored = store.open("job/0.png")
    assert stored.path is not None
    assert stored.path.read_bytes() in payloads
    assert stored.size == size
    assert sorted(p.name for p in (store.root / "job").iterdir()) == ["0.png"]
