"""The Verda (formerly DataCrunch) dialect: ``POST /<slug>/generate``, one path per klein variant.

Compatibility notes: docs/api/verda.md. The model is the path slug; the request is JSON; the answer is
synchronous: the raw image with ``X-Seed`` and ``X-Has-Nsfw-Content`` headers, or JSON with
``enable_base64_output``. Choices where Verda is silent (published in the README):

- klein 4B / 9B are step- and guidance-distilled: ``num_steps`` 4 and ``guidance`` 1.0 are fixed.
  Sending exactly those values is accepted, any other value is a 400. Base 4B / 9B default to
  50 / 4.0 and take any value within the server's bounds (``KLEINSERVE_MAX_STEPS``,
  ``KLEINSERVE_MAX_GUIDANCE``).
- ``width`` x ``height`` default to 1024 x 768, as Verda documents, *also* with ``input_images``
  (Verda states no "match the input" rule); a client that wants the input's size sends it.
- ``input_images``: at most 4, each an http(s) URL, bare base64 or a ``data:image/...;base64,`` URI.
- ``output_format`` also takes ``jpg`` (reported as ``jpeg``); ``output_quality`` is ignored for png.
- Safety: with a safety checker (``--safety-checker``), ``X-Has-Nsfw-Content`` and
  ``has_nsfw_content`` carry its verdict on the image (with the ``blur`` policy a flagged image is
  returned blurred and reported ``true``; with ``refuse`` the answer is a 400
  ``content_policy_violation``). ``enable_safety_checker: false`` skips it only when the operator
  allows clients to (``--safety-allow-disable``). When no checker ran, ``false`` is only ever sent
  together with ``X-Kleinserve-Safety-Checker: unavailable``, so a client can tell "not checked"
  from "checked and clean".
- Provisional, because Verda's examples were lost from our copy of its page (and no other public
  copy was found): the base64 JSON is ``{"image", "seed", "has_nsfw_content", "output_format",
  "width", "height"}``, and errors are FastAPI-style ``{"detail": "<message>", "code": "<code>"}``.
- ``GET /<slug>/health`` answers 200 once the model can generate (503 while loading), as the SDK's
  ``health()`` expects.
- Verda's asynchronous inference, which the SDK's ``run()`` uses: ``Prefer: respond-async`` (or its
  ``-proxy`` / ``-container`` forms) queues the request on the job queue and answers 202
  ``{"Id", "StatusPath", "ResultPath"}`` with ``X-Inference-Id`` and ``Location``;
  ``GET /status/<slug>`` (header ``X-Inference-Id``) says ``Queue``, ``Inference`` or ``Completed``
  (``Initialized`` is only the SDK's own state before its first poll), with ``QueuePosition`` and
  ``Progress`` where known; ``GET /result/<slug>`` answers as the sync call would (bytes or base64
  JSON, or the error that ended the job), or 202 with the status while it is not done. Other
  preferences (``wait=N``, malformed ones) are ignored as RFC 7240 requires: the call answers
  synchronously (:func:`async_preference`).
- ``Authorization: Bearer <key>`` is accepted and not checked yet; unknown body fields are a 400
  naming the field; a klein slug this server does not serve, or any other ``POST /<slug>/generate``,
  is a 404 in the same shape.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Request, Response, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from kleinserve.api.auth import Caller, CallerDep
from kleinserve.api.dialects.base import (
    Example,
    FieldNames,
    client_image_error,
    example_request,
    lora_header,
    output_size,
    submit_and_wait,
    to_request,
    unsaid,
    unsaid_note,
)
from kleinserve.api.errors import status_for
from kleinserve.api.jobs_http import ReadyRuntime, job_error, outputs_of, runtime_of
from kleinserve.engine.images import ASSET_PREFIX
from kleinserve.engine.variants import Variant, find_variant
from kleinserve.errors import (
    InvalidParameterError,
    InvalidRequestError,
    KleinserveError,
    NotFoundError,
    UnknownModelError,
)
from kleinserve.jobs.job import Job, JobOutput, JobStatus
from kleinserve.request import MAX_SEED, GenerationRequest
from kleinserve.runtime import Runtime
from kleinserve.settings import Settings

SLUGS: tuple[str, ...] = ("flux2-klein-4b", "flux2-klein-9b", "flux2-klein-base-4b", "flux2-klein-base-9b")
DEFAULT_WIDTH, DEFAULT_HEIGHT = 1024, 768
MAX_INPUT_IMAGES = 4  # Verda's documented limit; KLEINSERVE_MAX_REFERENCES may only lower it.
SAFETY_HEADER = "X-Kleinserve-Safety-Checker"
INFERENCE_ID = "X-Inference-Id"
# Verda's async statuses; a job that ended in any way is "Completed" (its result says how).
ASYNC_STATUS = {
    JobStatus.QUEUED: "Queue",
    JobStatus.PROCESSING: "Inference",
    JobStatus.SUCCEEDED: "Completed",
    JobStatus.FAILED: "Completed",
    JobStatus.CANCELLED: "Completed",
}
NAME = "verda"
# Canonical field -> the Verda name a client sent, for error messages.
NAMES = FieldNames(
    {"steps": "num_steps", "images": "input_images", "quality": "output_quality", "size": "width/height"}
)
# Declared so the OpenAPI page shows Verda's bearer auth; auto_error=False: nothing is refused yet.
_bearer = HTTPBearer(
    scheme_name="VerdaBearer", auto_error=False, description="Verda API key; accepted, not checked yet."
)
_IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The image bytes (X-Seed, X-Has-Nsfw-Content), or JSON with enable_base64_output.",
        "content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}, "application/json": {}},
    }
}


def verda_slug(variant_id: str) -> str:
    """Verda's path slug of a canonical variant id (``flux-2-klein-4b`` -> ``flux2-klein-4b``)."""
    return variant_id.replace("flux-2-", "flux2-", 1)


