"""Image-to-image with ``strength``: start from the first image noised part of the way, as
diffusers' ``Flux2KleinInpaintPipeline`` does with a mask that is white everywhere.

With an all-ones mask that pipeline's per-step blend ``(1 - mask) * image + mask * latents`` is the
identity, so what remains is: the first image, resized to at most 1 MP (diffusers' ``resize``) and
floored to the 16-pixel grid, fixes the output size; its VAE latents (posterior mode) are both the
starting point, mixed with noise at the first kept timestep (``scheduler.scale_noise``), and the first
conditioning reference; the schedule of ``steps`` is cut to its last ``strength`` part
(``get_timesteps``). Further images are references as usual. The methods used are the inpaint
pipeline's own, on the loaded pipeline's modules, so the pixels are that pipeline's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

if TYPE_CHECKING:
    from diffusers import Flux2KleinPipeline

MAX_PIXELS = 1024 * 1024


@dataclass
class StartingPoint:
    """What the denoising loop starts from for an image-to-image run."""

    latents: torch.Tensor  # packed, noised to timesteps[0]
    latent_ids: torch.Tensor
    noise: torch.Tensor  # packed: the noise mixed into latents (inpainting re-noises the kept area with it)
    image_latents: torch.Tensor  # packed: the first image's clean latents
    condition_latents: torch.Tensor  # packed references: the first image, then the others
    condition_ids: torch.Tensor
    timesteps: torch.Tensor
    width: int
    height: int


def inpaint_pipeline(pipe: Flux2KleinPipeline) -> Any:
    """``Flux2KleinInpaintPipeline`` over the same modules (nothing is copied or loaded)."""
    from diffusers import Flux2KleinInpaintPipeline

    return Flux2KleinInpaintPipeline(**pipe.components)


def start_size(width: int, height: int, multiple: int = 16) -> tuple[int, int]:
    """The output (width, height) of an image-to-image run from an image of this size (0 if too small)."""
    if width * height > MAX_PIXELS:
        scale = math.sqrt(MAX_PIXELS / (width * height))
        width, height = int(width * scale), int(height * scale)
    return (width // multiple) * multiple, (height // multiple) * multiple


def output_size(inpaint: Any, image: Image.Image) -> tuple[Image.Image, int, int]:
    """The first image as the inpaint pipeline sizes it, and the output (width, height) it gives."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        scale = math.sqrt(MAX_PIXELS / (width * height))
        image = inpaint.image_processor.resize(image, int(height * scale), int(width * scale))
        width, height = image.size
    multiple = inpaint.vae_scale_factor * 2
    return image, (width // multiple) * multiple, (height // multiple) * multiple


def starting_point(
    pipe: Flux2KleinPipeline,
    images: Sequence[Image.Image],
    strength: float,
    steps: int,
    scheduler: Any,
    generators: list[torch.Generator],
    dtype: torch.dtype,
    device: torch.device,
) -> StartingPoint:
    """Latents, references and the cut schedule for ``strength`` (``scheduler`` is fresh, not yet set)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

    inpaint = inpaint_pipeline(pipe)
    inpaint.scheduler = scheduler
    first, width, height = output_size(inpaint, images[0])
    init = inpaint.image_processor.preprocess(first, height, width, crops_coords=None, resize_mode="default")
    sigmas = None if getattr(scheduler.config, "use_flow_sigmas", False) else _linear_sigmas(steps)
    grid = pipe.vae_scale_factor * 2
    mu = compute_empirical_mu(image_seq_len=(height // grid) * (width // grid), num_steps=steps)
    retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    timesteps, remaining = inpaint.get_timesteps(steps, strength, device)
    if remaining < 1:
        raise ValueError(f"strength {strength} leaves no step of {steps}")
    n = len(generators)
    latents, noise, packed, image_latents, latent_ids = inpaint.prepare_latents(
        init,
        timesteps[:1].repeat(n),
        n,
        pipe.transformer.config.in_channels // 4,
        height,
        width,
        dtype,
        device,
        generators,
    )
    references: list[torch.Tensor] = [image_latents]
    for image in images[1:]:
        references.append(_reference_tensor(inpaint, image))
    condition_latents, condition_ids = inpaint.prepare_image_latents(references, n, generators, device, dtype)
    return StartingPoint(latents, latent_ids, noise, packed, condition_latents, condition_ids, timesteps, width, height)


def _linear_sigmas(steps: int) -> Any:
    import numpy as np

    return np.linspace(1.0, 1 / steps, steps)


def _reference_tensor(inpaint: Any, image: Image.Image) -> torch.Tensor:
    """A further reference as the inpaint pipeline's ``image_reference``: at most 1 MP, cropped to the grid."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        scale = math.sqrt(MAX_PIXELS / (width * height))
        image = inpaint.image_processor.resize(image, int(height * scale), int(width * scale))
        width, height = image.size
    multiple = inpaint.vae_scale_factor * 2
    tensor: torch.Tensor = inpaint.image_processor.preprocess(
        image, (height // multiple) * multiple, (width // multiple) * multiple, resize_mode="crop"
    )
    return tensor
