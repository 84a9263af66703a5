"""The Workbench: a web page at ``/`` to try the models, compare results and copy exact API calls.

Static HTML, CSS and JavaScript shipped as package data (no Node build, no CDN), plus one JSON
endpoint, ``GET /workbench/config``, that tells the page what the Oxen API cannot: each model's id in
every dialect, whether its steps and guidance are fixed, the server's request limits and the
aspect-ratio size table computed by :func:`~kleinserve.request.size_for_aspect_ratio` (so the page
never re-implements the rounding). ``POST /workbench/snippet`` takes the page's settings as a canonical
:class:`~kleinserve.request.GenerationRequest` and answers each dialect's request for them (its
:meth:`Dialect.example`), from which the page renders curl and Python generically and which it
submits itself (the Oxen one, to the queue): no wire format is encoded in JavaScript. The page then
calls the public Oxen queue and SSE stream, the same endpoints any client uses; it has no private
back door. The page, its files, the config and the snippets are served without an API key: the page
must load to ask for one, and nothing here is secret (a snippet only restates what was sent).

The script is native ES modules (``main.js`` imports the rest), no build step and no CDN.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from kleinserve.api.dialects.base import Dialect
from kleinserve.api.jobs_http import runtime_of
from kleinserve.engine.variants import find_variant
from kleinserve.request import ASPECT_RATIOS, MEGAPIXELS, GenerationRequest, size_for_aspect_ratio

PREFIX = "/workbench"
# The only files served, by name: a fixed table leaves no path to traverse.
_JS = "text/javascript; charset=utf-8"
# The script's native ES modules (main.js imports the others); the names are the whole table.
MODULES: tuple[str, ...] = (
    "main.js",
    "dom.js",
    "api.js",
    "settings.js",
    "references.js",
    "mask.js",
    "loras.js",
    "jobs.js",
    "compare.js",
    "snippets.js",
    "tabs.js",
)
ASSETS = {"app.css": "text/css; charset=utf-8", **dict.fromkeys(MODULES, _JS)}
# Oxen's queue schema bounds; the server's own settings may be tighter.
OXEN_MAX_STEPS, OXEN_MAX_GUIDANCE, OXEN_MAX_GENERATIONS = 50, 10.0, 4
# "no-cache" revalidates every load, so an upgraded server never runs an old script.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


def workbench_config(request: Request, dialects: Sequence[Dialect] = ()) -> dict[str, Any]:
    """What the page needs to build requests in every dialect for this server.

    Each model carries its id in every dialect (``ids``, from the :class:`Dialect` contract; also
    flat under each dialect's name, as the page reads them) and ``examples``: one ready request per
    dialect, from the dialect itself, so no wire format is re-encoded by hand in JavaScript.
    """
    runtime = runtime_of(request)
    settings = runtime.settings
    models = []
    for m in runtime.models():
        ids = {d.name: d.model_id(m.variant) for d in dialects}
        models.append(
            {
                "id": m.variant.id,
                "name": m.variant.display_name,
                "distilled": m.variant.distilled,
                "steps": m.variant.default_steps,
                "guidance": m.variant.default_guidance,
                "demo": m.demo,
                **ids,
                "ids": ids,
                "examples": [d.example(m.variant).as_json() for d in dialects],
            }
        )
    sizes = {ratio: {f"{mp:g}": list(size_for_aspect_ratio(ratio, mp)) for mp in MEGAPIXELS} for ratio in ASPECT_RATIOS}
    return {
        "public_url": settings.public_url,
        "demo": runtime.demo,
        "ready": runtime.ready,
        "models": models,
        "sizes": sizes,
        # Canonical fields the page offers controls for only when this server's request model has them.
        "features": {name: name in GenerationRequest.model_fields for name in ("mask", "previews")},
        "limits": {
            "max_references": settings.max_references,
            "max_generations": min(OXEN_MAX_GENERATIONS, settings.max_images),
            "min_side": settings.min_side,
            "max_side": settings.max_side,
            "max_pixels": settings.max_pixels,
            "max_steps": min(OXEN_MAX_STEPS, settings.max_steps),
            "max_guidance": min(OXEN_MAX_GUIDANCE, settings.max_guidance),
            "max_prompt_chars": settings.max_prompt_chars,
        },
    }


def snippets(request: Request, fields: dict[str, Any], dialects: Sequence[Dialect]) -> dict[str, Any]:
    """Each dialect's request for the canonical settings ``fields`` (a 400 names a bad field)."""
    runtime = runtime_of(request)
    gen = GenerationRequest.parse(fields, runtime.settings)
    variant = find_variant(runtime.service.check_model(gen.model))
    gen = gen.model_copy(update={"model": variant.id})
    return {
        "request": gen.model_dump(mode="json"),
        "examples": [d.example(variant, gen).as_json() for d in dialects],
    }


def workbench_router(dialects: Sequence[Dialect] = ()) -> APIRouter:
    """Routes of the Workbench: the page at ``/``, its two assets, and its config (``dialects``: the
    provider APIs the app serves, whose ids and example requests the config lists)."""
    router = APIRouter(include_in_schema=False)
    page = _read("index.html")
    assets = {name: _read(name) for name in ASSETS}

    @router.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_HEADERS)

    @router.post(PREFIX + "/snippet")
    async def snippet(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        return snippets(request, body, dialects)

    @router.get(PREFIX + "/config")
    async def config(request: Request) -> dict[str, Any]:
        body = workbench_config(request, dialects)
        body["auth_required"] = await asyncio.to_thread(runtime_of(request).access.keys_required)
        return body

    # After /config, which this pattern would otherwise match.
    @router.get(PREFIX + "/{name}")
    async def asset(name: str) -> Response:
        if name not in ASSETS:
            return Response(status_code=404)
        return Response(assets[name], media_type=ASSETS[name], headers=_HEADERS)

    return router
