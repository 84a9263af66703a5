"""The Black Forest Labs API dialect against the session servers: BFL's documented submit-and-poll flow."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import httpx
import pytest
import requests
from PIL import Image

from tests.api.conftest import OpsServer, ServerProcess
from tests.conftest import ImageServer, png_bytes

SMALL = {"width": 64, "height": 64}


def poll(polling_url: str, headers: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result: dict[str, Any] = httpx.get(polling_url, headers=headers, timeout=10).json()
        if result["status"] not in ("Pending",):
            return result
        assert result["progress"] is None or 0 <= result["progress"] <= 1
        time.sleep(0.1)
    raise TimeoutError(polling_url)


def fetch_image(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


def test_documented_python_example(server: ServerProcess) -> None:
    """BFL's quick-start flow: POST the prompt with x-key, poll the polling_url (with params={'id'})."""
    headers = {"accept": "application/json", "x-key": "YOUR_BFL_API_KEY", "Content-Type": "application/json"}
    response = requests.post(
        f"{server.url}/v1/flux-2-klein-4b",
        headers=headers,
        json={"prompt": "ein fantastisches bild", "seed": 42, **SMALL},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    request = response.json()
    assert set(request) == {"id", "polling_url", "cost", "input_mp", "output_mp"}
    assert request["polling_url"].endswith(f"/v1/get_result?id={request['id']}")
    assert request["output_mp"] == pytest.approx(64 * 64 / 1e6, abs=1e-4)
    assert request["input_mp"] == 0  # no input images: 0, as BFL answers a text-to-image task
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.1)
        result = requests.get(
            request["polling_url"], headers={"accept": "application/json", "x-key": "k"}, params={"id": request["id"]}
        ).json()
        if result["status"] == "Ready":
            break
        assert result["status"] == "Pending", result
    assert result["id"] == request["id"]
    sample = result["result"]["sample"]
    assert result["result"]["seed"] == 42 and result["result"]["prompt"] == "ein fantastisches bild"
    image = fetch_image(sample)
    assert image.format == "JPEG" and image.size == (64, 64)  # BFL's default output_format is jpeg


def test_9b_input_images_and_formats(server: ServerProcess, image_server: ImageServer) -> None:
    url = image_server.add("ref.png", png_bytes(96, 80))
    data = base64.b64encode(png_bytes(48, 48, (0, 120, 0))).decode()
    body = {"prompt": "combine them", "input_image": url, "input_image_2": data, "output_format": "png", "seed": 1}
    submitted = httpx.post(f"{server.url}/v1/flux-2-klein-9b", json=body, timeout=60).json()
    # BFL's input_mp: the inputs' megapixels as sent, summed; the output size is the first input's.
    assert submitted["input_mp"] == pytest.approx((96 * 80 + 48 * 48) / 1e6, abs=1e-4)
    assert submitted["input_mp"] > 0
    result = poll(submitted["polling_url"], {})
    assert result["status"] == "Ready", result
    image = fetch_image(result["result"]["sample"])
    # Without width/height: the first input image's size.
    assert image.format == "PNG" and image.size == (96, 80)
    assert (result["result"]["width"], result["result"]["height"]) == (96, 80)


def test_task_not_found_and_error_status(server: ServerProcess) -> None:
    missing = httpx.get(f"{server.url}/v1/get_result", params={"id": "no-such-task"}, timeout=10)
    assert missing.status_code == 200
    assert missing.json()["status"] == "Task not found"
    # A PNG whose header reads but whose pixels are cut short: accepted at submission (where URLs and
    # sizes are checked), it fails in the worker, so the task ends in Error.
    truncated = base64.b64encode(png_bytes(64, 64)[:-40]).decode()
    body = {"prompt": "p", "input_image": truncated, **SMALL}
    submitted = httpx.post(f"{server.url}/v1/flux-2-klein-4b", json=body, timeout=60).json()
    result = poll(submitted["polling_url"], {})
    assert result["status"] == "Error" and result["result"] is None
    assert result["details"]["message"]


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"webhook_secret": "s3cret"}, ["body", "webhook_secret"]),
        ({"webhook_url": "http://169.254.169.254/latest"}, ["body", "webhook_url"]),
        ({"safety_tolerance": 6}, ["body", "safety_tolerance"]),
        ({"width": 100, "height": 64}, ["body", "width"]),
        ({"output_format": "gif"}, ["body", "output_format"]),
        ({"steps": 4}, ["body", "steps"]),
        ({"input_image": ""}, ["body", "input_image"]),
    ],
)
def test_bad_input_is_4xx_in_fastapi_shape(server: ServerProcess, change: dict[str, Any], loc: list[str]) -> None:
    response = httpx.post(f"{server.url}/v1/flux-2-klein-4b", json={"prompt": "p", **SMALL, **change}, timeout=30)
    assert response.status_code == 400, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == loc and detail["msg"]


def test_unserved_and_unknown_endpoints(server: ServerProcess) -> None:
    for path in ("/v1/flux-2-pro", "/v1/flux-2-klein-4b/extra"):
        response = httpx.post(f"{server.url}{path}", json={"prompt": "p"}, timeout=30)
        assert 400 <= response.status_code < 500, response.text


@pytest.mark.parametrize("path", ["/v1/flux-nonexistent", "/v1/flux-2-pro", "/v1/flux-kontext-pro"])
def test_unknown_model_route_is_bfls_404(server: ServerProcess, path: str) -> None:
    """A BFL model route this server lacks answers as BFL's FastAPI app does, not in OpenAI's shape
    (the OpenAI dialect owns the rest of /v1)."""
    response = httpx.post(f"{server.url}{path}", json={"prompt": "p", **SMALL}, timeout=30)
    assert response.status_code == 404, response.text
    assert response.json() == {"detail": "Not Found"}


def test_get_result_without_id_names_the_query_parameter(server: ServerProcess) -> None:
    for params in ({}, {"id": "x" * 201}):
        response = httpx.get(f"{server.url}/v1/get_result", params=params, timeout=10)
        assert response.status_code == 400, response.text
        (detail,) = response.json()["detail"]
        assert detail["loc"] == ["query", "id"] and detail["msg"]


def test_x_key_is_the_api_key(ops_server: OpsServer) -> None:
    url = f"{ops_server.server.url}/v1/flux-2-klein-4b"
    body = {"prompt": "keyed", **SMALL}
    refused = httpx.post(url, json=body, timeout=30)
    assert refused.status_code == 401 and isinstance(refused.json()["detail"], str)
    accepted = httpx.post(url, json=body, headers={"x-key": ops_server.secret}, timeout=30)
    assert accepted.status_code == 200, accepted.text
    result = poll(accepted.json()["polling_url"], {"x-key": ops_server.secret})
    assert result["status"] == "Ready"
    # Another caller (no key) cannot read it: 401, and a key sees only its own tasks.
    assert httpx.get(accepted.json()["polling_url"], timeout=10).status_code == 401
