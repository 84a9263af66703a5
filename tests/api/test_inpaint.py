"""Masks (inpainting) and variations through the real ``openai`` SDK and the Oxen extension.

Pixel parity with diffusers' Flux2KleinInpaintPipeline is tests/engine/test_inpaint.py; here: the
wire forms, that they mean the same request, and the 400s in each dialect's error shape.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image, ImageDraw

from tests.api.conftest import ServerProcess
from tests.conftest import ImageServer, png_bytes

MODEL = "black-forest-labs/flux-2-klein-4b"
FAST: dict[str, Any] = {"num_inference_steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=120) as client:
        yield client


def mask_png(
    size: tuple[int, int], box: tuple[int, int, int, int] | None = (16, 16, 47, 31), mode: str = "RGBA"
) -> bytes:
    """An OpenAI mask: opaque black, fully transparent inside ``box`` (the area to edit)."""
    image = Image.new("RGBA", size, (0, 0, 0, 255))
    if box is not None:
        ImageDraw.Draw(image).rectangle(box, fill=(0, 0, 0, 0))
    buffer = io.BytesIO()
    if mode == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG")
    else:
        image.convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def pixels(b64: str | None) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64 or ""))).convert("RGB"))


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_openai_mask_multipart_and_json_are_one_request(
    client: OpenAI, server: ServerProcess, image_server: ImageServer, tmp_path: Path
) -> None:
    image, mask = png_bytes(64, 48), mask_png((64, 48))
    with write(tmp_path, "i.png", image).open("rb") as i, write(tmp_path, "m.png", mask).open("rb") as m:
        masked = client.images.edit(
            model=MODEL, image=i, mask=m, prompt="a hole", size="1024x1024", response_format="b64_json", extra_body=FAST
        )
    got = pixels(masked.data[0].b64_json)
    assert got.shape == (48, 64, 3)  # the edited image's size; size is ignored with a mask
    common = {"model": MODEL, "prompt": "a hole", "response_format": "b64_json", **FAST}
    forms = [
        {"images": [{"image_url": data_uri(image)}], "mask": {"image_url": data_uri(mask)}},  # OpenAI JSON
        {"image_url": image_server.add("inpaint.png", image), "mask_url": image_server.add("mask.png", mask)},
    ]
    for form in forms:
        response = httpx.post(f"{server.url}/v1/images/edits", json={**common, **form}, timeout=120)
        assert response.status_code == 200, response.text
        assert np.array_equal(pixels(response.json()["data"][0]["b64_json"]), got)
    with write(tmp_path, "i2.png", image).open("rb") as i:
        unmasked = client.images.edit(
            model=MODEL, image=i, prompt="a hole", response_format="b64_json", extra_body=FAST
        )
    assert not np.array_equal(pixels(unmasked.data[0].b64_json), got)


def test_openai_mask_streams_like_the_sync_answer(client: OpenAI, tmp_path: Path) -> None:
    image, mask = write(tmp_path, "s.png", png_bytes(64, 48)), write(tmp_path, "sm.png", mask_png((64, 48)))
    with image.open("rb") as i, mask.open("rb") as m:
        events = list(client.images.edit(model=MODEL, image=i, mask=m, prompt="p", stream=True, extra_body=FAST))
    assert [e.type for e in events] == ["image_edit.completed"] and events[0].size == "64x48"
    with image.open("rb") as i, mask.open("rb") as m:
        sync = client.images.edit(model=MODEL, image=i, mask=m, prompt="p", response_format="b64_json", extra_body=FAST)
    assert events[0].b64_json == sync.data[0].b64_json


@pytest.mark.parametrize(
    ("mask", "fragment"),
    [
        (mask_png((64, 48), mode="RGB"), "no alpha channel"),
        (mask_png((64, 48), mode="JPEG"), "must be a PNG"),
        (mask_png((48, 64)), "is 48x64 but the image it applies to (the first) is 64x48"),
        (mask_png((64, 48), box=None), "nothing to edit"),
        (b"not a png", "not a readable image"),
    ],
)
def test_openai_bad_masks_are_400s(client: OpenAI, tmp_path: Path, mask: bytes, fragment: str) -> None:
    image, mask_file = write(tmp_path, "i.png", png_bytes(64, 48)), write(tmp_path, "m", mask)
    with image.open("rb") as i, mask_file.open("rb") as m, pytest.raises(openai.BadRequestError) as info:
        client.images.edit(model=MODEL, image=i, mask=m, prompt="x", extra_body=FAST)
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == "mask" and body["type"] == "invalid_request_error", body
    assert body["code"] == "invalid_mask_image_format" and fragment in body["message"], body


def test_oxen_mask_extension(server: ServerProcess) -> None:
    body = {
        "model": "black-forest-labs-flux-2-klein-4b",
        "prompt": "a hole",
        "seed": 5,
        "num_inference_steps": 2,
        "response_format": "b64_json",
        "input_image": data_uri(png_bytes(64, 48)),
        "mask": data_uri(mask_png((64, 48))),
    }
    response = httpx.post(f"{server.url}/api/ai/images/edit", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert pixels(response.json()["images"][0]["b64_json"]).shape == (48, 64, 3)
    del body["input_image"]
    response = httpx.post(f"{server.url}/api/ai/images/edit", json=body, timeout=120)
    assert response.status_code == 400
    assert response.json()["error"]["detail"].startswith("mask: needs an image to edit"), response.text


def test_variations_through_the_sdk(client: OpenAI, tmp_path: Path) -> None:
    path = write(tmp_path, "v.png", png_bytes(80, 48))
    with path.open("rb") as file:
        one = client.images.create_variation(image=file, model=MODEL, response_format="b64_json", extra_body=FAST)
    assert pixels(one.data[0].b64_json).shape == (48, 80, 3)  # size auto: the image's
    with path.open("rb") as file:
        two = client.images.create_variation(
            image=file, model=MODEL, n=2, size="256x256", response_format="b64_json", user="u1", extra_body=FAST
        )
    first, second = (pixels(d.b64_json) for d in two.data)
    assert first.shape == second.shape == (256, 256, 3)
    assert not np.array_equal(first, second)  # each has its own seed
    with path.open("rb") as file:
        url = client.images.create_variation(image=file, model=MODEL)
    assert httpx.get(url.data[0].url or "").status_code == 200


def test_bad_variations_are_openai_400s(client: OpenAI, server: ServerProcess, tmp_path: Path) -> None:
    with write(tmp_path, "bad.png", b"not an image").open("rb") as file, pytest.raises(openai.BadRequestError) as info:
        client.images.create_variation(image=file, model=MODEL)
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == "image" and body["type"] == "invalid_request_error", body
    with write(tmp_path, "ok.png", png_bytes(32, 32)).open("rb") as file, pytest.raises(openai.BadRequestError) as info:
        client.images.create_variation(image=file, model=MODEL, size="100x100")  # type: ignore[arg-type]
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "size"
    with write(tmp_path, "dot.png", png_bytes(1, 1)).open("rb") as file, pytest.raises(openai.BadRequestError) as info:
        client.images.create_variation(image=file, model=MODEL)  # too small to start from (found by schemathesis)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "image"
    assert "need at least 16 pixels a side" in info.value.body["message"]
    response = httpx.post(f"{server.url}/v1/images/variations", json={"model": MODEL}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "image", response.text
