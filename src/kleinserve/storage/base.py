"""Result-file storage: the :class:`Storage` protocol every backend implements, and its key rules.

A *key* names one stored file, e.g. ``"<job-id>/0.png"``. Keys are checked by :func:`validate_key`
before any backend touches them, so a key can never name anything outside the store. Files are
handed out through *signed, expiring URL paths* (``/files/<key>?expires=<unix>&sig=<hex>``): the
HTTP layer prefixes its base URL when it renders a job and calls :meth:`Storage.verify` before
serving, so result URLs can be shared without an API key but stop working after a while.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from kleinserve.errors import KleinserveError, NotFoundError

MAX_KEY_CHARS = 512

# One or more segments of safe characters joined by single slashes. The character set has no
# '%', '\\', NUL or ':' in it, so keys never need URL quoting and cannot smuggle an encoded or
# Windows-style path separator past the check.
_KEY_RE = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")


class SignatureError(KleinserveError):
    """A file URL's signature is missing, malformed, does not match, or has expired."""

    code = "forbidden"


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One stored file as a backend hands it out.

    A disk backend fills ``path`` (so the HTTP layer can stream it); a backend without local files
    fills ``data`` instead. ``size`` is in bytes.
    """

    path: Path | None
    data: bytes | None
    media_type: str
    size: int


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a well-formed storage key, else raise :class:`NotFoundError`.

    A key is 1-512 characters of ``[A-Za-z0-9._-]`` segments joined by single ``/``, with no empty,
    ``.`` or ``..`` segment. A bad key is reported as *not found* (not as a bad request) so that an
    HTTP layer answers 404 and never tells a caller anything about paths outside the store.
    """
    if (
        not isinstance(key, str)
        or not 1 <= len(key) <= MAX_KEY_CHARS
        or _KEY_RE.fullmatch(key) is None
        or any(segment in (".", "..") for segment in key.split("/"))
    ):
        raise NotFoundError("no such file")
    return key


@runtime_checkable
class Storage(Protocol):
    """Where finished images live, and how their URLs are signed and checked.

    Implementations: :class:`kleinserve.storage.local.LocalStorage` (local disk, the default).
    Every method validates its key with :func:`validate_key` first. Methods may block on I/O;
    async callers run them in a thread.
    """

    def put(self, key: str, data: bytes, media_type: str) -> None:
        """Store ``data`` under ``key`` (replacing any earlier file atomically)."""
        ...

    def open(self, key: str) -> StoredFile:
        """Return the file stored under ``key``; raise :class:`NotFoundError` if there is none."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every file under the directory-like ``prefix`` (``"<job-id>/"``); return how many."""
        ...

    def remove_stale(self, parent: str, cutoff: float) -> int:
        """Delete the directories directly under ``parent`` not modified since ``cutoff``; return
        how many files went (used for uploads, which belong to no job)."""

    def signed_path(self, key: str, expires_in: float | None = None) -> str:
        """Return a URL path with query, ``/files/<key>?expires=<unix>&sig=<hex>``, valid for
        ``expires_in`` seconds (the backend's default when ``None``)."""
        ...

    def verify(self, key: str, expires: str | None, sig: str | None) -> None:
        """Raise :class:`SignatureError` unless ``expires``/``sig`` (raw query values) are a valid,
        unexpired signature of ``key``."""
        ...
