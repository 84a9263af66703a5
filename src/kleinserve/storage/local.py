"""Local-disk storage: files under one root directory, handed out through HMAC-signed URL paths.

Layout: the file for key ``"<job-id>/0.png"`` is ``<root>/<job-id>/0.png``. The media type is
derived from the file extension (``.png``, ``.jpg``/``.jpeg``, ``.webp``), so there is no sidecar
that could drift from its file; :meth:`LocalStorage.put` refuses a media type its key's extension
would not give back.

A URL is signed as ``hex(HMAC-SHA256(secret, f"{key}\\n{expires}"))`` where ``expires`` is an integer
Unix time; it stops verifying once ``clock() > expires``. The secret lives in
``<data_dir>/secret.key`` (see :meth:`LocalStorage.in_data_dir`) so URLs survive restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kleinserve.errors import NotFoundError
from kleinserve.storage.base import SignatureError, StoredFile, validate_key

MEDIA_TYPES: dict[str, str] = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
}

SECRET_BYTES = 32
_MIN_SECRET_BYTES = 16
# '~' is not allowed in keys, so a temp file can never be mistaken for (or collide with) a key.
_TEMP_SUFFIX = ".~tmp"
_SIG_HEX_CHARS = frozenset("0123456789abcdef")
_MAX_EXPIRES_DIGITS = 16  # far beyond any real Unix time; stops absurd int() parsing


def media_type_for(key: str) -> str | None:
    """The media type a key's extension stands for, or ``None`` for an unknown extension."""
    return MEDIA_TYPES.get(os.path.splitext(key)[1].lower())


