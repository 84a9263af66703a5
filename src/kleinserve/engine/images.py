"""Reading reference images safely, and encoding generated ones.

Inputs may be a URL (http/https), a ``data:`` URI, bare base64, or (only where the caller allows it,
i.e. the CLI) a file path. Every input is capped in bytes and pixels before it is decoded, gets its
EXIF orientation applied, and is flattened onto white when it has alpha. Errors name the input.

URL fetches by the server are guarded against server-side request forgery: every hop (redirects
are followed by hand) must resolve only to public addresses, unless its host name or address is in
the operator's allow-list (``KLEINSERVE_FETCH_ALLOW``), and the connection goes to the very address
that was checked. The CLI, a local user fetching what they ask for, skips the check.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from kleinserve.engine.fetch import (
    ALLOW_ENV,
    IPAddress,
    IPNetwork,
    check_byte_size,
    embedded_ipv4,
    fetch_url,
    parse_fetch_allow,
)
from kleinserve.errors import InvalidImageError, KleinserveError
from kleinserve.request import OutputFormat
from kleinserve.settings import Settings

# Formats a reference may come in; animated GIF/WebP/PNG contribute their first frame.
ALLOWED_INPUT_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"})
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),(?P<data>.*)$", re.DOTALL)
_WHITESPACE = re.compile(r"\s+")
ASSET_PREFIX = "asset:"  # an image uploaded to this server, kept in its storage
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class InputPolicy:
    """What reference inputs are accepted and how far a fetch may go."""

    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 40_000_000
    # Memory one decode may take, judged on the header by pixel count and mode (decode_memory()).
    max_decode_bytes: int = 512 * 1024 * 1024
    timeout: float = 15.0
    deadline: float = 30.0  # seconds for a whole fetch, redirects and slow bodies included
    allow_paths: bool = False
    field: str = "images"
    # Reads "asset:<key>" references (files uploaded to the server); None refuses them.
    read_asset: Callable[[str], bytes] | None = None
    max_redirects: int = 5
    # Refuse URLs whose host resolves to a loopback, private, link-local, ... address (the server);
    # False fetches whatever is asked (the CLI, run by a local user).
    check_hosts: bool = True
    # Exceptions to that check: host names (lowercase, no trailing dot) and networks.
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        allow_paths: bool = False,
        field: str = "images",
        read_asset: Callable[[str], bytes] | None = None,
        check_hosts: bool = True,
    ) -> InputPolicy:
        try:
            allow_hosts, allow_networks = parse_fetch_allow(settings.fetch_allow)
        except ValueError as err:
            raise KleinserveError(f"{ALLOW_ENV}: {err}", code="invalid_setting") from None
        return cls(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            max_decode_bytes=settings.max_decode_bytes,
            timeout=settings.fetch_timeout,
            deadline=settings.fetch_deadline,
            allow_paths=allow_paths,
            field=field,
            read_asset=read_asset,
            max_redirects=settings.fetch_max_redirects,
            check_hosts=check_hosts,
            allow_hosts=allow_hosts,
            allow_networks=allow_networks,
        )

    def allows_address(self, address: IPAddress) -> bool:
        """Whether the allow-list holds ``address`` (or the IPv4 address it wraps)."""
        inner = embedded_ipv4(address)
        return any(address in net or (inner is not None and inner in net) for net in self.allow_networks)


def load_references(sources: Sequence[str], policy: InputPolicy) -> list[Image.Image]:
    """Load every reference in order; the first bad one raises :class:`InvalidImageError`."""
    return [load_reference(source, index, policy) for index, source in enumerate(sources)]


def load_reference(source: str, index: int, policy: InputPolicy) -> Image.Image:
    """Read one reference from wherever ``source`` points and decode it to an RGB image."""
    return decode_image(read_source(source, index, policy), index, policy)


def read_source(source: str, index: int, policy: InputPolicy) -> bytes:
    """The raw bytes behind a URL, data URI, base64 string or (if allowed) file path."""
    text = source.strip()
    if text.startswith(("http://", "https://")):
        return fetch_url(text, index, policy)
    if text.startswith("data:"):
        return _decode_data_uri(text, index, policy)
    if text.startswith(ASSET_PREFIX):
        return _read_asset(text.removeprefix(ASSET_PREFIX), index, policy)
    if "://" in text[:16]:
        scheme = text.split("://", 1)[0]
        raise InvalidImageError(index, f"unsupported URL scheme {scheme!r}; use http or https", field=policy.field)
    if policy.allow_paths and len(text) < 4096:
        path = Path(text).expanduser()
        if path.is_file():
            return _read_file(path, index, policy)
        if _looks_like_path(text):
            raise InvalidImageError(index, f"no such file: {text}", field=policy.field)
    data = _decode_base64(text)
    if data is None:
        what = (
            "a file, an http(s) URL, a data URI or base64"
            if policy.allow_paths
            else ("an http(s) URL, a data URI or base64 image data")
        )
        raise InvalidImageError(index, f"is not {what}", field=policy.field)
    check_byte_size(len(data), index, policy)
    return data


def _read_asset(key: str, index: int, policy: InputPolicy) -> bytes:
    if policy.read_asset is None:
        raise InvalidImageError(index, "asset references are not accepted here", field=policy.field)
    try:
        return policy.read_asset(key)
    except KleinserveError:
        raise InvalidImageError(index, f"no such uploaded asset: {key}", field=policy.field) from None


def _looks_like_path(text: str) -> bool:
    # Base64 never has a file suffix, and never starts with "./", "../" or "~".
    return text.startswith(("./", "../", "~")) or Path(text).suffix.lower() in _IMAGE_SUFFIXES


def _read_file(path: Path, index: int, policy: InputPolicy) -> bytes:
    size = path.stat().st_size
    check_byte_size(size, index, policy)
    try:
        return path.read_bytes()
    except OSError as err:
        raise InvalidImageError(index, f"cannot read {path}: {err.strerror}", field=policy.field) from None


def _decode_base64(text: str) -> bytes | None:
    compact = _WHITESPACE.sub("", text)
    if not compact:
        return None
    compact += "=" * (-len(compact) % 4)
    if "-" in compact or "_" in compact:  # the URL-safe alphabet
        compact = compact.translate(str.maketrans("-_", "+/"))
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _decode_data_uri(text: str, index: int, policy: InputPolicy) -> bytes:
    match = _DATA_URI.match(text)
    if match is None or ";base64" not in match.group("params").lower():
        raise InvalidImageError(index, "data URI must be of the form data:image/...;base64,...", field=policy.field)
    # 4 base64 characters carry 3 bytes: refuse oversized payloads before decoding them.
    payload = _WHITESPACE.sub("", match.group("data")).rstrip("=")
    check_byte_size(len(payload) * 3 // 4, index, policy)
    data = _decode_base64(match.group("data"))
    if data is None:
        raise InvalidImageError(index, "data URI does not hold valid base64", field=policy.field)
    return data


def check_header(image: Image.Image, index: int | None, policy: InputPolicy) -> None:
    """Refuse an opened image by its header alone (format, pixel count, decode memory): nothing decoded."""
    if image.format not in ALLOWED_INPUT_FORMATS:
        raise InvalidImageError(index, f"image format {image.format} is not accepted", field=policy.field)
    width, height = image.size
    # Checked on the header, before any pixel is decoded (decompression bombs).
    if width * height > policy.max_pixels:
        raise InvalidImageError(
            index, f"is {width}x{height} pixels, over the limit of {policy.max_pixels}", field=policy.field
        )
    if width < 1 or height < 1:
        raise InvalidImageError(index, "image is empty", field=policy.field)
    needed = decode_memory(image.mode, width, height)
    if needed > policy.max_decode_bytes:
        raise InvalidImageError(
            index,
            f"is {width}x{height} pixels in mode {image.mode}; decoding it would take about {needed >> 20} MiB, "
            f"over the limit of {policy.max_decode_bytes >> 20} MiB",
            field=policy.field,
        )


def decode_image(data: bytes, index: int | None, policy: InputPolicy) -> Image.Image:
    """Decode image bytes to RGB, refusing unknown formats, bombs and truncated files."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise InvalidImageError(index, "image has too many pixels", field=policy.field) from None
    except Exception:
        raise InvalidImageError(
            index, "is not a readable image (PNG, JPEG, WebP, GIF, BMP or TIFF)", field=policy.field
        ) from None
    check_header(image, index, policy)
    try:
        image.seek(0)
        image.load()
    except Exception as err:
        raise InvalidImageError(index, f"image data is corrupt or truncated ({err})", field=policy.field) from None
    try:
        # A damaged EXIF block must not cost the picture: it is then used as stored, unrotated.
        oriented = ImageOps.exif_transpose(image) or image
    except Exception:
        oriented = image
    try:
        return to_rgb(oriented)
    except Exception as err:
        raise InvalidImageError(index, f"image data cannot be converted ({err})", field=policy.field) from None


