"""LoRA adapters over HTTP: listed, named in the Oxen and OpenAI bodies or the header, unknown ones refused."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import openai
import pytest

from tests.api.conftest import ServerProcess
from tests.api.test_oxen import assert_oxen_error
from tests.api.test_verda import assert_verda_error

OXEN = {
    "model": "black-forest-labs-flux-2-klein-4b",
    "prompt": "a small test",
    "image_size": {"width": 64, "height": 64},
    "seed": 4,
    "num_inference_steps": 2,
    "response_format": "b64_json",
}


def oxen_image(server: ServerProcess, **change: Any) -> bytes:
    response = httpx.post(f"{server.url}/api/ai/images/generate", json={**OXEN, **change}, timeout=120)
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["images"][0]["b64_json"])


def test_the_offered_adapters_are_listed(server: ServerProcess) -> None:
    body = httpx.get(f"{server.url}/v1/loras", timeout=10).json()
    assert [item["id"] for item in body["data"]] == ["tiny"]
    assert body["header"] == "X-Kleinserve-Loras" and body["max_per_request"] >= 1


def test_oxen_body_and_header_apply_the_adapter_and_scale_zero_is_the_base(server: ServerProcess) -> None:
    base = oxen_image(server)
    with_lora = oxen_image(server, loras=[{"name": "tiny", "scale": 1.0}])
    assert with_lora != base
    assert oxen_image(server, loras=[{"name": "tiny", "scale": 0}]) == base
    response = httpx.post(
        f"{server.url}/api/ai/images/generate", json=OXEN, headers={"X-Kleinserve-Loras": "tiny=1"}, timeout=120
    )
    assert base64.b64decode(response.json()["images"][0]["b64_json"]) == with_lora


def test_unknown_adapters_are_400_naming_them_in_each_dialect(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/api/ai/queue", json={**OXEN, "loras": [{"name": "nope"}]}, timeout=30)
    assert_oxen_error(response, 400, "invalid_params", "'nope'")
    verda = httpx.post(
        f"{server.url}/flux2-klein-4b/generate",
        json={"prompt": "x", "width": 64, "height": 64},
        headers={"X-Kleinserve-Loras": "nope=0.5"},
        timeout=30,
    )
    assert_verda_error(verda, 400, "invalid_parameter", "'nope'")
    with (
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=60) as client,
        pytest.raises(openai.BadRequestError, match="nope"),
    ):
        client.images.generate(prompt="x", size="64x64", extra_body={"loras": [{"name": "nope", "scale": 1}]})
