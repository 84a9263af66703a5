"""The OpenAI-compatible images dialect (as AIgateway serves it): generations, edits and models.

Compatibility notes: docs/api/openai.md. Choices where OpenAI's API has no klein meaning
(published in the README):
- ``size`` takes ``auto`` (1024x1024 for text-to-image, the first image's size for edits) or any
  ``WxH`` in multiples of 16; ``aspect_ratio`` (+ ``megapixels``) is our extension, as are ``seed``,
  ``num_inference_steps`` and ``guidance_scale``; left out, steps and guidance are the variant's;
- ``response_format`` defaults to ``url`` (AIgateway), ``output_compression`` is the JPEG/WebP
  quality (0 means 1); every other parameter the ``openai`` SDK sends is accepted without effect,
  recorded, or refused with a 400 naming it, as :class:`ImageParams` says field by field
  (``background: transparent``: klein makes no alpha);
- ``mask`` (edits) is inpainting of the first image (engine/inpaint.py, OpenAI's alpha rule; with a
  mask ``size`` is ignored: the output keeps that image's size);
- ``stream: true`` answers Server-Sent Events (:mod:`kleinserve.api.dialects.openai_stream`);
- image *i* of ``n`` uses ``seed + i``; the seed of image 0 is returned as ``seed``.
- errors: ``{"error": {"message", "type", "param", "code"}}``; ``type`` is AIgateway's identifier
  for the status (``invalid_request_error`` for 400), ``code`` is kleinserve's stable error code.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from fastapi import APIRouter, Request, Response

from kleinserve.api.auth import Caller, CallerDep
from kleinserve.api.dialects import replicate
from kleinserve.api.dialects.base import (
    Example,
    FieldNames,
    example_request,
    output_size,
    parse_body,
    submit_and_wait,
    to_request,
    unsaid,
    unsaid_note,
)
from kleinserve.api.dialects.openai_params import EditParams, ImageParams, requested_size, split_form, upload_cost
from kleinserve.api.dialects.openai_stream import Kind, image_stream
from kleinserve.api.dialects.openai_variations import VariationParams, to_variation_request, variation_inputs
from kleinserve.api.jobs_http import (
    ReadyRuntime,
    outputs_of,
    result_b64,
    result_url,
    runtime_of,
    store_upload,
)
from kleinserve.engine.masks import mask_error
from kleinserve.engine.variants import Variant
from kleinserve.errors import (
    InvalidImageError,
    InvalidParameterError,
    KleinserveError,
    NotFoundError,
)
from kleinserve.jobs.job import Job
from kleinserve.jobs.service import ACTIVE
from kleinserve.request import (
    GenerationRequest,
)
from kleinserve.runtime import Runtime

PREFIX = "/v1"
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_credits",
    403: "permission_error",
    404: "not_found",
    408: "request_timeout",
    409: "conflict",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
NAME = "openai"
# Canonical field -> the OpenAI name a client sent, for error messages.
NAMES = FieldNames(
    {
        "steps": "num_inference_steps",
        "guidance": "guidance_scale",
        "images": "image",
        "num_images": "n",
        "quality": "output_compression",
        "width": "size",
        "height": "size",
        "previews": "partial_images",
    }
)


def openai_id(variant: Variant) -> str:
    """AIgateway's id, e.g. ``black-forest-labs/flux-2-klein-9b``."""
    return f"black-forest-labs/{variant.id}"


# The quality values OpenAI's stream events may carry; the older ones are reported as "auto".
_STREAM_QUALITIES = ("low", "medium", "high", "xhigh", "max", "auto")
_GIF_ONLY = "is only for output_format gif, which FLUX.2 [klein] cannot make (it draws still images)"


