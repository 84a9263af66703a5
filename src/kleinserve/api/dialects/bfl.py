"""The Black Forest Labs API dialect: ``POST /v1/flux-2-klein-4b`` (and 9b), then poll ``get_result``.

Compatibility notes: docs/api/bfl.md. BFL's API is asynchronous only: a submit answers
``{"id", "polling_url", ...}`` at once, and ``GET /v1/get_result?id=`` (the polling URL) answers
``{"id", "status", "result", "progress", "details", "preview"}`` until ``status`` is ``Ready``, with
``result.sample`` a signed, expiring URL of the image. Choices where BFL is silent or klein differs
(published in the README):

- Paths: BFL's klein ids ``flux-2-klein-4b`` and ``flux-2-klein-9b``, and ``flux-2-klein-9b-preview``
  (BFL's preview of 9B: here the same 9B weights). BFL has no Base or KV endpoint, so neither is
  invented here; a klein id this server does not serve is a 404.
- ``input_image`` ... ``input_image_4``: URLs or base64 (bare or data URI); the first one present is
  the first reference. Leaving ``width``/``height`` out (or 0, BFL's default) gives the first input's
  size, else 1024 x 1024; both must be multiples of 16 within the server's size rule.
- ``output_format`` defaults to ``jpeg`` as BFL's does; ``png`` and ``webp`` too.
- ``safety_tolerance`` (0-5, default 2) moves the output safety checker's threshold when the operator
  runs one (safety.py: 2 is the operator's threshold, 0-1 stricter, 3-5 looser only where clients may
  skip the checker); without a checker it is accepted and has no effect. kleinserve moderates no
  inputs, so ``Request Moderated`` is never answered; ``Content Moderated`` is a job the checker
  refused (policy ``refuse``).
- ``webhook_url``: delivered by kleinserve's webhook machinery (api/webhooks_http.py): when the task
  ends, a POST of kleinserve's job payload (``type`` ``job.succeeded``/``job.failed``/...,
  ``data.id`` = the task id, ``data.outputs[].url``), signed as Standard Webhooks say with the
  caller's secret (``GET /api/webhooks/secret``); the URL is checked now (a 400 names it). BFL's own
  payload shape is not reproduced, and ``webhook_secret`` (BFL's per-request secret) is a 400: a
  delivery is never signed with a secret other than the one the server reports.
- Unknown body fields are a 400 naming the field (BFL would ignore them; a klein client sending
  e.g. ``aspect_ratio`` or ``steps`` would silently get something else).
- ``get_result`` of an unknown id (or another key's) answers 200 with ``status: "Task not found"``,
  as BFL's OpenAPI documents only 200 for it. ``progress`` is the denoising fraction 0-1.
- A submit's ``input_mp`` is the megapixels of the input images as sent, summed (0.0 without any,
  as BFL answers a text-to-image task); ``output_mp`` those of the output, ``null`` when its size
  is left to the first input; ``cost`` the operator's price for the job (``null`` when free).
- Errors: FastAPI's shape, as BFL's API is FastAPI: ``{"detail": [{"loc", "msg", "type"}]}`` for a
  bad parameter (status 400 here where BFL says 422; ``loc`` starts with where it was: ``body``, or
  ``query`` for ``get_result``'s ``id``), ``{"detail": "<message>"}`` otherwise. Every path under
  ``/v1/flux-`` is BFL's: a model route this server does not have is BFL's 404,
  ``{"detail": "Not Found"}``.
- The key comes in ``x-key`` (also any header api/auth.py reads).
"""

from __future__ import annotations

import asyncio
import io
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from kleinserve.api.auth import CallerDep
from kleinserve.api.dialects.base import (
    Example,
    FieldNames,
    client_image_error,
    example_request,
    to_request,
    unsaid,
    unsaid_note,
)
from kleinserve.api.jobs_http import ReadyRuntime, outputs_of, result_url, runtime_of
from kleinserve.api.webhooks_http import checked_webhook, webhook_from_header
from kleinserve.engine.images import ASSET_PREFIX
from kleinserve.engine.variants import Variant
from kleinserve.errors import InvalidParameterError, InvalidRequestError, KleinserveError, NotFoundError
from kleinserve.jobs.job import Job, JobStatus
from kleinserve.request import MAX_SEED, GenerationRequest
from kleinserve.runtime import Runtime

NAME = "bfl"
PREFIX = "/v1"
RESULT_PATH = f"{PREFIX}/get_result"
# BFL endpoint id -> the variant it runs.
ENDPOINTS: dict[str, str] = {
    "flux-2-klein-4b": "flux-2-klein-4b",
    "flux-2-klein-9b": "flux-2-klein-9b",
    "flux-2-klein-9b-preview": "flux-2-klein-9b",
}
IMAGE_FIELDS = ("input_image", "input_image_2", "input_image_3", "input_image_4")
MODERATED_CODES = frozenset({"content_policy_violation"})
NAMES = FieldNames({"images": "input_image", "size": "width/height"})


