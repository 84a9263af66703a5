"""Negative prompts through the Oxen and 1min.ai dialects (the engine's parity is in tests/engine)."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import numpy as np
from PIL import Image

from tests.api.conftest import ServerProcess

BASE = {
    "model": "black-forest-labs-flux-2-klein-base-4b",
    "prompt": "a lighthouse",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 2,
    "seed": 5,
    "response_format": "b64_json",
}


def oxen_pixels(server: ServerProcess, **change: Any) -> np.ndarray:
    response = httpx.post(f"{server.url}/api/ai/images/generate", json={**BASE, **change}, timeout=120)
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["images"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)))


def test_oxen_negative_prompt_changes_base_pixels_reproducibly(server: ServerProcess) -> None:
    plain = oxen_pixels(server)
    negative = oxen_pixels(server, negative_prompt="fog, night")
    assert not np.array_equal(plain, negative)
    assert np.array_equal(negative, oxen_pixels(server, negative_prompt="fog, night"))
    assert np.array_equal(plain, oxen_pixels(server, negative_prompt=""))  # "" is CFG's own negative


def test_oxen_negative_prompt_refused_on_distilled_and_without_cfg(server: ServerProcess) -> None:
    for change in ({"model": "black-forest-labs-flux-2-klein-4b"}, {"guidance_scale": 1.0}):
        body = {**BASE, **change, "negative_prompt": "fog"}
        response = httpx.post(f"{server.url}/api/ai/images/generate", json=body, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_params" and error["detail"].startswith("negative_prompt: ")


def test_onemin_negative_prompt(server: ServerProcess) -> None:
    prompt = {"prompt": "a lighthouse", "megapixels": "0.25", "num_inference_steps": 1, "seed": 2}

    def feature(model: str, **change: Any) -> httpx.Response:
        body = {"type": "IMAGE_GENERATOR", "model": model, "promptObject": {**prompt, **change}}
        return httpx.post(f"{server.url}/api/features", json=body, headers={"API-KEY": "k"}, timeout=120)

    accepted = feature("black-forest-labs/flux-2-klein-base-4b", negativePrompt="fog")
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["aiRecord"]["aiRecordDetail"]["promptObject"]["negativePrompt"] == "fog"
    refused = feature("black-forest-labs/flux-2-klein-4b", negativePrompt="fog")
    assert refused.status_code == 400, refused.text
    body = refused.json()
    assert body["statusCode"] == 400 and body["message"].startswith("promptObject.negativePrompt: ")
    assert "guidance-distilled" in body["message"]
