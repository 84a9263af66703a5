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
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from kleinserve.api.auth import Caller, CallerDep, while_allowed
from kleinserve.api.dialects.base import (
    Example,
    FieldNames,
    example_request,
    output_size,
    submit_and_wait,
    to_request,
    unsaid,
    unsaid_note,
)
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
from kleinserve.errors import KleinserveError, NotFoundError
from kleinserve.jobs.events import Event, EventType
from kleinserve.jobs.job import Job, JobOutput, JobStatus
from kleinserve.request import (
    ASPECT_RATIOS,
    MAX_SEED,
    GenerationRequest,
    LoraChoice,
    StepCacheChoice,
    size_for_aspect_ratio,
)
from kleinserve.runtime import AdvertisedModel, Runtime

if TYPE_CHECKING:  # the engine (torch) stays out of api-only processes
    from kleinserve.engine.catalog import ServedModel

PREFIX = "/api"
COMPLETED = "media_generation_completed"
QUALITY = {"standard": 90, "high": 100}
DEFAULT_ASPECT_RATIO = "16:9"
# Oxen's older `image_size` presets (fal.ai names), kept for clients written against them.
IMAGE_SIZE_PRESETS = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
# Canonical field -> the Oxen name a client sent, for error messages.
NAMES = FieldNames(
    {
        "steps": "num_inference_steps",
        "guidance": "guidance_scale",
        "images": "input_image",
        "num_images": "num_generations",
        "quality": "output_quality",
        "width": "aspect_ratio",
        "height": "aspect_ratio",
        "size": "aspect_ratio",
    }
)
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


def oxen_id(variant: Variant) -> str:
    """Oxen's hyphenated id, e.g. ``black-forest-labs-flux-2-klein-4b``."""
    return f"black-forest-labs-{variant.id}"


class ImageSize(BaseModel):
    width: int
    height: int


class OxenImageRequest(BaseModel):
    """Body of /images/generate, /images/edit and /queue for the klein models.

    Unknown fields are accepted and ignored, as Oxen's queue passes them on and fails only at run
    time: clients send e.g. ``safety_tolerance``, ``resolution``, ``quality``, ``size``, ``background``,
    ``moderation``. They are echoed on queue items like every parameter; known fields with bad values
    are still a 400.
    """

    model_config = ConfigDict(extra="allow", title="FLUX.2 [klein] request")

    model: str = Field(..., description="Model id, e.g. black-forest-labs-flux-2-klein-4b.")
    prompt: str = Field(..., description="Text prompt; may refer to inputs as @Image1, @Image2, ...")
    negative_prompt: str | None = Field(
        None, description="kleinserve extension: what to steer away from (Base models only; true CFG)."
    )
    strength: float | None = Field(
        None, description="kleinserve extension: image-to-image from the first input_image, 0-1 (1: from noise)."
    )
    mask: str | None = Field(
        None,
        description="kleinserve extension: inpainting mask for the first input_image, a PNG of its size whose fully "
        "transparent pixels are the area to repaint (OpenAI's rule); URL, data URI or base64. Not echoed.",
    )
    input_image: str | list[str] | None = Field(None, description="Reference image URL(s) or data URI(s).")
    image: str | list[str] | None = Field(None, description="Alias of input_image (Oxen's OpenAPI name).")
    aspect_ratio: Literal[tuple(ASPECT_RATIOS)] | None = Field(  # type: ignore[valid-type]
        None, description="Output aspect ratio (~1 MP); default 16:9, or the first input image's size."
    )
    image_size: Literal[tuple(IMAGE_SIZE_PRESETS)] | ImageSize | None = Field(  # type: ignore[valid-type]
        None, description="Older alternative to aspect_ratio: a preset or {width, height}."
    )
    output_quality: Literal["standard", "high"] = Field("standard", description="Encoder quality 90 or 100.")
    output_format: Literal["png", "jpeg", "jpg", "webp"] = Field("png", description="Image format.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed for reproducible results.")
    num_inference_steps: int | None = Field(None, ge=1, le=50, description="Default: the model's own (4 or 50).")
    guidance_scale: float | None = Field(
        None, ge=0, le=10, allow_inf_nan=False, description="Default: the model's own (1.0 or 4.0)."
    )
    response_format: Literal["url", "b64_json"] = Field("url", description="Return URLs or base64.")
    target_namespace: str | None = Field(None, description="Accepted for compatibility; results stay here.")
    num_generations: int = Field(1, ge=1, le=4, description="Generations to run (queue), or images (sync).")
    webhook_url: str | None = Field(
        None, description="kleinserve extension (queue): POST the generation here when it finishes, signed."
    )
    loras: list[LoraChoice] | None = Field(
        None, description="kleinserve extension: LoRA adapters with scales (GET /v1/loras lists them)."
    )
    cache: StepCacheChoice | None = Field(
        None, description="kleinserve extension: step caching on Base models ({type, threshold}; changes pixels)."
    )
    previews: int | None = Field(
        None, ge=0, description="kleinserve extension: preview images while denoising (/api/events?previews=true)."
    )

    def references(self) -> list[str]:
        source = self.input_image if self.input_image is not None else self.image
        if source is None:
            return []
        return [source] if isinstance(source, str) else list(source)