def _refuse_unsupported(params: ImageParams) -> None:
    if params.background == "transparent":
        raise InvalidParameterError("background", "FLUX.2 [klein] cannot make transparent images; use opaque or auto")
    if params.output_format in ("gif", "svg"):
        raise InvalidParameterError(
            "output_format", f"FLUX.2 [klein] makes raster images: use png, jpeg or webp, not {params.output_format}"
        )
    for name in ("frame_count", "frame_duration_ms"):
        if getattr(params, name) is not None:
            raise InvalidParameterError(name, _GIF_ONLY)
    if params.svg is not None:
        raise InvalidParameterError("svg", "is only for output_format svg, which FLUX.2 [klein] cannot make")
    if isinstance(params, EditParams) and params.markup:
        raise InvalidParameterError("markup", _MARKUP)


_MARKUP = "guide overlays are not supported; describe the change in the prompt"


def to_generation_request(
    params: ImageParams, runtime: Runtime, references: list[str], default_square: bool
) -> GenerationRequest:
    """The canonical request; field errors keep OpenAI's parameter names."""
    _refuse_unsupported(params)
    width, height = requested_size(params)
    if width is None and default_square:
        width = height = 1024
    mask = params.mask_source() if isinstance(params, EditParams) else None
    if mask is not None:
        width = height = None  # inpainting keeps the edited image's size: size is ignored (README)
    model = params.model or runtime.served_ids()[0]
    return to_request(
        {
            "model": runtime.service.check_model(model),
            "prompt": params.prompt,
            "images": references,
            "mask": mask,
            "width": width,
            "height": height,
            "steps": params.num_inference_steps,
            "guidance": params.guidance_scale,
            "seed": params.seed,
            "num_images": params.n,
            "output_format": params.output_format,
            "quality": max(1, params.output_compression),
            "loras": params.loras or [],
            "previews": (params.partial_images or 0) if params.stream else 0,
        },
        runtime.settings,
        NAMES,
    )


def images_response(runtime: Runtime, job: Job, params: ImageParams | VariationParams) -> dict[str, Any]:
    """OpenAI's ImagesResponse, plus the seed of image 0."""
    outputs = outputs_of(job)
    data = [
        {"b64_json": result_b64(runtime, o)}
        if params.response_format == "b64_json"
        else {"url": result_url(runtime, o)}
        for o in outputs
    ]
    return {
        "created": int(job.created_at),
        "data": data,
        "background": "opaque",
        "output_format": "jpeg" if params.output_format == "jpg" else params.output_format,
        "size": f"{outputs[0].width}x{outputs[0].height}",
        "seed": job.request.seed,
        **({"safety_identifier": params.safety_identifier} if params.safety_identifier else {}),
    }


