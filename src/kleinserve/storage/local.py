"""Local-disk storage: files under one root directory, handed out through HMAC-signed ``/files`` links.

Layout: the file for key ``"<job-id>/0.png"`` is ``<root>/<job-id>/0.png``. The media type is
derived from the file extension (``.png``, ``.jpg``/``.jpeg``, ``.webp``), so there is no sidecar
that could drift from its file; :meth:`LocalStorage.put` refuses a media type its key's extension
would not give back.

A link is ``<base_url>/files/<key>?expires=<unix>&sig=<hex>``, signed as
``hex(HMAC-SHA256(secret, f"{key}\\n{expires}"))`` where ``expires`` is an integer Unix time; it stops
verifying once ``clock() > expires``. ``base_url`` is fixed when the storage is made (the server's
``Settings.link_base_url()``), never taken from a request. The secret lives in
``<data_dir>/secret.key`` (see :meth:`LocalStorage.in_data_dir`) so links survive restarts. The HTTP
layer serves ``/files`` with :meth:`LocalStorage.verify` (which returns the seconds left, for
``Cache-Control``) and :meth:`LocalStorage.path`.
"""

from __future__ import annotations

import contextlib
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
from kleinserve.storage.base import SignatureError, check_media_type, media_type_for, validate_key, validate_prefix

SECRET_BYTES = 32
_MIN_SECRET_BYTES = 16
# '~' is not allowed in keys, so a temp file can never be mistaken for (or collide with) a key.
_TEMP_SUFFIX = ".~tmp"
_SIG_HEX_CHARS = frozenset("0123456789abcdef")
_MAX_EXPIRES_DIGITS = 16  # far beyond any real Unix time; stops absurd int() parsing


class LocalStorage:
    """Result files on local disk under ``root``, with signed, expiring absolute links.

    ``secret`` signs links; ``base_url`` (``http://host:port`` or the public URL, no trailing slash
    needed) starts every link; ``default_expiry`` is how many seconds a link stays valid unless
    :meth:`url` is told otherwise; ``url_prefix`` is the path the HTTP layer serves files under;
    ``clock`` returns the Unix time (injectable so tests need not sleep).
    """

    def __init__(
        self,
        root: Path,
        secret: bytes,
        base_url: str,
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
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an absolute http(s) URL, not {base_url!r}")
        root.mkdir(parents=True, exist_ok=True)
        # Resolved once: every containment check compares against the real root directory.
        self.root = root.resolve()
        self._secret = secret
        self.base_url = base_url.rstrip("/")
        self.default_expiry = default_expiry
        self.url_prefix = url_prefix.rstrip("/")
        self._clock = clock

    @classmethod
    def in_data_dir(cls, data_dir: Path, base_url: str, default_expiry: float = 3600.0) -> LocalStorage:
        """Storage under ``data_dir/files``, signing with the secret in ``data_dir/secret.key``.

        The secret (32 random bytes, mode 0600) is created on first use and reused afterwards, so
        links handed out before a restart keep working after it.
        """
        data_dir.mkdir(parents=True, exist_ok=True)
        secret = _load_or_create_secret(data_dir / "secret.key")
        return cls(data_dir / "files", secret, base_url, default_expiry)

    # -- files -------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, media_type: str) -> None:
        """Store ``data`` under ``key`` atomically: readers see the old file or the new, never half."""
        path = self._path(key)
        check_media_type(key, media_type)  # the type is derived from the extension on read
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

    def path(self, key: str) -> Path:
        """The file stored under ``key`` (for the ``/files`` route to stream), or NotFoundError."""
        path = self._path(key)
        try:
            info = path.stat()
        except OSError:
            info = None
        if info is None or media_type_for(key) is None or not stat.S_ISREG(info.st_mode):
            raise NotFoundError(f"no such file: {key}")
        return path

    def read(self, key: str) -> bytes:
        """The bytes stored under ``key``, or NotFoundError."""
        path = self.path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:  # deleted since path() looked
            raise NotFoundError(f"no such file: {key}") from None

    def exists(self, key: str) -> bool:
        try:
            self.path(key)
        except NotFoundError:
            return False
        return True

    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under the directory ``prefix`` (``"<job-id>/"`` or ``"<job-id>"``).

        ``prefix`` names a directory, never a string prefix: ``"job1/"`` does not touch
        ``"job10/..."``. Returns the number of stored files removed (stray temp files are removed
        but not counted); 0 when nothing is stored under it.
        """
        directory = self._path(validate_prefix(prefix).removesuffix("/"))
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

    def delete_older_than(self, prefix: str, cutoff: float) -> int:
        """Delete the files under the directory ``prefix`` last modified before ``cutoff``.

        Directories left empty go too, but only once they are themselves older than ``cutoff``, so
        a directory a concurrent :meth:`put` has just made is never pulled from under it. Links are
        removed themselves (by their own mtime), never followed. Returns how many stored files went.
        """
        directory = self._path(validate_prefix(prefix).removesuffix("/"))
        if directory == self.root or not directory.is_dir():
            return 0
        removed = 0
        walk = list(os.walk(directory, followlinks=False))
        # Directory ages are taken before anything goes: removing a file makes its directory young.
        old_dirs = {current for current, _, _ in walk if os.lstat(current).st_mtime < cutoff}
        for current, dirnames, filenames in reversed(walk):  # children before their parents
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(current, d))]:
                child = os.path.join(current, name)
                if os.lstat(child).st_mtime < cutoff:
                    os.unlink(child)
                    removed += not name.endswith(_TEMP_SUFFIX)
            if current != str(directory) and current in old_dirs:
                with contextlib.suppress(OSError):  # not empty: something in it is still young
                    os.rmdir(current)
        return removed

    # -- signed links --------------------------------------------------------------------------

    def url(self, key: str, expires_in: float | None = None) -> str:
        """``<base_url><url_prefix>/<key>?expires=<unix>&sig=<hex>``, valid for ``expires_in`` seconds.

        Keys only contain URL-safe characters, so the key goes into the path unquoted.
        """
        validate_key(key)
        seconds = self.default_expiry if expires_in is None else expires_in
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError("expires_in must be a positive number of seconds")
        # Rounded up so a link is never valid for less than asked.
        expires = math.ceil(self._clock() + seconds)
        return f"{self.base_url}{self.url_prefix}/{key}?expires={expires}&sig={self._sign(key, expires)}"

    def verify(self, key: str, expires: str | None, sig: str | None) -> int:
        """Whole seconds the link has left (0 in its last second); SignatureError unless ``sig``
        signs ``key`` until ``expires`` (raw query values) and that is not past."""
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
        now = self._clock()
        if now > int(expires):
            raise SignatureError("this file link has expired")
        return int(int(expires) - now)

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
