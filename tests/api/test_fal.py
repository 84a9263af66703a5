"""The fal.ai queue dialect: the ``fal-client`` package and fal's documented queue HTTP calls.

``fal-client`` builds its submit URL from a module constant, ``https://queue.fal.run/`` (no setting
changes the scheme), so the tests point that constant at the session server; every later call
(status, result, cancel) follows the URLs the server answered, exactly as against fal.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import fal_client
import fal_client.client
import httpx
import pytest
from PIL import Image

from tests.api.conftest import OpsServer, ServerProcess
from tests.conftest import ImageServer, png_bytes

SMALL = {"image_size": {"width": 64, "height": 64}}


@pytest.fixture
def fal(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[fal_client.SyncClient]:
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{server.url}/")
    client = fal_client.SyncClient(key="fal-test-key")
    yield client
    close(client)


def close(client: fal_client.SyncClient) -> None:
    """Close the client's connections (it has no close(); its httpx client is a cached property)."""
    if "_client" in vars(client):
        client._client.close()


def image_of(url: str) -> Image.Image:
    if url.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return Image.open(io.BytesIO(httpx.get(url, timeout=30).content))


def test_client_subscribe_text_to_image(fal: fal_client.SyncClient) -> None:
    updates: list[Any] = []
    result = fal.subscribe(
        "fal-ai/flux-2/klein/4b",
        arguments={"prompt": "a zen garden", "seed": 9, "num_images": 2, "output_format": "jpeg", **SMALL},
        with_logs=True,
        on_queue_update=updates.append,
    )
    assert [i["width"] for i in result["images"]] == [64, 64] and result["seed"] == 9
    assert result["has_nsfw_concepts"] == [False, False]
    assert all(image_of(i["url"]).format == "JPEG" for i in result["images"])
    assert updates  # the client saw the queue states the server reported


def test_client_submit_status_result_on_base_with_negative_prompt(fal: fal_client.SyncClient) -> None:
    arguments = {"prompt": "a cat", "negative_prompt": "blur", "guidance_scale": 3.0, "num_inference_steps": 2}
    handle = fal.submit("fal-ai/flux-2/klein/4b/base", arguments={**arguments, **SMALL, "sync_mode": True})
    result = handle.get()
    (image,) = result["images"]
    assert image["url"].startswith("data:image/png;base64,") and image_of(image["url"]).size == (64, 64)
    status = handle.status(with_logs=True)
    assert isinstance(status, fal_client.Completed)
    assert fal.result("fal-ai/flux-2/klein/4b/base", handle.request_id) == result


def test_edit_endpoint_documented_http_flow(server: ServerProcess, image_server: ImageServer) -> None:
    """fal's queue HTTP calls: POST queue URL with Key auth, GET status_url until COMPLETED, GET response_url."""
    url = image_server.add("fal-ref.png", png_bytes(96, 64))
    headers = {"Authorization": "Key fal-test-key", "Content-Type": "application/json"}
    submitted = httpx.post(
        f"{server.url}/fal-ai/flux-2/klein/9b/edit",
        headers=headers,
        json={"prompt": "make it night", "image_urls": [url]},
        timeout=60,
    ).json()
    assert set(submitted) >= {"request_id", "response_url", "status_url", "cancel_url"}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = httpx.get(submitted["status_url"], headers=headers, params={"logs": 1}, timeout=10)
        if status.json()["status"] == "COMPLETED":
            assert status.status_code == 200
            break
        assert status.status_code == 202 and status.json()["status"] in ("IN_QUEUE", "IN_PROGRESS")
        time.sleep(0.1)
    result = httpx.get(submitted["response_url"], headers=headers, timeout=30).json()
    (image,) = result["images"]
    assert (image["width"], image["height"]) == (96, 64)  # edit: the first image's size by default
    assert image_of(image["url"]).format == "PNG"


