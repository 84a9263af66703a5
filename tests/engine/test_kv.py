"""klein 9B-KV: reference K/V cached at step 0, with the pixels of diffusers' Flux2KleinKVPipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinKVPipeline

from kleinserve.engine.engine import Engine, EngineInputs
from kleinserve.engine.variants import find_variant
from kleinserve.engine.weights import ModelSpec, check_local_directory, read_pipeline
from kleinserve.errors import WeightsUnavailableError
from tests.engine.test_engine import reference_images


@pytest.fixture(scope="module")
def kv_engine(tiny_kv: Path) -> Engine:
    return Engine(read_pipeline(tiny_kv, torch.float32), find_variant("flux-2-klein-9b-kv"))


@pytest.mark.parametrize("count", [1, 2])
def test_matches_flux2_klein_kv_pipeline(kv_engine: Engine, tiny_kv: Path, count: int) -> None:
    references = reference_images(count)
    pipe = Flux2KleinKVPipeline.from_pretrained(str(tiny_kv))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        image=references,
        prompt="put the hat on the cat",
        width=48,
        height=64,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images[0]
    lengths: list[int] = []
    handle = kv_engine.pipeline.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: lengths.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        got = kv_engine.generate(
            EngineInputs("put the hat on the cat", 3, 1.0, 11, references=references, width=48, height=64)
        ).images[0]
    finally:
        handle.remove()
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    image_tokens = (48 // 16) * (64 // 16)
    # Step 0 carries the reference tokens; steps 1 and 2 only the image's own.
    assert lengths[0] > image_tokens and lengths[1:] == [image_tokens, image_tokens]


def test_text_to_image_without_references_matches_too(kv_engine: Engine, tiny_kv: Path) -> None:
    pipe = Flux2KleinKVPipeline.from_pretrained(str(tiny_kv))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt="a fox", width=32, height=32, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(4)
    ).images[0]
    got = kv_engine.generate(EngineInputs("a fox", 2, 1.0, 4, width=32, height=32)).images[0]
    assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_only_the_kv_variant_serves_a_kv_checkpoint(tiny_kv: Path, tiny_distilled: Path) -> None:
    assert check_local_directory(ModelSpec.parse(f"flux2-klein-9b-kv={tiny_kv}")) == tiny_kv
    with pytest.raises(WeightsUnavailableError, match="serve it as flux-2-klein-9b-kv"):
        check_local_directory(ModelSpec.parse(f"flux-2-klein-9b={tiny_kv}"))
    with pytest.raises(WeightsUnavailableError, match="needs one"):
        check_local_directory(ModelSpec.parse(f"flux-2-klein-9b-kv={tiny_distilled}"))


def test_every_provider_spelling() -> None:
    for name in (
        "black-forest-labs-flux-2-klein-9b-kv",
        "black-forest-labs/flux-2-klein-9b-kv",
        "flux2-klein-9b-kv",
        "black-forest-labs/FLUX.2-klein-9b-kv",
        "black-forest-labs/FLUX.2-klein-9B-KV",
    ):
        variant = find_variant(name)
        assert variant.id == "flux-2-klein-9b-kv" and variant.kv_cache and variant.distilled
    assert not any(find_variant(v).kv_cache for v in ("flux-2-klein-9b", "flux-2-klein-4b"))
