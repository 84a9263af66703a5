"""OpenAI's ``POST /v1/images/variations`` on klein: image-to-image with no instruction.

OpenAI's variations take an image and no prompt (``images.create_variation`` in the ``openai`` SDK:
multipart ``image``, ``model``, ``n``, ``size``, ``response_format``, ``user``). klein is an editing
model conditioned on a text instruction *and* on reference images (their latent tokens join the
sequence the transformer attends over), so a variation here is image-to-image (engine/img2img.py)
with the empty instruction: the image is the first reference (the model keeps its subject and
style) and the start, noised to :data:`DEFAULT_STRENGTH` of the schedule (on the 4-step distilled
models: 3 of 4 steps from a start that is mostly noise, so only the coarse layout is pinned), and
each image's seed (seed + i) draws the differences. Extensions (``extra_body`` in the SDK):
``strength`` (0-1; 1 starts from pure noise), ``prompt`` (an instruction after all), ``seed``,
``num_inference_steps``, ``guidance_scale``, ``output_format``, ``output_compression``.

``size`` (``auto``, OpenAI's ``256x256`` / ``512x512`` / ``1024x1024`` or any ``WxH`` in multiples of
16) resizes the image before it is used, so the variations have that size (at most 1 MP, like every
image-to-image run); ``auto`` keeps the image's. Compatibility notes: docs/api/openai.md.
"""

from __future__ import annotations

from typing import Literal

from fastapi import Request
from pydantic import Field

from kleinserve.api.auth import Caller
from kleinserve.api.dialects.base import FieldNames, parse_body, to_request
from kleinserve.api.dialects.openai_params import OpenAIParams, parse_size, split_form, upload_cost
from kleinserve.api.jobs_http import store_upload
from kleinserve.errors import InvalidParameterError
from kleinserve.request import GenerationRequest, check_size
from kleinserve.runtime import Runtime

DEFAULT_STRENGTH = 0.75
NAMES = FieldNames(
    {
        "steps": "num_inference_steps",
        "guidance": "guidance_scale",
        "images": "image",
        "num_images": "n",
        "quality": "output_compression",
    }
)


class VariationParams(OpenAIParams):
    """The text fields of a variations request (the image is a file)."""

    n: int = Field(1, ge=1, le=10, description="Variations to make; variation i uses seed + i.")
    size: str = Field("auto", max_length=32, description="'auto' (the image's size) or 'WxH' in multiples of 16.")
    response_format: Literal["url", "b64_json"] = "url"
    prompt: str = Field("", description="kleinserve extension: an instruction; default none.")
    strength: float = Field(
        DEFAULT_STRENGTH, gt=0, le=1, allow_inf_nan=False, description="kleinserve extension: how far to re-draw."
    )
    output_format: Literal["png", "jpeg", "jpg", "webp"] = Field("png", description="kleinserve extension.")
    output_compression: int = Field(100, ge=0, le=100, description="kleinserve extension: JPEG/WebP quality.")

    def pixel_size(self, runtime: Runtime) -> tuple[int, int] | None:
        """The size the image is resized to, or None for ``auto``."""
        pixels = parse_size(self.size)
        if pixels is None:
            return None
        try:
            check_size(*pixels, runtime.settings)
        except InvalidParameterError as err:
            raise InvalidParameterError("size", err.detail) from None
        return pixels


async def variation_inputs(request: Request, runtime: Runtime, caller: Caller) -> tuple[VariationParams, str]:
    """The parameters and the stored image (an ``asset:`` reference) of a multipart variations request."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidParameterError("image", "send the image as a file in a multipart/form-data body")
    form = await request.form(max_files=2)
    fields, uploads, files = split_form(form)
    for key, _ in files:
        raise InvalidParameterError(key, "is not a known file parameter")
    params = parse_body(VariationParams, fields)
    if len(uploads) != 1:
        raise InvalidParameterError("image", f"exactly one image file is required; got {len(uploads)}")
    size = params.pixel_size(runtime)
    data = await uploads[0].read()
    reference = await store_upload(
        runtime, data, None, "image", caller.key, upload_cost(runtime, params.model, params.n), 1, size=size
    )
    return params, reference


def to_variation_request(params: VariationParams, runtime: Runtime, reference: str) -> GenerationRequest:
    """The canonical image-to-image request of a variation."""
    model = params.model or runtime.served_ids()[0]
    return to_request(
        {
            "model": runtime.service.check_model(model),
            "prompt": params.prompt,
            "images": [reference],
            "strength": params.strength,
            "steps": params.num_inference_steps,
            "guidance": params.guidance_scale,
            "seed": params.seed,
            "num_images": params.n,
            "output_format": params.output_format,
            "quality": max(1, params.output_compression),
        },
        runtime.settings,
        NAMES,
    )
