"""The engine against diffusers' own Flux2KleinPipeline on the same tiny weights (the reproducibility contract)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kleinserve.engine.engine import Engine, EngineInputs
from kleinserve.engine.progress import Progress
from kleinserve.errors import GenerationCancelledError


def reference_images(count: int) -> list[Image.Image]:
    """Distinct references of different sizes (one not on the 16-pixel grid, one over 1 MP)."""
    rng = np.random.RandomState(42)
    sizes = [(80, 64), (100, 130), (1100, 1000)][:count]
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for w, h in sizes]


def diffusers_images(
    engine: Engine,
    prompt: str,
    *,
    steps: int,
    guidance: float,
    seeds: Sequence[int],
    references: Sequence[Image.Image] = (),
    width: int | None = None,
    height: int | None = None,
) -> list[np.ndarray]:
    """What diffusers' pipeline makes with the same weights, one CPU generator per image."""
    pipe = engine.pipeline
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    output = pipe(
        image=list(references) or None,
        prompt=prompt,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=len(seeds),
        generator=generators if len(generators) > 1 else generators[0],
    )
    return [np.asarray(image) for image in output.images]


def engine_images(engine: Engine, inputs: EngineInputs) -> list[np.ndarray]:
    return [np.asarray(image) for image in engine.generate(inputs).images]


def test_prompt_embedding_matches_diffusers(distilled_engine: Engine) -> None:
    pipe = distilled_engine.pipeline
    expected = pipe._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, ["a red fox in snow"])
    assert torch.equal(distilled_engine.encode_prompt("a red fox in snow"), expected)


def test_prompt_encoding_stops_at_the_deepest_tap(distilled_engine: Engine) -> None:
    """Layers past the deepest tap, the final norm and the LM head never run."""
    encoder = distilled_engine.pipeline.text_encoder
    deepest = max(distilled_engine.layers)
    ran: set[str] = set()
    watched = {
        "after_deepest": encoder.model.layers[deepest],
        "last_layer": encoder.model.layers[-1],
        "norm": encoder.model.norm,
        "lm_head": encoder.lm_head,
        "deepest": encoder.model.layers[deepest - 1],
    }
    handles = [m.register_forward_hook(lambda *_a, n=name: ran.add(n)) for name, m in watched.items()]
    try:
        distilled_engine.encode_prompt("stop early")
    finally:
        for handle in handles:
            handle.remove()
    assert ran == {"deepest"}


def test_distilled_text_to_image_matches_diffusers(distilled_engine: Engine) -> None:
    expected = diffusers_images(
        distilled_engine, "a red fox in snow", steps=4, guidance=1.0, seeds=[7], width=64, height=64
    )
    got = engine_images(distilled_engine, EngineInputs("a red fox in snow", 4, 1.0, 7, width=64, height=64))
    assert np.array_equal(got[0], expected[0])


def test_base_with_cfg_matches_diffusers(base_engine: Engine) -> None:
    expected = diffusers_images(
        base_engine, "a cat wearing a hat", steps=5, guidance=4.0, seeds=[3], width=64, height=64
    )
    output = base_engine.generate(EngineInputs("a cat wearing a hat", 5, 4.0, 3, width=64, height=64))
    assert output.cfg
    assert np.array_equal(np.asarray(output.images[0]), expected[0])
    # CFG really changes the result: guidance 1 (no CFG) gives other pixels.
    plain = engine_images(base_engine, EngineInputs("a cat wearing a hat", 5, 1.0, 3, width=64, height=64))
    assert not np.array_equal(plain[0], expected[0])


def test_non_square_size_matches_diffusers(distilled_engine: Engine) -> None:
    expected = diffusers_images(
        distilled_engine, "a wide lake", steps=3, guidance=1.0, seeds=[11], width=112, height=48
    )
    got = engine_images(distilled_engine, EngineInputs("a wide lake", 3, 1.0, 11, width=112, height=48))
    assert got[0].shape == (48, 112, 3)
    assert np.array_equal(got[0], expected[0])


