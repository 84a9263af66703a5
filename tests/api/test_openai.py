"""The OpenAI-compatible dialect, driven by the official ``openai`` package against a real server."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from tests.api.conftest import ServerProcess
from tests.conftest import ImageServer, png_bytes

MODEL = "black-forest-labs/flux-2-klein-9b"
FAST: dict[str, Any] = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{server.url}/v1", api_key="sk-aig-test", max_retries=0, timeout=120) as client:
        yield client


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_seed_request_body(server: ServerProcess) -> None:
    """The seed's (AIgateway's) documented request, sent as written, and its documented response."""
    body = {
        "model": "black-forest-labs/flux-2-klein-9b",
        "prompt": "A cyberpunk cat at sunset, cinematic lighting",
        "n": 1,
        "size": "1024x1024",
        "response_format": "url",
    }
    response = httpx.post(
        f"{server.url}/v1/images/generations", json=body, headers={"Authorization": "Bearer sk-aig-x"}, timeout=120
    )
    assert response.status_code == 200, response.text
    payload = response.json()
    assert isinstance(payload["created"], int)
    (item,) = payload["data"]
    assert set(item) == {"url"}
    assert decode(httpx.get(item["url"]).content).size == (1024, 1024)


def test_seed_quickstart_and_curl(server: ServerProcess) -> None:
    """The seed's Python quickstart and cURL example, unchanged but for the base URL."""
    quickstart = """
from openai import OpenAI
client = OpenAI(base_url="https://api.aigateway.sh/v1", api_key="sk-aig-...")

r = client.images.generate(
    model="black-forest-labs/flux-2-klein-9b",
    prompt="a cyberpunk cat at sunset",
    size="1024x1024",
)
print(r.data[0].url)
""".replace("https://api.aigateway.sh", server.url)
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", quickstart], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert decode(httpx.get(done.stdout.strip()).content).size == (1024, 1024)
    curl = f"""curl {server.url}/v1/images/generations \\
  -H "Authorization: Bearer $AIGATEWAY_API_KEY" \\
  -H "Content-Type: application/json" \\
  -d '{{"model":"black-forest-labs/flux-2-klein-9b","prompt":"a serene cyberpunk city at dusk"}}'"""
    done = subprocess.run(
        ["bash", "-c", curl],
        capture_output=True,
        text=True,
        timeout=120,
        env={"AIGATEWAY_API_KEY": "k", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    import json

    payload = json.loads(done.stdout)
    assert decode(httpx.get(payload["data"][0]["url"]).content).size == (1024, 1024)  # size auto


def test_generate_url_and_b64_with_n2(client: OpenAI) -> None:
    urls = client.images.generate(model=MODEL, prompt="two foxes", n=2, size="80x64", extra_body={**FAST, "seed": 5})
    assert len(urls.data) == 2 and all(d.url for d in urls.data)
    b64 = client.images.generate(
        model=MODEL, prompt="two foxes", n=2, size="80x64", response_format="b64_json", extra_body={**FAST, "seed": 5}
    )
    assert len(b64.data) == 2
    from_b64 = [base64.b64decode(d.b64_json or "") for d in b64.data]
    from_url = [httpx.get(d.url or "").content for d in urls.data]
    assert from_b64 == from_url  # same seed, same pixels, whichever transport
    assert from_b64[0] != from_b64[1]  # image 1 uses seed + 1
    assert decode(from_b64[0]).size == (80, 64) and decode(from_b64[0]).format == "PNG"
    assert b64.model_extra and b64.model_extra["seed"] == 5 and b64.size == "80x64"


def test_generate_formats_and_extensions(client: OpenAI) -> None:
    jpeg = client.images.generate(
        model="black-forest-labs/flux-2-klein-4b",
        prompt="x",
        size="64x64",
        output_format="jpeg",
        output_compression=30,
        response_format="b64_json",
        extra_body=FAST,
    )
    assert decode(base64.b64decode(jpeg.data[0].b64_json or "")).format == "JPEG"
    webp = client.images.generate(
        model=MODEL,
        prompt="x",
        response_format="b64_json",
        output_format="webp",
        extra_body={**FAST, "aspect_ratio": "16:9", "megapixels": 0.25},
    )
    image = decode(base64.b64decode(webp.data[0].b64_json or ""))
    assert image.format == "WEBP" and image.size == (688, 384)


@pytest.mark.parametrize(
    ("kwargs", "param", "fragment"),
    [
        ({"size": "100x100"}, "size", "multiples of 16"),
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"n": 11}, "n", ""),
        ({"background": "transparent"}, "background", "transparent"),
        ({"output_format": "gif"}, "output_format", "raster"),
        ({"output_format": "svg"}, "output_format", "raster"),
        ({"frame_count": 4}, "frame_count", "gif"),
        ({"frame_duration_ms": 100}, "frame_duration_ms", "gif"),
        ({"svg": {"model": "x"}}, "svg", "svg"),
        ({"quality": "ultra"}, "quality", ""),
        ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps", ""),
        ({"extra_body": {"colour": "red"}}, "colour", "not a known parameter"),
    ],
)
def test_bad_requests_are_openai_400s(client: OpenAI, kwargs: dict[str, Any], param: str, fragment: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model=MODEL, prompt="x", **kwargs)
    error = info.value.body
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error" and error["param"] == param and fragment in error["message"]
    assert info.value.status_code == 400


