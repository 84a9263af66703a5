"""Inpainting: repaint only where a mask says, as diffusers' ``Flux2KleinInpaintPipeline`` does.

It is image-to-image (engine/img2img.py) plus one blend after every denoising step. The mask is a
PIL ``L`` image of the first image's size, 255 where to repaint and 0 where to keep (engine/masks.py
makes it from an OpenAI-style PNG). The pipeline's own mask processor binarises it, resizes it to the
output size and then, bilinearly, to the packed latent grid (one value per 16x16 patch, fractional
along the edges). After step ``i`` the kept area is replaced by the first image's latents noised to
the next timestep with the very noise the run started from (clean after the last step)::

    latents = (1 - mask) * image_at(t[i + 1]) + mask * latents

so the kept area ends as the first image's own latents, and the repainted area is denoised in
their context. ``strength`` still says how far the start is noised (in the masked area it is all
that remains of the image besides the reference); with a mask it defaults to 1.0, the pipeline's
default: the masked area is drawn from pure noise. The first image stays the first conditioning
reference either way, so the model sees what it repaints. The methods are the pipeline's own, on
the loaded modules, so the pixels are that pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from kleinserve.engine.img2img import StartingPoint, inpaint_pipeline

if TYPE_CHECKING:
    from diffusers import Flux2KleinPipeline

DEFAULT_STRENGTH = 1.0  # with a mask and no strength: the masked area from pure noise (diffusers' default)


@dataclass
class MaskBlend:
    """The per-step blend that keeps the unmasked area the first image's."""

    mask: torch.Tensor  # packed (n, seq, 1): 1 repaint, 0 keep, fractional on edges
    image_latents: torch.Tensor  # packed clean latents of the first image
    noise: torch.Tensor  # packed: the starting noise
    timesteps: torch.Tensor

    def __call__(self, scheduler: Any, index: int, latents: torch.Tensor) -> torch.Tensor:
        """``latents`` after step ``index`` (already taken by ``scheduler``), blended with the kept area."""
        kept = self.image_latents
        if index < len(self.timesteps) - 1:
            kept = scheduler.scale_noise(kept, torch.tensor([self.timesteps[index + 1]]), self.noise)
        blended: torch.Tensor = (1 - self.mask) * kept + self.mask * latents
        return blended


def mask_blend(
    pipe: Flux2KleinPipeline,
    mask: Image.Image,
    start: StartingPoint,
    dtype: torch.dtype,
    device: torch.device,
) -> MaskBlend:
    """The blend for ``mask`` (``L``, the first image's size) over an image-to-image ``start``."""
    inpaint = inpaint_pipeline(pipe)
    condition = inpaint.mask_processor.preprocess(
        mask, height=start.height, width=start.width, resize_mode="default", crops_coords=None
    )
    n = start.latents.shape[0]
    packed = inpaint.prepare_mask_latents(condition, 1, n, start.height, start.width, dtype, device)
    return MaskBlend(packed, start.image_latents, start.noise, start.timesteps)