@pytest.mark.parametrize("count", [1, 3])
def test_references_match_diffusers(base_engine: Engine, count: int) -> None:
    references = reference_images(count)
    expected = diffusers_images(
        base_engine, "put the hat on the cat", steps=3, guidance=4.0, seeds=[5], references=references
    )
    output = base_engine.generate(EngineInputs("put the hat on the cat", 3, 4.0, 5, references=references))
    # With no size given, the output takes the first reference's size on the 16-pixel grid.
    assert (output.width, output.height) == (80, 64)
    assert np.array_equal(np.asarray(output.images[0]), expected[0])


def test_two_images_use_seed_and_seed_plus_one(distilled_engine: Engine) -> None:
    inputs = EngineInputs("two foxes", 3, 1.0, 20, num_images=2, width=64, height=48)
    output = distilled_engine.generate(inputs)
    assert output.seeds == [20, 21]
    batched = diffusers_images(
        distilled_engine, "two foxes", steps=3, guidance=1.0, seeds=[20, 21], width=64, height=48
    )
    got = [np.asarray(image) for image in output.images]
    assert np.array_equal(got[0], batched[0]) and np.array_equal(got[1], batched[1])
    assert not np.array_equal(got[0], got[1])
    # Image 1 is the image a one-image request with seed 21 makes (up to batch rounding).
    single = engine_images(distilled_engine, EngineInputs("two foxes", 3, 1.0, 21, width=64, height=48))
    assert np.abs(single[0].astype(int) - got[1].astype(int)).max() <= 2


def test_same_seed_same_pixels_and_other_seed_other_pixels(distilled_engine: Engine) -> None:
    a = engine_images(distilled_engine, EngineInputs("repeat", 2, 1.0, 1, width=32, height=32))
    b = engine_images(distilled_engine, EngineInputs("repeat", 2, 1.0, 1, width=32, height=32))
    c = engine_images(distilled_engine, EngineInputs("repeat", 2, 1.0, 2, width=32, height=32))
    assert np.array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_progress_is_reported_after_every_step(distilled_engine: Engine) -> None:
    seen: list[Progress] = []
    distilled_engine.generate(EngineInputs("progress", 4, 1.0, 0, width=32, height=32), on_progress=seen.append)
    denoise = [(p.step, p.total) for p in seen if p.stage == "denoise"]
    assert denoise == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert seen[0].stage == "encode_prompt" and seen[-1] == Progress("decode", 1, 1)


def test_cancel_between_steps(distilled_engine: Engine) -> None:
    seen: list[Progress] = []

    def cancel_after_two() -> bool:
        return sum(p.stage == "denoise" for p in seen) >= 2

    with pytest.raises(GenerationCancelledError):
        distilled_engine.generate(
            EngineInputs("cancel me", 6, 1.0, 0, width=32, height=32),
            on_progress=seen.append,
            should_cancel=cancel_after_two,
        )
    assert [p.step for p in seen if p.stage == "denoise"] == [1, 2]
    assert not any(p.stage == "decode" for p in seen)


def test_cached_prompt_embedding_gives_the_same_pixels(distilled_engine: Engine) -> None:
    embedding = distilled_engine.encode_prompt("cached")
    inputs = EngineInputs("cached", 2, 1.0, 9, width=32, height=32)
    fresh = engine_images(distilled_engine, inputs)
    cached = [np.asarray(i) for i in distilled_engine.generate(inputs, prompt_embedding=embedding).images]
    assert np.array_equal(fresh[0], cached[0])


def test_empty_prompt_embedding_is_computed_once(base_engine: Engine) -> None:
    first = base_engine.empty_prompt_embedding()
    assert base_engine.empty_prompt_embedding() is first


