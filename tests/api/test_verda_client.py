"""The Verda dialect through Verda's own SDK (``verda`` on PyPI, ``InferenceClient``).

The SDK's endpoint base URL is ``<server>/<slug>`` (the deployment's path); ``run_sync`` POSTs
``<base>/generate``, ``health`` GETs ``<base>/health``, and ``run`` uses Verda's asynchronous
protocol: ``Prefer: respond-async``, then ``/status/<slug>`` and ``/result/<slug>`` with
``X-Inference-Id``.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import httpx
import pytest
from PIL import Image
from verda.inference_client import AsyncStatus, InferenceClient

from tests.api.conftest import ServerProcess
from tests.conftest import png_bytes

SMALL: dict[str, Any] = {"prompt": "a small test", "width": 64, "height": 64, "seed": 21}
SLUG = "flux2-klein-4b"


@pytest.fixture
def client(server: ServerProcess) -> InferenceClient:
    return InferenceClient("any-key", f"{server.url}/{SLUG}", timeout_seconds=120)


def test_health_and_run_sync(client: InferenceClient) -> None:
    assert client.health().status_code == 200
    raw = client.run_sync(SMALL, path="generate")
    assert raw.status_code == 200 and raw.headers["X-Seed"] == "21"
    as_json = client.run_sync({**SMALL, "enable_base64_output": True}, path="generate").output()
    assert base64.b64decode(as_json["image"]) == raw._original_response.content
    assert Image.open(io.BytesIO(raw._original_response.content)).size == (64, 64)


def test_run_async_status_and_result(client: InferenceClient, server: ServerProcess) -> None:
    execution = client.run({**SMALL, "enable_base64_output": True}, path="generate")
    assert execution.status() is AsyncStatus.Initialized  # the SDK's own state before the first poll
    deadline = time.monotonic() + 120
    while (status := execution.status_json())["Status"] != "Completed":
        assert status["Status"] in ("Queue", "Inference"), status
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert execution.status() is AsyncStatus.Completed
    result = execution.result()
    sync = client.run_sync({**SMALL, "enable_base64_output": True}, path="generate").output()
    assert result["image"] == sync["image"] and result["seed"] == 21


def test_other_preferences_are_ignored_and_answered_synchronously(server: ServerProcess) -> None:
    """RFC 7240 § 2: a preference the server does not use (wait=N, a malformed one) is ignored, not an error."""
    for prefer in ("wait=abc", "wait=5", "respond-sync"):
        response = httpx.post(f"{server.url}/{SLUG}/generate", json=SMALL, headers={"Prefer": prefer}, timeout=120)
        assert response.status_code == 200, (prefer, response.text)
        assert response.headers["content-type"] == "image/jpeg" and "Preference-Applied" not in response.headers


def test_async_protocol_headers_and_errors(server: ServerProcess) -> None:
    response = httpx.post(
        f"{server.url}/{SLUG}/generate", json={**SMALL, "seed": 22}, headers={"Prefer": "respond-async"}, timeout=60
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"Id", "StatusPath", "ResultPath"}
    assert response.headers["X-Inference-Id"] == body["Id"]
    assert response.headers["Location"] == f"{server.url}/status/{SLUG}"
    assert (body["StatusPath"], body["ResultPath"]) == (f"/status/{SLUG}", f"/result/{SLUG}")
    assert response.headers["Preference-Applied"] == "respond-async"  # RFC 7240 § 3
    headers = {"X-Inference-Id": body["Id"]}
    deadline = time.monotonic() + 120
    while httpx.get(f"{server.url}{body['StatusPath']}", headers=headers).json()["Status"] != "Completed":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    result = httpx.get(f"{server.url}{body['ResultPath']}", headers=headers, timeout=30)
    assert result.status_code == 200 and result.headers["content-type"] == "image/jpeg"
    assert result.headers["X-Seed"] == "22"
    # Another slug's path, an unknown id, or no id at all: Verda-shaped errors.
    wrong = httpx.get(f"{server.url}/status/flux2-klein-9b", headers=headers)
    assert wrong.status_code == 404 and "detail" in wrong.json()
    assert httpx.get(f"{server.url}/result/{SLUG}", headers={"X-Inference-Id": "nope"}).status_code == 404
    missing = httpx.get(f"{server.url}/status/{SLUG}")
    assert missing.status_code == 400 and "X-Inference-Id" in missing.json()["detail"]


def test_async_failure_is_reported_on_the_result(server: ServerProcess) -> None:
    # Header fine, pixels cut short: accepted at submission (where URLs are checked), fails in the worker.
    body = {**SMALL, "input_images": [base64.b64encode(png_bytes(64, 64)[:-40]).decode()]}
    accepted = httpx.post(f"{server.url}/{SLUG}/generate", json=body, headers={"Prefer": "respond-async"}, timeout=60)
    headers = {"X-Inference-Id": accepted.json()["Id"]}
    deadline = time.monotonic() + 120
    while httpx.get(f"{server.url}/status/{SLUG}", headers=headers).json()["Status"] != "Completed":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    result = httpx.get(f"{server.url}/result/{SLUG}", headers=headers, timeout=30)
    assert result.status_code == 400 and result.json()["detail"].startswith("input_images[0]:")