def served_slugs(runtime: Runtime) -> list[str]:
    """The slugs this server answers on, for "unknown model" messages."""
    return [verda_slug(model_id) for model_id in runtime.served_ids()]


class VerdaGenerateRequest(BaseModel):
    """Body of ``POST /<slug>/generate`` (text-to-image and image-to-image alike)."""

    model_config = ConfigDict(extra="forbid", title="FLUX.2 [klein] generate request")

    prompt: str = Field(..., description="What to draw, or how to change the input images.")
    width: int = Field(DEFAULT_WIDTH, description="Output width, a multiple of 16.")
    height: int = Field(DEFAULT_HEIGHT, description="Output height, a multiple of 16.")
    num_steps: int | None = Field(None, description="Distilled models: fixed 4. Base models: default 50.")
    guidance: float | None = Field(
        None, allow_inf_nan=False, description="Distilled models: fixed 1.0. Base models: default 4.0."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Omit for a random seed (sent back in X-Seed).")
    input_images: list[str] | None = Field(
        None, description="Up to 4 images: http(s) URLs, base64 strings or data URIs."
    )
    enable_safety_checker: bool = Field(
        True, description="False skips the safety checker, if the operator runs one and lets clients skip it."
    )
    output_format: Literal["jpeg", "jpg", "png", "webp"] = Field("jpeg", description="Image format.")
    output_quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality; ignored for png.")
    enable_base64_output: bool = Field(False, description="true: JSON with base64; false: raw image bytes.")


def _check_fixed(body: VerdaGenerateRequest, variant: Variant) -> None:
    """Verda refuses a different num_steps/guidance on the distilled models; the fixed value itself is fine."""
    if not variant.distilled:
        return
    for name, sent, fixed in (
        ("num_steps", body.num_steps, variant.default_steps),
        ("guidance", body.guidance, variant.default_guidance),
    ):
        if sent is not None and sent != fixed:
            raise InvalidParameterError(
                name, f"is fixed at {fixed} for {variant.display_name}; leave it out or send {fixed}"
            )


def _check_inputs(images: list[str]) -> None:
    if len(images) > MAX_INPUT_IMAGES:
        raise InvalidParameterError("input_images", f"at most {MAX_INPUT_IMAGES} images are allowed; got {len(images)}")
    for index, image in enumerate(images):
        # The engine also reads "asset:" keys (other dialects' uploads); Verda has no uploads.
        if image.strip().startswith(ASSET_PREFIX):
            raise InvalidParameterError(f"input_images[{index}]", "must be an http(s) URL or base64 image data")


def to_generation_request(body: VerdaGenerateRequest, variant: Variant, settings: Settings) -> GenerationRequest:
    """Translate a Verda body to the canonical request (field errors keep Verda's names)."""
    _check_fixed(body, variant)
    images = body.input_images or []
    _check_inputs(images)
    return to_request(
        {
            "model": variant.id,
            "prompt": body.prompt,
            "images": images,
            "width": body.width,
            "height": body.height,
            "steps": body.num_steps,
            "guidance": body.guidance,
            "seed": body.seed,
            "output_format": body.output_format,
            "quality": body.output_quality,
            "safety_check": body.enable_safety_checker,
        },
        settings,
        NAMES,
    )


class ServedVariant:
    """Dependency: the variant behind one slug, or 404 when this server does not serve it.

    A dependency rather than a check in the endpoint, so that it runs before body validation:
    asking for a model that is not here is a 404 whatever the body says.
    """

    def __init__(self, slug: str) -> None:
        self.slug = slug

    def __call__(self, runtime: ReadyRuntime) -> Variant:
        try:
            return find_variant(runtime.service.check_model(self.slug))
        except UnknownModelError:
            raise UnknownModelError(self.slug, served_slugs(runtime)) from None


def has_nsfw(job: Job) -> bool:
    """The safety checker's verdict on the job's (one) image; False when no checker ran."""
    return job.safety is not None and job.safety.any_flagged


def _headers(job: Job, output: JobOutput) -> dict[str, str]:
    if job.safety is not None:
        return {"X-Seed": str(output.seed), "X-Has-Nsfw-Content": str(has_nsfw(job)).lower()}
    # "false" is only ever sent beside SAFETY_HEADER: nothing was checked (see the module docstring).
    return {"X-Seed": str(output.seed), "X-Has-Nsfw-Content": "false", SAFETY_HEADER: "unavailable"}


router = APIRouter(tags=["verda"], dependencies=[Security(_bearer)])


class VerdaDialect:
    """The Verda inference API for the four FLUX.2 [klein] variants."""

    name = NAME
    prefixes: tuple[str, ...] = (*(f"/{slug}" for slug in SLUGS), "/status", "/result")

    def router(self) -> APIRouter:
        return router

    def error_body(self, error: KleinserveError, status: int) -> dict[str, Any]:
        """Provisional: Verda's error example was lost; FastAPI's ``detail`` plus our stable code."""
        return {"detail": error.message, "code": error.code}

    def model_id(self, variant: Variant) -> str:
        return verda_slug(variant.id)

    def example(self, variant: Variant, request: GenerationRequest | None = None) -> Example:
        req = example_request(variant, request)
        carried = {"model", "prompt", "images", "steps", "guidance", "seed", "output_format", "quality"}
        carried |= {"safety_check", "loras"}
        body: dict[str, Any] = {"prompt": req.prompt}
        if (size := output_size(req)) is not None:  # Verda has no "the input's size": 1024x768 then
            body.update(width=size[0], height=size[1])
            carried |= {"width", "height"}
        for name, value in (("num_steps", req.steps), ("guidance", req.guidance), ("seed", req.seed)):
            if value is not None:
                body[name] = value
        if req.images:
            body["input_images"] = list(req.images)
        body["output_format"] = req.output_format.value  # Verda's default is jpeg
        if req.output_format.value != "png":
            body["output_quality"] = req.quality
        if not req.safety_check:
            body["enable_safety_checker"] = False
        # Verda has no "the first image's size": its default size applies then.
        dropped = unsaid(req, carried) + (() if size else ("width", "height"))
        notes = ["The model is the path; the answer is the image's bytes (enable_base64_output: true gives JSON)."]
        if req.num_images > 1:
            notes.append("Verda makes one image per call.")
        return Example(
            dialect=NAME,
            title="Verda: generate (raw image bytes back)",
            method="POST",
            path=f"/{verda_slug(variant.id)}/generate",
            body=body,
            headers=lora_header(req),
            notes=(*notes, *unsaid_note("Verda", dropped)),
            unsaid=dropped,
            response="image",
            served=verda_slug(variant.id) in SLUGS,
        )


def render_output(runtime: Runtime, job: Job, as_base64: bool) -> Response:
    """A succeeded job as Verda answers it: raw bytes with X-Seed, or base64 JSON."""
    (output,) = outputs_of(job)
    data = runtime.read_asset(output.key)
    if not as_base64:
        return Response(data, media_type=output.media_type, headers=_headers(job, output))
    content = {
        "image": base64.b64encode(data).decode(),
        "seed": output.seed,
        "has_nsfw_content": has_nsfw(job),
        "output_format": job.request.output_format.value,
        "width": output.width,
        "height": output.height,
    }
    return JSONResponse(content, headers=_headers(job, output))


def _base(request: Request, runtime: Runtime) -> str:
    return (runtime.settings.public_url or str(request.base_url)).rstrip("/")


def async_preference(prefer: str | None) -> str | None:
    """Verda's ``Prefer: respond-async`` (and its ``-proxy`` / ``-container`` forms): the token sent,
    or ``None`` (answer synchronously).

    Every other preference, ``wait=N`` and malformed ones included, is ignored: RFC 7240 § 2 says a
    server that does not recognize or cannot comply with a preference MUST ignore it and continue
    instead of signaling an error. The 202 names the preference it applied in ``Preference-Applied``."""
    tokens = [part.split(";")[0].strip().lower() for part in (prefer or "").split(",")]
    return next((token for token in tokens if token.startswith("respond-async")), None)


async def generate(
    request: Request, body: VerdaGenerateRequest, runtime: Runtime, caller: Caller, variant: Variant, prefer: str | None
) -> Response:
    """One generation for ``variant``: sync (the image), or queued with Verda's async protocol."""
    gen = to_generation_request(body, variant, runtime.settings)
    slug = verda_slug(variant.id)
    extra = {
        "model": slug,
        "enable_safety_checker": body.enable_safety_checker,
        "enable_base64_output": body.enable_base64_output,
    }
    applied = async_preference(prefer)
    if applied is not None:
        (job,) = await asyncio.to_thread(runtime.service.submit, [gen], key=caller.key, dialect=NAME, extra=extra)
        status_path, result_path = f"/status/{slug}", f"/result/{slug}"
        return JSONResponse(
            {"Id": job.id, "StatusPath": status_path, "ResultPath": result_path},
            status_code=202,
            # Where the client reached us (the configured public URL when one is set).
            headers={
                INFERENCE_ID: job.id,
                "Location": _base(request, runtime) + status_path,
                "Preference-Applied": applied,  # RFC 7240 § 3
            },
        )
    (job,) = await submit_and_wait(
        request, runtime, caller, [gen], dialect=NAME, extra=extra, images_field="input_images"
    )
    return await asyncio.to_thread(render_output, runtime, job, body.enable_base64_output)


PreferHeader = Annotated[
    str | None, Header(alias="Prefer", description="respond-async: queue it (Verda's asynchronous inference).")
]


def _generate_route(slug: str) -> Callable[..., Awaitable[Response]]:
    """The endpoint of one slug: FastAPI needs a function per path to resolve its own dependency."""
    served = Depends(ServedVariant(slug))

    async def endpoint(
        request: Request,
        body: VerdaGenerateRequest,
        runtime: ReadyRuntime,
        caller: CallerDep,
        variant: Variant = served,
        prefer: PreferHeader = None,
    ) -> Response:
        return await generate(request, body, runtime, caller, variant, prefer)

    return endpoint


def _health_route(slug: str) -> Callable[..., Awaitable[dict[str, Any]]]:
    served = Depends(ServedVariant(slug))

    async def health(variant: Variant = served) -> dict[str, Any]:
        return {"status": "ok", "model": verda_slug(variant.id)}

    return health


for _slug in SLUGS:
    router.add_api_route(
        f"/{_slug}/generate",
        _generate_route(_slug),
        methods=["POST"],
        summary=f"Generate with {find_variant(_slug).display_name} (sync, or async with Prefer: respond-async).",
        response_class=Response,
        responses=_IMAGE_RESPONSES,
    )
    router.add_api_route(
        f"/{_slug}/health",
        _health_route(_slug),
        methods=["GET"],
        summary=f"Health of the {find_variant(_slug).display_name} endpoint (200 once it can generate).",
    )

# -- Verda's asynchronous inference: status and result by X-Inference-Id --------------------------

InferenceIdHeader = Annotated[
    str | None, Header(alias=INFERENCE_ID, description="The Id from the Prefer: respond-async answer.")
]


async def _async_job(request: Request, slug: str, caller: Caller, inference_id: str | None) -> Job:
    """The caller's job behind ``X-Inference-Id``, which must have been made through ``slug``."""
    runtime = runtime_of(request)
    if not inference_id:
        raise InvalidParameterError(INFERENCE_ID, "header is required (the Id of the async request)")
    try:
        job = await asyncio.to_thread(runtime.service.get, inference_id, **caller.scope)
    except NotFoundError:
        raise NotFoundError(f"no inference {inference_id!r} for {slug}") from None
    if job.extra.get("model") != slug:
        raise NotFoundError(f"no inference {inference_id!r} for {slug}")
    return job


@router.get("/status/{slug}", summary="Status of an asynchronous inference (X-Inference-Id).")
async def async_status(
    request: Request, slug: str, caller: CallerDep, inference_id: InferenceIdHeader = None
) -> dict[str, Any]:
    job = await _async_job(request, slug, caller, inference_id)
    body: dict[str, Any] = {"Id": job.id, "Status": ASYNC_STATUS[job.status]}
    if job.status is JobStatus.QUEUED:
        positions = await asyncio.to_thread(runtime_of(request).service.queue_positions, [job])
        body["QueuePosition"] = positions.get(job.id, 0)
    if job.progress_total:
        body["Progress"] = {"step": job.progress_step, "total": job.progress_total}
    if job.terminal:
        body["Outcome"] = job.status.value
    return body


@router.get(
    "/result/{slug}",
    summary="Result of an asynchronous inference (X-Inference-Id): the image, as the sync call answers.",
    response_class=Response,
    responses=_IMAGE_RESPONSES,
)
async def async_result(
    request: Request, slug: str, caller: CallerDep, inference_id: InferenceIdHeader = None
) -> Response:
    job = await _async_job(request, slug, caller, inference_id)
    if not job.terminal:
        # Not done: say so with the status, as Verda's own status endpoint would (202: try later).
        return JSONResponse({"Id": job.id, "Status": ASYNC_STATUS[job.status]}, status_code=202)
    if job.status is not JobStatus.SUCCEEDED:
        error = job_error(job)
        raise client_image_error(error, "input_images") if isinstance(error, InvalidRequestError) else error
    return await asyncio.to_thread(render_output, runtime_of(request), job, bool(job.extra.get("enable_base64_output")))


# Registered after the four: any other "/<slug>/generate" is a Verda client asking for a model
# kleinserve does not have. Its path is outside `prefixes`, so the body is rendered here, in
# Verda's shape, rather than by the app's error handler.
@router.post("/{slug}/generate", include_in_schema=False)
async def unknown_slug(request: Request, slug: str) -> JSONResponse:
    error = UnknownModelError(slug, served_slugs(runtime_of(request)))
    status = status_for(error)
    return JSONResponse(VerdaDialect().error_body(error, status), status_code=status)
