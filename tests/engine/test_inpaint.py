"""Inpainting (engine/inpaint.py) against diffusers' Flux2KleinInpaintPipeline on the same tiny weights."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from kleinserve.engine.engine import Engine, EngineInputs
from tests.engine.test_engine import engine_images, reference_images


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """255 (repaint) inside ``box``, 0 (keep) elsewhere; off the 16-pixel grid, so edges are fractional."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def diffusers_inpaint(
    engine: Engine, images: list[Image.Image], mask: Image.Image, seeds: list[int], **kwargs: object
) -> list[np.ndarray]:
    from diffusers import Flux2KleinInpaintPipeline

    pipe = Flux2KleinInpaintPipeline(**engine.pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    output = pipe(
        image=images[0],
        image_reference=images[1] if len(images) > 1 else None,
        mask_image=mask,
        num_images_per_prompt=len(seeds),
        generator=generators if len(generators) > 1 else generators[0],
        **kwargs,  # type: ignore[arg-type]
    )
    return [np.asarray(image) for image in output.images]


def test_a_mask_matches_the_inpaint_pipeline(distilled_engine: Engine) -> None:
    (image,) = reference_images(1)
    mask = box_mask(image.size, (20, 10, 61, 45))
    expected = diffusers_inpaint(
        distilled_engine, [image], mask, [3, 4], prompt="a fox", num_inference_steps=4, guidance_scale=1.0
    )
    output = distilled_engine.generate(EngineInputs("a fox", 4, 1.0, 3, num_images=2, references=[image], mask=mask))
    assert (output.width, output.height) == (80, 64)
    assert all(np.array_equal(np.asarray(g), e) for g, e in zip(output.images, expected, strict=True))
    # The mask matters: without it (image-to-image at the same strength) the pixels differ.
    unmasked = engine_images(distilled_engine, EngineInputs("a fox", 4, 1.0, 3, references=[image], strength=1.0))
    assert not np.array_equal(unmasked[0], expected[0])


def test_a_mask_with_strength_cfg_and_a_second_reference_matches(base_engine: Engine) -> None:
    first, second = reference_images(2)
    mask = box_mask(first.size, (0, 0, 39, 63))
    kwargs = {"prompt": "a cat", "strength": 0.5, "num_inference_steps": 4, "guidance_scale": 3.0}
    expected = diffusers_inpaint(base_engine, [first, second], mask, [2], **kwargs)
    got = engine_images(
        base_engine, EngineInputs("a cat", 4, 3.0, 2, references=[first, second], strength=0.5, mask=mask)
    )
    assert np.array_equal(got[0], expected[0])
