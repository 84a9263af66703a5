"""One request through every dialect, same seed: the same pixels, whichever API a client speaks."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
from PIL import Image

from tests.api.conftest import ServerProcess

PROMPT = "the same lighthouse in every dialect"
SEED = 123


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_every_dialect_gives_the_same_pixels(server: ServerProcess) -> None:
    url = server.url
    got: dict[str, bytes] = {}

    oxen = httpx.post(
        f"{url}/api/ai/images/generate",
        json={
            "model": "black-forest-labs-flux-2-klein-4b",
            "prompt": PROMPT,
            "seed": SEED,
            "image_size": {"width": 512, "height": 512},
            "response_format": "b64_json",
        },
        timeout=120,
    )
    got["oxen"] = base64.b64decode(oxen.json()["images"][0]["b64_json"])

    openai = httpx.post(
        f"{url}/v1/images/generations",
        json={
            "model": "black-forest-labs/flux-2-klein-4b",
            "prompt": PROMPT,
            "seed": SEED,
            "size": "512x512",
            "response_format": "b64_json",
        },
        timeout=120,
    )
    got["openai"] = base64.b64decode(openai.json()["data"][0]["b64_json"])

    onemin = httpx.post(
        f"{url}/api/features",
        headers={"API-KEY": "k"},
        json={
            "type": "IMAGE_GENERATOR",
            "model": "black-forest-labs/flux-2-klein-4b",
            "promptObject": {
                "prompt": PROMPT,
                "seed": SEED,
                "aspect_ratio": "1:1",
                "megapixels": "0.25",
                "output_format": "png",
            },
        },
        timeout=120,
    )
    got["onemin"] = httpx.get(onemin.json()["aiRecord"]["temporaryUrl"]).content

    verda = httpx.post(
        f"{url}/flux2-klein-4b/generate",
        json={"prompt": PROMPT, "seed": SEED, "width": 512, "height": 512, "output_format": "png"},
        timeout=120,
    )
    assert verda.headers["X-Seed"] == str(SEED)
    got["verda"] = verda.content

    reference = pixels(got["oxen"])
    assert reference.shape == (512, 512, 3)
    for dialect, data in got.items():
        assert np.array_equal(pixels(data), reference), dialect


def test_workbench_config_lists_every_dialects_ids_and_example(server: ServerProcess) -> None:
    config = httpx.get(f"{server.url}/workbench/config", timeout=30).json()
    model = next(m for m in config["models"] if m["id"] == "flux-2-klein-4b")
    names = {"oxen", "openai", "onemin", "verda"}
    assert names <= set(model["ids"])
    assert model["ids"]["oxen"] == "black-forest-labs-flux-2-klein-4b" == model["oxen"]
    assert model["ids"]["verda"] == "flux2-klein-4b"
    examples = {e["dialect"]: e for e in model["examples"]}
    assert set(examples) == set(model["ids"])
    assert examples["oxen"]["body"]["model"] == model["ids"]["oxen"]
    assert examples["openai"]["body"]["model"] == model["ids"]["openai"]
    assert examples["verda"]["path"] == "/flux2-klein-4b/generate"
    assert examples["onemin"]["auth_header"] == "API-KEY"


def test_an_image_over_the_pixel_limit_is_refused_at_submission(server: ServerProcess) -> None:
    """Queue dialects check a reference's size from its header before they answer, as for unreadable images."""
    buffer = io.BytesIO()
    Image.new("L", (6400, 6400)).save(buffer, "PNG")  # 41 MP, over the default 40 MP; a few kB
    big = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    submissions = {
        "oxen": ("/api/ai/queue", {"model": "black-forest-labs-flux-2-klein-4b", "prompt": "x", "input_image": big}),
        "bfl": ("/v1/flux-2-klein-4b", {"prompt": "x", "input_image": big}),
        "replicate": (
            "/v1/models/black-forest-labs/flux-2-klein-4b/predictions",
            {"input": {"prompt": "x", "images": [big]}},
        ),
        "fal": ("/fal-ai/flux-2/klein/4b/edit", {"prompt": "x", "image_urls": [big]}),
    }
    for dialect, (path, body) in submissions.items():
        response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
        assert response.status_code == 400, (dialect, response.text)
        assert "over the limit" in response.text, (dialect, response.text)


def test_a_bad_reference_is_named_as_the_client_sent_it(server: ServerProcess) -> None:
    """The queue dialects' submit names the reference field of the request, not the canonical ``images``."""
    bad = "data:image/png;base64,aGVsbG8="  # valid base64, not an image
    good = "data:image/png;base64," + base64.b64encode(_png(64, 64)).decode()
    submissions = {
        "input_image_2": ("/v1/flux-2-klein-4b", {"prompt": "x", "input_image": good, "input_image_2": bad}),
        "input.images[1]": (
            "/v1/models/black-forest-labs/flux-2-klein-4b/predictions",
            {"input": {"prompt": "x", "images": [good, bad]}},
        ),
        "image_urls[1]": ("/fal-ai/flux-2/klein/4b/edit", {"prompt": "x", "image_urls": [good, bad]}),
    }
    for field, (path, body) in submissions.items():
        response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
        assert response.status_code == 400, (field, response.text)
        assert f"{field}: is not a readable image" in response.text, (field, response.text)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_oxen_names_the_reference_field_it_was_sent_in(server: ServerProcess) -> None:
    bad = "data:image/png;base64,aGVsbG8="
    good = "data:image/png;base64," + base64.b64encode(_png(64, 64)).decode()
    model = "black-forest-labs-flux-2-klein-4b"
    cases = {
        "input_image: is not": ("/api/ai/images/edit", {"input_image": bad}),
        "image[1]: is not": ("/api/ai/images/edit", {"image": [good, bad]}),
        "input_image[1]: is not": ("/api/ai/queue", {"input_image": [good, bad]}),
    }
    for expected, (path, fields) in cases.items():
        response = httpx.post(f"{server.url}{path}", json={"model": model, "prompt": "x", **fields}, timeout=60)
        assert response.status_code == 400, response.text
        assert expected in response.json()["error"]["detail"], response.text