def test_negative_prompt_matches_diffusers_with_the_same_negative_embedding(base_engine: Engine) -> None:
    """True CFG against a given text: diffusers' pipeline takes it as ``negative_prompt_embeds``."""
    pipe = base_engine.pipeline
    pipe.set_progress_bar_config(disable=True)
    negative = pipe._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, ["blurry, low quality"])
    expected = pipe(
        prompt="a cat wearing a hat",
        negative_prompt_embeds=negative,
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=4.0,
        num_images_per_prompt=2,
        generator=[torch.Generator("cpu").manual_seed(s) for s in (3, 4)],
    ).images
    inputs = EngineInputs(
        "a cat wearing a hat", 4, 4.0, 3, num_images=2, width=64, height=64, negative_prompt="blurry, low quality"
    )
    got = engine_images(base_engine, inputs)
    assert all(np.array_equal(g, np.asarray(e)) for g, e in zip(got, expected, strict=True))
    # The negative text matters: the empty negative gives other pixels.
    plain = engine_images(base_engine, EngineInputs("a cat wearing a hat", 4, 4.0, 3, width=64, height=64))
    assert not np.array_equal(plain[0], got[0])


def test_negative_prompt_goes_through_the_prompt_cache(tiny_base: Path) -> None:
    from kleinserve.engine.cache import PromptCache
    from kleinserve.engine.variants import find_variant
    from kleinserve.engine.weights import load_pipeline

    engine = Engine(load_pipeline(tiny_base, torch.device("cpu"), torch.float32), find_variant("flux-2-klein-base-4b"))
    engine.prompt_cache = PromptCache(64 * 1024 * 1024)
    inputs = EngineInputs("a dog", 1, 3.0, 1, width=32, height=32, negative_prompt="rain")
    first = engine_images(engine, inputs)
    stats = engine.prompt_cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (0, 2, 2)  # the prompt and the negative
    assert engine.prompt_cache.get("flux-2-klein-base-4b", "rain") is not None
    again = engine_images(engine, inputs)
    assert engine.prompt_cache.stats().hits == 3  # the get above, the prompt and the negative
    assert np.array_equal(first[0], again[0])


def inpaint_with_white_mask(engine: Engine, images: list[Image.Image], **kwargs: object) -> list[np.ndarray]:
    """diffusers' Flux2KleinInpaintPipeline on the engine's modules, repainting everywhere."""
    from diffusers import Flux2KleinInpaintPipeline

    pipe = Flux2KleinInpaintPipeline(**engine.pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    mask = Image.new("L", images[0].size, 255)
    reference = images[1] if len(images) > 1 else None
    output = pipe(image=images[0], image_reference=reference, mask_image=mask, **kwargs)  # type: ignore[arg-type]
    return [np.asarray(image) for image in output.images]


def test_strength_matches_the_inpaint_pipeline_with_a_white_mask(distilled_engine: Engine) -> None:
    (image,) = reference_images(1)
    expected = inpaint_with_white_mask(
        distilled_engine,
        [image],
        prompt="a fox",
        strength=0.6,
        num_inference_steps=4,
        guidance_scale=1.0,
        num_images_per_prompt=2,
        generator=[torch.Generator("cpu").manual_seed(s) for s in (5, 6)],
    )
    output = distilled_engine.generate(EngineInputs("a fox", 4, 1.0, 5, num_images=2, references=[image], strength=0.6))
    assert (output.width, output.height) == (80, 64)  # the first image's size
    assert all(np.array_equal(np.asarray(g), e) for g, e in zip(output.images, expected, strict=True))
    # strength matters: a stronger one moves further from the image.
    stronger = engine_images(distilled_engine, EngineInputs("a fox", 4, 1.0, 5, references=[image], strength=1.0))
    assert not np.array_equal(stronger[0], expected[0])


def test_strength_with_cfg_and_a_second_reference_matches(base_engine: Engine) -> None:
    first, second = reference_images(2)
    expected = inpaint_with_white_mask(
        base_engine,
        [first, second],
        prompt="a cat",
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator("cpu").manual_seed(2),
    )
    got = engine_images(base_engine, EngineInputs("a cat", 4, 3.0, 2, references=[first, second], strength=0.5))
    assert np.array_equal(got[0], expected[0])
