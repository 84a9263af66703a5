"""The 1min.ai dialect: ``POST /api/features`` (IMAGE_GENERATOR, IMAGE_EDITOR) and ``POST /api/assets``.

Compatibility notes: docs/api/onemin.md. Both feature types are sync: the call returns when the image is
done, as an ``aiRecord`` whose ``resultObject`` lists storage keys (``<job-id>/0.webp``) and whose
``temporaryUrl`` is a signed, expiring URL of the first result. Choices where 1min is silent
(published in the README):

- parameters left out take the *variant's* defaults: klein 4B/9B run 4 steps on both types (not the
  editor's advertised 28); the echoed ``promptObject`` has every default filled in;
- ``num_inference_steps``: 1-4 on the generator for klein 4B/9B (1min's range; 5 is a 400), 1-50 on
  the editor; the Base variants (our ids ``black-forest-labs/flux-2-klein-base-4b|9b``) take 1-50;
- ``aspect_ratio`` x ``megapixels`` map through kleinserve's published size table;
  ``match_input_image`` keeps the input's size (like every reference: scaled to at most 1 MP and
  cropped to multiples of 16) and ``megapixels`` then has no effect;
- ``output_quality`` is the JPEG/WebP encoder quality; 0 is sent as 1, the encoder's lowest;
  ``jpeg`` is accepted next to ``jpg``; ``megapixels`` may also be sent as a number;
- ``go_fast`` is accepted and echoed but changes nothing: kleinserve has one code path;
- ``disable_safety_checker`` is echoed, and honoured when the operator runs a safety checker and
  allows clients to skip it (``--safety-allow-disable``); the verdict is in ``aiRecord.kleinserve.safety``;
- ``imageUrl`` is a key from ``/api/assets``, a ``resultObject`` path, an http(s) URL or a data URI;
- the random seed of a request without one is reported in ``aiRecord.kleinserve`` (with the size);
- errors are ``{"message", "code", "statusCode"}`` with the statuses of ``api/errors.py``;
- the ``API-KEY`` header is accepted and not yet checked.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, File, Header, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from kleinserve.api.auth import CallerDep
from kleinserve.api.dialects.base import (
    Example,
    FieldNames,
    example_request,
    lora_header,
    output_size,
    submit_and_wait,
    to_request,
    unsaid,
    unsaid_note,
)
from kleinserve.api.jobs_http import (
    ReadyRuntime,
    outputs_of,
    result_url,
    runtime_of,
    store_upload,
)
from kleinserve.engine.images import ASSET_PREFIX
from kleinserve.engine.variants import Variant, find_variant
from kleinserve.errors import (
    InvalidImageError,
    InvalidParameterError,
    KleinserveError,
)
from kleinserve.jobs.job import Job
from kleinserve.request import MAX_SEED, GenerationRequest, size_for_aspect_ratio
from kleinserve.runtime import Runtime
from kleinserve.storage.base import media_type_for

PREFIX = "/api"
GENERATOR = "IMAGE_GENERATOR"
EDITOR = "IMAGE_EDITOR"
MATCH_INPUT: Final = "match_input_image"
BUCKET = "kleinserve"
AspectRatio = Literal["1:1", "16:9", "9:16", "3:2", "2:3", "4:5", "5:4"]
DISTILLED_GENERATOR_MAX_STEPS = 4  # 1min's generator range for the 4-step distilled models
NAME = "onemin"
# Canonical field -> the promptObject name a client sent, for error messages.
NAMES = FieldNames(
    {
        "steps": "num_inference_steps",
        "quality": "output_quality",
        "images": "imageUrl",
        "negative_prompt": "negativePrompt",
        "width": "aspect_ratio",
        "height": "aspect_ratio",
        "size": "aspect_ratio",
    },
    prefix="promptObject.",
)
NAMES_WITH_SIZE = FieldNames({**NAMES, "width": "size", "height": "size", "size": "size"}, prefix=NAMES.prefix)
ApiKey = Annotated[str | None, Header(alias="API-KEY", description="1min API key (accepted, not yet checked).")]


class _Prompt(BaseModel):
    """The promptObject fields both feature types share."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., description="What to draw, or how to change the input image.")
    negativePrompt: str | None = Field(
        None, description="What to steer away from: Base models only (true CFG); a 400 on the distilled ones."
    )
    output_format: Literal["webp", "jpg", "jpeg", "png"] = Field("webp", description="Image format.")
    output_quality: int = Field(80, ge=0, le=100, description="JPEG/WebP quality 0-100 (0 is sent as 1).")
    megapixels: Literal["0.25", "1"] = Field("1", description="Output size with an explicit aspect_ratio.")
    disable_safety_checker: bool = Field(
        False, description="Skip the safety checker, if the operator runs one and lets clients skip it."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed for reproducible results; default random.")
    n: int | None = Field(None, ge=1, description="Images to make (1min's relay clients); default 1.")
    num_outputs: int | None = Field(None, ge=1, description="Same as n (1min's docs for some models).")
    size: str | None = Field(
        None, description="'WIDTHxHEIGHT' in multiples of 16, instead of aspect_ratio; 'auto' is ignored."
    )

    def image_count(self) -> int:
        if self.n is not None and self.num_outputs is not None and self.n != self.num_outputs:
            raise _param("num_outputs", f"contradicts n ({self.n}); send one of them")
        return self.n or self.num_outputs or 1

    def explicit_size(self) -> tuple[int, int] | None:
        """``size`` as width and height, or None when it is left out or ``auto``."""
        if self.size is None or self.size.strip().lower() in ("", "auto"):
            return None
        width, sep, height = self.size.strip().lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise _param("size", f"must be 'WIDTHxHEIGHT', e.g. 1024x1024, or 'auto'; got {self.size!r}")
        return int(width), int(height)

    @field_validator("megapixels", mode="before")
    @classmethod
    def _number_to_text(cls, value: Any) -> Any:
        # 1min documents a string; JavaScript clients easily send the number, which means the same.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f"{value:g}"
        return value


class GeneratorPrompt(_Prompt):
    """promptObject of ``IMAGE_GENERATOR`` (text-to-image)."""

    aspect_ratio: AspectRatio = Field("1:1", description="Output aspect ratio.")
    num_inference_steps: int | None = Field(
        None, ge=1, le=50, description="1-4 on klein 4B/9B, 1-50 on Base; default: the model's own."
    )
    go_fast: bool = Field(True, description="Echoed only: kleinserve has one code path.")


class EditorPrompt(_Prompt):
    """promptObject of ``IMAGE_EDITOR`` (one input image)."""

    imageUrl: str = Field(..., min_length=1, description="Asset key, resultObject path, http(s) URL or data URI.")
    aspect_ratio: AspectRatio | Literal["match_input_image"] = Field(
        MATCH_INPUT, description="Output aspect ratio, or the input image's size."
    )
    num_inference_steps: int | None = Field(None, ge=1, le=50, description="1-50; default: the model's own.")
    go_fast: bool = Field(False, description="Echoed only: kleinserve has one code path.")


_PROMPTS: dict[str, type[_Prompt]] = {GENERATOR: GeneratorPrompt, EDITOR: EditorPrompt}


class FeatureRequest(BaseModel):
    """Body of ``POST /api/features`` for the klein models."""

    model_config = ConfigDict(extra="forbid", title="1min.ai feature request")

    type: Literal["IMAGE_GENERATOR", "IMAGE_EDITOR"] = Field(..., description="The feature to run.")
    model: str = Field(..., description="Model id, e.g. black-forest-labs/flux-2-klein-4b.")
    promptObject: GeneratorPrompt | EditorPrompt = Field(..., description="Parameters of the feature type.")

    @field_validator("promptObject", mode="wrap")
    @classmethod
    def _prompt_of_type(cls, value: Any, handler: Any, info: ValidationInfo) -> Any:
        # Validate against the kind `type` names, so errors read "promptObject.<field>" (a plain
        # union would put the member's name in the path). Without a valid type, that error stands.
        kind = _PROMPTS.get(info.data.get("type", ""))
        return value if kind is None else kind.model_validate(value)


def _iso(timestamp: float) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``, as 1min's ``createdAt``."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _param(field: str, message: str) -> InvalidParameterError:
    return InvalidParameterError(f"promptObject.{field}", message)


def image_reference(runtime: Runtime, image_url: str) -> str:
    """The canonical reference for ``imageUrl``: URLs and data URIs as they are, keys as ``asset:``."""
    text = image_url.strip()
    if text.startswith(("http://", "https://", "data:")):
        return text
    # Whether the asset exists, and is the caller's, is checked when the job is submitted
    # (kleinserve.inputs): another key's asset gets the very answer a missing one does.
    return ASSET_PREFIX + text.removeprefix(ASSET_PREFIX)


def to_generation_request(body: FeatureRequest, runtime: Runtime) -> tuple[GenerationRequest, dict[str, Any]]:
    """The canonical request and the promptObject to echo, with the defaults filled in."""
    variant = find_variant(runtime.service.check_model(body.model))
    prompt = body.promptObject
    steps = variant.default_steps if prompt.num_inference_steps is None else prompt.num_inference_steps
    if body.type == GENERATOR and variant.distilled and steps > DISTILLED_GENERATOR_MAX_STEPS:
        limit = DISTILLED_GENERATOR_MAX_STEPS
        raise _param("num_inference_steps", f"must be 1-{limit} for {body.model} (a {limit}-step model); got {steps}")
    ratio: str = prompt.aspect_ratio
    count = prompt.image_count()
    names = NAMES
    if (size := prompt.explicit_size()) is not None:
        width, height = size  # an explicit size wins over aspect_ratio (which always has a default)
        names = NAMES_WITH_SIZE
    elif ratio == MATCH_INPUT:
        width, height = None, None
    else:
        width, height = size_for_aspect_ratio(ratio, float(prompt.megapixels))
    if count > 1:
        names = FieldNames({**names, "num_images": "n" if prompt.n is not None else "num_outputs"}, prefix=names.prefix)
    images = [image_reference(runtime, prompt.imageUrl)] if isinstance(prompt, EditorPrompt) else []
    request = to_request(
        {
            "model": variant.id,
            "prompt": prompt.prompt,
            "negative_prompt": prompt.negativePrompt,
            "images": images,
            "width": width,
            "height": height,
            "steps": steps,
            "seed": prompt.seed,
            "num_images": count,
            "output_format": prompt.output_format,
            "quality": max(1, prompt.output_quality),  # the encoders' scale starts at 1
            "safety_check": not prompt.disable_safety_checker,
        },
        runtime.settings,
        names,
    )
    echo = prompt.model_dump(exclude_none=True)
    echo["num_inference_steps"] = steps
    return request, echo


def ai_record(runtime: Runtime, job: Job, body: FeatureRequest, echo: dict[str, Any]) -> dict[str, Any]:
    """A finished job as 1min's ``aiRecord``, plus kleinserve's seed and size."""
    outputs = outputs_of(job)
    first = outputs[0]
    return {
        "aiRecord": {
            "uuid": job.id,
            "model": body.model,
            "type": body.type,
            "status": "SUCCESS",
            "createdAt": _iso(job.created_at),
            "aiRecordDetail": {"promptObject": echo, "resultObject": [o.key for o in outputs]},
            "temporaryUrl": result_url(runtime, first),
            "temporaryUrls": [result_url(runtime, o) for o in outputs],
            # 1min's record fields with no counterpart on a self-hosted server: the owner (the API
            # key's id) or null, and nothing rated, no conversation, no team.
            "userId": job.owner,
            "teamId": None,
            "conversationId": None,
            "metadata": None,
            "rating": None,
            "feedback": None,
            "additionalData": None,
            "kleinserve": {
                "seed": first.seed,
                "width": first.width,
                "height": first.height,
                **({"safety": job.safety.model_dump(mode="json")} if job.safety else {}),
            },
        }
    }


router = APIRouter(prefix=PREFIX, tags=["1min.ai"])


class OneMinDialect:
    """The 1min.ai AI Feature API (klein image features) and Asset API under /api."""

    name = NAME
    prefixes: tuple[str, ...] = ("/api/features", "/api/assets")
    upload_paths: tuple[str, ...] = ("/api/assets",)  # multipart/form-data accepted here

    def router(self) -> APIRouter:
        return router

    def error_body(self, error: KleinserveError, status: int) -> dict[str, Any]:
        # 1min documents no error body; this one carries a readable and a stable machine field.
        return {"message": error.message, "code": error.code, "statusCode": status}

    def model_id(self, variant: Variant) -> str:
        return f"black-forest-labs/{variant.id}"

    def example(self, variant: Variant, request: GenerationRequest | None = None) -> Example:
        req = example_request(variant, request)
        prompt: dict[str, Any] = {"prompt": req.prompt}
        carried = {"model", "prompt", "negative_prompt", "width", "height", "steps", "seed", "num_images"}
        carried |= {"output_format", "quality", "safety_check", "loras"}
        if req.images:
            prompt["imageUrl"] = req.images[0]
            if len(req.images) == 1:
                carried.add("images")
        if req.negative_prompt is not None:
            prompt["negativePrompt"] = req.negative_prompt
        if (size := output_size(req)) is not None:
            prompt["size"] = f"{size[0]}x{size[1]}"
        if req.steps is not None:
            prompt["num_inference_steps"] = req.steps
        if req.seed is not None:
            prompt["seed"] = req.seed
        if req.num_images > 1:
            prompt["n"] = req.num_images
        prompt["output_format"] = req.output_format.value  # 1min's default is webp
        if req.output_format.value != "png":
            prompt["output_quality"] = req.quality
        if not req.safety_check:
            prompt["disable_safety_checker"] = True
        dropped = unsaid(req, carried)
        notes = ["The answer's aiRecord.temporaryUrl is the image."]
        if req.loras:
            notes.append("Adapters go in the X-Kleinserve-Loras header (1min has no field for them).")
        return Example(
            dialect=NAME,
            title=f"1min.ai: {EDITOR if req.images else GENERATOR}",
            method="POST",
            path=f"{PREFIX}/features",
            body={"type": EDITOR if req.images else GENERATOR, "model": self.model_id(variant), "promptObject": prompt},
            auth_header="API-KEY",
            auth_scheme="",
            headers=lora_header(req),
            notes=(*notes, *unsaid_note("1min.ai", dropped)),
            unsaid=dropped,
        )


@router.post("/features", summary="Run IMAGE_GENERATOR or IMAGE_EDITOR (sync).")
async def features(
    request: Request, body: FeatureRequest, runtime: ReadyRuntime, caller: CallerDep, api_key: ApiKey = None
) -> dict[str, Any]:
    gen, echo = await asyncio.to_thread(to_generation_request, body, runtime)
    extra = {"model": body.model, "type": body.type, "promptObject": echo}
    (job,) = await submit_and_wait(
        request,
        runtime,
        caller,
        [gen],
        dialect=NAME,
        extra=extra,
        images_field="promptObject.imageUrl",
        single_image=True,
    )
    return ai_record(runtime, job, body, echo)


@router.post("/assets", summary="Upload an image for promptObject.imageUrl.")
async def assets(
    request: Request,
    asset: Annotated[UploadFile, File(description="The image file.")],
    caller: CallerDep,
    api_key: ApiKey = None,
) -> dict[str, Any]:
    runtime = runtime_of(request)
    limit = runtime.settings.max_image_bytes
    if asset.size is not None and asset.size > limit:
        raise InvalidImageError(None, f"is {asset.size} bytes, over the limit of {limit} bytes", field="asset")
    data = await asset.read()
    key = (await store_upload(runtime, data, None, "asset", caller.key)).removeprefix(ASSET_PREFIX)
    name = key.rsplit("/", 1)[-1]
    location = await asyncio.to_thread(runtime.storage.url, key)
    return {
        "asset": {
            "fieldname": "asset",
            "originalname": asset.filename or name,
            "mimetype": asset.content_type or "application/octet-stream",
            "size": len(data),
            "bucket": BUCKET,
            "key": key,
            "location": location,
            "contentType": media_type_for(key),  # what is kept: the decoded pixels as PNG
        },
        # The upload's folder in storage is "<owner>-<fresh UUID>": the UUID serves as the asset's id.
        "fileContent": {
            "uuid": key.split("/")[-2].partition("-")[2],
            "path": key,
            "type": name.rsplit(".", 1)[-1],
            "name": name,
        },
    }
