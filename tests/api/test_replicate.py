"""The Replicate predictions dialect, driven by the official ``replicate`` package and by Replicate's
documented HTTP calls, against the session servers."""

from __future__ import annotations

import base64
import contextlib
import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import replicate
from PIL import Image
from replicate.exceptions import ModelError, ReplicateError

from tests.api.conftest import OpsServer, ServerProcess
from tests.conftest import ImageServer, png_bytes

SMALL = {"aspect_ratio": "1:1", "output_megapixels": "0.25"}  # 512 x 512, the smallest preset
TRUNCATED = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)[:-40]).decode()


@contextlib.contextmanager
def replicate_client(server: ServerProcess, token: str = "r8_test") -> Iterator[replicate.Client]:
    """The official client pointed at ``server``; its connections are closed afterwards."""
    transport = httpx.HTTPTransport()
    api = replicate.Client(api_token=token, base_url=server.url, transport=transport)
    api.poll_interval = 0.1
    try:
        yield api
    finally:
        transport.close()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[replicate.Client]:
    with replicate_client(server) as api:
        yield api


def read_output(item: Any) -> bytes:
    """An output item's bytes. The client wraps only https:// and data: URLs in FileOutput; a plain
    http:// server's URLs come back as strings."""
    if isinstance(item, str):
        assert item.startswith("http://")
        return httpx.get(item, timeout=30).content
    data: bytes = item.read()
    return data


def test_client_run_waits_and_returns_outputs(client: replicate.Client) -> None:
    output = client.run(
        "black-forest-labs/flux-2-klein-4b",
        input={"prompt": "a lighthouse", "seed": 3, "output_format": "png", **SMALL},
    )
    (item,) = output
    image = Image.open(io.BytesIO(read_output(item)))
    assert image.format == "PNG" and image.size == (512, 512)


def test_client_create_reload_and_base_guidance(client: replicate.Client) -> None:
    api = client
    prediction = api.models.predictions.create(
        model="black-forest-labs/flux-2-klein-4b-base",
        input={"prompt": "a fox", "guidance": 3.5, "seed": 1, "output_format": "webp", **SMALL},
    )
    assert prediction.status in ("starting", "processing", "succeeded")
    prediction.wait()
    assert prediction.status == "succeeded", prediction.error
    assert prediction.urls["get"].endswith(f"/v1/predictions/{prediction.id}")
    assert prediction.metrics["image_count"] == 1 and prediction.metrics["predict_time"] >= 0
    assert prediction.input["guidance"] == 3.5 and prediction.model == "black-forest-labs/flux-2-klein-4b-base"
    image = Image.open(io.BytesIO(httpx.get(prediction.output[0], timeout=30).content))
    assert image.format == "WEBP"
    again = api.predictions.get(prediction.id)
    assert again.status == "succeeded"
    # The same file, under a freshly signed link.
    assert [u.split("?")[0] for u in again.output] == [u.split("?")[0] for u in prediction.output]


