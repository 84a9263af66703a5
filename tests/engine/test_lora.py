"""LoRA adapters per request, against diffusers' own LoRA loading on the same tiny weights."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kleinserve.engine.engine import Engine
from kleinserve.engine.lora import Adapters, check_sources
from kleinserve.engine.tiny import make_tiny_lora
from kleinserve.engine.variants import find_variant
from kleinserve.engine.weights import load_pipeline
from kleinserve.errors import InvalidParameterError, WeightsUnavailableError
from kleinserve.generation import run_request
from kleinserve.loras import LoraSource, check_choices, parse_lora_header, parse_lora_options
from kleinserve.request import GenerationRequest
from tests.engine.test_engine import diffusers_images

KLEIN_4B = find_variant("flux-2-klein-4b")
PROMPT, SEED, STEPS = "a red fox in snow", 5, 2


def request(*loras: tuple[str, float]) -> GenerationRequest:
    return GenerationRequest.parse(
        {
            "prompt": PROMPT,
            "seed": SEED,
            "steps": STEPS,
            "width": 64,
            "height": 64,
            "loras": [{"name": n, "scale": s} for n, s in loras],
        }
    )


def pixels_of(engine: Engine, req: GenerationRequest) -> np.ndarray:
    result = run_request(req, engine)
    with Image.open(io.BytesIO(result.images[0].data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def second_lora(tiny_distilled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_lora(tiny_distilled, tmp_path_factory.mktemp("lora2") / "other.safetensors", seed=9)


@pytest.fixture(scope="module")
def lora_engine(tiny_distilled: Path, tiny_lora: Path, second_lora: Path) -> Engine:
    """An engine of its own: adapters change its pipeline, which the shared engines must not see."""
    engine = Engine(load_pipeline(tiny_distilled, torch.device("cpu"), torch.float32), KLEIN_4B)
    offered = {"tiny": LoraSource("tiny", str(tiny_lora)), "other": LoraSource("other", str(second_lora))}
    engine.adapters = Adapters(engine.pipeline, offered, capacity=1)
    return engine


@pytest.fixture(scope="module")
def base_pixels(distilled_engine: Engine) -> np.ndarray:
    return pixels_of(distilled_engine, request())


def test_scale_zero_gives_the_base_pixels_exactly(lora_engine: Engine, base_pixels: np.ndarray) -> None:
    assert np.array_equal(pixels_of(lora_engine, request(("tiny", 0.0))), base_pixels)


def test_scale_one_gives_diffusers_pixels_after_load_lora_weights_and_set_adapters(
    lora_engine: Engine, tiny_distilled: Path, tiny_lora: Path, base_pixels: np.ndarray
) -> None:
    reference = Engine(load_pipeline(tiny_distilled, torch.device("cpu"), torch.float32), KLEIN_4B)
    reference.pipeline.load_lora_weights(str(tiny_lora.parent), weight_name=tiny_lora.name, adapter_name="tiny")
    reference.pipeline.set_adapters(["tiny"], adapter_weights=[1.0])
    expected = diffusers_images(reference, PROMPT, steps=STEPS, guidance=1.0, seeds=[SEED], width=64, height=64)[0]
    got = pixels_of(lora_engine, request(("tiny", 1.0)))
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, base_pixels)  # the adapter does something


def test_a_job_without_adapters_after_one_with_them_is_the_base_again(
    lora_engine: Engine, base_pixels: np.ndarray
) -> None:
    pixels_of(lora_engine, request(("tiny", 1.0)))
    assert np.array_equal(pixels_of(lora_engine, request()), base_pixels)


def test_the_least_recently_used_adapter_is_unloaded_past_the_cache_size(lora_engine: Engine) -> None:
    pixels_of(lora_engine, request(("tiny", 0.5)))
    pixels_of(lora_engine, request(("other", 0.5)))  # capacity 1: "tiny" goes
    assert list(lora_engine.adapters.loaded) == ["other"]  # type: ignore[union-attr]
    assert lora_engine.pipeline.get_list_adapters()["transformer"] == ["other"]
    with pytest.raises(InvalidParameterError, match="at most 1"):
        lora_engine.adapters.activate(request(("tiny", 1.0), ("other", 1.0)).loras)  # type: ignore[union-attr]


def test_a_server_without_adapters_refuses_a_request_naming_one(distilled_engine: Engine) -> None:
    with pytest.raises(InvalidParameterError, match="offers no LoRA"):
        run_request(request(("tiny", 1.0)), distilled_engine)


def test_lora_options_headers_and_unknown_names(tmp_path: Path, tiny_lora: Path) -> None:
    (tmp_path / "style-a.safetensors").write_bytes(b"x")
    (tmp_path / "style-b.safetensors").write_bytes(b"x")
    offered = parse_lora_options([str(tmp_path), f"mine={tiny_lora}", "hub=owner/repo/file.safetensors"])
    assert sorted(offered) == ["hub", "mine", "style-a", "style-b"]
    check_sources(offered)  # hub ids load on first use
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        check_sources({"gone": LoraSource("gone", "/no/such/file.safetensors")})
    with pytest.raises(InvalidParameterError, match="given twice"):
        parse_lora_options([f"a={tiny_lora}", f"a={tiny_lora}"])
    assert parse_lora_header("tiny=0.8, other") == [{"name": "tiny", "scale": 0.8}, {"name": "other", "scale": 1.0}]
    with pytest.raises(InvalidParameterError, match="not a number"):
        parse_lora_header("tiny=strong")
    with pytest.raises(InvalidParameterError, match=r"unknown LoRA adapter 'nope'.*tiny"):
        check_choices(["nope"], ["tiny"])
    with pytest.raises(InvalidParameterError, match="named once"):
        request(("tiny", 1.0), ("tiny", 0.5))
