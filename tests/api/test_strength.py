"""Image-to-image ``strength`` through the Oxen extension (pixel parity is in tests/engine)."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
from PIL import Image

from tests.api.conftest import ServerProcess
from tests.conftest import png_bytes

MODEL = "black-forest-labs-flux-2-klein-4b"


def generate(server: ServerProcess, **body: object) -> httpx.Response:
    payload = {"model": MODEL, "prompt": "a red square", "seed": 4, "response_format": "b64_json", **body}
    return httpx.post(f"{server.url}/api/ai/images/edit", json=payload, timeout=120)


def pixels(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]["b64_json"]))))


def test_oxen_strength_starts_from_the_first_image(server: ServerProcess) -> None:
    image = "data:image/png;base64," + base64.b64encode(png_bytes(80, 48)).decode()
    weak = pixels(generate(server, input_image=image, strength=0.3))
    assert weak.shape == (48, 80, 3)  # the first image's size
    assert np.array_equal(weak, pixels(generate(server, input_image=image, strength=0.3)))
    assert not np.array_equal(weak, pixels(generate(server, input_image=image, strength=1.0)))


def test_oxen_strength_needs_an_image_and_a_range(server: ServerProcess) -> None:
    for body, fragment in (({"strength": 0.5}, "needs an input image"), ({"strength": 2, "input_image": "x"}, "1")):
        response = generate(server, **body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["detail"].startswith("strength: ") and fragment in response.text