REQUEST_SCHEMA = OxenImageRequest.model_json_schema()


def _size(body: OxenImageRequest, has_references: bool) -> tuple[int | None, int | None]:
    if body.aspect_ratio is not None:
        return size_for_aspect_ratio(body.aspect_ratio)
    if isinstance(body.image_size, ImageSize):
        return body.image_size.width, body.image_size.height
    if isinstance(body.image_size, str):
        return IMAGE_SIZE_PRESETS[body.image_size]
    return (None, None) if has_references else size_for_aspect_ratio(DEFAULT_ASPECT_RATIO)


def to_generation_request(
    body: OxenImageRequest, runtime: Runtime, *, num_images: int = 1, seed_offset: int = 0
) -> GenerationRequest:
    """Translate an Oxen body to the canonical request (field errors keep Oxen's names)."""
    references = body.references()
    width, height = _size(body, bool(references))
    return to_request(
        {
            "model": runtime.service.check_model(body.model),
            "prompt": body.prompt,
            "negative_prompt": body.negative_prompt,
            "strength": body.strength,
            "mask": body.mask,
            "images": references,
            "width": width,
            "height": height,
            "steps": body.num_inference_steps,
            "guidance": body.guidance_scale,
            "seed": None if body.seed is None else body.seed + seed_offset,
            "num_images": num_images,
            "output_format": body.output_format,
            "quality": QUALITY[body.output_quality],
            "loras": body.loras or [],
            "cache": body.cache,
            "previews": body.previews or 0,
        },
        runtime.settings,
        NAMES,
    )


def _echo(body: OxenImageRequest) -> dict[str, Any]:
    """The parameters a client sent, echoed on generation objects."""
    return body.model_dump(
        exclude_none=True, exclude={"image", "mask", "num_generations", "target_namespace", "webhook_url"}
    )


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


