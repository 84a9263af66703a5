"""The Oxen.ai request body (``OxenImageRequest``) and its translation to the canonical request
(the choices where Oxen is silent are listed in oxen.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kleinserve.api.dialects.base import FieldNames, to_request
from kleinserve.request import (
    ASPECT_RATIOS,
    MAX_SEED,
    GenerationRequest,
    LoraChoice,
    StepCacheChoice,
    size_for_aspect_ratio,
)
from kleinserve.runtime import Runtime

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


def echo(body: OxenImageRequest) -> dict[str, Any]:
    """The parameters a client sent, echoed on generation objects."""
    return body.model_dump(
        exclude_none=True, exclude={"image", "mask", "num_generations", "target_namespace", "webhook_url"}
    )