def test_cancel_and_in_progress_result(server: ServerProcess, fal: fal_client.SyncClient) -> None:
    handle = fal.submit("fal-ai/flux-2/klein/9b/base", arguments={"prompt": "slow", "image_size": "square_hd"})
    early = httpx.get(handle.response_url, timeout=10)
    assert early.status_code in (400, 200)  # 200 only if it already finished (it should not)
    handle.cancel()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = handle.status()
        if isinstance(status, fal_client.Completed):
            break
        time.sleep(0.1)
    assert isinstance(status, fal_client.Completed) and status.error
    again = httpx.put(handle.cancel_url, timeout=10)
    assert again.status_code == 400 and again.json()["status"] == "ALREADY_COMPLETED"


def test_query_and_header_parameters_are_located_where_they_were(server: ServerProcess) -> None:
    """FastAPI's ``loc`` starts with where the value was sent: a query parameter or header is not "body"."""
    submit, unsafe = f"{server.url}/fal-ai/flux-2/klein/4b", "http://169.254.169.254/latest"
    cases = [
        (httpx.post(submit, params={"fal_webhook": unsafe}, json={"prompt": "p"}, timeout=30), "query", "fal_webhook"),
        (
            httpx.post(submit, headers={"X-Kleinserve-Webhook": unsafe}, json={"prompt": "p"}, timeout=30),
            "header",
            "X-Kleinserve-Webhook",
        ),
        (
            httpx.get(f"{server.url}/fal-ai/flux-2/requests/x/status", params={"logs": "1" * 11}, timeout=30),
            "query",
            "logs",
        ),
    ]
    for response, source, name in cases:
        assert response.status_code == 400, response.text
        (detail,) = response.json()["detail"]
        assert detail["loc"] == [source, name] and detail["msg"]


@pytest.mark.parametrize(
    ("endpoint", "change", "loc"),
    [
        ("klein/4b", {"guidance_scale": 2.0}, ["body", "guidance_scale"]),
        ("klein/4b", {"negative_prompt": "x"}, ["body", "negative_prompt"]),
        ("klein/4b", {"num_inference_steps": 9}, ["body", "num_inference_steps"]),
        ("klein/4b", {"image_size": "huge"}, ["body", "image_size"]),
        ("klein/4b", {"image_size": {"width": 100, "height": 64}}, ["body", "image_size", "width"]),
        ("klein/4b", {"num_images": 5}, ["body", "num_images"]),
        ("klein/4b", {"loras": []}, ["body", "loras"]),
        ("klein/4b/edit", {}, ["body", "image_urls"]),
    ],
)
def test_bad_input_is_4xx_in_fastapi_shape(
    server: ServerProcess, endpoint: str, change: dict[str, Any], loc: list[str]
) -> None:
    response = httpx.post(f"{server.url}/fal-ai/flux-2/{endpoint}", json={"prompt": "p", **change}, timeout=30)
    assert response.status_code == 400, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"][: len(loc)] == loc and detail["msg"]


def test_client_raises_for_bad_input_and_unknown_request(fal: fal_client.SyncClient) -> None:
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal.submit("fal-ai/flux-2/klein/4b", arguments={"prompt": "p", "num_images": 0})
    assert info.value.status_code == 400
    with pytest.raises(fal_client.client.FalClientHTTPError) as missing:
        fal.status("fal-ai/flux-2/klein/4b", "no-such-request")
    assert missing.value.status_code == 404


def test_key_auth(ops_server: OpsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{ops_server.server.url}/")
    wrong, right = fal_client.SyncClient(key="wrong"), fal_client.SyncClient(key=ops_server.secret)
    try:
        with pytest.raises(fal_client.client.FalClientHTTPError) as info:
            wrong.submit("fal-ai/flux-2/klein/4b", arguments={"prompt": "p", **SMALL})
        assert info.value.status_code == 401
        result = right.subscribe("fal-ai/flux-2/klein/4b", arguments={"prompt": "keyed", **SMALL})
        assert result["images"][0]["width"] == 64
    finally:
        close(wrong)
        close(right)