async def run_sync(request: Request, body: OxenImageRequest, runtime: Runtime, caller: Caller) -> dict[str, Any]:
    """Sync generate/edit: one job of ``num_generations`` images."""
    gen = to_generation_request(body, runtime, num_images=body.num_generations)
    (job,) = await submit_and_wait(
        request, runtime, caller, [gen], dialect=NAME, extra={"model": body.model, **_echo(body)}
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
    jobs = await asyncio.to_thread(
        runtime.service.submit,
        requests,
        key=caller.key,
        dialect=NAME,
        extra={"model": body.model, **_echo(body)},
        webhook_url=webhook_url,
    )
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
        ping_message_factory=lambda: _frame(comment="keep-alive"),
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


FAVORITES = "favorites"  # storage folder: one JSON list of Oxen model ids per caller


def _favorites_key(caller: Caller) -> str:
    # Key ids are the owners; hashed so that no owner text ever shapes a storage path.
    owner = caller.owner or "open-server"
    return f"{FAVORITES}/{hashlib.sha256(owner.encode()).hexdigest()[:32]}.json"


def _read_favorites(runtime: Runtime, caller: Caller) -> list[str]:
    try:
        stored = json.loads(runtime.read_asset(_favorites_key(caller)))
    except NotFoundError:
        return []
    return [item for item in stored if isinstance(item, str)] if isinstance(stored, list) else []


def _write_favorites(runtime: Runtime, caller: Caller, ids: list[str]) -> None:
    runtime.storage.put(_favorites_key(caller), json.dumps(ids).encode(), "application/json")


def _served_for_favorite(runtime: Runtime, model_id: str) -> ServedModel | AdvertisedModel:
    served = runtime.served_model(model_id)
    if served is None:
        raise NotFoundError(f"Model not found: {model_id}")
    return served


@router.get("/ai/models/favorites", summary="The caller's favourite models (served ones only).")
async def list_favorites(request: Request, caller: CallerDep) -> dict[str, Any]:
    runtime = runtime_of(request)
    ids = await asyncio.to_thread(_read_favorites, runtime, caller)
    served = [runtime.served_model(model_id) for model_id in ids]
    return {"object": "list", "data": [model_object(runtime, m.variant, m.demo) for m in served if m is not None]}


@router.post("/ai/models/{model_id:path}/favorite", summary="Mark a served model as a favourite.")
async def add_favorite(request: Request, model_id: str, caller: CallerDep) -> dict[str, Any]:
    runtime = runtime_of(request)
    served = _served_for_favorite(runtime, model_id)
    ids = await asyncio.to_thread(_read_favorites, runtime, caller)
    if oxen_id(served.variant) not in ids:
        await asyncio.to_thread(_write_favorites, runtime, caller, [*ids, oxen_id(served.variant)])
    return {"status": "success", "model": oxen_id(served.variant), "favorite": True}


@router.delete("/ai/models/{model_id:path}/favorite", summary="Remove a model from the favourites.")
async def remove_favorite(request: Request, model_id: str, caller: CallerDep) -> dict[str, Any]:
    runtime = runtime_of(request)
    served = _served_for_favorite(runtime, model_id)
    ids = await asyncio.to_thread(_read_favorites, runtime, caller)
    if oxen_id(served.variant) in ids:
        remaining = [i for i in ids if i != oxen_id(served.variant)]
        await asyncio.to_thread(_write_favorites, runtime, caller, remaining)
    return {"status": "success", "model": oxen_id(served.variant), "favorite": False}


@router.get("/ai/models/{model_id:path}", summary="One served model, with its request schema.")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    runtime = runtime_of(request)
    served = runtime.served_model(model_id)
    if served is None:
        raise NotFoundError(f"Model not found: {model_id}")
    return model_object(runtime, served.variant, served.demo)


def progress_fraction(job: Job) -> float:
    """How far a job is, 0..1: 1 once it succeeded, else its denoising step over the total."""
    if job.status is JobStatus.SUCCEEDED:
        return 1.0
    if job.progress_total <= 0:
        return 0.0
    return round(min(1.0, job.progress_step / job.progress_total), 4)


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


def generation_objects(runtime: Runtime, jobs: list[Job]) -> list[dict[str, Any]]:
    """Queue items for ``jobs``, with every queue position from one store query (blocking: call it
    from a worker thread, never on the event loop)."""
    positions = runtime.service.queue_positions(jobs)
    return [generation_object(runtime, job, positions.get(job.id)) for job in jobs]


def generation_object(runtime: Runtime, job: Job, queue_position: int | None = None) -> dict[str, Any]:
    """A queue item as Oxen shapes it, plus kleinserve's extras (progress, queue position, size)."""
    outputs = outputs_of(job)
    item: dict[str, Any] = {
        "generation_id": job.id,
        "model_name": job.extra.get("model", oxen_id(find_variant(job.request.model))),
        "prompt": job.request.prompt,
        "media_type": "image",
        "status": job.status.value,
        "result_url": result_url(runtime, outputs[0]) if outputs else None,
        "error_message": job.error_message,
        "enqueued_at": _ts(job.created_at),
        "started_at": _ts(job.started_at),
        "completed_at": _ts(job.completed_at),
    }
    echoed = {k: v for k, v in job.extra.items() if k not in item and k not in ("model", "response_format")}
    item.update(echoed)
    item["seed"] = job.request.seed
    # A number, as Oxen's queue clients parse it; the step counts in their own fields.
    item["progress"] = progress_fraction(job)
    item["progress_step"], item["progress_total"] = job.progress_step, job.progress_total
    if job.status is JobStatus.QUEUED:
        item["queue_position"] = queue_position or 0
    if outputs:
        item["width"], item["height"] = outputs[0].width, outputs[0].height
    if job.safety is not None:  # kleinserve's extension: the safety checker's verdict and scores
        item["safety"] = job.safety.model_dump(mode="json")
    return item


def _frame(**fields: Any) -> ServerSentEvent:
    # Plain "\n" line ends: the seeds' awk client matches "^event: media_generation_completed$".
    return ServerSentEvent(sep="\n", **fields)


def _compact(data: dict[str, Any]) -> str:
    # One line, no spaces: the seeds' awk client greps for "generation_id":"<id>" literally.
    return json.dumps(data, separators=(",", ":"))


# Event data for waiters inside the server (the job's final state), not for SSE clients.
_INTERNAL_DATA = frozenset({"state", "extra"})
_OWN_EVENTS = {
    EventType.QUEUED: "kleinserve.generation.queued",
    EventType.STARTED: "kleinserve.generation.started",
    EventType.PROGRESS: "kleinserve.generation.progress",
    EventType.FAILED: "kleinserve.generation.failed",
    EventType.CANCELLED: "kleinserve.generation.cancelled",
    EventType.PREVIEW: "kleinserve.generation.preview",  # only with ?previews=true
}


def to_sse(runtime: Runtime, event: Event) -> list[ServerSentEvent]:
    """The SSE frames for one job event: Oxen's completion event, then kleinserve's own."""
    frames: list[ServerSentEvent] = []
    job_id = event.job_id
    if event.type is EventType.SUCCEEDED:
        # The event carries the result: no store read per subscriber (see jobs/events.py).
        result = (event.data.get("state") or {}).get("result") or {}
        outputs = [JobOutput.model_validate(o) for o in result.get("outputs", [])]
        model = event.data.get("model")
        extra = event.data.get("extra") or {}
        payload: dict[str, Any] = {
            "generation_id": job_id,
            "status": "succeeded",
            "media_type": "image",
            "model": extra.get("model") or (oxen_id(find_variant(model)) if model else None),
            "url": result_url(runtime, outputs[0]) if outputs else None,
        }
        frames.append(_frame(data=_compact(payload), event=COMPLETED, id=str(event.seq)))
    elif event.type is EventType.FAILED:
        payload = {"generation_id": job_id, "status": "failed", "media_type": "image", "error": event.data.get("error")}
        frames.append(_frame(data=_compact(payload), event=COMPLETED, id=str(event.seq)))
    own = _OWN_EVENTS.get(event.type)
    if own is not None:
        shown = {k: v for k, v in event.data.items() if k not in _INTERNAL_DATA}
        data = {"generation_id": job_id, "status": event.type.value.removeprefix("job."), **shown}
        if event.type is EventType.PREVIEW and isinstance(event.data.get("key"), str):
            data["url"] = runtime.storage.url(event.data["key"])  # signed here, by the API's storage
        frames.append(_frame(data=_compact(data), event=own, id=str(event.seq)))
    return frames


def model_object(runtime: Runtime, variant: Variant, demo: bool) -> dict[str, Any]:
    """A model as Oxen's /models lists it, with the request schema under both of Oxen's keys."""
    steps = "fixed 4-step distilled" if variant.distilled else "undistilled, 50 steps with true CFG"
    return {
        "id": oxen_id(variant),
        "object": "model",
        "created": int(runtime.started_at),
        "owned_by": "black-forest-labs",
        "display_name": variant.display_name,
        "description": f"{variant.display_name} from Black Forest Labs ({steps}), served by kleinserve.",
        "summary": f"{variant.display_name}: text-to-image and multi-reference editing.",
        "model_type": "base",
        "endpoint": "/images/generate",
        "capabilities": {"input": ["text", "image"], "output": ["image"]},
        "pricing": {"method": "per_image", "cost_per_image": None},
        "fine_tuning": None,
        "deployments": [{"status": "active"}],
        "developer": {"name": "Black Forest Labs", "logo": None},
        "source_model": variant.repo_id,
        "image_url": None,
        "released_at": None,
        "license": variant.license,
        "defaults": {"num_inference_steps": variant.default_steps, "guidance_scale": variant.default_guidance},
        "aliases": list(variant.all_names()),
        "demo": demo,
        "request_schema": REQUEST_SCHEMA,
        "json_request_schema": REQUEST_SCHEMA,
    }
