"""Tests for reading reference images and encoding outputs (kleinserve.engine.images).

Images are built with Pillow in ``tmp_path``; URLs are served by a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from PIL import Image

from kleinserve.engine.images import (
    EncodedImage,
    InputPolicy,
    decode_image,
    encode_image,
    load_reference,
    load_references,
)
from kleinserve.errors import InvalidImageError
from kleinserve.request import OutputFormat
from tests.conftest import loopback_server

# The test server is on loopback, which the server-side host check refuses unless allowed.
LOCAL = InputPolicy(allow_networks=(ipaddress.ip_network("127.0.0.1/32"),))
SIZE = (40, 24)  # deliberately not square, so a swapped width/height shows
COLOR = (30, 90, 200)


def image_bytes(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_bytes(size: tuple[int, int] = SIZE, color: tuple[int, int, int] = COLOR) -> bytes:
    return image_bytes(Image.new("RGB", size, color), "PNG")


def noisy_rgb(size: tuple[int, int]) -> Image.Image:
    """A busy image (compresses poorly, so lossy quality matters)."""
    noise = Image.effect_noise(size, 64)
    return Image.merge("RGB", (noise, noise.rotate(90, expand=False), noise.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width`` x ``height``, with no pixel data at all."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def assert_rgb(image: Image.Image, size: tuple[int, int] = SIZE) -> None:
    assert image.mode == "RGB"
    assert image.size == size


def error_of(source: str, policy: InputPolicy, index: int = 0) -> InvalidImageError:
    with pytest.raises(InvalidImageError) as info:
        load_reference(source, index, policy)
    err = info.value
    assert err.message.startswith(f"{policy.field}[{index}]: ")
    assert err.index == index
    assert err.code == "invalid_image"
    return err


# --------------------------------------------------------------------------------------------------
# A real HTTP server

BIG_BODY = b"\x00" * 5000
SLOW_DELAY = 5.0  # far longer than the short fetch timeout; released at teardown


class _Handler(BaseHTTPRequestHandler):
    png = b""
    release: threading.Event

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "image/png", sized: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if sized:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        try:
            if self.path == "/image.png":
                self._send(200, self.png)
            elif self.path == "/missing.png":
                self._send(404, b"not found", "text/plain")
            elif self.path == "/big.png":
                self._send(200, BIG_BODY)
            elif self.path == "/big-unsized.png":
                # HTTP/1.0 without Content-Length: the body ends when the connection closes.
                self._send(200, BIG_BODY, sized=False)
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/image.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/slow.png":
                self.release.wait(SLOW_DELAY)
                self._send(200, self.png)
            else:
                self._send(500, b"unexpected path", "text/plain")
        except OSError:  # the client gave up (timeouts, byte caps); nothing to do
            pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """Base URL of a real HTTP server on 127.0.0.1 (proxies disabled so httpx connects directly)."""
    release = threading.Event()
    handler = type("Handler", (_Handler,), {"png": png_bytes(), "release": release})
    with loopback_server(handler, release) as port:
        yield f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------------------------------
# Source kinds


def test_file_path_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "ref.png"
    path.write_bytes(png_bytes())
    image = load_reference(str(path), 0, InputPolicy(allow_paths=True))
    assert_rgb(image)
    assert image.getpixel((0, 0)) == COLOR


def test_file_path_refused_by_default(tmp_path: Path) -> None:
    path = tmp_path / "ref.png"
    path.write_bytes(png_bytes())
    err = error_of(str(path), InputPolicy())
    assert err.message == "images[0]: is not an http(s) URL, a data URI or base64 image data"


def test_file_path_over_byte_cap(tmp_path: Path) -> None:
    path = tmp_path / "ref.png"
    data = png_bytes()
    path.write_bytes(data)
    err = error_of(str(path), InputPolicy(allow_paths=True, max_bytes=len(data) - 1))
    assert f"is {len(data)} bytes, over the limit of {len(data) - 1} bytes" in err.message


def test_missing_file_with_paths_allowed(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.png")
    err = error_of(missing, InputPolicy(allow_paths=True))
    assert err.message == f"images[0]: no such file: {missing}"


@pytest.mark.parametrize("source", ["./nope", "../nope/ref", "~/no-such-dir-kleinserve/ref"])
def test_missing_relative_path_with_paths_allowed(source: str) -> None:
    err = error_of(source, InputPolicy(allow_paths=True))
    assert f"no such file: {source}" in err.message


def test_neither_file_nor_base64_with_paths_allowed() -> None:
    err = error_of("not an image!", InputPolicy(allow_paths=True))
    assert "is not a file, an http(s) URL, a data URI or base64" in err.message


@pytest.mark.parametrize("text", ["hello world!", "not base64 at all?", "%%%%"])
def test_text_that_is_not_base64(text: str) -> None:
    err = error_of(text, InputPolicy())
    assert err.message == "images[0]: is not an http(s) URL, a data URI or base64 image data"


def test_http_url(server: str) -> None:
    image = load_reference(f"{server}/image.png", 0, LOCAL)
    assert_rgb(image)
    assert image.getpixel((5, 5)) == COLOR


def test_redirect_is_followed(server: str) -> None:
    image = load_reference(f"{server}/redirect", 0, LOCAL)
    assert_rgb(image)


@pytest.mark.parametrize("mime", ["image/png", "image/jpeg", ""])
def test_data_uri(mime: str) -> None:
    uri = f"data:{mime};base64," + base64.b64encode(png_bytes()).decode()
    image = load_reference(uri, 0, InputPolicy())
    assert_rgb(image)
    assert image.getpixel((0, 0)) == COLOR


def test_data_uri_without_base64_is_refused() -> None:
    err = error_of("data:image/png,hello", InputPolicy())
    assert "data:image/...;base64" in err.message


def test_bare_base64() -> None:
    image = load_reference(base64.b64encode(png_bytes()).decode(), 0, InputPolicy())
    assert_rgb(image)
    assert image.getpixel((0, 0)) == COLOR


def test_bare_base64_with_newlines() -> None:
    wrapped = base64.encodebytes(png_bytes()).decode()  # MIME style: a newline every 76 characters
    assert wrapped.count("\n") > 1
    image = load_reference("\n" + wrapped + "\n", 0, InputPolicy())
    assert_rgb(image)


def test_urlsafe_base64_without_padding() -> None:
    text = base64.urlsafe_b64encode(png_bytes()).decode().rstrip("=")
    assert_rgb(load_reference(text, 0, InputPolicy()))


# --------------------------------------------------------------------------------------------------
# URL errors


def test_url_404_names_the_status(server: str) -> None:
    err = error_of(f"{server}/missing.png", LOCAL)
    assert "HTTP 404" in err.message


@pytest.mark.parametrize("path", ["/big.png", "/big-unsized.png"])
def test_url_over_byte_cap(server: str, path: str) -> None:
    err = error_of(f"{server}{path}", replace(LOCAL, max_bytes=1024))
    assert "over the limit of 1024 bytes" in err.message


def test_url_timeout(server: str) -> None:
    err = error_of(f"{server}/slow.png", replace(LOCAL, timeout=0.3))
    assert "timed out" in err.message
    assert "0.3s" in err.message


def test_url_redirect_loop(server: str) -> None:
    err = error_of(f"{server}/loop", LOCAL)
    assert "redirect loop" in err.message


def test_url_connection_refused() -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    err = error_of(f"http://127.0.0.1:{port}/image.png", replace(LOCAL, timeout=2))
    assert "failed" in err.message


@pytest.mark.parametrize("url", ["ftp://example.com/cat.png", "file:///etc/passwd", "s3://bucket/key.png"])
def test_unsupported_scheme(url: str) -> None:
    err = error_of(url, InputPolicy(allow_paths=True))
    scheme = url.split("://")[0]
    assert f"unsupported URL scheme {scheme!r}" in err.message


# --------------------------------------------------------------------------------------------------
# Hostile and unusual images


def test_garbage_bytes() -> None:
    err = error_of(base64.b64encode(b"this is not an image at all" * 10).decode(), InputPolicy())
    assert "is not a readable image" in err.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(fmt: str) -> None:
    data = image_bytes(noisy_rgb((64, 48)), fmt)
    with pytest.raises(InvalidImageError) as info:
        decode_image(data[: len(data) // 2], 0, InputPolicy())
    message = info.value.message
    assert message.startswith("images[0]: ")
    assert "corrupt or truncated" in message or "not a readable image" in message


def test_pixel_cap() -> None:
    err = error_of(base64.b64encode(png_bytes((20, 20))).decode(), InputPolicy(max_pixels=100))
    assert "is 20x20 pixels, over the limit of 100" in err.message


def test_pixel_cap_is_checked_on_the_header() -> None:
    """A header-only PNG (no pixel data) is refused for its size, not for being truncated."""
    with pytest.raises(InvalidImageError) as info:
        decode_image(header_only_png(7000, 7000), 0, InputPolicy())
    assert "is 7000x7000 pixels, over the limit of 40000000" in info.value.message
    # Under the cap, the same kind of file is refused as truncated instead.
    with pytest.raises(InvalidImageError) as info:
        decode_image(header_only_png(20, 20), 0, InputPolicy())
    assert "corrupt or truncated" in info.value.message


def test_decompression_bomb_header() -> None:
    with pytest.raises(InvalidImageError) as info:
        decode_image(header_only_png(20000, 20000), 0, InputPolicy())
    assert "too many pixels" in info.value.message


def test_byte_cap_on_bare_base64() -> None:
    data = png_bytes()
    err = error_of(base64.b64encode(data).decode(), InputPolicy(max_bytes=len(data) - 1))
    assert f"is {len(data)} bytes, over the limit of {len(data) - 1} bytes" in err.message


def test_byte_cap_on_data_uri() -> None:
    data = png_bytes()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    err = error_of(uri, InputPolicy(max_bytes=len(data) // 2))
    assert f"over the limit of {len(data) // 2} bytes" in err.message


def test_byte_cap_allows_exact_size() -> None:
    data = png_bytes()
    assert_rgb(load_reference(base64.b64encode(data).decode(), 0, InputPolicy(max_bytes=len(data))))


def test_data_uri_byte_cap_allows_exact_size() -> None:
    data = png_bytes()
    assert len(data) % 3 != 0  # so the base64 text ends in padding
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    assert_rgb(load_reference(uri, 0, InputPolicy(max_bytes=len(data))))


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", SIZE, color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    image = decode_image(data, 0, InputPolicy())
    assert_rgb(image)
    assert image.getpixel((3, 3)) == (255, 0, 0)


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = image_bytes(Image.new("CMYK", SIZE, (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = decode_image(data, 0, InputPolicy())
    assert_rgb(image)
    r, g, b = image.getpixel((5, 5))
    assert r > 230 and g < 25 and b < 25  # red


def test_16_bit_grayscale_is_scaled() -> None:
    data = image_bytes(Image.new("I;16", SIZE, 32768), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = decode_image(data, 0, InputPolicy())
    assert_rgb(image)
    r, g, b = image.getpixel((2, 2))
    assert r == g == b
    assert abs(r - 128) <= 1


def test_dark_16_bit_grayscale_stays_dark() -> None:
    # 200 / 65535 is almost black; it must not come out as 200 / 255.
    image = decode_image(image_bytes(Image.new("I;16", SIZE, 200), "PNG"), 0, InputPolicy())
    assert image.getpixel((0, 0))[0] <= 1


def test_16_bit_white_is_white() -> None:
    image = decode_image(image_bytes(Image.new("I;16", SIZE, 65535), "PNG"), 0, InputPolicy())
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_transparent_rgba_flattened_onto_white() -> None:
    source = Image.new("RGBA", SIZE, (10, 20, 30, 0))
    source.putpixel((1, 1), (10, 20, 30, 255))
    image = decode_image(image_bytes(source, "PNG"), 0, InputPolicy())
    assert_rgb(image)
    assert image.getpixel((5, 5)) == (255, 255, 255)
    assert image.getpixel((1, 1)) == (10, 20, 30)


def test_half_transparent_rgba_blends_with_white() -> None:
    image = decode_image(image_bytes(Image.new("RGBA", SIZE, (0, 0, 0, 128)), "PNG"), 0, InputPolicy())
    r, g, b = image.getpixel((0, 0))
    assert r == g == b
    assert 120 <= r <= 135


def test_palette_png_with_transparency() -> None:
    source = Image.new("P", SIZE, 0)
    source.putpalette([10, 20, 30, 200, 0, 0] + [0] * (256 - 2) * 3)
    source.putpixel((1, 1), 1)
    data = image_bytes(source, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    image = decode_image(data, 0, InputPolicy())
    assert_rgb(image)
    assert image.getpixel((5, 5)) == (255, 255, 255)  # index 0 is transparent
    assert image.getpixel((1, 1)) == (200, 0, 0)


def test_palette_png_with_partial_alpha() -> None:
    source = Image.new("P", SIZE, 0)
    source.putpalette([10, 20, 30, 200, 0, 0] + [0] * (256 - 2) * 3)
    source.putpixel((1, 1), 1)
    data = image_bytes(source, "PNG", transparency=bytes([0, 128]))
    image = decode_image(data, 0, InputPolicy())
    assert_rgb(image)
    assert image.getpixel((5, 5)) == (255, 255, 255)
    r, g, b = image.getpixel((1, 1))
    assert abs(r - 227) <= 2 and abs(g - 127) <= 2 and abs(b - 127) <= 2


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    source = Image.new("RGB", SIZE, COLOR)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = image_bytes(source, fmt, exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == SIZE
    image = decode_image(data, 0, InputPolicy())
    assert_rgb(image, (SIZE[1], SIZE[0]))


def test_exif_orientation_6_rotates_content() -> None:
    source = Image.new("RGB", SIZE, (255, 255, 255))
    source.paste((255, 0, 0), (0, 0, 8, 8))  # red block in the top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_image(image_bytes(source, "PNG", exif=exif.tobytes()), 0, InputPolicy())
    # Rotated 90 degrees clockwise: the top-left corner moves to the top-right.
    assert image.size == (SIZE[1], SIZE[0])
    assert image.getpixel((image.width - 2, 1)) == (255, 0, 0)
    assert image.getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_accepted_input_format(fmt: str) -> None:
    assert_rgb(decode_image(image_bytes(Image.new("RGB", SIZE, COLOR), fmt), 0, InputPolicy()))


def test_refused_input_format() -> None:
    data = image_bytes(Image.new("RGB", SIZE, COLOR), "PPM")
    with pytest.raises(InvalidImageError) as info:
        decode_image(data, 0, InputPolicy())
    assert "image format PPM is not accepted" in info.value.message


# --------------------------------------------------------------------------------------------------
# Error indices


def test_load_references_all_good(server: str) -> None:
    sources = [base64.b64encode(png_bytes()).decode(), f"{server}/image.png"]
    images = load_references(sources, LOCAL)
    assert len(images) == 2
    for image in images:
        assert_rgb(image)


@pytest.mark.parametrize(
    ("bad", "policy", "fragment"),
    [
        ("ftp://example.com/a.png", InputPolicy(), "unsupported URL scheme"),
        (base64.b64encode(b"garbage" * 20).decode(), InputPolicy(), "is not a readable image"),
        (base64.b64encode(png_bytes((20, 20))).decode(), InputPolicy(max_pixels=399), "over the limit of 399"),
        ("!!!", InputPolicy(), "is not an http(s) URL, a data URI or base64"),
        ("data:image/png,abc", InputPolicy(), "data URI must be of the form"),
        ("/missing.png", LOCAL, "HTTP 404"),
    ],
)
def test_error_names_the_bad_index(server: str, bad: str, policy: InputPolicy, fragment: str) -> None:
    if bad.startswith("/"):
        bad = server + bad
    good = base64.b64encode(png_bytes((10, 10))).decode()
    with pytest.raises(InvalidImageError) as info:
        load_references([good, bad], policy)
    err = info.value
    assert err.index == 1
    assert err.message.startswith("images[1]: ")
    assert fragment in err.message


def test_error_uses_policy_field() -> None:
    policy = InputPolicy(field="mask")
    with pytest.raises(InvalidImageError) as info:
        load_references([base64.b64encode(png_bytes()).decode(), "ftp://x/y.png"], policy)
    assert info.value.message.startswith("mask[1]: ")
    assert info.value.field == "mask"


# --------------------------------------------------------------------------------------------------
# encode_image


def test_encode_png_carries_parameters() -> None:
    metadata = {
        "prompt": "un chat sur un toit – 猫",
        "seed": 42,
        "steps": 4,
        "guidance": 1.0,
        "model": "flux-2-klein-4b",
    }
    encoded = encode_image(Image.new("RGB", SIZE, COLOR), OutputFormat.PNG, 95, metadata)
    assert isinstance(encoded, EncodedImage)
    assert encoded.format is OutputFormat.PNG
    assert encoded.media_type == "image/png"
    assert (encoded.width, encoded.height) == SIZE
    with Image.open(io.BytesIO(encoded.data)) as decoded:
        assert decoded.format == "PNG"
        assert decoded.size == SIZE
        assert json.loads(decoded.text["parameters"]) == metadata
        assert decoded.convert("RGB").getpixel((0, 0)) == COLOR


def test_encode_png_without_metadata_has_no_parameters() -> None:
    encoded = encode_image(Image.new("RGB", SIZE, COLOR), OutputFormat.PNG, 95)
    with Image.open(io.BytesIO(encoded.data)) as decoded:
        assert "parameters" not in decoded.text


@pytest.mark.parametrize(("fmt", "pil_format"), [(OutputFormat.JPEG, "JPEG"), (OutputFormat.WEBP, "WEBP")])
def test_encode_lossy_formats(fmt: OutputFormat, pil_format: str) -> None:
    encoded = encode_image(Image.new("RGB", SIZE, COLOR), fmt, 90, {"seed": 1})
    assert encoded.format is fmt
    assert encoded.media_type == f"image/{fmt.value}"
    assert (encoded.width, encoded.height) == SIZE
    with Image.open(io.BytesIO(encoded.data)) as decoded:
        assert decoded.format == pil_format
        assert decoded.size == SIZE
        r, g, b = decoded.convert("RGB").getpixel((10, 10))
        assert abs(r - COLOR[0]) < 12 and abs(g - COLOR[1]) < 12 and abs(b - COLOR[2]) < 12


def test_encode_jpeg_carries_metadata_comment() -> None:
    metadata = {"seed": 7, "prompt": "a boat"}
    encoded = encode_image(Image.new("RGB", SIZE, COLOR), OutputFormat.JPEG, 90, metadata)
    with Image.open(io.BytesIO(encoded.data)) as decoded:
        assert json.loads(decoded.info["comment"]) == metadata


def test_encode_jpeg_from_rgba() -> None:
    encoded = encode_image(Image.new("RGBA", SIZE, (*COLOR, 255)), OutputFormat.JPEG, 90)
    with Image.open(io.BytesIO(encoded.data)) as decoded:
        assert decoded.format == "JPEG" and decoded.size == SIZE


@pytest.mark.parametrize("fmt", [OutputFormat.JPEG, OutputFormat.WEBP])
def test_lower_quality_is_smaller(fmt: OutputFormat) -> None:
    image = noisy_rgb((128, 128))
    low = encode_image(image, fmt, 20)
    high = encode_image(image, fmt, 95)
    assert len(low.data) < len(high.data)
