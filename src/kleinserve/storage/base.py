"""Result-file storage: the :class:`Storage` protocol every backend implements, and its key rules.

A *key* names one stored file, e.g. ``"<job-id>/0.png"``. Keys are checked by :func:`validate_key`
before any backend touches them, so a key can never name anything outside the store.

Decisions:
- Files are handed out as **absolute, expiring URLs** made by the backend itself
  (:meth:`Storage.url`): the local backend signs ``/files`` links on the server's own base URL
  (``Settings.link_base_url()``: ``--public-url``, else the bind address, never a request's ``Host``
  header); the S3 backend presigns a GET. Callers never prefix anything, so a link cannot point at a
  host a client chose.
- :meth:`Storage.read` returns bytes, always: no path-or-bytes union for callers to branch on. Only
  the local backend's own ``/files`` route streams from a path (``LocalStorage.path``).
- Retention is by age of the stored object (:meth:`Storage.delete_older_than`), which every backend
  can answer (file mtime, S3 ``LastModified``), plus whole-prefix deletion for a job's files.
"""

from __future__ import annotations

import posixpath
import re
from typing import Protocol, runtime_checkable

from kleinserve.errors import KleinserveError, NotFoundError

MAX_KEY_CHARS = 512

# One or more segments of safe characters joined by single slashes. The character set has no
# '%', '\\', NUL or ':' in it, so keys never need URL quoting and cannot smuggle an encoded or
# Windows-style path separator past the check.
_KEY_RE = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")

MEDIA_TYPES: dict[str, str] = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".json": "application/json",  # small records kept beside the files (the Oxen dialect's favourites)
}


class SignatureError(KleinserveError):
    """A file URL's signature is missing, malformed, does not match, or has expired."""

    code = "forbidden"


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


def validate_prefix(prefix: str) -> str:
    """The directory-like form ``"a/b/"`` of a prefix given as ``"a/b"`` or ``"a/b/"``.

    A prefix always names a whole directory, never a string prefix: ``"job1/"`` does not reach
    ``"job10/..."``. Raises :class:`NotFoundError` for anything :func:`validate_key` refuses.
    """
    return validate_key(prefix.removesuffix("/") if isinstance(prefix, str) else prefix) + "/"


def media_type_for(key: str) -> str | None:
    """The media type a key's extension stands for, or ``None`` for an unknown extension."""
    return MEDIA_TYPES.get(posixpath.splitext(key)[1].lower())


def check_media_type(key: str, media_type: str) -> str:
    """The media type to store ``key`` with; ``ValueError`` unless it matches the key's extension.

    Every backend keeps the rule the local one needs (the type is derived from the extension), so a
    key serves the same type wherever it is stored.
    """
    expected = media_type_for(key)
    given = media_type.split(";", 1)[0].strip().lower()
    if expected is None or given != expected:
        raise ValueError(f"key {key!r} must end in one of {', '.join(MEDIA_TYPES)} matching {media_type!r}")
    return expected


@runtime_checkable
class Storage(Protocol):
    """Where finished images and uploads live, and the URLs that hand them out.

    Implementations: :class:`kleinserve.storage.local.LocalStorage` (local disk, the default) and
    :class:`kleinserve.storage.s3.S3Storage` (any S3-compatible store). Every method validates its
    key with :func:`validate_key` first (a bad key is :class:`NotFoundError`). Methods block on I/O;
    async callers run them in a thread.
    """

    def put(self, key: str, data: bytes, media_type: str) -> None:
        """Store ``data`` under ``key``, replacing any earlier file atomically (readers see the old
        or the new, never half). ``ValueError`` if ``media_type`` does not match the extension."""
        ...

    def read(self, key: str) -> bytes:
        """The bytes stored under ``key``; :class:`NotFoundError` if there are none."""
        ...

    def exists(self, key: str) -> bool:
        """Whether a file is stored under ``key``."""
        ...

    def url(self, key: str, expires_in: float | None = None) -> str:
        """An absolute URL that downloads ``key`` without credentials for ``expires_in`` seconds
        (the backend's default when ``None``) and is refused after that or when tampered with."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every file under the directory ``prefix`` (``"<job-id>/"``); return how many."""
        ...

    def delete_older_than(self, prefix: str, cutoff: float) -> int:
        """Delete the files under the directory ``prefix`` last written before the Unix time
        ``cutoff``; return how many (used for uploads, which belong to no job)."""
        ...
