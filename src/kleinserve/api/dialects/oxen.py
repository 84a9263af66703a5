"""The Oxen.ai dialect: sync generate/edit, the async queue, SSE events and the model catalogue.

Compatibility notes: docs/api/oxen.md. Choices where Oxen is silent (published in the README):
- parameters left out take the *variant's* defaults (klein 4B/9B: 4 steps, guidance 1.0), not the
  28 steps / 2.0 Oxen advertises for these 4-step distilled models; explicit values are honoured;
- ``aspect_ratio`` maps through kleinserve's ~1 MP table; without it, text-to-image is 16:9 (as
  Oxen's current pages say) and editing keeps the first input image's size;
- ``output_quality`` is the JPEG/WebP encoder quality: ``standard`` = 90, ``high`` = 100;
- ``num_generations`` N queues N generations; with a seed, generation i uses seed + i.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from kleinserve.api.auth import Caller, CallerDep, while_allowed
from kleinserve.api.dialects.base import (
    Example,
    client_image_error,
    example_request,
    output_size,
    submit_and_wait,
    unsaid,
    unsaid_note,
)
from kleinserve.api.dialects.oxen_models import (
    model_object,
    oxen_id,
    read_favorites,
    served_or_404,
    write_favorites,
)
from kleinserve.api.dialects.oxen_queue import frame, generation_objects, to_sse
from kleinserve.api.dialects.oxen_schema import QUALITY, OxenImageRequest, echo, to_generation_request
from kleinserve.api.jobs_http import (
    ReadyRuntime,
    outputs_of,
    result_b64,
    result_url,
    runtime_of,
    with_lora_header,
)
from kleinserve.api.webhooks_http import checked_webhook, webhook_from_header
from kleinserve.engine.variants import Variant, find_variant
from kleinserve.errors import InvalidRequestError, KleinserveError
from kleinserve.jobs.events import EventType
from kleinserve.jobs.job import JobStatus
from kleinserve.request import ASPECT_RATIOS, GenerationRequest, size_for_aspect_ratio
from kleinserve.runtime import Runtime

PREFIX = "/api"
_ERROR_TYPES = {
    400: ("invalid_params", "Invalid parameters supplied, please check your request and try again."),
    401: ("unauthenticated", "Authentication is required."),
    402: ("insufficient_credits", "Insufficient credits for this request."),
    403: ("forbidden", "Access to this resource is forbidden."),
    404: ("resource_not_found", "The requested resource could not be found"),
    408: ("request_timeout", "The request took too long to arrive."),
    409: ("conflict", "The request conflicts with the state of the resource."),
    413: ("payload_too_large", "The request body is too large."),
    415: ("unsupported_media_type", "The request body must be application/json."),
    429: ("rate_limited", "Too many requests, please retry later."),
    503: ("service_unavailable", "The service is temporarily unavailable, please retry later."),
}


NAME = "oxen"
router = APIRouter(prefix=PREFIX, tags=["oxen"])


class OxenDialect:
    """The Oxen.ai inference API under /api."""

    name = NAME
    prefixes: tuple[str, ...] = ("/api/ai", "/api/events")

    def router(self) -> APIRouter:
        return router

    def error_body(self, error: KleinserveError, status: int) -> dict[str, Any]:
        error_type, title = _ERROR_TYPES.get(status, ("unknown_error", "An unexpected error occurred."))
        return {
            "error": {"type": error_type, "title": title, "detail": error.message, "message": error.message},
            "status": "error",
            "status_message": error_type,
        }

    def model_id(self, variant: Variant) -> str:
        return oxen_id(variant)

    def example(self, variant: Variant, request: GenerationRequest | None = None) -> Example:
        req = example_request(variant, request)
        body: dict[str, Any] = {"model": oxen_id(variant), "prompt": req.prompt}
        carried = {"model", "prompt", "negative_prompt", "strength", "images", "mask", "width", "height", "steps"}
        carried |= {"guidance", "seed", "num_images", "output_format", "loras", "cache"}
        for name, value in (("negative_prompt", req.negative_prompt), ("strength", req.strength)):
            if value is not None:
                body[name] = value
        if req.images:
            body["input_image"] = list(req.images)
        if req.mask is not None:  # kleinserve's extension: inpainting of the first input_image
            body["mask"] = req.mask
        if (size := output_size(req)) is not None:
            ratio = next((r for r in ASPECT_RATIOS if size_for_aspect_ratio(r) == size), None)
            body.update({"aspect_ratio": ratio} if ratio else {"image_size": {"width": size[0], "height": size[1]}})
        for name, value in (("num_inference_steps", req.steps), ("guidance_scale", req.guidance), ("seed", req.seed)):
            if value is not None:
                body[name] = value
        if req.num_images > 1:
            body["num_generations"] = req.num_images
        if req.output_format.value != "png":
            body["output_format"] = req.output_format.value
            named = {quality: name for name, quality in QUALITY.items()}
            if req.quality in named:
                body["output_quality"] = named[req.quality]
                carried.add("quality")
        if req.loras:
            body["loras"] = [choice.model_dump() for choice in req.loras]
        if req.cache is not None:
            body["cache"] = req.cache.model_dump(exclude_none=True)
        if previews := getattr(req, "previews", 0):  # the field exists once live previews are served
            body["previews"] = previews
            carried.add("previews")
        dropped = unsaid(req, carried)
        return Example(
            dialect=NAME,
            title="Oxen.ai: generate (sync)" if not req.images else "Oxen.ai: edit (sync)",
            method="POST",
            path=f"{PREFIX}/ai/images/{'edit' if req.images else 'generate'}",
            body=body,
            notes=(
                "POST /api/ai/queue takes the same body (what the Workbench sends); poll GET "
                "/api/ai/queue/{generation_id} or listen on GET /api/events.",
                *unsaid_note("Oxen", dropped),
            ),
            unsaid=dropped,
        )


def _images_field(body: OxenImageRequest) -> tuple[str, bool]:
    """The field the client sent its references in (``input_image`` or ``image``; ``images`` for both),
    and whether it was one string (named without an index)."""
    sent = [name for name in ("input_image", "image") if getattr(body, name) is not None]
    if len(sent) != 1:
        return "images", False
    return sent[0], isinstance(getattr(body, sent[0]), str)


async def run_sync(request: Request, body: OxenImageRequest, runtime: Runtime, caller: Caller) -> dict[str, Any]:
    """Sync generate/edit: one job of ``num_generations`` images."""
    gen = to_generation_request(body, runtime, num_images=body.num_generations)
    field, single = _images_field(body)
    (job,) = await submit_and_wait(
        request,
        runtime,
        caller,
        [gen],
        dialect=NAME,
        extra={"model": body.model, **echo(body)},
        images_field=field,
        single_image=single,
    )
    # Off the event loop: reading results may be a network call (S3).
    images = await asyncio.to_thread(
        lambda: [
            {"b64_json": result_b64(runtime, o)}
            if body.response_format == "b64_json"
            else {"url": result_url(runtime, o)}
            for o in outputs_of(job)
        ]
    )
    return {"model": body.model, "created": int(job.created_at), "images": images}


@router.post("/ai/images/generate", summary="Generate images (sync).")
async def generate(
    request: Request, body: OxenImageRequest, runtime: ReadyRuntime, caller: CallerDep
) -> dict[str, Any]:
    return await run_sync(request, body, runtime, caller)


@router.post("/ai/images/edit", summary="Edit or generate images from references (sync).")
async def edit(request: Request, body: OxenImageRequest, runtime: ReadyRuntime, caller: CallerDep) -> dict[str, Any]:
    return await run_sync(request, body, runtime, caller)


@router.post("/ai/queue", summary="Queue 1-4 generations.")
async def enqueue(request: Request, body: OxenImageRequest, runtime: ReadyRuntime, caller: CallerDep) -> dict[str, Any]:
    requests = [to_generation_request(body, runtime, seed_offset=i) for i in range(body.num_generations)]
    requests = with_lora_header(request, requests, runtime.settings)
    webhook_url = await checked_webhook(runtime, body.webhook_url, "webhook_url") or await webhook_from_header(
        request, runtime
    )
    try:  # submitting checks the references: name them as the client did
        jobs = await asyncio.to_thread(
            runtime.service.submit,
            requests,
            key=caller.key,
            dialect=NAME,
            extra={"model": body.model, **echo(body)},
            webhook_url=webhook_url,
        )
    except InvalidRequestError as err:
        field, single = _images_field(body)
        raise err if field == "images" else client_image_error(err, field, single=single) from None
    return {"generations": [{"generation_id": j.id, "status": j.status.value} for j in jobs]}


@router.get("/ai/queue", summary="List generations (default: queued and processing).")
async def list_queue(
    request: Request,
    caller: CallerDep,
    model: str | None = None,
    status: Literal["queued", "processing", "succeeded", "failed", "cancelled"] | None = None,
    media_type: Literal["image", "video"] | None = None,
    namespace: str | None = None,
    repo: str | None = None,
    folder: str | None = None,
) -> dict[str, Any]:
    runtime = runtime_of(request)
    if media_type == "video":
        return {"count": 0, "generations": []}
    statuses = [JobStatus(status)] if status else [JobStatus.QUEUED, JobStatus.PROCESSING]
    model_id = find_variant(model).id if model else None

    def listed() -> list[dict[str, Any]]:
        jobs = runtime.service.list(statuses=statuses, model=model_id, **caller.scope)
        return generation_objects(runtime, jobs)

    items = await run_in_threadpool(listed)
    return {"count": len(items), "generations": items}


@router.get("/ai/queue/{generation_id}", summary="One generation's status and result.")
async def get_generation(request: Request, generation_id: str, caller: CallerDep) -> dict[str, Any]:
    runtime = runtime_of(request)

    def found() -> dict[str, Any]:
        job = runtime.service.get(generation_id, **caller.scope)
        return generation_objects(runtime, [job])[0]

    return await run_in_threadpool(found)


@router.delete("/ai/queue/{generation_id}", summary="Cancel a queued or processing generation.")
async def cancel_generation(request: Request, generation_id: str, caller: CallerDep) -> dict[str, Any]:
    job = await asyncio.to_thread(runtime_of(request).service.cancel, generation_id, **caller.scope)
    return {"status": "success", "generation_id": generation_id, "generation_status": job.status.value}


@router.get(
    "/events",
    summary="Server-Sent Events: media_generation_completed and progress.",
    response_class=EventSourceResponse,
    responses={200: {"description": "An endless event stream.", "content": {"text/event-stream": {}}}},
)
async def events(
    request: Request,
    caller: CallerDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    previews: Annotated[
        bool, Query(description="true: also kleinserve.generation.preview events (jobs that ask for previews).")
    ] = False,
) -> EventSourceResponse:
    runtime = runtime_of(request)
    if last_event_id and last_event_id.isascii() and last_event_id.isdigit():
        # Beyond SQLite's integers nothing can follow: resume after everything stored.
        # Digits bounded before int(): past 4300 of them Python refuses to convert (a 500).
        after = min(int(last_event_id), 2**63 - 1) if len(last_event_id) <= 19 else 2**63 - 1
    else:
        # Oxen's own examples enqueue first and connect after, so a fast job could finish
        # in between; a short replay window closes that race (clients filter by id).
        since = time.time() - runtime.settings.sse_replay_seconds
        after = await asyncio.to_thread(runtime.store.last_seq_before, since)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        async with runtime.bus.subscribe(
            after=after, owner=caller.owner, all_owners=caller.key is None
        ) as subscription:
            # A revoked key's stream ends (api/auth.py), as does an anonymous one once keys exist.
            async for event in while_allowed(runtime, caller, subscription):
                if event.type is EventType.PREVIEW and not previews:
                    continue
                for sse in to_sse(runtime, event):
                    yield sse

    return EventSourceResponse(
        stream(),
        ping=runtime.settings.keepalive_interval,
        ping_message_factory=lambda: frame(comment="keep-alive"),
        sep="\n",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/ai/models", summary="Served models.")
async def list_models(request: Request) -> dict[str, Any]:
    runtime = runtime_of(request)
    return {"object": "list", "data": [model_object(runtime, m.variant, m.demo) for m in runtime.models()]}


@router.get("/ai/models/search", summary="Served models whose id or name contains a text.")
async def search_models(request: Request, search: str = Query("", max_length=200)) -> dict[str, Any]:
    runtime = runtime_of(request)
    text = search.lower()
    found = [
        model_object(runtime, m.variant, m.demo)
        for m in runtime.models()
        if text in oxen_id(m.variant) or text in m.variant.display_name.lower()
    ]
    return {"object": "list", "data": found}


@router.get("/ai/models/favorites", summary="The caller's favourite models (served ones only).")
async def list_favorites(request: Request, caller: CallerDep) -> dict[str, Any]:
    runtime = runtime_of(request)
    ids = await asyncio.to_thread(read_favorites, runtime, caller)
    served = [runtime.served_model(model_id) for model_id in ids]
    return {"object": "list", "data": [model_object(runtime, m.variant, m.demo) for m in served if m is not None]}


@router.post("/ai/models/{model_id:path}/favorite", summary="Mark a served model as a favourite.")
async def add_favorite(request: Request, model_id: str, caller: CallerDep) -> dict[str, Any]:
    runtime = runtime_of(request)
    served = served_or_404(runtime, model_id)
    ids = await asyncio.to_thread(read_favorites, runtime, caller)
    if oxen_id(served.variant) not in ids:
        await asyncio.to_thread(write_favorites, runtime, caller, [*ids, oxen_id(served.variant)])
    return {"status": "success", "model": oxen_id(served.variant), "favorite": True}


@router.delete("/ai/models/{model_id:path}/favorite", summary="Remove a model from the favourites.")
async def remove_favorite(request: Request, model_id: str, caller: CallerDep) -> dict[str, Any]:
    runtime = runtime_of(request)
    served = served_or_404(runtime, model_id)
    ids = await asyncio.to_thread(read_favorites, runtime, caller)
    if oxen_id(served.variant) in ids:
        remaining = [i for i in ids if i != oxen_id(served.variant)]
        await asyncio.to_thread(write_favorites, runtime, caller, remaining)
    return {"status": "success", "model": oxen_id(served.variant), "favorite": False}


@router.get("/ai/models/{model_id:path}", summary="One served model, with its request schema.")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    runtime = runtime_of(request)
    served = served_or_404(runtime, model_id)
    return model_object(runtime, served.variant, served.demo)