def test_every_sdk_parameter_is_known() -> None:
    """Each parameter the installed openai SDK can send is handled on purpose (README table)."""
    from openai.types import image_edit_params, image_generate_params

    from kleinserve.api.dialects.openai import EditParams, ImageParams

    for typed, model in (
        (image_generate_params.ImageGenerateParamsStreaming, ImageParams),
        (image_edit_params.ImageEditParamsStreaming, EditParams),
    ):
        sent = set(typed.__annotations__) | {k for base in typed.__mro__ for k in getattr(base, "__annotations__", {})}
        assert sent - {"image"} <= set(model.model_fields), sent - set(model.model_fields)


IGNORED = {
    "quality": "xhigh",
    "moderation": "low",
    "style": "vivid",
    "complexity": "high",
    "background": "opaque",
    "user": "u-1",
    "safety_identifier": "hashed-user",
}


def test_accepted_parameters_change_nothing(client: OpenAI, tmp_path: Path) -> None:
    common: dict[str, Any] = {"model": MODEL, "prompt": "x", "size": "64x64", "response_format": "b64_json"}
    plain = client.images.generate(**common, extra_body={**FAST, "seed": 3})
    rich = client.images.generate(**common, **IGNORED, extra_body={**FAST, "seed": 3})  # type: ignore[arg-type]
    assert rich.data and plain.data and rich.data[0].b64_json == plain.data[0].b64_json
    assert rich.safety_identifier == "hashed-user"
    # null means "left out", as OpenAI's reference says of its optional fields.
    nulls = httpx.post(
        f"{client.base_url}images/generations",
        json={**common, "seed": 3, **FAST, "n": None, "quality": None, "style": None, "partial_images": None},
        timeout=120,
    )
    assert nulls.status_code == 200, nulls.text
    assert nulls.json()["data"][0]["b64_json"] == plain.data[0].b64_json
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes(64, 64))
    with path.open("rb") as image:
        edited = client.images.edit(
            image=image,
            input_fidelity="high",
            **common,
            **{k: v for k, v in IGNORED.items() if k not in ("moderation", "style")},  # generate-only
            extra_body={**FAST, "seed": 3},
        )
    with path.open("rb") as image:
        plain_edit = client.images.edit(image=image, **common, extra_body={**FAST, "seed": 3})
    assert edited.data and plain_edit.data and edited.data[0].b64_json == plain_edit.data[0].b64_json
    with path.open("rb") as image, path.open("rb") as markup, pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=image, markup=markup, **common)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "markup"
    with path.open("rb") as image, pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=image, svg={"model": "x", "reasoning": {"effort": "low"}}, **common)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "svg"


