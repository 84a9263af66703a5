"""The request bodies of OpenAI's image endpoints (generations, edits, variations) and their size rule.

Every field the ``openai`` SDK sends is declared, so each is honoured, accepted without effect, or
refused with a 400 naming it (the README's table, docs/api/openai.md). ``null`` means "left out", as
OpenAI's reference says for its optional fields. The routes are in api/dialects/openai.py and
openai_variations.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import FormData, UploadFile

from kleinserve.errors import InvalidParameterError
from kleinserve.request import ASPECT_RATIOS, MAX_SEED, MEGAPIXELS, LoraChoice, size_for_aspect_ratio
from kleinserve.runtime import Runtime


class OpenAIParams(BaseModel):
    """What every OpenAI image body shares: the model, who the end user is, and kleinserve's
    extensions for seed, steps and guidance; ``null`` is "left out"."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Default: the first model this server serves.")
    user: str | None = Field(None, description="Accepted; recorded with the job.")
    safety_identifier: str | None = Field(None, description="Accepted; recorded with the job (replaces user).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="kleinserve extension.")
    num_inference_steps: int | None = Field(None, ge=1, description="kleinserve extension.")
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False, description="kleinserve extension.")

    @model_validator(mode="before")
    @classmethod
    def _null_is_left_out(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    def end_user(self) -> str | None:
        """Who the client says the end user is: ``safety_identifier``, else the deprecated ``user``."""
        return self.safety_identifier or self.user or None


def upload_cost(runtime: Runtime, model: str | None, images: int) -> float:
    """What the request will cost, priced with the default model when none is named, so an upload
    is refused (402/429) before it is decoded or stored."""
    return runtime.inputs.price_of(model or next(iter(runtime.served_ids()), None), images)


def split_form(form: FormData) -> tuple[dict[str, Any], list[UploadFile], list[tuple[str, UploadFile]]]:
    """A multipart body as its text fields (nested ``a[b]`` keys as objects), its ``image`` /
    ``image[]`` files in order, and every other file with its key (for the endpoint to take or refuse)."""
    fields: dict[str, Any] = {}
    uploads: list[UploadFile] = []
    files: list[tuple[str, UploadFile]] = []
    for key, value in form.multi_items():
        if key in ("image", "image[]"):
            if not isinstance(value, UploadFile):
                raise InvalidParameterError("image", "must be a file upload")
            uploads.append(value)
        elif isinstance(value, UploadFile):
            files.append((key, value))
        else:
            _set_form_field(fields, key, value)
    return fields, uploads, files


def _set_form_field(fields: dict[str, Any], key: str, value: str) -> None:
    """One multipart text field; the SDK sends nested objects as ``svg[reasoning][effort]``."""
    base, bracket, rest = key.partition("[")
    if not bracket or not base:
        fields[key] = value
        return
    path = [base, *rest.rstrip("]").split("][")]
    node = fields
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def parse_size(size: str) -> tuple[int, int] | None:
    """OpenAI's ``size``: ``auto`` (None) or ``WIDTHxHEIGHT``; anything else is a 400 naming ``size``."""
    if size == "auto":
        return None
    width, sep, height = size.lower().partition("x")
    # Digits bounded before int(): past 4300 of them Python refuses to convert (a 500, not a 400).
    if not (sep and width.isdigit() and height.isdigit() and len(width) <= 6 and len(height) <= 6):
        raise InvalidParameterError("size", f"must be 'auto' or 'WIDTHxHEIGHT', e.g. 1024x1024; got {size!r}")
    return int(width), int(height)


class ImageParams(OpenAIParams):
    """Fields shared by /images/generations and /images/edits: every one the ``openai`` SDK sends.

    Each is honoured, accepted without effect, or refused with a 400 naming it (the README's table,
    docs/api/openai.md). ``null`` means "left out", as OpenAI's reference says for its optional fields.
    """

    prompt: str = Field(..., description="What to draw, or how to edit the images.")
    n: int = Field(1, ge=1, le=10, description="Images to generate; image i uses seed + i.")
    size: str = Field("auto", max_length=32, description="'auto' or 'WxH' in multiples of 16.")
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg", "jpg", "webp", "gif", "svg"] = Field(
        "png", description="png, jpeg or webp; gif and svg are refused (klein draws raster stills)."
    )
    output_compression: int = Field(100, ge=0, le=100, description="JPEG/WebP quality.")
    quality: Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"] = Field(
        "auto", description="Accepted; klein has one quality level (steps are num_inference_steps)."
    )
    background: Literal["auto", "opaque", "transparent"] = Field(
        "auto", description="auto or opaque; transparent is refused (klein makes no alpha)."
    )
    moderation: Literal["auto", "low"] | None = Field(None, description="Accepted; no classifier runs.")
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted; no effect on klein.")
    complexity: Literal["low", "medium", "high"] | None = Field(None, description="Accepted; no effect on klein.")
    stream: bool = Field(
        False, description="true: Server-Sent Events: partial images, then one *.completed event per image."
    )
    partial_images: int | None = Field(
        None, ge=0, le=3, description="With stream: up to this many partial_image events (previews) first."
    )
    frame_count: int | None = Field(None, description="Refused: only with output_format gif.")
    frame_duration_ms: int | None = Field(None, description="Refused: only with output_format gif.")
    svg: dict[str, Any] | None = Field(None, description="Refused: only with output_format svg.")
    aspect_ratio: Literal[tuple(ASPECT_RATIOS)] | None = Field(  # type: ignore[valid-type]
        None, description="kleinserve extension, instead of size."
    )
    megapixels: float | None = Field(None, description=f"With aspect_ratio: one of {list(MEGAPIXELS)}.")
    loras: list[LoraChoice] | None = Field(None, description="kleinserve extension (extra_body): LoRA adapters.")


