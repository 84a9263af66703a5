"""Several compatible requests denoised as one batch (cross-request batching).

Requests are *compatible* when they share the model, output size, steps, guidance, LoRA adapters and
the shapes of their reference latents (:func:`batch_key`); the worker (jobs/worker.py) claims up to
``KLEINSERVE_MAX_BATCH`` queued jobs and runs each group sharing a key as one batch. Each request
keeps its own prompt, seeds (image ``i`` of a request: its seed + i, drawn from its own CPU
generators, so its starting noise is exactly the unbatched one), progress reports, cancellation and
outputs: a cancelled request's rows leave the batch at the next step and the others go on.

Pixels may differ from the request run alone by float rounding only (a batched matmul may sum in
another order); the tests hold each image to at most 2 levels of its unbatched twin on uint8 pixels.
The K/V-cached path of klein 9B-KV with references is not batched (its cache is per request).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, fields

import torch

from kleinserve.engine.denoising import denoising_schedule
from kleinserve.engine.engine import DEFAULT_SIZE, Engine, EngineInputs, EngineOutput
from kleinserve.engine.guidance import guide, predict_noise
from kleinserve.engine.progress import CancelCheck, Progress, ProgressCallback
from kleinserve.errors import GenerationCancelledError, ResourceExhaustedError


@dataclass
class BatchItem:
    """One request of a batch, with its own progress and cancellation."""

    inputs: EngineInputs
    on_progress: ProgressCallback | None = None
    should_cancel: CancelCheck | None = None


Outcome = EngineOutput | BaseException  # per item: its output, or why it has none


# Fields of EngineInputs each request of a batch has on its own, and those the batch shares (its key).
_OWN = frozenset({"prompt", "seed", "num_images", "negative_prompt", "references"})
_SHARED = ("steps", "guidance", "width", "height")


def batch_key(engine: Engine, inputs: EngineInputs, loras: tuple[tuple[str, float], ...] = ()) -> Hashable | None:
    """What requests must share to be denoised together; ``None``: this one runs alone.

    The key holds the model, size, steps, guidance, the shapes of the references after their
    preprocessing and ``loras`` (the LoRA adapters and scales, which are set on the shared
    transformer). Inputs the batched loop does not implement run alone: image-to-image
    (``strength``), inpainting (``mask``), step caching, the K/V-cached references of 9B-KV, and any other field of
    :class:`EngineInputs` away from its default (a new field runs alone until this path learns it).
    """
    if engine.variant.kv_cache and inputs.references:
        return None
    for spec in fields(inputs):
        if spec.name not in _OWN and spec.name not in _SHARED and getattr(inputs, spec.name) != spec.default:
            return None
    references = tuple(tuple(engine.preprocess_reference(image).shape[-2:]) for image in inputs.references)
    shared = tuple(getattr(inputs, name) for name in _SHARED)
    return (engine.variant.id, *shared, references, tuple(loras))


def generate_batch(engine: Engine, items: Sequence[BatchItem]) -> list[Outcome]:
    """Run compatible requests as one batch; one outcome per item, in order.

    A cancelled item gets :class:`GenerationCancelledError`; running out of memory fails every item
    with :class:`ResourceExhaustedError`. A single item is just :meth:`Engine.generate`.
    """
    if len(items) == 1:
        item = items[0]
        try:
            return [engine.generate(item.inputs, item.on_progress, item.should_cancel)]
        except Exception as err:
            return [err]
    try:
        with torch.inference_mode():
            return _generate_batch(engine, items)
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        images = sum(item.inputs.num_images for item in items)
        error = ResourceExhaustedError(f"out of {engine.device} memory for a batch of {images} image(s)")
        return [error for _ in items]


def _generate_batch(engine: Engine, items: Sequence[BatchItem]) -> list[Outcome]:
    pipe = engine.pipeline
    first = items[0].inputs
    counts = [item.inputs.num_images for item in items]
    reports = [item.on_progress or (lambda _p: None) for item in items]
    cancels = [item.should_cancel or (lambda: False) for item in items]
    outcomes: list[Outcome | None] = [None] * len(items)
    cfg = engine.variant.uses_cfg and first.guidance > 1.0 and not pipe.config.is_distilled
    timings: dict[str, float] = {}

    started = time.perf_counter()
    for report in reports:
        report(Progress("encode_prompt", 0, 1))
    prompt_embeds = torch.cat(
        [engine.prompt_embedding(item.inputs.prompt).expand(n, -1, -1) for item, n in zip(items, counts, strict=True)]
    )
    negative_embeds = None
    if cfg:  # each request's own negative ("" unless it gave one)
        negatives = [engine.negative_embedding(item.inputs.negative_prompt) for item in items]
        negative_embeds = torch.cat([neg.expand(n, -1, -1) for neg, n in zip(negatives, counts, strict=True)])
    timings["encode_prompt"] = time.perf_counter() - started

    ref_latents = ref_ids = None
    width, height = first.width, first.height
    if first.references:
        started = time.perf_counter()
        encoded = [engine.encode_references(item.inputs.references, n) for item, n in zip(items, counts, strict=True)]
        ref_latents = torch.cat([latents for latents, _, _ in encoded])
        ref_ids = torch.cat([ids for _, ids, _ in encoded])
        if width is None or height is None:
            width, height = encoded[0][2]
        timings["encode_references"] = time.perf_counter() - started
    width = width or DEFAULT_SIZE
    height = height or DEFAULT_SIZE

    started = time.perf_counter()
    seeds = [[item.inputs.seed + i for i in range(n)] for item, n in zip(items, counts, strict=True)]
    generators = [torch.Generator("cpu").manual_seed(seed) for request in seeds for seed in request]
    latents, latent_ids = pipe.prepare_latents(
        batch_size=len(generators),
        num_latents_channels=pipe.transformer.config.in_channels // 4,
        height=height,
        width=width,
        dtype=prompt_embeds.dtype,
        device=engine.device,
        generator=generators,
    )
    scheduler, timesteps = denoising_schedule(pipe, first.steps, latents.shape[1], engine.device)

    # owner[r]: the item whose image is row r of every batched tensor.
    owner = [index for index, n in enumerate(counts) for _ in range(n)]
    transformer = pipe.transformer
    for i, t in enumerate(timesteps):
        keep = _drop_cancelled(owner, cancels, outcomes)
        if not keep:
            break
        if len(keep) < len(owner):
            rows = torch.tensor(keep, device=latents.device)
            owner = [owner[r] for r in keep]
            latents, prompt_embeds = latents[rows], prompt_embeds[rows]
            negative_embeds = negative_embeds[rows] if negative_embeds is not None else None
            if ref_latents is not None and ref_ids is not None:
                ref_latents, ref_ids = ref_latents[rows], ref_ids[rows]
        text_ids = pipe._prepare_text_ids(prompt_embeds).to(engine.device)
        model_ids = latent_ids[:1].expand(len(owner), -1, -1)
        if ref_ids is not None:
            model_ids = torch.cat([model_ids, ref_ids], dim=1)
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        model_input = latents if ref_latents is None else torch.cat([latents, ref_latents], dim=1)
        model_input = model_input.to(transformer.dtype)
        image_tokens = latents.size(1)
        noise = predict_noise(
            transformer, model_input, timestep / 1000, prompt_embeds, text_ids, model_ids, image_tokens
        )
        if negative_embeds is not None:
            negative_ids = pipe._prepare_text_ids(negative_embeds).to(engine.device)
            negative = predict_noise(
                transformer, model_input, timestep / 1000, negative_embeds, negative_ids, model_ids, image_tokens
            )
            noise = guide(noise, negative, first.guidance)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        for index in sorted(set(owner)):
            # Each item's preview decodes its own rows only (engine/preview.py), lazily.
            its_rows = [row for row, row_owner in enumerate(owner) if row_owner == index]
            preview = engine.previews.lazy(
                latents, noise, scheduler.sigmas, scheduler.step_index, latent_ids, width, height, its_rows
            )
            reports[index](Progress("denoise", i + 1, len(timesteps), preview))
    keep = _drop_cancelled(owner, cancels, outcomes)
    timings["denoise"] = time.perf_counter() - started
    if keep:
        rows = torch.tensor(keep, device=latents.device)
        owner = [owner[r] for r in keep]
        started = time.perf_counter()
        for index in sorted(set(owner)):
            reports[index](Progress("decode", 0, 1))
        images = engine.decode(latents[rows], latent_ids[:1].expand(len(owner), -1, -1), width, height)
        timings["decode"] = time.perf_counter() - started
        for index in sorted(set(owner)):
            reports[index](Progress("decode", 1, 1))
            mine = [image for image, row_owner in zip(images, owner, strict=True) if row_owner == index]
            outcomes[index] = EngineOutput(
                images=mine,
                seeds=seeds[index],
                width=mine[0].width,
                height=mine[0].height,
                steps=first.steps,
                guidance=items[index].inputs.guidance,
                cfg=cfg,
                timings=dict(timings),
            )
    return [outcome if outcome is not None else GenerationCancelledError() for outcome in outcomes]


def _drop_cancelled(owner: list[int], cancels: Sequence[CancelCheck], outcomes: list[Outcome | None]) -> list[int]:
    """Rows still wanted; items whose cancellation was asked for get their outcome now."""
    for index in sorted(set(owner)):
        if outcomes[index] is None and cancels[index]():
            outcomes[index] = GenerationCancelledError()
    return [row for row, index in enumerate(owner) if outcomes[index] is None]
