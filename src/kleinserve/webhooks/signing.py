"""Standard Webhooks signatures (https://www.standardwebhooks.com), and whose secret signs what.

Each delivery carries ``webhook-id`` (the delivery's id, the same on every retry, so receivers can
drop duplicates), ``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``:
``v1,`` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")). Secrets are written ``whsec_`` +
base64(key), as the specification's libraries expect.

Whose secret: a job submitted with an API key is signed with that key's own secret, derived from
the server secret (HMAC-SHA256(server key, "api-key:" + key id)), so no key holder can forge
another's deliveries and nothing new is stored per key; a key holder reads it from
``GET /api/webhooks/secret``. A job submitted without a key (an open server) is signed with the
server secret itself. The server secret is ``KLEINSERVE_WEBHOOK_SECRET`` when set (required when
several hosts send webhooks: they must agree), else a random one kept in ``DATA_DIR/webhook.secret``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

PREFIX = "whsec_"


def encode_secret(key: bytes) -> str:
    return PREFIX + base64.b64encode(key).decode()


def decode_secret(secret: str) -> bytes:
    """The key bytes of a ``whsec_...`` secret (a bare base64 key is accepted too)."""
    return base64.b64decode(secret.removeprefix(PREFIX))


def server_secret(configured: str | None, data_dir: Path) -> str:
    """The configured secret, or the one kept in the data dir (made on first use, mode 0600)."""
    if configured:
        decode_secret(configured)  # a malformed secret fails at start, not at the first delivery
        return configured
    path = data_dir / "webhook.secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(encode_secret(secrets.token_bytes(32)))
    return path.read_text().strip()


def secret_for(server: str, key_id: str | None) -> str:
    """The secret that signs deliveries of jobs submitted with ``key_id`` (``None``: the server's)."""
    if key_id is None:
        return server
    derived = hmac.new(decode_secret(server), f"api-key:{key_id}".encode(), hashlib.sha256).digest()
    return encode_secret(derived)


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one attempt."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(decode_secret(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message_id, timestamp, body),
        "content-type": "application/json",
    }