class EditParams(ImageParams):
    """Edits: the images arrive as files (multipart) or as URLs (JSON)."""

    image_url: str | list[str] | None = Field(None, description="AIgateway JSON form: URL(s) or data URI(s).")
    images: list[dict[str, str]] | None = Field(None, description="OpenAI JSON form: [{'image_url': ...}].")
    mask: str | dict[str, str] | None = Field(
        None,
        description="Inpainting: a PNG of the first image's size whose fully transparent pixels are the area to "
        "edit; a file (multipart), or JSON {'image_url': URL or data URI} (OpenAI) or a URL / data URI string.",
    )
    mask_url: str | None = Field(None, description="AIgateway JSON form of mask: a URL or data URI.")
    markup: str | None = Field(None, description="Refused: no guide overlays; say the change in the prompt.")
    input_fidelity: Literal["high", "low"] | None = Field(None, description="Accepted; no effect.")

    def references(self) -> list[str]:
        found: list[str] = []
        if isinstance(self.image_url, str):
            found.append(self.image_url)
        elif self.image_url:
            found.extend(self.image_url)
        for item in self.images or []:
            if "image_url" not in item:
                raise InvalidParameterError("images", "each item needs an image_url (file_id is not supported)")
            found.append(item["image_url"])
        return found

    def mask_source(self) -> str | None:
        """The mask as a URL, data URI or base64 (multipart files arrive as base64), if any."""
        if self.mask is not None and self.mask_url is not None:
            raise InvalidParameterError("mask_url", "send mask or mask_url, not both")
        if isinstance(self.mask, dict):
            if "image_url" not in self.mask:
                raise InvalidParameterError("mask", "needs an image_url (file_id is not supported)")
            return self.mask["image_url"]
        return self.mask if self.mask is not None else self.mask_url


def requested_size(params: ImageParams) -> tuple[int | None, int | None]:
    if params.aspect_ratio is not None:
        return size_for_aspect_ratio(params.aspect_ratio, params.megapixels or 1.0)
    if params.megapixels is not None:
        raise InvalidParameterError("megapixels", "needs aspect_ratio")
    pixels = parse_size(params.size)
    return pixels if pixels is not None else (None, None)
