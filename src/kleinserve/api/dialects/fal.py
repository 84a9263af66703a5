"""The fal.ai queue dialect for the klein endpoints: submit, status, result, cancel.

Compatibility notes: docs/api/fal.md. fal's queue protocol on kleinserve's queue:
``POST /fal-ai/flux-2/klein/4b`` (or ``/9b``, ``/4b/base``, ``/9b/base`` and each with ``/edit``)
answers ``{"request_id", "response_url", "status_url", "cancel_url", "queue_position"}``;
``GET /fal-ai/flux-2/requests/<id>/status`` answers ``IN_QUEUE`` / ``IN_PROGRESS`` (202) or
``COMPLETED`` (200); ``GET /fal-ai/flux-2/requests/<id>`` the result ``{"images": [{"url", "width",
"height", "content_type"}], "seed", "prompt", "has_nsfw_concepts", "timings"}``; ``PUT
.../cancel`` cancels. The key comes as ``Authorization: Key <key>``. Choices (README):

- Distilled endpoints take ``num_inference_steps`` 4-8 (default 4) as fal documents; the Base ones
  ``guidance_scale``, ``negative_prompt`` (true CFG) and steps 1-``KLEINSERVE_MAX_STEPS``, left out
  the variant's own defaults (50 steps, guidance 4.0); ``guidance_scale`` or ``negative_prompt`` on
  a distilled endpoint is a 400 naming it (they have no CFG).
- ``image_size``: fal's presets (``landscape_4_3`` the default for text-to-image) or ``{width,
  height}`` in multiples of 16. On the ``/edit`` endpoints (``image_urls`` required) it defaults to
  the first image's size; ``image_urls`` on a text-to-image endpoint are references too.
- ``num_images`` 1-4 (the server's ``KLEINSERVE_MAX_IMAGES`` may lower it); image *i* uses ``seed + i``.
- ``output_format`` ``png`` (default), ``jpeg``, ``webp``. ``sync_mode: true`` returns the images
  as data URIs in the result (the files are still kept until retention removes them).
- ``enable_safety_checker: false`` skips the output safety checker where the operator runs one and
  lets clients skip it; ``has_nsfw_concepts`` is the checker's verdict per image (all false when no
  checker ran); a job the checker refused (policy ``refuse``) ends as an error.
- There is no separate synchronous host (fal.run): a client submits and polls, as fal's queue
  clients do. A result fetched before completion is a 400 ``Request is still in progress``; a failed
  job's result is its error. Unknown fields are a 400 naming them.
- ``?fal_webhook=<url>`` on a submit (what ``fal-client``'s ``webhook_url`` sends) is delivered by
  kleinserve's webhook machinery when the request ends: kleinserve's signed job payload (Standard
  Webhooks), not fal's webhook body.
- Errors: FastAPI's shape (fal's apps are FastAPI-style): ``{"detail": [{"loc", "msg", "type"}]}``
  for a bad parameter (HTTP 400 where fal says 422), ``{"detail": "<message>"}`` otherwise.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from kleinserve.api.auth import CallerDep
from kleinserve.api.dialects.base import (
    Example,
    FieldNames,
    client_image_error,
    example_request,
    output_size,
    to_request,
    unsaid,
    unsaid_note,
)
from kleinserve.api.dialects.oxen_schema import IMAGE_SIZE_PRESETS
from kleinserve.api.jobs_http import ReadyRuntime, job_error, outputs_of, result_url, runtime_of
from kleinserve.api.webhooks_http import checked_webhook, webhook_from_header
from kleinserve.engine.variants import Variant, find_variant
from kleinserve.errors import InvalidParameterError, InvalidRequestError, KleinserveError
from kleinserve.jobs.job import Job, JobStatus
from kleinserve.request import MAX_SEED, GenerationRequest
from kleinserve.runtime import Runtime

NAME = "fal"
APP = "/fal-ai/flux-2"
# fal endpoint (after fal-ai/flux-2/) -> (variant, is an /edit endpoint).
ENDPOINTS: dict[str, tuple[str, bool]] = {
    "klein/4b": ("flux-2-klein-4b", False),
    "klein/9b": ("flux-2-klein-9b", False),
    "klein/4b/base": ("flux-2-klein-base-4b", False),
    "klein/9b/base": ("flux-2-klein-base-9b", False),
    "klein/4b/edit": ("flux-2-klein-4b", True),
    "klein/9b/edit": ("flux-2-klein-9b", True),
    "klein/4b/base/edit": ("flux-2-klein-base-4b", True),
    "klein/9b/base/edit": ("flux-2-klein-base-9b", True),
}
DEFAULT_IMAGE_SIZE = "landscape_4_3"
DISTILLED_STEPS = (4, 8)  # fal's documented range on the distilled endpoints
NAMES = FieldNames(
    {
        "steps": "num_inference_steps",
        "guidance": "guidance_scale",
        "images": "image_urls",
        "size": "image_size",
        "width": "image_size.width",
        "height": "image_size.height",
    }
)


class ImageSize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    width: int
    height: int


class FalKleinInput(BaseModel):
    """Input of every klein endpoint (distilled, Base, and their /edit forms)."""

    model_config = ConfigDict(extra="forbid", title="FLUX.2 [klein] (fal queue)")

    prompt: str = Field(..., description="The prompt to generate an image from.")
    image_urls: list[str] | None = Field(None, description="Images to edit (required on /edit).")
    image_size: Literal[tuple(IMAGE_SIZE_PRESETS)] | ImageSize | None = Field(  # type: ignore[valid-type]
        None, description="A preset or {width, height}; default landscape_4_3 (edit: the first image's size)."
    )
    num_inference_steps: int | None = Field(None, ge=1, description="4-8 distilled; Base: default 50.")
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False, description="Base only.")
    negative_prompt: str | None = Field(None, description="Base only: true CFG against this text.")
    num_images: int = Field(1, ge=1, le=4, description="Images to generate.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed; default random.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Output format.")
    enable_safety_checker: bool = Field(True, description="False skips the safety checker, where allowed.")
    sync_mode: bool = Field(False, description="Return the images as data URIs.")


def to_generation_request(endpoint: str, body: FalKleinInput, runtime: Runtime) -> GenerationRequest:
    """The canonical request for ``body`` at ``endpoint`` (errors name fal's fields)."""
    variant_id, edit = ENDPOINTS[endpoint]
    variant = find_variant(runtime.service.check_model(variant_id))
    images = body.image_urls or []
    if edit and not images:
        raise InvalidParameterError("image_urls", f"is required on fal-ai/flux-2/{endpoint}")
    if variant.distilled:
        for name in ("guidance_scale", "negative_prompt"):
            if getattr(body, name) is not None:
                raise InvalidParameterError(name, f"fal-ai/flux-2/{endpoint} is guidance-distilled and takes no {name}")
        low, high = DISTILLED_STEPS
        if body.num_inference_steps is not None and not low <= body.num_inference_steps <= high:
            raise InvalidParameterError("num_inference_steps", f"must be {low}-{high}; got {body.num_inference_steps}")
    size = body.image_size if body.image_size is not None else (None if images else DEFAULT_IMAGE_SIZE)
    width, height = (
        (size.width, size.height) if isinstance(size, ImageSize) else IMAGE_SIZE_PRESETS[size] if size else (None, None)
    )
    return to_request(
        {
            "model": variant.id,
            "prompt": body.prompt,
            "negative_prompt": body.negative_prompt,
            "images": images,
            "width": width,
            "height": height,
            "steps": body.num_inference_steps,
            "guidance": body.guidance_scale,
            "seed": body.seed,
            "num_images": body.num_images,
            "output_format": body.output_format,
            "safety_check": body.enable_safety_checker,
        },
        runtime.settings,
        NAMES,
    )


def request_urls(runtime: Runtime, request_id: str) -> dict[str, str]:
    base = f"{runtime.settings.link_base_url()}{APP}/requests/{request_id}"
    return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}