def test_documented_http_flow_prefer_wait_and_match_input(server: ServerProcess, image_server: ImageServer) -> None:
    """Replicate's curl example: POST with Prefer: wait, then GET urls.get."""
    url = image_server.add("replicate-ref.png", png_bytes(80, 48))
    response = httpx.post(
        f"{server.url}/v1/models/black-forest-labs/flux-2-klein-9b/predictions",
        headers={"Authorization": "Bearer r8_test", "Content-Type": "application/json", "Prefer": "wait"},
        json={"input": {"prompt": "make it blue", "images": [url], "aspect_ratio": "match_input_image"}},
        timeout=120,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "succeeded" and response.headers["Location"] == body["urls"]["get"]
    assert set(body) >= {"id", "model", "version", "input", "logs", "output", "error", "status", "created_at", "urls"}
    image = Image.open(io.BytesIO(httpx.get(body["output"][0], timeout=30).content))
    assert image.format == "JPEG" and image.size == (80, 48)  # jpg is Replicate's default here
    fetched = httpx.get(body["urls"]["get"], timeout=10).json()
    assert fetched["id"] == body["id"] and fetched["status"] == "succeeded"


def test_prefer_wait_is_a_preference_as_rfc_7240_says(server: ServerProcess) -> None:
    """A wait the server cannot use as sent is ignored, never a 400 (RFC 7240 § 2); over 60 s it waits
    Replicate's 60; the answer names the wait it applied in Preference-Applied (§ 3)."""
    url = f"{server.url}/v1/models/black-forest-labs/flux-2-klein-4b/predictions"
    body = {"input": {"prompt": "p", "seed": 5, **SMALL}}
    for prefer, applied in [
        ("wait=abc", None),
        ("wait=-1", None),
        ("wait=abc, wait=5", None),  # only the first wait counts
        ("wait=0", None),
        ("wait=100", "wait=60"),
        ("respond-async, wait=30", "wait=30"),
    ]:
        response = httpx.post(url, headers={"Prefer": prefer}, json=body, timeout=120)
        assert response.status_code == 201, (prefer, response.text)
        assert response.headers.get("Preference-Applied") == applied, prefer
        if applied is not None:
            assert response.json()["status"] == "succeeded", prefer


def test_cancel_and_failed_prediction(client: replicate.Client) -> None:
    api = client
    slow = api.models.predictions.create(
        model="black-forest-labs/flux-2-klein-9b-base", input={"prompt": "slow", "output_megapixels": 1}
    )
    slow.cancel()
    deadline = time.monotonic() + 60
    while slow.status not in ("canceled", "succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
        slow.reload()
    assert slow.status == "canceled"
    with pytest.raises(ModelError):
        api.run(
            "black-forest-labs/flux-2-klein-4b",
            # Header fine, pixels cut short: accepted at submission, fails in the worker.
            input={"prompt": "p", "images": [TRUNCATED], **SMALL},
        )


@pytest.mark.parametrize(
    ("model", "inputs", "field"),
    [
        ("flux-2-klein-4b", {"prompt": "p", "guidance": 3}, "input.guidance"),
        ("flux-2-klein-4b", {"prompt": "p", "output_megapixels": 3}, "input.output_megapixels"),
        ("flux-2-klein-4b", {"prompt": "p", "aspect_ratio": "7:5"}, "input.aspect_ratio"),
        ("flux-2-klein-4b", {"prompt": "p", "num_outputs": 2}, "input.num_outputs"),
        ("flux-2-klein-4b", {"prompt": ""}, "input.prompt"),
        ("flux-2-klein-4b-base", {"prompt": "p", "guidance": 11}, "input.guidance"),
    ],
)
def test_bad_input_is_a_problem_detail(
    server: ServerProcess, client: replicate.Client, model: str, inputs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ReplicateError) as info:
        client.models.predictions.create(model=f"black-forest-labs/{model}", input=inputs)
    assert info.value.status == 400 and info.value.title == "Input validation failed"
    response = httpx.post(f"{server.url}/v1/models/black-forest-labs/{model}/predictions", json={"input": inputs})
    (invalid,) = response.json()["invalid_fields"]
    assert invalid["field"] == field and invalid["description"]


def test_unknown_model_and_prediction_are_404(server: ServerProcess, client: replicate.Client) -> None:
    response = httpx.post(
        f"{server.url}/v1/models/black-forest-labs/flux-2-pro/predictions", json={"input": {"prompt": "p"}}, timeout=10
    )
    assert response.status_code == 404 and response.json()["title"] == "Not found"
    # Another owner is outside the dialect's paths: a 404 in the OpenAI shape /v1 answers in.
    other = httpx.post(f"{server.url}/v1/models/other/flux-2-klein-4b/predictions", json={"input": {}}, timeout=10)
    assert other.status_code == 404
    with pytest.raises(ReplicateError) as info:
        client.predictions.get("no-such-prediction")
    assert info.value.status == 404


def test_webhook_filters_without_completed_and_unsafe_urls_are_refused(server: ServerProcess) -> None:
    url = f"{server.url}/v1/models/black-forest-labs/flux-2-klein-4b/predictions"
    for extra, field in (
        ({"webhook": "http://169.254.169.254/latest"}, "webhook"),
        ({"webhook": "https://example.com/hook", "webhook_events_filter": ["start"]}, "webhook_events_filter"),
    ):
        response = httpx.post(url, json={"input": {"prompt": "p"}, **extra}, timeout=30)
        assert response.status_code == 400 and response.json()["invalid_fields"][0]["field"] == field


def test_the_token_is_the_api_key(ops_server: OpsServer) -> None:
    with replicate_client(ops_server.server, "wrong") as wrong, pytest.raises(ReplicateError) as info:
        wrong.run("black-forest-labs/flux-2-klein-4b", input={"prompt": "p", **SMALL})
    assert info.value.status == 401
    with replicate_client(ops_server.server, ops_server.secret) as right:
        (item,) = right.run("black-forest-labs/flux-2-klein-4b", input={"prompt": "keyed", **SMALL})
    assert Image.open(io.BytesIO(read_output(item))).size == (512, 512)


def test_models_get_parses_for_replicate_and_openai(server: ServerProcess, client: replicate.Client) -> None:
    """GET /v1/models/black-forest-labs/<name> is both APIs' model route: one answer both clients parse."""
    model = client.models.get("black-forest-labs/flux-2-klein-4b")
    assert (model.owner, model.name, model.visibility) == ("black-forest-labs", "flux-2-klein-4b", "public")
    assert model.url.endswith("/v1/models/black-forest-labs/flux-2-klein-4b")
    from openai import OpenAI

    with OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0) as openai_client:
        assert openai_client.models.retrieve("black-forest-labs/flux-2-klein-4b").owned_by == "black-forest-labs"
