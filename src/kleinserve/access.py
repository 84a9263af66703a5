"""Whether the server requires API keys: decided once at start, afterwards only ever tightened.

The decision (``Access.at_start``):

- keys are required when the key table has any key at start, active or revoked (a data dir whose
  keys were all revoked does not start open either), or when the server binds a
  non-loopback address (``kleinserve serve`` refuses that without keys unless ``--insecure-no-auth``,
  the operator's explicit choice of open mode behind something else that checks access);
- otherwise the server starts *open*: loopback only, anyone who can reach it may use it and sees
  every job.

While it runs, the key table can only tighten that: the first active key seen (one created with
``kleinserve keys create`` while the server runs) makes keys required for the rest of the
process's life. Revoking keys never loosens it, so revoking the last key does not open a server,
running or restarted: it refuses everyone until a key is created again.

``Access`` also remembers which keys were revoked, so long-lived responses (SSE streams) can end
when their key is revoked; :meth:`kleinserve.runtime.Runtime.enforce_revocations` refreshes it.
"""

from __future__ import annotations

import ipaddress
import threading

from kleinserve.keys import ApiKeyStore


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server reachable from this machine only."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Access:
    """The server's access rule: open, or keys required (sticky), plus the revoked key ids."""

    def __init__(self, keys: ApiKeyStore, *, keys_required: bool) -> None:
        self._keys = keys
        self._required = keys_required
        self._revoked: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    @classmethod
    def at_start(cls, keys: ApiKeyStore, host: str, insecure_no_auth: bool = False) -> Access:
        """The start-up decision for a server binding ``host`` (see the module docstring)."""
        public = not is_loopback(host) and not insecure_no_auth
        return cls(keys, keys_required=public or keys.any_key())

    def keys_required(self) -> bool:
        """Whether a request needs a valid key; once True, True for good."""
        if not self._required and self._keys.any_active():
            self._required = True
        return self._required

    def keys_required_now(self) -> bool:
        """The current rule without consulting the key table (for cheap periodic checks)."""
        return self._required

    def note_revoked(self, key_ids: frozenset[str]) -> None:
        with self._lock:
            self._revoked = self._revoked | key_ids

    def is_revoked(self, key_id: str) -> bool:
        return key_id in self._revoked