def status_body(runtime: Runtime, job: Job, position: int | None, logs: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"request_id": job.id, **request_urls(runtime, job.id)}
    lines = []
    if logs and job.progress_total:
        lines = [{"message": f"denoising step {job.progress_step}/{job.progress_total}", "level": "INFO"}]
    if job.status is JobStatus.QUEUED:
        body.update(status="IN_QUEUE", queue_position=position or 0)
    elif job.status is JobStatus.PROCESSING:
        body.update(status="IN_PROGRESS", logs=lines if logs else None)
    else:
        body.update(status="COMPLETED", logs=lines if logs else None, metrics={})
        if job.started_at is not None and job.completed_at is not None:
            body["metrics"] = {"inference_time": round(job.completed_at - job.started_at, 3)}
        if job.status is not JobStatus.SUCCEEDED:
            body["error"] = job.error_message or f"request {job.status.value}"
            body["error_type"] = job.error_code or job.status.value
    return body


def result_body(runtime: Runtime, job: Job) -> dict[str, Any]:
    """A finished job as the klein endpoints' output (blocking: reads files with ``sync_mode``)."""
    if not job.terminal:
        raise InvalidRequestError("Request is still in progress", code="in_progress")
    if job.status is not JobStatus.SUCCEEDED:
        raise job_error(job)
    sync = bool(job.extra.get("sync_mode"))
    images = []
    for output in outputs_of(job):
        if sync:
            data = base64.b64encode(runtime.read_asset(output.key)).decode()
            url = f"data:{output.media_type};base64,{data}"
        else:
            url = result_url(runtime, output)
        images.append({"url": url, "width": output.width, "height": output.height, "content_type": output.media_type})
    timings = dict(job.result.timings) if job.result else {}
    return {
        "images": images,
        "seed": job.request.seed,
        "prompt": job.request.prompt,
        "has_nsfw_concepts": list(job.safety.flagged) if job.safety else [False] * len(images),
        "timings": timings,
    }