class LocalStorage:
    """Result files on local disk under ``root``, with signed, expiring URL paths.

    ``secret`` signs URLs; ``default_expiry`` is how many seconds a URL stays valid unless
    :meth:`signed_path` is told otherwise; ``url_prefix`` is the path the HTTP layer serves files
    under; ``clock`` returns the Unix time (injectable so tests need not sleep).
    """

    def __init__(
        self,
        root: Path,
        secret: bytes,
        default_expiry: float = 3600.0,
        url_prefix: str = "/files",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < _MIN_SECRET_BYTES:
            raise ValueError(f"the URL signing secret must be at least {_MIN_SECRET_BYTES} bytes")
        if not (default_expiry > 0 and math.isfinite(default_expiry)):
            raise ValueError("default_expiry must be a positive number of seconds")
        if not url_prefix.startswith("/"):
            raise ValueError("url_prefix must start with '/'")
        root.mkdir(parents=True, exist_ok=True)
        # Resolved once: every containment check compares against the real root directory.
        self.root = root.resolve()
        self._secret = secret
        self.default_expiry = default_expiry
        self.url_prefix = url_prefix.rstrip("/")
        self._clock = clock

    @classmethod
    def in_data_dir(cls, data_dir: Path, default_expiry: float = 3600.0) -> LocalStorage:
        """Storage under ``data_dir/files``, signing with the secret in ``data_dir/secret.key``.

        The secret (32 random bytes, mode 0600) is created on first use and reused afterwards, so
        URLs handed out before a restart keep working after it.
        """
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(data_dir / "files", _load_or_create_secret(data_dir / "secret.key"), default_expiry)

    # -- files -------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, media_type: str) -> None:
        """Store ``data`` under ``key`` atomically: readers see the old file or the new, never half."""
        path = self._path(key)
        expected = media_type_for(key)
        given = media_type.split(";", 1)[0].strip().lower()
        if expected is None or given != expected:
            # The media type is derived from the extension on open, so refuse what it cannot keep.
            raise ValueError(f"key {key!r} must end in one of {', '.join(MEDIA_TYPES)} matching {media_type!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._check_inside(path.parent)  # the directories just made may sit behind a symlink
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())  # durable before it becomes visible under its name
            os.replace(temp_name, path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise

    def open(self, key: str) -> StoredFile:
        """Return the file under ``key`` (``path`` set, ``data`` None) or raise NotFoundError."""
        path = self._path(key)
        media_type = media_type_for(key)
        try:
            info = path.stat()
        except OSError:
            info = None
        if info is None or media_type is None or not stat.S_ISREG(info.st_mode):
            raise NotFoundError(f"no such file: {key}")
        return StoredFile(path=path, data=None, media_type=media_type, size=info.st_size)

    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under the directory ``prefix`` (``"<job-id>/"`` or ``"<job-id>"``).

        ``prefix`` names a directory, never a string prefix: ``"job1/"`` does not touch
        ``"job10/..."``. Returns the number of stored files removed (stray temp files are removed
        but not counted); 0 when nothing is stored under it.
        """
        directory = self._path(prefix.removesuffix("/"))
        if directory == self.root or not directory.is_dir():
            return 0
        count = 0
        # Bottom-up and without following links: a symlink is removed itself, never its target.
        for current, dirnames, filenames in os.walk(directory, topdown=False, followlinks=False):
            for name in filenames:
                os.unlink(os.path.join(current, name))
                if not name.endswith(_TEMP_SUFFIX):
                    count += 1
            for name in dirnames:
                child = os.path.join(current, name)
                if os.path.islink(child):
                    os.unlink(child)
                else:
                    os.rmdir(child)
        os.rmdir(directory)
        return count

    def remove_stale(self, parent: str, cutoff: float) -> int:
        """Delete each directory directly under ``parent`` last modified before ``cutoff``."""
        directory = self._path(parent.removesuffix("/"))
        if directory == self.root or not directory.is_dir():
            return 0
        removed = 0
        for child in directory.iterdir():
            if child.is_dir() and not child.is_symlink() and child.stat().st_mtime < cutoff:
                removed += self.delete_prefix(f"{parent.removesuffix('/')}/{child.name}")
        return removed

    # -- signed URLs ---------------------------------------------------------------------------

    def signed_path(self, key: str, expires_in: float | None = None) -> str:
        """``<url_prefix>/<key>?expires=<unix>&sig=<hex>``, valid for ``expires_in`` seconds.

        Keys only contain URL-safe characters, so the key goes into the path unquoted.
        """
        validate_key(key)
        seconds = self.default_expiry if expires_in is None else expires_in
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError("expires_in must be a positive number of seconds")
        # Rounded up so a URL is never valid for less than asked.
        expires = math.ceil(self._clock() + seconds)
        return f"{self.url_prefix}/{key}?expires={expires}&sig={self._sign(key, expires)}"

    def verify(self, key: str, expires: str | None, sig: str | None) -> None:
        """Raise SignatureError unless ``sig`` signs ``key`` until ``expires`` and that is not past."""
        validate_key(key)
        if not expires or not sig:
            raise SignatureError("this file link is not signed")
        # Canonical decimal only (no sign, spaces, leading zeros or non-ASCII digits), so exactly one
        # spelling of each expiry time is valid.
        if (
            len(expires) > _MAX_EXPIRES_DIGITS
            or not (expires.isascii() and expires.isdigit())
            or (len(expires) > 1 and expires[0] == "0")
        ):
            raise SignatureError("this file link has a malformed expiry")
        if len(sig) != 64 or not set(sig) <= _SIG_HEX_CHARS:
            raise SignatureError("this file link has a malformed signature")
        expected = self._sign(key, int(expires))
        if not hmac.compare_digest(expected.encode("ascii"), sig.encode("ascii")):
            raise SignatureError("this file link's signature is invalid")
        # Checked only after the signature, so an expiry message never confirms a forged link.
        if self._clock() > int(expires):
            raise SignatureError("this file link has expired")

    # -- internals -----------------------------------------------------------------------------

    def _sign(self, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _path(self, key: str) -> Path:
        """The path of a validated key, checked (after resolving symlinks) to lie inside root."""
        path = self.root / validate_key(key)
        self._check_inside(path)
        return path

    def _check_inside(self, path: Path) -> None:
        # validate_key already rules out '..'; this catches a symlink in the store pointing out.
        if not path.resolve().is_relative_to(self.root):
            raise NotFoundError("no such file")


def _load_or_create_secret(path: Path) -> bytes:
    """Read the signing secret at ``path``, creating it (mode 0600) if it does not exist yet."""
    if not path.exists():
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".secret.", suffix=_TEMP_SUFFIX)
        try:
            os.fchmod(fd, 0o600)  # mkstemp already uses 0600; made explicit as it matters here
            with os.fdopen(fd, "wb") as file:
                file.write(secrets.token_bytes(SECRET_BYTES))
                file.flush()
                os.fsync(file.fileno())
            # link() fails if the name exists, so two servers starting at once agree on one secret,
            # and nobody ever reads a half-written file.
            os.link(temp_name, path)
        except FileExistsError:
            pass
        finally:
            Path(temp_name).unlink(missing_ok=True)
    secret = path.read_bytes()
    if len(secret) < _MIN_SECRET_BYTES:
        raise ValueError(f"{path} holds too short a secret; delete it to have a new one made")
    return secret