async def _edit_params(request: Request, runtime: Runtime, caller: Caller) -> tuple[EditParams, list[str]]:
    """Edit parameters and reference sources from a multipart form or a JSON body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=runtime.settings.max_references + 2)
        fields, uploads, files = split_form(form)
        for key, value in files:
            if key == "mask":
                mask = await value.read(runtime.settings.max_image_bytes + 1)
                if len(mask) > runtime.settings.max_image_bytes:
                    raise mask_error(f"is over the limit of {runtime.settings.max_image_bytes} bytes")
                fields["mask"] = base64.b64encode(mask).decode()  # checked and stored on submission
            elif key == "markup":
                raise InvalidParameterError("markup", _MARKUP)
            else:
                raise InvalidParameterError(key, "is not a known file parameter")
        params = parse_body(EditParams, fields)
        if len(uploads) > runtime.settings.max_references:
            raise InvalidParameterError("image", f"at most {runtime.settings.max_references} images are allowed")
        cost = upload_cost(runtime, params.model, params.n)
        references = [
            await store_upload(runtime, await upload.read(), index, "image", caller.key, cost, 1)
            for index, upload in enumerate(uploads)
        ]
        return params, references + params.references()
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        raise InvalidParameterError("body", "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidParameterError("body", "must be a JSON object")
    params = parse_body(EditParams, body)
    return params, params.references()


router = APIRouter(prefix=PREFIX, tags=["openai"])


class OpenAIDialect:
    """The OpenAI images API under /v1."""

    name = NAME
    prefixes: tuple[str, ...] = (PREFIX,)
    # multipart/form-data accepted here
    upload_paths: tuple[str, ...] = (f"{PREFIX}/images/edits", f"{PREFIX}/images/variations")

    def router(self) -> APIRouter:
        return router

    def error_body(self, error: KleinserveError, status: int) -> dict[str, Any]:
        param = getattr(error, "field", None)
        if isinstance(error, InvalidImageError):
            param = "mask" if error.field == "mask" else "image"
        return {
            "error": {
                "message": error.message,
                "type": _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
                "param": param or None,
                "code": error.code,
            }
        }

    def model_id(self, variant: Variant) -> str:
        return openai_id(variant)

    def example(self, variant: Variant, request: GenerationRequest | None = None) -> Example:
        req = example_request(variant, request)
        body: dict[str, Any] = {"model": openai_id(variant), "prompt": req.prompt}
        if req.images:  # the JSON form of an edit; the openai SDK uploads files as multipart instead
            body["images"] = [{"image_url": image} for image in req.images]
        if req.mask is not None:
            body["mask"] = {"image_url": req.mask}
        elif (size := output_size(req)) is not None:  # with a mask, the first image's size
            body["size"] = f"{size[0]}x{size[1]}"
        if req.num_images > 1:
            body["n"] = req.num_images
        if req.output_format.value != "png":
            body["output_format"] = req.output_format.value
            body["output_compression"] = req.quality
        # kleinserve's extensions (extra_body in the openai SDK)
        for name, value in (("seed", req.seed), ("num_inference_steps", req.steps), ("guidance_scale", req.guidance)):
            if value is not None:
                body[name] = value
        if req.loras:
            body["loras"] = [choice.model_dump() for choice in req.loras]
        carried = {"model", "prompt", "images", "mask", "width", "height", "num_images", "output_format", "quality"}
        dropped = unsaid(req, carried | {"seed", "steps", "guidance", "loras"})
        return Example(
            dialect=NAME,
            title=f"OpenAI: images.{'edit' if req.images else 'generate'}",
            method="POST",
            path=f"{PREFIX}/images/{'edits' if req.images else 'generations'}",
            body=body,
            notes=(
                "The openai SDK: OpenAI(base_url=<server>/v1).images.generate(...); seed, "
                "num_inference_steps, guidance_scale and loras go in extra_body.",
                *unsaid_note("OpenAI", dropped),
            ),
            unsaid=dropped,
        )


async def _run(
    request: Request, runtime: Runtime, caller: Caller, gen: GenerationRequest, params: ImageParams, kind: Kind
) -> dict[str, Any] | Response:
    extra: dict[str, Any] = {"model": params.model, "size": params.size, "response_format": params.response_format}
    if params.end_user():
        extra["end_user"] = params.end_user()
    if params.stream:
        fields = {
            "background": "opaque",
            "quality": params.quality if params.quality in _STREAM_QUALITIES else "auto",
            "output_format": "jpeg" if params.output_format == "jpg" else params.output_format,
            **({"safety_identifier": params.end_user()} if params.end_user() else {}),
        }
        return await image_stream(
            request,
            runtime,
            caller,
            gen,
            kind=kind,
            dialect=NAME,
            extra=extra,
            fields=fields,
            error_body=OpenAIDialect().error_body,
        )
    (job,) = await submit_and_wait(request, runtime, caller, [gen], dialect=NAME, extra=extra, images_field="image")
    # Off the event loop: reading results may be a network call (S3).
    return await asyncio.to_thread(images_response, runtime, job, params)


@router.post(
    "/images/generations",
    summary="Create images from a prompt (JSON, or Server-Sent Events with stream: true).",
    response_model=None,
)
async def generations(
    request: Request, params: ImageParams, runtime: ReadyRuntime, caller: CallerDep
) -> dict[str, Any] | Response:
    gen = to_generation_request(params, runtime, [], default_square=True)
    return await _run(request, runtime, caller, gen, params, "image_generation")


@router.post(
    "/images/edits",
    summary="Edit or combine 1-4 images (multipart files, or JSON image URLs); stream: true for SSE.",
    response_model=None,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": EditParams.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"image": {"type": "string", "format": "binary"}},
                    }
                },
            }
        }
    },
)
async def edits(request: Request, runtime: ReadyRuntime, caller: CallerDep) -> dict[str, Any] | Response:
    params, references = await _edit_params(request, runtime, caller)
    if not references:
        raise InvalidParameterError("image", "at least one image is required")
    gen = to_generation_request(params, runtime, references, default_square=False)
    return await _run(request, runtime, caller, gen, params, "image_edit")


@router.post(
    "/images/variations",
    summary="Variations of one image (multipart): image-to-image with no instruction (openai_variations.py).",
    response_model=None,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": {"type": "string", "format": "binary"},
                            **VariationParams.model_json_schema()["properties"],
                        },
                    }
                },
            }
        }
    },
)
async def variations(request: Request, runtime: ReadyRuntime, caller: CallerDep) -> dict[str, Any]:
    params, reference = await variation_inputs(request, runtime, caller)
    gen = to_variation_request(params, runtime, reference)
    extra: dict[str, Any] = {"model": params.model, "size": params.size, "response_format": params.response_format}
    if params.end_user():
        extra["end_user"] = params.end_user()
    (job,) = await submit_and_wait(
        request, runtime, caller, [gen], dialect=NAME, extra=extra, images_field="image", single_image=True
    )
    return await asyncio.to_thread(images_response, runtime, job, params)


@router.get("/usage", summary="The calling API key's usage, credits and limits.")
async def usage(request: Request, caller: CallerDep) -> dict[str, Any]:
    return await asyncio.to_thread(usage_report, runtime_of(request), caller)


@router.get("/models", summary="Served models.")
async def models(request: Request) -> dict[str, Any]:
    runtime = runtime_of(request)
    return {"object": "list", "data": [model_object(runtime, m.variant, m.demo) for m in runtime.models()]}


@router.get("/models/{model_id:path}", summary="One served model.")
async def model(request: Request, model_id: str) -> dict[str, Any]:
    runtime = runtime_of(request)
    served = runtime.served_model(model_id)
    if served is None:
        raise NotFoundError(f"The model '{model_id}' does not exist")
    found = model_object(runtime, served.variant, served.demo)
    if model_id.startswith(f"{replicate.OWNER}/"):  # also Replicate's model route: carry its fields too
        found = {**replicate.model_fields(runtime, served.variant), **found}
    return found


def usage_report(runtime: Runtime, caller: Caller) -> dict[str, Any]:
    """What the calling key has generated and spent, and what it may still do."""
    key = caller.key
    if key is None:
        return {"object": "usage", "key": None, "auth": "open", "note": "this server runs without API keys"}
    usage = runtime.keys.usage(key.id)
    reserved = sum(job.cost for job in runtime.service.list(owner=key.id, any_owner=False, statuses=ACTIVE))
    remaining = None if key.credits is None else max(0.0, key.credits - usage.spent - reserved)
    return {
        "object": "usage",
        "key": key.name,
        "images": usage.images,
        "jobs": usage.jobs,
        "spent": usage.spent,
        "credits": key.credits,
        "reserved": reserved,
        "remaining": remaining,
        "by_model": usage.by_model,
        "limits": {
            "requests_per_minute": key.requests_per_minute,
            "images_per_minute": key.images_per_minute,
            "concurrency": key.concurrency,
        },
        "prices": runtime.settings.price_per_image,
    }


def model_object(runtime: Runtime, variant: Variant, demo: bool) -> dict[str, Any]:
    """OpenAI's Model object, with kleinserve's defaults, demo flag and per-device state beside it."""
    return {
        "id": openai_id(variant),
        "object": "model",
        "created": int(runtime.started_at),
        "owned_by": "black-forest-labs",
        "modality": "image",
        "defaults": {"num_inference_steps": variant.default_steps, "guidance_scale": variant.default_guidance},
        "demo": demo,
        "devices": runtime.model_devices(variant.id),
    }