router = APIRouter(prefix=APP, tags=["fal"])


def _add_endpoint(endpoint: str) -> None:
    async def submit(
        request: Request,
        body: FalKleinInput,
        runtime: ReadyRuntime,
        caller: CallerDep,
        fal_webhook: str | None = Query(None, max_length=2048),
    ) -> dict[str, Any]:
        gen = to_generation_request(endpoint, body, runtime)
        webhook_url = await checked_webhook(runtime, fal_webhook, "fal_webhook", "query") or await webhook_from_header(
            request, runtime
        )
        extra = {"model": f"fal-ai/flux-2/{endpoint}", "sync_mode": body.sync_mode}
        try:  # submitting checks the references: name them as the client did
            (job,) = await asyncio.to_thread(
                runtime.service.submit, [gen], key=caller.key, dialect=NAME, extra=extra, webhook_url=webhook_url
            )
        except InvalidRequestError as err:
            raise client_image_error(err, "image_urls") from None
        position = (await asyncio.to_thread(runtime.service.queue_positions, [job])).get(job.id, 0)
        return {"request_id": job.id, **request_urls(runtime, job.id), "status": "IN_QUEUE", "queue_position": position}

    summary = f"Queue a request to fal-ai/flux-2/{endpoint}."
    router.add_api_route(f"/{endpoint}", submit, methods=["POST"], summary=summary, name=f"fal_{endpoint}")


for _endpoint in ENDPOINTS:
    _add_endpoint(_endpoint)


