"""Turning a :class:`GenerationRequest` into encoded images with an :class:`Engine`.

The one place that applies a variant's defaults, draws a random seed when none was given, runs the
engine and encodes its output. The CLI and the server's worker both go through it (:func:`run_request`
for one request; the worker's batches through its steps :func:`prepare_inputs` and :func:`encode_output`),
so a request means the same thing wherever it comes from.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from kleinserve.engine.engine import Engine, EngineInputs, EngineOutput
from kleinserve.engine.images import EncodedImage, encode_image
from kleinserve.engine.img2img import start_size
from kleinserve.engine.masks import check_mask_size
from kleinserve.engine.progress import CancelCheck, ProgressCallback
from kleinserve.engine.stepcache import DEFAULT_THRESHOLDS, StepCache
from kleinserve.engine.variants import Variant, find_variant
from kleinserve.errors import InvalidImageError, InvalidParameterError
from kleinserve.request import GenerationRequest, random_seed


@dataclass
class GenerationResult:
    """What a finished request produced, with the parameters that produced it."""

    model: str
    images: list[EncodedImage]
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance: float
    timings: dict[str, float] = field(default_factory=dict)

    def metadata(self, index: int, prompt: str, negative_prompt: str | None = None) -> dict[str, Any]:
        """The parameters of image ``index``, as embedded in its file."""
        extra = {"negative_prompt": negative_prompt} if negative_prompt else {}
        return {
            "generator": "kleinserve",
            "model": self.model,
            "prompt": prompt,
            "seed": self.seeds[index],
            "steps": self.steps,
            "guidance": self.guidance,
            "width": self.width,
            "height": self.height,
            **extra,
        }


def resolved_parameters(request: GenerationRequest, variant: Variant) -> tuple[int, float, int]:
    """Steps, guidance and seed for ``request``: its own values, else the variant's defaults."""
    steps = request.steps if request.steps is not None else variant.default_steps
    guidance = request.guidance if request.guidance is not None else variant.default_guidance
    seed = request.seed if request.seed is not None else random_seed()
    return steps, guidance, seed


def step_cache_for(request: GenerationRequest, engine: Engine) -> StepCache | None:
    """The request's step caching, else the server's default; only ever on the Base variants."""
    if not engine.variant.uses_cfg:
        return None
    choice = request.cache
    if choice is None:
        return engine.step_cache
    if choice.type == "none":
        return None
    return StepCache(choice.type, choice.threshold or DEFAULT_THRESHOLDS[choice.type])


def prepare_inputs(
    request: GenerationRequest,
    engine: Engine,
    references: Sequence[Image.Image] = (),
    mask: Image.Image | None = None,
) -> EngineInputs:
    """The engine's inputs for ``request`` (its defaults applied, a random seed drawn when it has none).

    ``references`` are ``request.images`` already loaded (:func:`~kleinserve.engine.images.load_references`),
    and ``mask`` is ``request.mask`` loaded (:func:`~kleinserve.engine.masks.load_mask`), so callers
    can refuse bad inputs before they load a model. Refuses what ``engine`` cannot run.
    """
    variant = find_variant(request.model)
    if variant.id != engine.variant.id:
        raise InvalidParameterError("model", f"{request.model!r} is not served by this engine ({engine.variant.id})")
    steps, guidance, seed = resolved_parameters(request, variant)
    if len(references) != len(request.images):
        raise InvalidParameterError("images", "references were not loaded for this request")
    if request.strength is not None or mask is not None:
        grid = engine.pipeline.vae_scale_factor * 2
        if min(start_size(*references[0].size, grid)) < grid:
            width, height = references[0].size
            raise InvalidImageError(
                0,
                f"is {width}x{height}; image-to-image and inpainting need at least {grid} pixels a side",
                field="images",
            )
    if (mask is None) != (request.mask is None):
        raise InvalidParameterError("mask", "the mask was not loaded for this request")
    if mask is not None:
        check_mask_size(mask.size, references[0].size)
    if request.loras and engine.adapters is None:
        raise InvalidParameterError("loras", "this server offers no LoRA adapters")
    return EngineInputs(
        prompt=request.prompt,
        steps=steps,
        guidance=guidance,
        seed=seed,
        num_images=request.num_images,
        references=references,
        width=request.width,
        height=request.height,
        negative_prompt=request.negative_prompt or "",
        step_cache=step_cache_for(request, engine),
        strength=request.strength,
        mask=mask,
    )


def lora_key(request: GenerationRequest) -> tuple[tuple[str, float], ...]:
    """The request's LoRA adapters and scales as a comparable value (requests sharing it share adapters)."""
    return tuple(sorted((choice.name, choice.scale) for choice in request.loras))


def activate_loras(request: GenerationRequest, engine: Engine) -> None:
    """Put exactly ``request``'s LoRA adapters (or none) on ``engine``; call right before generating."""
    if engine.adapters is not None:
        engine.adapters.activate(request.loras)


def encode_output(request: GenerationRequest, output: EngineOutput) -> GenerationResult:
    """Encode the engine's images in the request's format, with their parameters as metadata."""
    timings = dict(output.timings)
    result = GenerationResult(
        model=find_variant(request.model).id,
        images=[],
        seeds=output.seeds,
        width=output.width,
        height=output.height,
        steps=output.steps,
        guidance=output.guidance,
        timings=timings,
    )
    started = time.perf_counter()
    result.images = [
        encode_image(
            image, request.output_format, request.quality, result.metadata(i, request.prompt, request.negative_prompt)
        )
        for i, image in enumerate(output.images)
    ]
    timings["encode"] = time.perf_counter() - started
    return result


def run_request(
    request: GenerationRequest,
    engine: Engine,
    references: Sequence[Image.Image] = (),
    *,
    mask: Image.Image | None = None,
    on_progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> GenerationResult:
    """Generate and encode every image ``request`` asks for on ``engine``: :func:`prepare_inputs`,
    :func:`activate_loras`, :meth:`Engine.generate`, :func:`encode_output` (the worker's batched path
    runs the same steps around :func:`~kleinserve.engine.batch.generate_batch`)."""
    inputs = prepare_inputs(request, engine, references, mask)
    activate_loras(request, engine)
    output = engine.generate(inputs, on_progress=on_progress, should_cancel=should_cancel)
    return encode_output(request, output)