class BflKleinRequest(BaseModel):
    """Body of ``POST /v1/flux-2-klein-4b`` and ``/v1/flux-2-klein-9b``."""

    model_config = ConfigDict(extra="forbid", title="FLUX.2 [klein] (BFL API)")

    prompt: str = Field(..., description="Text prompt for image generation or editing.")
    input_image: str | None = Field(None, description="First input image: URL or base64.")
    input_image_2: str | None = Field(None, description="Second input image.")
    input_image_3: str | None = Field(None, description="Third input image.")
    input_image_4: str | None = Field(None, description="Fourth input image.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed for reproducibility; default random.")
    width: int | None = Field(None, description="Output width (multiple of 16); 0 or absent: automatic.")
    height: int | None = Field(None, description="Output height (multiple of 16); 0 or absent: automatic.")
    safety_tolerance: int = Field(2, ge=0, le=5, description="0 strictest .. 5 least strict (see the README).")
    output_format: Literal["jpeg", "png", "webp"] | None = Field("jpeg", description="Image format.")
    webhook_url: str | None = Field(
        None, min_length=1, max_length=2083, description="POSTed (signed, kleinserve's payload) when the task ends."
    )
    webhook_secret: str | None = Field(None, description="Refused: deliveries are signed with the key's secret.")

    def images(self) -> list[str]:
        return [value for name in IMAGE_FIELDS if (value := getattr(self, name)) is not None]


def to_generation_request(body: BflKleinRequest, variant_id: str, runtime: Runtime) -> GenerationRequest:
    """The canonical request for ``body`` on ``variant_id`` (errors name BFL's fields)."""
    if body.webhook_secret is not None:
        raise InvalidParameterError(
            "webhook_secret",
            "per-request secrets are not supported: deliveries are signed with your key's Standard Webhooks "
            "secret (GET /api/webhooks/secret)",
        )
    width = body.width or None  # 0 is BFL's "automatic"
    height = body.height or None
    return to_request(
        {
            "model": runtime.service.check_model(variant_id),
            "prompt": body.prompt,
            "images": body.images(),
            "width": width,
            "height": height,
            "seed": body.seed,
            "output_format": body.output_format or "jpeg",
            "safety_tolerance": body.safety_tolerance,
        },
        runtime.settings,
        NAMES,
    )


def _status(job: Job) -> str:
    if job.status is JobStatus.SUCCEEDED:
        return "Ready"
    if job.status in (JobStatus.QUEUED, JobStatus.PROCESSING):
        return "Pending"
    if job.error_code in MODERATED_CODES:
        return "Content Moderated"
    return "Error"


def not_found(task_id: str) -> dict[str, Any]:
    return {"id": task_id, "status": "Task not found", "result": None, "progress": None, "details": None}


def result_response(runtime: Runtime, job: Job) -> dict[str, Any]:
    """A job as BFL's ``ResultResponse`` (blocking: signing a URL may call the storage)."""
    status = _status(job)
    body: dict[str, Any] = {"id": job.id, "status": status, "result": None, "progress": None, "details": None}
    if status == "Pending":
        total = job.progress_total
        body["progress"] = round(job.progress_step / total, 4) if total else 0.0
    elif status == "Ready":
        outputs = outputs_of(job)
        first = outputs[0]
        started = job.started_at or job.created_at
        ended = job.completed_at or started
        body["result"] = {
            "sample": result_url(runtime, first),
            "prompt": job.request.prompt,
            "seed": first.seed,
            "width": first.width,
            "height": first.height,
            "start_time": started,
            "end_time": ended,
            "duration": round(ended - started, 3),
        }
    else:
        body["details"] = {"code": job.error_code or job.status.value, "message": job.error_message}
    return body


def polling_url(runtime: Runtime, task_id: str) -> str:
    return f"{runtime.settings.link_base_url()}{RESULT_PATH}?id={task_id}"


router = APIRouter(prefix=PREFIX, tags=["bfl"])


def _input_image_field(index: int) -> str:
    """BFL's name for reference ``index``: input_image, input_image_2 ... input_image_4."""
    return "input_image" if index == 0 else f"input_image_{index + 1}"


