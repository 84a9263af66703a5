"""The onemin dialect (being written in this change; see ../shared/api/)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from kleinserve.errors import KleinserveError


class OneMinDialect:
    """Placeholder registration; the routes land with the dialect."""

    name = "onemin"
    prefixes: tuple[str, ...] = ()

    def error_body(self, error: KleinserveError, status: int) -> dict[str, Any]:
        return {"error": {"message": error.message}}

    def router(self) -> APIRouter:
        return APIRouter()