def test_streaming_through_the_sdk(client: OpenAI, server: ServerProcess, tmp_path: Path) -> None:
    common: dict[str, Any] = {"model": MODEL, "prompt": "x", "size": "64x64"}
    events = list(
        client.images.generate(**common, stream=True, partial_images=2, extra_body={**FAST, "seed": 4, "n": 2})
    )
    # partial_images=2 over 2 steps: a preview after each step (of the first image), then the images.
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"] * 2
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert [e.partial_image_index for e in partials] == [0, 1]
    for partial in partials:
        assert partial.output_format == "jpeg" and partial.size == "64x64" and partial.background == "opaque"
        assert decode(base64.b64decode(partial.b64_json)).size == (64, 64)
    completed = [e for e in events if e.type == "image_generation.completed"]
    plain = client.images.generate(**common, n=2, response_format="b64_json", extra_body={**FAST, "seed": 4})
    assert plain.data and [e.b64_json for e in completed] == [d.b64_json for d in plain.data]
    first = completed[0]
    assert first.type == "image_generation.completed" and first.size == "64x64" and first.output_format == "png"
    # Without partial_images: only the completed events.
    assert [e.type for e in client.images.generate(**common, stream=True, extra_body=FAST)] == [
        "image_generation.completed"
    ]
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes(64, 64))
    with path.open("rb") as image:
        edits = list(client.images.edit(image=image, stream=True, partial_images=1, **common, extra_body=FAST))
    assert [e.type for e in edits] == ["image_edit.partial_image", "image_edit.completed"]
    assert edits[0].type == "image_edit.partial_image" and edits[0].partial_image_index == 0
    # A failure after the stream started is an error event, which the SDK raises.
    # (A PNG whose header reads but whose pixels are cut short: accepted at submission, where URLs and
    # sizes are checked, it fails in the worker.)
    truncated = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)[:-40]).decode()
    body = {**common, **FAST, "stream": True, "image_url": truncated}
    with httpx.stream("POST", f"{server.url}/v1/images/edits", json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    assert "event: error" in text and '"param":"image"' in text and "image[0]" in text


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(model="dall-e-3", prompt="x")
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "not_found"
    assert "unknown model 'dall-e-3'" in info.value.body["message"]


def test_edit_one_image_multipart(client: OpenAI, tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes(80, 64))
    with path.open("rb") as file:
        result = client.images.edit(
            model=MODEL, image=file, prompt="a hat on the cat", response_format="b64_json", extra_body=FAST
        )
    image = decode(base64.b64decode(result.data[0].b64_json or ""))
    assert image.size == (80, 64)  # size auto keeps the input's size


def test_edit_several_images_multipart(client: OpenAI, tmp_path: Path) -> None:
    files = []
    for i, size in enumerate([(64, 96), (48, 48), (32, 64)]):
        path = tmp_path / f"ref{i}.png"
        path.write_bytes(png_bytes(*size))
        files.append(path.open("rb"))
    try:
        result = client.images.edit(
            model=MODEL, image=files, prompt="combine them", size="64x64", n=2, extra_body={**FAST, "seed": 1}
        )
    finally:
        for file in files:
            file.close()
    assert len(result.data) == 2
    assert all(decode(httpx.get(d.url or "").content).size == (64, 64) for d in result.data)


def test_edit_json_forms_match_the_multipart_form(
    client: OpenAI, server: ServerProcess, image_server: ImageServer, tmp_path: Path
) -> None:
    data = png_bytes(64, 64, (0, 120, 200))
    url = image_server.add("json-edit.png", data)
    path = tmp_path / "same.png"
    path.write_bytes(data)
    with path.open("rb") as file:
        multipart = client.images.edit(
            model=MODEL, image=file, prompt="edit", response_format="b64_json", extra_body={**FAST, "seed": 9}
        )
    common = {"model": MODEL, "prompt": "edit", "response_format": "b64_json", "seed": 9, **FAST}
    aigateway = httpx.post(f"{server.url}/v1/images/edits", json={**common, "image_url": url}, timeout=120)
    openai_json = httpx.post(
        f"{server.url}/v1/images/edits", json={**common, "images": [{"image_url": url}]}, timeout=120
    )
    assert aigateway.status_code == 200 and openai_json.status_code == 200, aigateway.text + openai_json.text
    expected = multipart.data[0].b64_json
    assert aigateway.json()["data"][0]["b64_json"] == expected == openai_json.json()["data"][0]["b64_json"]


def test_edit_refusals(client: OpenAI, server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    path.write_bytes(png_bytes(32, 32))
    with path.open("rb") as image, path.open("rb") as mask, pytest.raises(openai.BadRequestError) as info:
        client.images.edit(model=MODEL, image=image, mask=mask, prompt="inpaint")
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "mask"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with bad.open("rb") as image, pytest.raises(openai.BadRequestError) as info:
        client.images.edit(model=MODEL, image=image, prompt="x")
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "image"
    assert "image[0]" in info.value.body["message"]
    too_many = httpx.post(
        f"{server.url}/v1/images/edits", json={"prompt": "x", "image_url": ["data:,"] * 5}, timeout=30
    )
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "image"
    none = httpx.post(f"{server.url}/v1/images/edits", json={"prompt": "x"}, timeout=30)
    assert none.status_code == 400 and "at least one image" in none.json()["error"]["message"]


def test_models(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [
        "black-forest-labs/flux-2-klein-4b",
        "black-forest-labs/flux-2-klein-9b",
        "black-forest-labs/flux-2-klein-base-4b",
        "black-forest-labs/flux-2-klein-base-9b",
    ]
    model = client.models.retrieve("black-forest-labs/flux-2-klein-9b")
    assert model.owned_by == "black-forest-labs" and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-image-1")


def test_a_client_error_without_its_own_type_is_an_invalid_request(server: ServerProcess) -> None:
    """A 4xx with no AIgateway type of its own (405 here) is invalid_request_error, never server_error."""
    response = httpx.patch(f"{server.url}/v1/images/generations", json={})
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "invalid_request_error"