async def _submit(
    request: Request, endpoint: str, body: BflKleinRequest, runtime: Runtime, caller: CallerDep
) -> dict[str, Any]:
    gen = to_generation_request(body, ENDPOINTS[endpoint], runtime)
    webhook_url = await checked_webhook(runtime, body.webhook_url, "webhook_url") or await webhook_from_header(
        request, runtime
    )
    extra = {"model": endpoint, "safety_tolerance": body.safety_tolerance}
    try:  # submitting checks the references: name them as the client did
        (job,) = await asyncio.to_thread(
            runtime.service.submit, [gen], key=caller.key, dialect=NAME, extra=extra, webhook_url=webhook_url
        )
    except InvalidRequestError as err:
        raise client_image_error(err, _input_image_field) from None
    output_mp = round(gen.width * gen.height / 1_000_000, 4) if gen.width and gen.height else None
    input_mp = await asyncio.to_thread(input_megapixels, runtime, job.request)
    return {
        "id": job.id,
        "polling_url": polling_url(runtime, job.id),
        "cost": job.cost or None,
        "input_mp": input_mp,
        "output_mp": output_mp,
    }


def input_megapixels(runtime: Runtime, request: GenerationRequest) -> float | None:
    """BFL's ``input_mp``: the megapixels of the input images as sent, summed (each listed image
    counts, as BFL prices each input), 0.0 without any, as BFL answers a text-to-image task. Read from
    the headers of the stored inputs (staged by now); ``None`` if one cannot be read."""
    pixels = 0
    for source in request.images:
        try:
            data = runtime.read_asset(source.strip().removeprefix(ASSET_PREFIX))
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except (KleinserveError, OSError, ValueError):
            return None
        pixels += width * height
    return round(pixels / 1_000_000, 4)


def _add_endpoint(endpoint: str) -> None:
    async def submit(
        request: Request, body: BflKleinRequest, runtime: ReadyRuntime, caller: CallerDep
    ) -> dict[str, Any]:
        return await _submit(request, endpoint, body, runtime, caller)

    summary = f"Generate or edit an image with {endpoint} (BFL API; poll the polling_url)."
    router.add_api_route(f"/{endpoint}", submit, methods=["POST"], summary=summary, name=f"bfl_{endpoint}")


for _endpoint in ENDPOINTS:
    _add_endpoint(_endpoint)


@router.get("/get_result", summary="A BFL task's status and, once Ready, its result.")
async def get_result(
    request: Request, caller: CallerDep, task_id: str = Query(..., alias="id", max_length=200)
) -> dict[str, Any]:
    runtime = runtime_of(request)

    def found() -> dict[str, Any]:
        try:
            job = runtime.service.get(task_id, **caller.scope)
        except NotFoundError:
            return not_found(task_id)
        return result_response(runtime, job)

    return await asyncio.to_thread(found)


class BflDialect:
    """Black Forest Labs' API for the klein endpoints, under /v1."""

    name = NAME
    prefixes: tuple[str, ...] = (*(f"{PREFIX}/{e}" for e in ENDPOINTS), RESULT_PATH)
    # Every BFL model route is /v1/flux-...: one this server does not have (``flux-2-pro``) is BFL's
    # 404, ``{"detail": "Not Found"}``, not the OpenAI dialect's (which owns the rest of /v1).
    loose_prefixes: tuple[str, ...] = (f"{PREFIX}/flux-",)

    def router(self) -> APIRouter:
        return router

    def error_body(self, error: KleinserveError, status: int) -> dict[str, Any]:
        if isinstance(error, InvalidParameterError) and error.field:
            loc = [error.source, *error.field.split(".")]
            return {"detail": [{"loc": loc, "msg": error.detail, "type": "value_error"}]}
        return {"detail": error.message}

    def model_id(self, variant: Variant) -> str:
        return bfl_endpoint(variant)

    def example(self, variant: Variant, request: GenerationRequest | None = None) -> Example:
        req = example_request(variant, request)
        body: dict[str, Any] = {"prompt": req.prompt}
        carried = {"model", "prompt", "width", "height", "seed", "output_format", "safety_tolerance"}
        for name, image in zip(IMAGE_FIELDS, req.images, strict=False):
            body[name] = image
        if len(req.images) <= len(IMAGE_FIELDS):
            carried.add("images")
        if req.width is not None and req.height is not None:  # left out: BFL's automatic size
            body.update(width=req.width, height=req.height)
        if req.seed is not None:
            body["seed"] = req.seed
        body["output_format"] = req.output_format.value  # BFL's default is jpeg
        if req.safety_tolerance is not None:
            body["safety_tolerance"] = req.safety_tolerance
        dropped = unsaid(req, carried)
        return Example(
            dialect=NAME,
            title="BFL API: submit, then poll polling_url",
            method="POST",
            path=f"{PREFIX}/{bfl_endpoint(variant)}",
            body=body,
            auth_header="x-key",
            auth_scheme="",
            notes=(
                "Answers {id, polling_url}; GET the polling_url until status is Ready, then fetch result.sample.",
                *unsaid_note("The BFL API", dropped),
            ),
            unsaid=dropped,
            served=bfl_endpoint(variant) in ENDPOINTS,
        )


def bfl_endpoint(variant: Variant) -> str:
    """BFL's endpoint id for ``variant`` (its own id for the two BFL serves; ours for the rest)."""
    return variant.id
