"""``GET /v1/loras``: the LoRA adapters this server offers (names requests may use, with scales).

The list is the operator's ``--lora`` options; an adapter is loaded on the first job that uses it, so
``loaded`` says which ones are in memory now. Sources (paths, hub ids) are not shown to clients.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from kleinserve.api.jobs_http import runtime_of
from kleinserve.loras import LORA_HEADER


def loras_router() -> APIRouter:
    router = APIRouter(tags=["models"])

    @router.get("/v1/loras", summary="LoRA adapters offered; name them in `loras` or the X-Kleinserve-Loras header.")
    async def list_loras(request: Request) -> dict[str, Any]:
        runtime = runtime_of(request)
        loaded = {name for engine in runtime.engines.values() if engine.adapters for name in engine.adapters.loaded}
        return {
            "object": "list",
            "header": LORA_HEADER,
            "max_per_request": runtime.settings.max_loras,
            "data": [
                {"id": name, "object": "lora", "name": name, "loaded": name in loaded} for name in sorted(runtime.loras)
            ],
        }

    return router