# Bytes per pixel Pillow keeps for a decoded image of each mode (RGB is stored 4 bytes wide).
_DECODED_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 4, "PA": 4, "RGB": 4, "RGBA": 4, "RGBX": 4, "CMYK": 4, "YCbCr": 4}
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")  # scaled through float64 in to_rgb()


def decode_memory(mode: str, width: int, height: int) -> int:
    """Peak bytes decoding an image of this mode and size takes, to its RGB form included.

    By mode, not only by pixel count: a 16-bit greyscale PNG that compresses to kilobytes decodes to
    2 bytes a pixel, and to_rgb() scales it through float64 (8 more) before the 4-byte RGB result.
    """
    pixels = width * height
    if mode in _WIDE_MODES:
        return pixels * (4 + 8 + 4)
    return pixels * (_DECODED_BYTES.get(mode, 4) + 4)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of any Pillow mode: alpha flattened onto white, 16-bit scaled to 8-bit."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit modes span 0-65535; plain 32-bit "I" carries no range, so judge it by its values.
        scale = 257.0 if image.mode != "I" or values.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(values / scale, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0) <= 1.0:
            values = values * 255
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class EncodedImage:
    """An encoded output image."""

    data: bytes
    format: OutputFormat
    width: int
    height: int

    @property
    def media_type(self) -> str:
        return self.format.media_type


def encode_image(
    image: Image.Image, fmt: OutputFormat, quality: int, metadata: Mapping[str, Any] | None = None
) -> EncodedImage:
    """Encode to PNG (metadata in a ``parameters`` text chunk), JPEG or WebP at ``quality``."""
    buffer = io.BytesIO()
    text = json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False) if metadata else None
    if fmt is OutputFormat.PNG:
        info = PngImagePlugin.PngInfo()
        if text:
            info.add_itxt("parameters", text)
        image.save(buffer, format="PNG", pnginfo=info)
    elif fmt is OutputFormat.JPEG:
        extra: dict[str, Any] = {"comment": text.encode()} if text else {}
        image.convert("RGB").save(buffer, format="JPEG", quality=quality, **extra)
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return EncodedImage(buffer.getvalue(), fmt, image.width, image.height)
