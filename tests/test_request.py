"""Tests for the canonical request model and the shared size rules (kleinserve.request)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from kleinserve.errors import InvalidParameterError
from kleinserve.request import (
    ASPECT_RATIOS,
    MAX_SEED,
    MEGAPIXELS,
    GenerationRequest,
    OutputFormat,
    check_size,
    size_for_aspect_ratio,
)
from kleinserve.settings import Settings

# --------------------------------------------------------------------------------------------------
# size_for_aspect_ratio


@pytest.mark.parametrize("megapixels", MEGAPIXELS)
@pytest.mark.parametrize("aspect_ratio", list(ASPECT_RATIOS))
def test_aspect_ratio_table_sizes(aspect_ratio: str, megapixels: float) -> None:
    width, height = size_for_aspect_ratio(aspect_ratio, megapixels)
    assert isinstance(width, int) and isinstance(height, int)
    assert width % 16 == 0 and height % 16 == 0
    assert width >= 16 and height >= 16
    w, h = ASPECT_RATIOS[aspect_ratio]
    assert (width / height) / (w / h) == pytest.approx(1.0, rel=0.03)
    assert width * height == pytest.approx(megapixels * 1024 * 1024, rel=0.05)
    # Every size the table produces is one the default size rule accepts.
    check_size(width, height, Settings())


@pytest.mark.parametrize(
    ("aspect_ratio", "megapixels", "expected"),
    [
        ("1:1", 1.0, (1024, 1024)),
        ("16:9", 1.0, (1360, 768)),
        ("9:16", 1.0, (768, 1360)),
        ("1:1", 0.25, (512, 512)),
        ("1:1", 4.0, (2048, 2048)),
        (" 1:1 ", 1, (1024, 1024)),
    ],
)
def test_aspect_ratio_spot_values(aspect_ratio: str, megapixels: float, expected: tuple[int, int]) -> None:
    assert size_for_aspect_ratio(aspect_ratio, megapixels) == expected


def test_aspect_ratio_defaults_to_one_megapixel() -> None:
    assert size_for_aspect_ratio("16:9") == (1360, 768)


@pytest.mark.parametrize("aspect_ratio", ["7:3", "1x1", "", "16/9", "square"])
def test_unknown_aspect_ratio_is_refused(aspect_ratio: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        size_for_aspect_ratio(aspect_ratio, 1.0)
    err = info.value
    assert err.field == "aspect_ratio"
    assert str(err).startswith("aspect_ratio: ")
    for allowed in ASPECT_RATIOS:
        assert allowed in err.message
    assert repr(aspect_ratio) in err.message


@pytest.mark.parametrize("megapixels", [0.0, 0.3, 1.5, 3.0, 8.0, -1.0, math.nan])
def test_unknown_megapixels_is_refused(megapixels: float) -> None:
    with pytest.raises(InvalidParameterError) as info:
        size_for_aspect_ratio("1:1", megapixels)
    err = info.value
    assert err.field == "megapixels"
    assert str(err).startswith("megapixels: ")
    for allowed in ("0.25", "0.5", "1", "2", "4"):
        assert allowed in err.message


# --------------------------------------------------------------------------------------------------
# check_size


@pytest.mark.parametrize(("width", "height"), [(1024, 1024), (64, 64), (4096, 1152), (2048, 2304)])
def test_check_size_accepts(width: int, height: int) -> None:
    check_size(width, height, Settings())


@pytest.mark.parametrize(
    ("width", "height", "field", "fragment"),
    [
        (1000, 1024, "width", "multiples of 16"),
        (1024, 1000, "height", "multiples of 16"),
        (48, 1024, "width", "between 64 and 4096"),
        (1024, 4112, "height", "between 64 and 4096"),
        (4096, 4096, "size", "over the limit of 4718592"),
    ],
)
def test_check_size_refuses(width: int, height: int, field: str, fragment: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        check_size(width, height, Settings())
    assert info.value.field == field
    assert fragment in info.value.message


def test_check_size_follows_settings() -> None:
    small = Settings(max_pixels=512 * 512, max_side=1024)
    check_size(512, 512, small)
    with pytest.raises(InvalidParameterError) as info:
        check_size(512, 528, small)
    assert info.value.field == "size"
    assert "over the limit of 262144" in info.value.message
    with pytest.raises(InvalidParameterError) as info:
        check_size(1040, 64, small)
    assert info.value.field == "width"


# --------------------------------------------------------------------------------------------------
# OutputFormat.parse


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("png", OutputFormat.PNG),
        ("PNG", OutputFormat.PNG),
        ("jpg", OutputFormat.JPEG),
        ("JPG", OutputFormat.JPEG),
        ("jpeg", OutputFormat.JPEG),
        ("JPEG", OutputFormat.JPEG),
        (" webp ", OutputFormat.WEBP),
    ],
)
def test_output_format_parse(text: str, expected: OutputFormat) -> None:
    assert OutputFormat.parse(text) is expected


@pytest.mark.parametrize("text", ["gif", "", "jpe", "image/png"])
def test_output_format_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="must be one of png, jpeg"):
        OutputFormat.parse(text)


def test_output_format_media_type() -> None:
    assert OutputFormat.JPEG.media_type == "image/jpeg"
    assert OutputFormat.PNG.media_type == "image/png"
    assert OutputFormat.WEBP.media_type == "image/webp"


# --------------------------------------------------------------------------------------------------
# GenerationRequest.parse: errors

_PARSE_ERRORS: list[tuple[str, dict[str, Any], dict[str, Any], str, str]] = [
    ("empty prompt", {"prompt": ""}, {}, "prompt", "must not be empty"),
    ("blank prompt", {"prompt": "  \n\t "}, {}, "prompt", "must not be empty"),
    ("empty prompt, image, no strength", {"prompt": "", "images": ["x"]}, {}, "prompt", "needs strength"),
    ("mask without images", {"prompt": "p", "mask": "x"}, {}, "mask", "needs an image to edit"),
    ("mask with a size", {"prompt": "p", "images": ["x"], "mask": "m", "width": 64, "height": 64}, {}, "mask", "size"),
    ("empty mask string", {"prompt": "p", "images": ["x"], "mask": " "}, {}, "mask", "must not be an empty string"),
    ("missing prompt", {"width": 1024, "height": 1024}, {}, "prompt", "is required"),
    ("long prompt", {"prompt": "x" * 11}, {"max_prompt_chars": 10}, "prompt", "is 11 characters, over the limit of 10"),
    ("NUL in prompt", {"prompt": "a cat\x00"}, {}, "prompt", "NUL"),
    ("width not multiple", {"prompt": "p", "width": 1000, "height": 1024}, {}, "width", "multiples of 16"),
    ("height not multiple", {"prompt": "p", "width": 1024, "height": 1001}, {}, "height", "multiples of 16"),
    ("width too small", {"prompt": "p", "width": 32, "height": 1024}, {}, "width", "between 64 and 4096"),
    ("width without height", {"prompt": "p", "width": 1024}, {}, "size", "must be given together"),
    ("height without width", {"prompt": "p", "height": 1024}, {}, "size", "must be given together"),
    ("too many pixels", {"prompt": "p", "width": 4096, "height": 4096}, {}, "size", "over the limit of 4718592"),
    (
        "too many images",
        {"prompt": "p", "images": ["a", "b", "c"]},
        {"max_references": 2},
        "images",
        "at most 2 reference images",
    ),
    ("empty image string", {"prompt": "p", "images": ["  "]}, {}, "images", "must not be empty"),
    ("image not a string", {"prompt": "p", "images": [3]}, {}, "images.0", "valid string"),
    ("num_images over max", {"prompt": "p", "num_images": 11}, {}, "num_images", "at most 10"),
    ("num_images zero", {"prompt": "p", "num_images": 0}, {}, "num_images", "greater than or equal to 1"),
    ("steps zero", {"prompt": "p", "steps": 0}, {}, "steps", "greater than or equal to 1"),
    ("steps over max", {"prompt": "p", "steps": 101}, {}, "steps", "at most 100"),
    ("guidance NaN", {"prompt": "p", "guidance": float("nan")}, {}, "guidance", "finite number"),
    ("guidance inf", {"prompt": "p", "guidance": float("inf")}, {}, "guidance", "finite number"),
    ("guidance -inf", {"prompt": "p", "guidance": float("-inf")}, {}, "guidance", "finite number"),
    ("guidance negative", {"prompt": "p", "guidance": -0.5}, {}, "guidance", "greater than or equal to 0"),
    ("guidance over max", {"prompt": "p", "guidance": 20.5}, {}, "guidance", "at most 20"),
    ("seed negative", {"prompt": "p", "seed": -1}, {}, "seed", "greater than or equal to 0"),
    ("seed too large", {"prompt": "p", "seed": 2**53}, {}, "seed", "less than or equal to 9007199254740991"),
    ("unknown field", {"prompt": "p", "colour": "red"}, {}, "colour", "is not a known parameter"),
    ("prompt as list", {"prompt": ["a", "cat"]}, {}, "prompt", "valid string"),
    ("width as text", {"prompt": "p", "width": "abc", "height": 1024}, {}, "width", "valid integer"),
    ("output_format gif", {"prompt": "p", "output_format": "gif"}, {}, "output_format", "must be one of png, jpeg"),
    ("quality zero", {"prompt": "p", "quality": 0}, {}, "quality", "greater than or equal to 1"),
    ("quality 101", {"prompt": "p", "quality": 101}, {}, "quality", "less than or equal to 100"),
    ("model empty", {"prompt": "p", "model": ""}, {}, "model", "at least 1 character"),
    ("negative on distilled", {"prompt": "p", "negative_prompt": "rain"}, {}, "negative_prompt", "guidance-distilled"),
    (
        "negative on 9B-KV",
        {"prompt": "p", "model": "flux-2-klein-9b-kv", "negative_prompt": "rain"},
        {},
        "negative_prompt",
        "negative prompts work on the Base variants",
    ),
    (
        "negative without CFG",
        {"prompt": "p", "model": "flux-2-klein-base-4b", "guidance": 1.0, "negative_prompt": "rain"},
        {},
        "negative_prompt",
        "needs guidance above 1",
    ),
    (
        "long negative",
        {"prompt": "p", "model": "flux-2-klein-base-4b", "negative_prompt": "x" * 11},
        {"max_prompt_chars": 10},
        "negative_prompt",
        "over the limit of 10",
    ),
    ("negative not text", {"prompt": "p", "negative_prompt": 3}, {}, "negative_prompt", "valid string"),
    ("strength without image", {"prompt": "p", "strength": 0.5}, {}, "strength", "needs an input image"),
    (
        "strength with a size",
        {"prompt": "p", "images": ["u"], "strength": 0.5, "width": 64, "height": 64},
        {},
        "strength",
        "first image's size",
    ),
    ("strength zero", {"prompt": "p", "images": ["u"], "strength": 0}, {}, "strength", "greater than 0"),
    ("strength over 1", {"prompt": "p", "images": ["u"], "strength": 1.5}, {}, "strength", "less than or equal to 1"),
]


@pytest.mark.parametrize(
    ("data", "settings_kwargs", "field", "fragment"),
    [case[1:] for case in _PARSE_ERRORS],
    ids=[case[0] for case in _PARSE_ERRORS],
)
def test_parse_errors(data: dict[str, Any], settings_kwargs: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        GenerationRequest.parse(data, Settings(**settings_kwargs))
    err = info.value
    assert err.field == field
    assert fragment in err.message
    assert err.message.startswith(f"{field}: ")
    assert err.code == "invalid_parameter"
    # The pydantic prefixes are stripped from the message.
    assert "Value error" not in err.message


@pytest.mark.parametrize(
    ("data", "settings_kwargs"),
    [
        ({"prompt": "x" * 10}, {"max_prompt_chars": 10}),
        ({"prompt": "p", "images": ["a", "b"]}, {"max_references": 2}),
        ({"prompt": "p", "num_images": 10}, {}),
        ({"prompt": "p", "steps": 1}, {}),
        ({"prompt": "p", "steps": 100}, {}),
        ({"prompt": "p", "guidance": 0}, {}),
        ({"prompt": "p", "guidance": 20.0}, {}),
        ({"prompt": "p", "seed": 0}, {}),
        ({"prompt": "p", "seed": MAX_SEED}, {}),
        ({"prompt": "p", "quality": 1}, {}),
        ({"prompt": "p", "quality": 100}, {}),
        ({"prompt": "p", "width": 64, "height": 64}, {}),
        ({"prompt": "p", "width": 2048, "height": 2304}, {}),
    ],
)
def test_parse_accepts_boundary_values(data: dict[str, Any], settings_kwargs: dict[str, Any]) -> None:
    request = GenerationRequest.parse(data, Settings(**settings_kwargs))
    for key, value in data.items():
        assert getattr(request, key) == value


def test_negative_prompt_on_base_variants() -> None:
    for model in ("flux-2-klein-base-4b", "black-forest-labs/FLUX.2-klein-base-9B"):
        request = GenerationRequest.parse({"prompt": "p", "model": model, "negative_prompt": "rain"}, Settings())
        assert request.negative_prompt == "rain"
    # "" is the negative CFG always uses, so it is the same request as none, on every variant.
    assert GenerationRequest.parse({"prompt": "p", "negative_prompt": ""}, Settings()).negative_prompt is None
    # A stored request reads back without the settings context.
    stored = GenerationRequest.parse({"prompt": "p", "model": "flux-2-klein-base-4b", "negative_prompt": "rain"})
    assert GenerationRequest.model_validate(stored.model_dump()) == stored


def test_parse_uses_settings_bounds() -> None:
    """A value the defaults accept is refused under a narrower setting, and the reverse."""
    data = {"prompt": "p", "steps": 30}
    assert GenerationRequest.parse(data, Settings()).steps == 30
    with pytest.raises(InvalidParameterError) as info:
        GenerationRequest.parse(data, Settings(max_steps=20))
    assert info.value.field == "steps"
    assert "at most 20" in info.value.message
    assert GenerationRequest.parse({"prompt": "p", "steps": 150}, Settings(max_steps=200)).steps == 150


# --------------------------------------------------------------------------------------------------
# GenerationRequest.parse: acceptance


@pytest.mark.parametrize(
    ("text", "expected"),
    [("jpg", OutputFormat.JPEG), ("JPEG", OutputFormat.JPEG), ("Png", OutputFormat.PNG), ("webp", OutputFormat.WEBP)],
)
def test_parse_output_format_spellings(text: str, expected: OutputFormat) -> None:
    request = GenerationRequest.parse({"prompt": "p", "output_format": text})
    assert request.output_format is expected


def test_parse_defaults() -> None:
    request = GenerationRequest.parse({"prompt": "a lighthouse at dusk"})
    assert request.model == "flux-2-klein-4b"
    assert request.prompt == "a lighthouse at dusk"
    assert request.images == []
    assert request.num_images == 1
    assert request.output_format is OutputFormat.PNG
    assert request.quality == 95
    assert request.steps is None
    assert request.guidance is None
    assert request.seed is None
    assert request.width is None
    assert request.height is None


_FULL_REQUEST: dict[str, Any] = {
    "model": "flux-2-klein-9b",
    "prompt": "a red fox in fresh snow, telephoto",
    "images": ["https://example.com/fox.png", "data:image/png;base64,iVBORw0KGgo="],
    "width": 768,
    "height": 1360,
    "steps": 4,
    "guidance": 1.5,
    "seed": 1234567,
    "num_images": 3,
    "output_format": "jpg",
    "quality": 80,
    "loras": [{"name": "ink", "scale": 0.8}, {"name": "grain", "scale": -0.5}],
}


def test_full_request_round_trips() -> None:
    request = GenerationRequest.parse(_FULL_REQUEST)
    dumped = request.model_dump()
    assert dumped == {
        **_FULL_REQUEST,
        "output_format": OutputFormat.JPEG,
        "negative_prompt": None,
        "safety_check": True,
        "cache": None,
        "safety_tolerance": None,
        "strength": None,
        "mask": None,
        "previews": 0,
    }
    again = GenerationRequest.parse(dumped)
    assert again == request
    # And through JSON-safe values, as a job file would store it.
    assert GenerationRequest.parse(request.model_dump(mode="json")) == request


def test_request_is_frozen() -> None:
    request = GenerationRequest.parse({"prompt": "p"})
    with pytest.raises(ValidationError):
        request.prompt = "q"  # type: ignore[misc]
    assert request.prompt == "p"


# --------------------------------------------------------------------------------------------------
# Settings from the environment


def test_max_references_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLEINSERVE_MAX_REFERENCES", "1")
    settings = Settings()
    assert settings.max_references == 1
    one = {"prompt": "p", "images": ["https://example.com/a.png"]}
    two = {"prompt": "p", "images": ["https://example.com/a.png", "https://example.com/b.png"]}
    assert GenerationRequest.parse(one, settings).images == one["images"]
    with pytest.raises(InvalidParameterError) as info:
        GenerationRequest.parse(two, settings)
    assert info.value.field == "images"
    assert "at most 1 reference images" in info.value.message
    # Without explicit settings, parse() reads the environment itself.
    with pytest.raises(InvalidParameterError) as info:
        GenerationRequest.parse(two)
    assert info.value.field == "images"


def test_keyword_settings_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLEINSERVE_MAX_REFERENCES", "1")
    assert Settings(max_references=3).max_references == 3


def test_an_empty_prompt_is_image_to_image_with_no_instruction() -> None:
    """OpenAI's variations: "" with strength re-draws the first image (whitespace stays refused)."""
    request = GenerationRequest.parse({"prompt": "", "images": ["x"], "strength": 0.75})
    assert request.prompt == "" and request.strength == 0.75
    with pytest.raises(InvalidParameterError, match="prompt: must not be empty"):
        GenerationRequest.parse({"prompt": " ", "images": ["x"], "strength": 0.75})
