"""The Storage contract, run against every backend in conftest.BACKENDS (local disk, S3).

What every backend must do: keep bytes under validated keys, replace atomically, refuse a media
type its key's extension would not give back, delete by directory prefix (never by string prefix)
and by age, and hand out absolute links that download the file without credentials, and are
refused once tampered with or expired.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from kleinserve.errors import NotFoundError
from kleinserve.storage.base import Storage

from .conftest import Backend

PNG = b"\x89PNG\r\n\x1a\n not really a png"


def test_is_a_storage(backend: Backend) -> None:
    assert isinstance(backend.storage, Storage)


def test_put_read_exists(backend: Backend) -> None:
    store = backend.storage
    assert not store.exists("job-1/0.png")
    store.put("job-1/0.png", PNG, "image/png")
    store.put("job-1/1.jpg", b"jpeg!", "image/jpeg")
    store.put("job-1/2.webp", b"webp", "image/webp")
    assert store.read("job-1/0.png") == PNG
    assert store.read("job-1/1.jpg") == b"jpeg!"
    assert store.read("job-1/2.webp") == b"webp"
    assert store.exists("job-1/0.png")
    assert not store.exists("job-1/3.png")
    assert not store.exists("job-1")  # a directory is not a file


def test_put_replaces(backend: Backend) -> None:
    backend.storage.put("job/0.png", b"first", "image/png")
    backend.storage.put("job/0.png", b"second", "image/png")
    assert backend.storage.read("job/0.png") == b"second"


def test_put_refuses_media_type_the_extension_cannot_keep(backend: Backend) -> None:
    with pytest.raises(ValueError):
        backend.storage.put("job/0.png", b"x", "image/jpeg")
    with pytest.raises(ValueError):
        backend.storage.put("job/0.bin", b"x", "application/octet-stream")
    assert not backend.storage.exists("job/0.png")


def test_read_missing(backend: Backend) -> None:
    with pytest.raises(NotFoundError):
        backend.storage.read("nope/0.png")


@pytest.mark.parametrize("key", ["../x.png", "/etc/passwd", "a//b.png", "a/./b.png", "%2e%2e/x.png", "a b.png", ""])
def test_bad_keys_are_not_found(backend: Backend, key: str) -> None:
    store = backend.storage
    for call in (lambda: store.read(key), lambda: store.put(key, b"x", "image/png"), lambda: store.url(key)):
        with pytest.raises(NotFoundError):
            call()


def test_delete_prefix_removes_only_that_directory(backend: Backend) -> None:
    store = backend.storage
    for i in range(3):
        store.put(f"job1/{i}.png", b"a", "image/png")
    store.put("job1/sub/0.png", b"a", "image/png")
    store.put("job10/0.png", b"b", "image/png")
    store.put("job2/0.png", b"c", "image/png")

    assert store.delete_prefix("job1/") == 4
    assert not any(store.exists(f"job1/{i}.png") for i in range(3))
    assert store.read("job10/0.png") == b"b"
    assert store.delete_prefix("job1/") == 0
    assert store.delete_prefix("job2") == 1
    assert not store.exists("job2/0.png")


def test_delete_older_than(backend: Backend) -> None:
    store = backend.storage
    store.put("uploads/a/image.png", b"a", "image/png")
    store.put("uploads/b/image.png", b"b", "image/png")
    store.put("uploadsx/c/image.png", b"c", "image/png")
    assert store.delete_older_than("uploads/", time.time() - 3600) == 0
    assert store.exists("uploads/a/image.png")
    # Everything written so far is older than a cutoff in the (near) future.
    assert store.delete_older_than("uploads/", time.time() + 60) == 2
    assert not store.exists("uploads/a/image.png") and not store.exists("uploads/b/image.png")
    assert store.read("uploadsx/c/image.png") == b"c"


def test_url_downloads_the_file(backend: Backend) -> None:
    backend.storage.put("job/0.png", PNG, "image/png")
    url = backend.storage.url("job/0.png")
    assert url.startswith(("http://", "https://"))
    response = backend.get(url)
    assert response.status_code == 200, response.text
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"


def _tampered(url: str) -> list[str]:
    """The link with each query value changed in turn, and with its key swapped for another file's."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    variants = []
    for i, (name, value) in enumerate(query):
        changed = value[:-1] + ("1" if value[-1:] != "1" else "2")
        variants.append(urlunsplit(parts._replace(query=urlencode([*query[:i], (name, changed), *query[i + 1 :]]))))
    variants.append(urlunsplit(parts._replace(path=parts.path.replace("/0.png", "/1.png"))))
    return variants


def test_tampered_url_is_refused(backend: Backend) -> None:
    backend.storage.put("job/0.png", PNG, "image/png")
    backend.storage.put("job/1.png", b"another file", "image/png")
    url = backend.storage.url("job/0.png")
    assert backend.get(url).status_code == 200
    for bad in _tampered(url):
        response = backend.get(bad)
        assert response.status_code in (400, 403), (bad, response.status_code)
        assert PNG not in response.content and b"another file" not in response.content


def test_expired_url_is_refused(backend: Backend) -> None:
    backend.storage.put("job/0.png", PNG, "image/png")
    url = backend.storage.url("job/0.png", expires_in=1)
    assert backend.get(url).status_code == 200
    time.sleep(2.2)  # past the expiry second on any backend's clock granularity
    response = backend.get(url)
    assert response.status_code == 403
    assert PNG not in response.content


def test_url_of_deleted_file_is_not_served(backend: Backend) -> None:
    backend.storage.put("job/0.png", PNG, "image/png")
    url = backend.storage.url("job/0.png")
    backend.storage.delete_prefix("job/")
    response = backend.get(url)
    assert response.status_code == 404
    assert PNG not in response.content
