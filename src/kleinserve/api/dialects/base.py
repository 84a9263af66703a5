"""What every dialect provides: its routes, the paths it owns, and its error body."""

from __future__ import annotations

from typing import Any, Protocol

from fastapi import APIRouter

from kleinserve.errors import KleinserveError


class Dialect(Protocol):
    """One provider API: a router, the path prefixes it owns, and its error shape."""

    name: str
    prefixes: tuple[str, ...]
    # Optional ``upload_paths``: routes that take multipart/form-data; every other body must be
    # JSON (api/guard.py answers 415 otherwise).

    def router(self) -> APIRouter:
        """The dialect's routes."""

    def error_body(self, error: KleinserveError, status: int) -> dict[str, Any]:
        """The JSON body this provider sends for ``error`` with HTTP ``status``."""
