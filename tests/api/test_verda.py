"""The Verda dialect against a real server process: images and headers, base64 JSON, errors."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from kleinserve.api.app import create_app
from kleinserve.engine.catalog import ServedModel
from kleinserve.engine.variants import find_variant
from kleinserve.settings import Settings
from tests.api.conftest import ServerProcess
from tests.conftest import ImageServer, png_bytes

SMALL: dict[str, Any] = {"prompt": "a small test", "width": 64, "height": 64}
BASE_FAST = {"num_steps": 2}  # Base variants default to 50 steps; tests need far fewer.
SLUGS = ["flux2-klein-4b", "flux2-klein-9b", "flux2-klein-base-4b", "flux2-klein-base-9b"]


def generate(server: ServerProcess, slug: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/{slug}/generate", json=body, timeout=120, **kwargs)


def image_of(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def assert_verda_error(response: httpx.Response, status: int, code: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "code"} and body["code"] == code
    assert fragment in body["detail"], body["detail"]


def assert_safety_headers(response: httpx.Response) -> None:
    # No classifier ships with kleinserve: "false" always comes with the "unavailable" marker.
    assert response.headers["X-Has-Nsfw-Content"] == "false"
    assert response.headers["X-Kleinserve-Safety-Checker"] == "unavailable"


@pytest.mark.parametrize("slug", SLUGS)
def test_text_to_image_on_every_slug(server: ServerProcess, slug: str) -> None:
    body = {**SMALL, "seed": 5, **(BASE_FAST if "base" in slug else {})}
    response = generate(server, slug, body, headers={"Authorization": "Bearer any-key"})
    image = image_of(response)
    assert image.format == "JPEG" and image.size == (64, 64)
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["X-Seed"] == "5"
    assert_safety_headers(response)


def test_random_seed_is_reported_and_reproducible(server: ServerProcess) -> None:
    first = generate(server, "flux2-klein-4b", SMALL)
    seed = int(first.headers["X-Seed"])
    again = generate(server, "flux2-klein-4b", {**SMALL, "seed": seed})
    assert again.headers["X-Seed"] == str(seed)
    assert image_of(first).size == (64, 64) and again.content == first.content


def test_defaults_are_1024x768_jpeg(server: ServerProcess) -> None:
    response = generate(server, "flux2-klein-4b", {"prompt": SMALL["prompt"]})
    image = image_of(response)
    assert image.format == "JPEG" and image.size == (1024, 768)
    assert response.headers["content-type"] == "image/jpeg" and int(response.headers["X-Seed"]) >= 0


@pytest.mark.parametrize(
    ("output_format", "media_type", "pil_format"),
    [("png", "image/png", "PNG"), ("webp", "image/webp", "WEBP")],  # jpg: see test_base64_output_json
)
def test_output_formats(server: ServerProcess, output_format: str, media_type: str, pil_format: str) -> None:
    response = generate(server, "flux2-klein-4b", {**SMALL, "seed": 1, "output_format": output_format})
    assert image_of(response).format == pil_format
    assert response.headers["content-type"] == media_type


def test_lower_quality_gives_a_smaller_jpeg(server: ServerProcess) -> None:
    body = {**SMALL, "width": 128, "height": 128, "seed": 2}
    high = generate(server, "flux2-klein-4b", body)  # default quality 95
    low = generate(server, "flux2-klein-4b", {**body, "output_quality": 10})
    assert image_of(low).size == image_of(high).size
    assert len(low.content) < len(high.content)


def test_base64_output_json(server: ServerProcess) -> None:
    body = {**SMALL, "seed": 9, "output_format": "jpg"}
    raw = generate(server, "flux2-klein-4b", body)
    assert image_of(raw).format == "JPEG" and raw.headers["content-type"] == "image/jpeg"
    response = generate(server, "flux2-klein-4b", {**body, "enable_base64_output": True})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    data = response.json()
    assert set(data) == {"image", "seed", "has_nsfw_content", "output_format", "width", "height"}
    assert data["seed"] == 9 and data["has_nsfw_content"] is False and data["output_format"] == "jpeg"
    assert (data["width"], data["height"]) == (64, 64)
    assert base64.b64decode(data["image"]) == raw.content  # the same image as the binary answer
    assert response.headers["X-Seed"] == "9"
    assert_safety_headers(response)


def test_distilled_steps_and_guidance_are_fixed(server: ServerProcess) -> None:
    for slug, change, field in [
        ("flux2-klein-4b", {"num_steps": 8}, "num_steps"),
        ("flux2-klein-9b", {"guidance": 2.5}, "guidance"),
    ]:
        response = generate(server, slug, {**SMALL, **change})
        assert_verda_error(response, 400, "invalid_parameter", f"{field}: is fixed at")
    # The fixed values themselves are accepted, and change nothing.
    plain = generate(server, "flux2-klein-4b", {**SMALL, "seed": 4})
    explicit = generate(server, "flux2-klein-4b", {**SMALL, "seed": 4, "num_steps": 4, "guidance": 1.0})
    assert image_of(explicit).size == (64, 64) and explicit.content == plain.content


def test_base_guidance_and_steps_are_honoured(server: ServerProcess) -> None:
    body = {**SMALL, **BASE_FAST, "seed": 6, "output_format": "png"}
    default = generate(server, "flux2-klein-base-4b", body)  # guidance 4.0
    stronger = generate(server, "flux2-klein-base-4b", {**body, "guidance": 6})
    fewer = generate(server, "flux2-klein-base-4b", {**body, "num_steps": 1})
    assert image_of(stronger).tobytes() != image_of(default).tobytes()
    assert image_of(fewer).tobytes() != image_of(default).tobytes()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"width": 100}, "width: width and height must be multiples of 16"),
        ({"height": 8000}, "height: "),
        ({"input_images": ["aGVsbG8="] * 5}, "input_images: at most 4 images"),
        ({"input_images": ["asset:uploads/x/image.png"]}, "input_images[0]: must be an http(s) URL"),
        ({"colour": "red"}, "colour: is not a known parameter"),
        ({"prompt": None}, "prompt: is required"),
        ({"prompt": "  "}, "prompt: must not be empty"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_quality": 0}, "output_quality"),
        ({"seed": -1}, "seed"),
        ({"width": "wide"}, "width"),
    ],
)
def test_bad_parameters_are_400(server: ServerProcess, change: dict[str, Any], fragment: str) -> None:
    body = {k: v for k, v in {**SMALL, **change}.items() if v is not None}
    for slug in ("flux2-klein-4b", "flux2-klein-base-9b"):
        assert_verda_error(generate(server, slug, body), 400, "invalid_parameter", fragment)


def test_base_steps_beyond_the_bound_are_400(server: ServerProcess) -> None:
    response = generate(server, "flux2-klein-base-4b", {**SMALL, "num_steps": 101})
    assert_verda_error(response, 400, "invalid_parameter", "num_steps: must be at most 100")


def test_malformed_json_is_400(server: ServerProcess) -> None:
    response = httpx.post(
        f"{server.url}/flux2-klein-4b/generate", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_verda_error(response, 400, "invalid_parameter", "not valid JSON")


def test_input_images_by_url_base64_and_data_uri(server: ServerProcess, image_server: ImageServer) -> None:
    png = png_bytes(96, 64)
    b64 = base64.b64encode(png).decode()
    sources = [image_server.add("verda-ref.png", png), b64, "data:image/png;base64," + b64]
    body = {**SMALL, "seed": 8, "width": 96, "height": 64}
    without = generate(server, "flux2-klein-4b", body)
    outputs = [generate(server, "flux2-klein-4b", {**body, "input_images": [source]}) for source in sources]
    for response in outputs:
        assert image_of(response).size == (96, 64)
    # The same picture by every transport gives the same pixels, and the reference does count.
    assert outputs[0].content == outputs[1].content == outputs[2].content != without.content


def test_input_images_keep_the_1024x768_default(server: ServerProcess) -> None:
    b64 = base64.b64encode(png_bytes(64, 64)).decode()
    response = generate(server, "flux2-klein-4b", {"prompt": SMALL["prompt"], "input_images": [b64]})
    assert image_of(response).size == (1024, 768)


def test_unreadable_input_image_is_400_naming_input_images(server: ServerProcess) -> None:
    response = generate(server, "flux2-klein-4b", {**SMALL, "input_images": ["not an image!"]})
    assert_verda_error(response, 400, "invalid_image", "input_images[0]: ")


@pytest.mark.parametrize("slug", ["flux2-klein-8b", "flux-dev"])
def test_unknown_slug_is_404(server: ServerProcess, slug: str) -> None:
    assert_verda_error(generate(server, slug, SMALL), 404, "unknown_model", f"unknown model '{slug}'")


def test_wrong_method_is_verda_shaped(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/flux2-klein-4b/generate")
    assert_verda_error(response, 405, "method_not_allowed", "Method Not Allowed")


def test_unserved_variant_is_404_before_the_body_is_checked(tmp_path: Path, tiny_distilled: Path) -> None:
    """In process, without loading models: only klein 4B is served, and the runtime is marked ready."""
    app = create_app(Settings(data_dir=tmp_path), [ServedModel(find_variant("flux-2-klein-4b"), tiny_distilled)])
    runtime = app.state.runtime
    runtime.ready = True
    try:
        client = TestClient(
            app, base_url="http://localhost"
        )  # no `with`: the lifespan (model loading, workers) does not run
        response = client.post("/flux2-klein-9b/generate", json={"width": 100, "colour": "red"})
        assert response.status_code == 404
        assert response.json() == {
            "detail": "unknown model 'flux2-klein-9b'; known models: flux2-klein-4b",
            "code": "unknown_model",
        }
        paths = client.get("/openapi.json").json()["paths"]
        assert {f"/{slug}/generate" for slug in SLUGS} <= set(paths) and "/{slug}/generate" not in paths
    finally:
        runtime.store.close()