@router.get("/requests/{request_id}/status", summary="A queued request's status.")
async def request_status(
    request: Request, request_id: str, caller: CallerDep, logs: str = Query("0", max_length=10)
) -> JSONResponse:
    runtime = runtime_of(request)

    def found() -> dict[str, Any]:
        job = runtime.service.get(request_id, **caller.scope)
        position = runtime.service.queue_positions([job]).get(job.id)
        return status_body(runtime, job, position, logs.strip().lower() in ("1", "true", "yes"))

    body = await asyncio.to_thread(found)
    return JSONResponse(body, status_code=200 if body["status"] == "COMPLETED" else 202)


@router.get("/requests/{request_id}", summary="A completed request's result.")
async def request_result(request: Request, request_id: str, caller: CallerDep) -> dict[str, Any]:
    runtime = runtime_of(request)
    return await asyncio.to_thread(lambda: result_body(runtime, runtime.service.get(request_id, **caller.scope)))


@router.put("/requests/{request_id}/cancel", summary="Cancel a queued or running request.")
async def cancel_request(request: Request, request_id: str, caller: CallerDep) -> JSONResponse:
    runtime = runtime_of(request)
    before = await asyncio.to_thread(runtime.service.get, request_id, **caller.scope)
    if before.terminal:
        return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
    await asyncio.to_thread(runtime.service.cancel, request_id, **caller.scope)
    return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)


class FalDialect:
    """fal.ai's queue API for the klein endpoints, under /fal-ai/flux-2."""

    name = NAME
    prefixes: tuple[str, ...] = (APP,)

    def router(self) -> APIRouter:
        return router

    def error_body(self, error: KleinserveError, status: int) -> dict[str, Any]:
        if isinstance(error, InvalidParameterError) and error.field:
            loc = [error.source, *error.field.split(".")]
            return {"detail": [{"loc": loc, "msg": error.detail, "type": "value_error"}]}
        return {"detail": error.message, "error_type": error.code}

    def model_id(self, variant: Variant) -> str:
        return fal_endpoint(variant)

    def example(self, variant: Variant, request: GenerationRequest | None = None) -> Example:
        req = example_request(variant, request)
        body: dict[str, Any] = {"prompt": req.prompt}
        carried = {"model", "prompt", "negative_prompt", "images", "width", "height", "steps", "guidance"}
        carried |= {"num_images", "seed", "output_format", "safety_check"}
        if req.images:
            body["image_urls"] = list(req.images)
        if (size := output_size(req)) is not None:
            body["image_size"] = {"width": size[0], "height": size[1]}
        if req.steps is not None:
            body["num_inference_steps"] = req.steps
        if req.guidance is not None and not variant.distilled:  # the distilled endpoints take none
            body["guidance_scale"] = req.guidance
        if req.negative_prompt is not None:
            body["negative_prompt"] = req.negative_prompt
        if req.num_images > 1:
            body["num_images"] = req.num_images
        if req.seed is not None:
            body["seed"] = req.seed
        if req.output_format.value != "png":
            body["output_format"] = req.output_format.value
        if not req.safety_check:
            body["enable_safety_checker"] = False
        dropped = unsaid(req, carried)
        endpoint = fal_endpoint(variant, edit=bool(req.images))
        return Example(
            dialect=NAME,
            title="fal queue: submit, then poll status_url and fetch response_url",
            method="POST",
            path=f"/{endpoint}",
            body=body,
            auth_header="Authorization",
            auth_scheme="Key ",
            notes=("Answers {request_id, status_url, response_url, cancel_url}.", *unsaid_note("fal", dropped)),
            unsaid=dropped,
            served=endpoint.removeprefix("fal-ai/flux-2/") in ENDPOINTS,
        )


def fal_endpoint(variant: Variant, *, edit: bool = False) -> str:
    """fal's endpoint id for ``variant`` (e.g. ``fal-ai/flux-2/klein/4b/base``; ``edit``: its /edit one)."""
    for endpoint, (variant_id, is_edit) in ENDPOINTS.items():
        if variant_id == variant.id and is_edit == edit:
            return f"fal-ai/flux-2/{endpoint}"
    return f"fal-ai/flux-2/klein/{variant.id}"
