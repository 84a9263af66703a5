"""Reference images for FLUX.2 [klein] editing: sized as diffusers sizes them and VAE-encoded.

A reference larger than :data:`REFERENCE_MAX_PIXELS` is shrunk to that area, then cropped to the
16-pixel grid (``vae_scale_factor * 2``), as ``Flux2KleinPipeline`` does. The latents are the VAE
posterior's mode, so encoding references draws no randomness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

REFERENCE_MAX_PIXELS = 1024 * 1024  # diffusers shrinks larger references to this area


def preprocess_reference(pipeline: Any, image: Image.Image) -> torch.Tensor:
    """Resize (to at most 1 MP) and crop a reference to the 16-pixel grid, as diffusers does."""
    processor = pipeline.image_processor
    width, height = image.size
    if width * height > REFERENCE_MAX_PIXELS:
        image = processor._resize_to_target_area(image, REFERENCE_MAX_PIXELS)
        width, height = image.size
    multiple = pipeline.vae_scale_factor * 2
    width, height = (width // multiple) * multiple, (height // multiple) * multiple
    tensor: torch.Tensor = processor.preprocess(image, height=height, width=width, resize_mode="crop")
    return tensor


@torch.inference_mode()
def encode_references(
    pipeline: Any, images: Sequence[Image.Image], batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """VAE latents and position ids of the references, and the first reference's (width, height)."""
    tensors = [preprocess_reference(pipeline, image) for image in images]
    first_size = (int(tensors[0].shape[-1]), int(tensors[0].shape[-2]))
    latents, ids = pipeline.prepare_image_latents(
        images=tensors,
        batch_size=batch_size,
        generator=None,  # references are encoded with the posterior mode: no randomness
        device=device,
        dtype=pipeline.vae.dtype,
    )
    return latents, ids, first_size
