"""Inpainting masks as OpenAI defines them: a PNG whose fully transparent pixels mark the area to edit.

A mask applies to the first image of a request and must have that image's size. It must be a PNG
with an alpha channel (RGBA, LA, or a palette or greyscale image with a transparent colour); a mask
without one is refused, as OpenAI refuses it ("mask image missing alpha channel"), because a
black-and-white mask from other tools means the opposite of what an opaque OpenAI mask would mean.
A mask without any fully transparent pixel would change nothing and is refused too.

:func:`decode_mask` turns it into what the engine takes (engine/inpaint.py): a PIL ``L`` image, 255
where alpha is 0 (repaint) and 0 elsewhere (keep). No torch here: the HTTP layer checks masks at
submission with the same code the worker uses to load them.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

from kleinserve.engine.images import InputPolicy, decode_memory, read_source
from kleinserve.errors import InvalidImageError

FIELD = "mask"
ERROR_CODE = "invalid_mask_image_format"  # OpenAI's code for a mask it cannot use
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def mask_error(message: str) -> InvalidImageError:
    """A 400 naming ``mask``, with OpenAI's code for an unusable mask."""
    error = InvalidImageError(None, message, field=FIELD)
    error.code = ERROR_CODE
    return error


def decode_mask(data: bytes, policy: InputPolicy) -> Image.Image:
    """The repaint mask (``L``: 255 edit, 0 keep) of an OpenAI-style PNG mask, or :func:`mask_error`."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise mask_error("image has too many pixels") from None
    except Exception:
        raise mask_error("is not a readable image; a mask must be a PNG with an alpha channel") from None
    if image.format != "PNG":
        raise mask_error(f"must be a PNG with an alpha channel; got {image.format or 'an unknown format'}")
    width, height = image.size
    if width * height > policy.max_pixels:
        raise mask_error(f"is {width}x{height} pixels, over the limit of {policy.max_pixels}")
    if decode_memory(image.mode, width, height) > policy.max_decode_bytes:
        raise mask_error(f"is {width}x{height} pixels in mode {image.mode}, too large to decode")
    if image.mode not in _ALPHA_MODES and "transparency" not in image.info:
        raise mask_error(
            f"has no alpha channel (mode {image.mode}): the area to edit is marked by fully transparent "
            "pixels (alpha 0) of an RGBA PNG"
        )
    try:
        image.load()
        oriented = ImageOps.exif_transpose(image) or image
        alpha = oriented.convert("RGBA").getchannel("A")
    except Exception as err:
        raise mask_error(f"image data is corrupt or cannot be read ({err})") from None
    repaint = alpha.point(lambda a: 255 if a == 0 else 0)
    if repaint.getbbox() is None:
        raise mask_error("has no fully transparent pixel (alpha 0), so there is nothing to edit")
    return repaint


def load_mask(source: str, policy: InputPolicy) -> Image.Image:
    """Read a mask from a URL, data URI, base64, ``asset:`` or (CLI) path, and decode it."""
    return decode_mask(read_source(source, None, _mask_policy(policy)), policy)  # type: ignore[arg-type]


def check_mask_size(mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """:func:`mask_error` unless the mask has the size of the image it applies to (the first)."""
    if mask_size != image_size:
        raise mask_error(
            f"is {mask_size[0]}x{mask_size[1]} but the image it applies to (the first) is "
            f"{image_size[0]}x{image_size[1]}; they must have the same size"
        )


def _mask_policy(policy: InputPolicy) -> InputPolicy:
    from dataclasses import replace

    return replace(policy, field=FIELD)
