"""Every dialect's example for given settings, sent to the server, means those settings.

This is what keeps the Workbench's API tab honest: its snippets are these examples
(``POST /workbench/snippet``), so a snippet that the server read differently, or refused, fails here.
In process, without loading models: the submission is captured where the queue would take it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from kleinserve.api.app import create_app
from kleinserve.engine.catalog import ServedModel
from kleinserve.engine.variants import find_variant
from kleinserve.errors import ServiceUnavailableError
from kleinserve.request import GenerationRequest
from kleinserve.settings import Settings
from tests.conftest import png_bytes

DIALECTS = {"oxen", "openai", "onemin", "verda", "bfl", "replicate", "fal"}


def data_uri(color: tuple[int, int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(32, 32, color)).decode()


def mask_uri() -> str:
    """An OpenAI mask of the 32 x 32 references: the left half transparent (the area to edit)."""
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 32))
    out = io.BytesIO()
    mask.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


SETTINGS: dict[str, dict[str, Any]] = {
    "square": {"model": "flux-2-klein-4b", "prompt": "a fox", "width": 1024, "height": 1024, "seed": 42},
    "rich": {
        "model": "flux-2-klein-4b",
        "prompt": "the fox from @Image1 in the style of @Image2, 'quoted' \"too\"",
        "images": [data_uri((200, 30, 30)), data_uri((30, 30, 200))],
        "width": 688,
        "height": 384,
        "steps": 4,
        "guidance": 1.0,
        "seed": 7,
        "num_images": 2,
        "output_format": "jpeg",
        "quality": 90,
        "loras": [{"name": "style", "scale": 0.5}],
    },
    "base": {
        "model": "flux-2-klein-base-4b",
        "prompt": "a lighthouse",
        "negative_prompt": "fog",
        "images": [data_uri((20, 160, 60))],
        "steps": 20,
        "guidance": 3.5,
        "seed": 3,
        "output_format": "webp",
        "quality": 100,
        "safety_check": False,
        "previews": 20,
    },
    "masked": {
        "model": "flux-2-klein-4b",
        "prompt": "a hat on the fox",
        "images": [data_uri((200, 30, 30)), data_uri((30, 30, 200))],
        "mask": mask_uri(),
        "seed": 11,
    },
    "odd-size": {"model": "flux-2-klein-base-4b", "prompt": "a cat", "width": 64, "height": 96, "seed": 1},
}


class Captured(Exception):
    pass


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    served = [ServedModel(find_variant(v), Path("/nonexistent")) for v in ("flux-2-klein-4b", "flux-2-klein-base-4b")]
    settings = Settings(data_dir=tmp_path_factory.mktemp("examples"))
    app = create_app(settings, served)
    app.state.runtime.ready = True
    yield app
    app.state.runtime.store.close()


@pytest.fixture
def submitted(app: Any, monkeypatch: pytest.MonkeyPatch) -> list[GenerationRequest]:
    """The canonical requests a dialect submits; the submission then answers 503 (nothing runs)."""
    got: list[GenerationRequest] = []

    def submit(requests: list[GenerationRequest], **_: Any) -> None:
        got.extend(requests)
        raise ServiceUnavailableError("captured by the test")

    monkeypatch.setattr(app.state.runtime.service, "submit", submit)
    return got


def meaning(gen: GenerationRequest, unsaid: list[str]) -> dict[str, Any]:
    """What a request means: defaults resolved, fields an example cannot carry left out."""
    variant = find_variant(gen.model)
    fields = gen.model_dump(mode="json")
    fields["steps"] = gen.steps if gen.steps is not None else variant.default_steps
    fields["guidance"] = gen.guidance if gen.guidance is not None else variant.default_guidance
    if gen.safety_tolerance == 2:  # BFL's default: the operator's own threshold, as None is
        fields["safety_tolerance"] = None
    if gen.output_format.value == "png":
        del fields["quality"]  # no effect on a PNG
    for name in unsaid:
        fields.pop(name, None)
    return fields


@pytest.mark.parametrize("case", list(SETTINGS))
def test_every_dialects_example_means_the_settings(app: Any, submitted: list[GenerationRequest], case: str) -> None:
    client = TestClient(app, base_url="http://localhost")
    answer = client.post("/workbench/snippet", json=SETTINGS[case])
    assert answer.status_code == 200, answer.text
    wanted = GenerationRequest.model_validate(answer.json()["request"])
    examples = answer.json()["examples"]
    assert {e["dialect"] for e in examples} == DIALECTS
    checked = set()
    for example in examples:
        if not example["served"]:
            continue
        submitted.clear()
        headers = dict(example["headers"])
        response = client.request(example["method"], example["path"], json=example["body"], headers=headers)
        assert response.status_code == 503, (example["dialect"], response.text)
        assert submitted, example["dialect"]
        got = submitted[0]
        unsaid = example["unsaid"]
        assert meaning(got, unsaid) == meaning(wanted, unsaid), example["dialect"]
        checked.add(example["dialect"])
    # Every dialect serves klein 4B; BFL has no Base endpoint, the others do.
    assert checked == (DIALECTS if wanted.model == "flux-2-klein-4b" else DIALECTS - {"bfl"})


def test_what_an_example_cannot_carry_is_named(app: Any) -> None:
    client = TestClient(app, base_url="http://localhost")
    examples = {e["dialect"]: e for e in client.post("/workbench/snippet", json=SETTINGS["rich"]).json()["examples"]}
    assert examples["oxen"]["unsaid"] == [] and examples["openai"]["unsaid"] == []
    assert "images" in examples["onemin"]["unsaid"]  # 1min.ai takes one input image
    assert "num_images" in examples["verda"]["unsaid"] and "loras" in examples["bfl"]["unsaid"]
    assert examples["onemin"]["headers"] == {"X-Kleinserve-Loras": "style=0.5"}
    assert any("cannot carry" in note for note in examples["fal"]["notes"])
    masked = {e["dialect"]: e for e in client.post("/workbench/snippet", json=SETTINGS["masked"]).json()["examples"]}
    assert masked["oxen"]["body"]["mask"] == masked["openai"]["body"]["mask"]["image_url"] == SETTINGS["masked"]["mask"]
    assert "mask" in masked["verda"]["unsaid"]
    base = {e["dialect"]: e for e in client.post("/workbench/snippet", json=SETTINGS["base"]).json()["examples"]}
    assert base["oxen"]["body"]["previews"] == 20 and base["oxen"]["unsaid"] == ["safety_check"]


def test_bad_settings_are_a_400_naming_the_field(app: Any) -> None:
    client = TestClient(app, base_url="http://localhost")
    response = client.post("/workbench/snippet", json={"model": "flux-2-klein-4b", "prompt": "x", "width": 100})
    assert response.status_code == 400 and "width" in response.text
    response = client.post("/workbench/snippet", json={"model": "flux-2-klein-9b", "prompt": "x"})
    assert response.status_code == 404
