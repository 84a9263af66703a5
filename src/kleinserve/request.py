"""The canonical generation request, and the size rules every dialect shares.

Each provider dialect translates its wire format into one :class:`GenerationRequest`; the engine,
the job system and the CLI only ever see this model. Bounds that an operator may tune come from
:class:`~kleinserve.settings.Settings` and are checked by :meth:`GenerationRequest.parse`, which turns
every validation failure into an :class:`~kleinserve.errors.InvalidParameterError` naming the field.

Validated once, on entry: the configurable bounds are checked only when ``parse`` (or a validation
with a ``settings`` context) is given them. A request loaded back from the job store is validated
without that context, so only the fixed shape rules run; it is neither checked against *today's*
limits (an operator lowering ``KLEINSERVE_MAX_PROMPT_CHARS`` must not make queued jobs unreadable)
nor made to rebuild :class:`Settings` from the environment for every stored job.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from kleinserve.engine.variants import DEFAULT_VARIANT_ID, find_variant
from kleinserve.errors import InvalidParameterError, UnknownModelError
from kleinserve.settings import Settings

SIZE_MULTIPLE = 16
DEFAULT_SIZE = (1024, 1024)
MAX_SEED = 2**53 - 1  # JSON-safe for every client, JavaScript included.

ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1, 1),
    "16:9": (16, 9),
    "9:16": (9, 16),
    "4:3": (4, 3),
    "3:4": (3, 4),
    "3:2": (3, 2),
    "2:3": (2, 3),
    "4:5": (4, 5),
    "5:4": (5, 4),
    "21:9": (21, 9),
    "9:21": (9, 21),
}
MEGAPIXELS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
# One "megapixel" is 1024 x 1024 pixels, so 1:1 at 1 MP is exactly 1024 x 1024.
_PIXELS_PER_MEGAPIXEL = 1024 * 1024


class OutputFormat(StrEnum):
    """Encodings the server can return."""

    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def media_type(self) -> str:
        return f"image/{self.value}"

    @classmethod
    def parse(cls, value: str) -> OutputFormat:
        """Accept any case and the ``jpg`` spelling."""
        text = value.strip().lower()
        if text == "jpg":
            text = "jpeg"
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"must be one of png, jpeg (or jpg), webp; got {value!r}") from None


def _round_to_multiple(value: float) -> int:
    return max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def size_for_aspect_ratio(aspect_ratio: str, megapixels: float = 1.0) -> tuple[int, int]:
    """Width and height for an aspect ratio and a megapixel budget, in multiples of 16.

    ``megapixels`` must be one of :data:`MEGAPIXELS`; 1 MP means 1024 x 1024 pixels, and each side
    is rounded to the nearest multiple of 16 (so ``16:9`` at 1 MP is 1360 x 768).
    """
    ratio = ASPECT_RATIOS.get(aspect_ratio.strip())
    if ratio is None:
        raise InvalidParameterError("aspect_ratio", f"must be one of {', '.join(ASPECT_RATIOS)}; got {aspect_ratio!r}")
    if not any(math.isclose(megapixels, m) for m in MEGAPIXELS):
        allowed = ", ".join(f"{m:g}" for m in MEGAPIXELS)
        raise InvalidParameterError("megapixels", f"must be one of {allowed}; got {megapixels!r}")
    pixels = megapixels * _PIXELS_PER_MEGAPIXEL
    w, h = ratio
    return _round_to_multiple(math.sqrt(pixels * w / h)), _round_to_multiple(math.sqrt(pixels * h / w))


def _side_problem(value: int, settings: Settings) -> str | None:
    if value % SIZE_MULTIPLE or not settings.min_side <= value <= settings.max_side:
        return f"{settings.size_bounds_text()}; got {value}"
    return None


def _area_problem(width: int, height: int, settings: Settings) -> str | None:
    if width * height > settings.max_pixels:
        return f"{width}x{height} is {width * height} pixels, over the limit of {settings.max_pixels}"
    return None


def check_size(width: int, height: int, settings: Settings) -> None:
    """Raise :class:`InvalidParameterError` unless the size obeys the configured size rule."""
    for name, value in (("width", width), ("height", height)):
        if problem := _side_problem(value, settings):
            raise InvalidParameterError(name, problem)
    if problem := _area_problem(width, height, settings):
        raise InvalidParameterError("size", problem)


_EMPTY_PROMPT = "must not be empty (it has no visible character)"


def random_seed() -> int:
    """A fresh seed for a request that did not name one (kept below 2**32 so it is easy to quote)."""
    return secrets.randbelow(2**32)


class LoraChoice(BaseModel):
    """One LoRA adapter a request applies, at a scale (0 leaves the base model's pixels exactly)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., min_length=1, max_length=100, description="An adapter the server offers (GET /v1/loras).")
    scale: float = Field(1.0, ge=-8, le=8, allow_inf_nan=False, description="Strength; 1.0 is the trained one.")


class StepCacheChoice(BaseModel):
    """A request's step caching (Base variants): ``none`` turns the server's default off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["taylorseer", "none"] = Field(..., description="taylorseer, or none to turn the default off.")
    threshold: float | None = Field(
        None,
        gt=0,
        le=100,
        allow_inf_nan=False,
        description="taylorseer: the interval between full steps (default 5).",
    )


class GenerationRequest(BaseModel):
    """One text-to-image or reference-editing request, in kleinserve's own terms.

    ``steps``, ``guidance`` and ``seed`` left as ``None`` take the variant's defaults and a random
    seed when the job runs; ``width``/``height`` left as ``None`` take the first reference image's
    size (as diffusers does), or 1024 x 1024 without references. Image ``i`` uses ``seed + i``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEFAULT_VARIANT_ID, min_length=1, max_length=200)
    prompt: str = Field(
        ...,
        description='What to draw, or how to change the reference images; "" only with strength (re-draw the '
        "first image with no instruction, as OpenAI's image variations do).",
    )
    negative_prompt: str | None = Field(
        None,
        description='What to steer away from (Base variants only: true CFG against this text instead of "").',
    )
    images: list[str] = Field(
        default_factory=list,
        description="Reference images: URL, data URI or base64 (a file path only from the CLI).",
    )
    width: int | None = Field(None, description="Output width, a multiple of 16.")
    height: int | None = Field(None, description="Output height, a multiple of 16.")
    steps: int | None = Field(None, ge=1, description="Denoising steps; default: the variant's.")
    guidance: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Guidance scale; default: the variant's."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of image 0; image i uses seed + i.")
    num_images: int = Field(1, ge=1, description="How many images to generate.")
    output_format: OutputFormat = Field(OutputFormat.PNG, description="png, jpeg (or jpg) or webp.")
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP encoder quality, 1-100.")
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Image-to-image: start from the first image noised this far (0-1]; None: from noise.",
    )
    mask: str | None = Field(
        None,
        description="Inpainting: a PNG of the first image's size whose fully transparent pixels (alpha 0) are the "
        "area to repaint (OpenAI's rule); URL, data URI or base64 like images. Further images are references.",
    )
    safety_check: bool = Field(
        True, description="False asks to skip the safety checker (honoured only if the operator allows it)."
    )
    safety_tolerance: int | None = Field(
        None,
        ge=0,
        le=5,
        description="BFL's scale, 0 strictest to 5: below 2 lowers the safety checker's threshold; above 2 "
        "raises it only where the operator lets clients skip the checker (see safety.py).",
    )
    loras: list[LoraChoice] = Field(
        default_factory=list, description="LoRA adapters to apply, with scales (see GET /v1/loras)."
    )
    cache: StepCacheChoice | None = Field(
        None, description="Step caching (Base variants only; changes pixels); default: the server's."
    )
    previews: int = Field(
        0,
        ge=0,
        description="Preview images written while denoising (0: none; N: up to N spread over the steps, "
        "at most one per step); each is announced as a job.preview event.",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str, info: ValidationInfo) -> str:
        _check_unicode(value)
        # "" is allowed only with strength (checked on the model): image-to-image with no instruction.
        if value and not any(ch.isprintable() and not ch.isspace() for ch in value):
            raise ValueError(_EMPTY_PROMPT)
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        settings = _settings_from(info)
        if settings is not None and len(value) > settings.max_prompt_chars:
            raise ValueError(f"is {len(value)} characters, over the limit of {settings.max_prompt_chars}")
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        _check_unicode(value)
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        settings = _settings_from(info)
        if settings is not None and len(value) > settings.max_prompt_chars:
            raise ValueError(f"is {len(value)} characters, over the limit of {settings.max_prompt_chars}")
        # "" is the negative CFG always uses: the same request as no negative prompt at all.
        return value or None

    @field_validator("model")
    @classmethod
    def _model_is_text(cls, value: str) -> str:
        _check_unicode(value)
        return value

    @field_validator("output_format", mode="before")
    @classmethod
    def _parse_format(cls, value: Any) -> Any:
        return OutputFormat.parse(value) if isinstance(value, str) else value

    @field_validator("images")
    @classmethod
    def _images_within_limit(cls, value: list[str], info: ValidationInfo) -> list[str]:
        settings = _settings_from(info)
        if settings is not None and len(value) > settings.max_references:
            raise ValueError(f"at most {settings.max_references} reference images are allowed; got {len(value)}")
        if any(not item.strip() for item in value):
            raise ValueError("reference images must not be empty strings")
        for item in value:
            _check_unicode(item)
        return value

    @field_validator("mask")
    @classmethod
    def _mask_text(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must not be an empty string")
        _check_unicode(value)
        return value

    @field_validator("loras")
    @classmethod
    def _loras_within_limit(cls, value: list[LoraChoice], info: ValidationInfo) -> list[LoraChoice]:
        settings = _settings_from(info)
        if settings is not None and len(value) > settings.max_loras:
            raise ValueError(f"at most {settings.max_loras} LoRA adapters per request; got {len(value)}")
        names = [choice.name for choice in value]
        if len(set(names)) != len(names):
            raise ValueError("each adapter may be named once")
        return value

    @field_validator("num_images")
    @classmethod
    def _num_images_within_limit(cls, value: int, info: ValidationInfo) -> int:
        settings = _settings_from(info)
        if settings is not None and value > settings.max_images:
            raise ValueError(f"must be at most {settings.max_images}; got {value}")
        return value

    @field_validator("previews")
    @classmethod
    def _previews_within_limit(cls, value: int, info: ValidationInfo) -> int:
        settings = _settings_from(info)
        if settings is not None and value > settings.max_steps:
            raise ValueError(f"must be at most {settings.max_steps} (one per step); got {value}")
        return value

    @field_validator("steps")
    @classmethod
    def _steps_within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        settings = _settings_from(info)
        if settings is not None and value is not None and value > settings.max_steps:
            raise ValueError(f"must be at most {settings.max_steps}; got {value}")
        return value

    @field_validator("guidance")
    @classmethod
    def _guidance_within_limit(cls, value: float | None, info: ValidationInfo) -> float | None:
        settings = _settings_from(info)
        if settings is not None and value is not None and value > settings.max_guidance:
            raise ValueError(f"must be at most {settings.max_guidance:g}; got {value:g}")
        return value

    @field_validator("width", "height")
    @classmethod
    def _side_rule(cls, value: int | None, info: ValidationInfo) -> int | None:
        settings = _settings_from(info)
        if value is not None and settings is not None and (problem := _side_problem(value, settings)):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _size_rule(self, info: ValidationInfo) -> GenerationRequest:
        # Errors raised here have no field of their own; parse() reports them under "size".
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height must be given together")
        settings = _settings_from(info)
        if (
            self.width is not None
            and self.height is not None
            and settings is not None
            and (problem := _area_problem(self.width, self.height, settings))
        ):
            raise ValueError(problem)
        if self.negative_prompt is not None:
            _check_negative_prompt(self)
        if self.cache is not None and self.cache.type != "none":
            _check_step_cache(self)
        if self.strength is not None and not self.images:
            raise InvalidParameterError("strength", "needs an input image to start from (images is empty)")
        if self.strength is not None and self.width is not None:
            raise InvalidParameterError(
                "strength", "the output has the first image's size (at most 1 MP); leave width/height out"
            )
        if not self.prompt and self.strength is None:
            raise InvalidParameterError("prompt", _EMPTY_PROMPT + "; an empty prompt needs strength")
        if self.mask is not None and not self.images:
            raise InvalidParameterError("mask", "needs an image to edit (images is empty): it applies to the first")
        if self.mask is not None and self.width is not None:
            raise InvalidParameterError(
                "mask", "the output has the size of the image it edits (at most 1 MP); leave width/height out"
            )
        return self

    @classmethod
    def parse(cls, data: Mapping[str, Any], settings: Settings | None = None) -> GenerationRequest:
        """Validate ``data`` against the model and the configured bounds (read from the
        environment when ``settings`` is not given).

        Raises :class:`InvalidParameterError` naming the first bad field.
        """
        try:
            return cls.model_validate(dict(data), context={"settings": settings or Settings()})
        except ValidationError as err:
            raise _to_parameter_error(err) from None


def _check_step_cache(request: GenerationRequest) -> None:
    """Step caching is for the Base variants' many steps; a distilled variant's 4 steps have none to skip."""
    try:
        variant = find_variant(request.model)
    except UnknownModelError:
        return
    if not variant.uses_cfg:
        raise InvalidParameterError(
            "cache", f"{variant.id} is a 4-step distilled variant; step caching works on the Base variants"
        )


def _check_negative_prompt(request: GenerationRequest) -> None:
    """A negative prompt needs true CFG: a Base variant with guidance above 1 (diffusers' condition).

    Refused (never silently dropped) on the guidance-distilled variants, which run one transformer
    pass per step and have no negative branch, and on a Base request that turns CFG off. An unknown
    model is left to the model check, which names it.
    """
    try:
        variant = find_variant(request.model)
    except UnknownModelError:
        return
    if not variant.uses_cfg:
        raise InvalidParameterError(
            "negative_prompt",
            f"{variant.id} is guidance-distilled and has no classifier-free guidance; "
            "negative prompts work on the Base variants",
        )
    if request.guidance is not None and request.guidance <= 1.0:
        raise InvalidParameterError(
            "negative_prompt", f"needs guidance above 1 (true CFG); got guidance {request.guidance:g}"
        )


def _check_unicode(text: str) -> None:
    # JSON may carry lone surrogates ("\ud800"); they are not text and cannot be stored or encoded.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None


def _settings_from(info: ValidationInfo) -> Settings | None:
    """The bounds to check against; ``None`` (no bounds in the context) for stored requests."""
    context = info.context or {}
    settings = context.get("settings")
    return settings if isinstance(settings, Settings) else None


def _to_parameter_error(err: ValidationError) -> InvalidParameterError:
    first = err.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"])
    if not field:
        # Only the size rule is checked on the whole model; any other error without a field is the body's.
        field = "size" if first["type"] == "value_error" else "body"
    field = field.encode("utf-8", "replace").decode()
    message = first["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if first["type"] == "extra_forbidden":
        message = "is not a known parameter"
    elif first["type"] == "missing":
        message = "is required"
    return InvalidParameterError(field, message)
