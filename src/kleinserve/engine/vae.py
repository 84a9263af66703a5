"""VAE decoding: whole, or in tiles above a size so large images fit in memory.

diffusers' ``AutoencoderKLFlux2.tiled_decode`` decodes overlapping tiles of ``sample_size`` pixels and
blends their seams, so peak memory stays that of one tile. Blending changes pixels slightly against
a whole decode (and diffusers' pipeline, which decodes whole), so it is the operator's choice:
``KLEINSERVE_VAE_TILE_ABOVE_PIXELS`` (0, the default: never) tiles images with more pixels than that.
"""

from __future__ import annotations

from typing import Any

import torch


def decode_latents(vae: Any, latents: torch.Tensor, tile_above_pixels: int, scale: int) -> torch.Tensor:
    """``vae`` decodes ``latents`` (unpatchified, normalised back); tiled when the image is large."""
    pixels = latents.shape[-1] * latents.shape[-2] * scale * scale
    if tile_above_pixels > 0 and pixels > tile_above_pixels:
        tiled: torch.Tensor = vae.tiled_decode(latents, return_dict=False)[0]
        return tiled
    whole: torch.Tensor = vae.decode(latents, return_dict=False)[0]
    return whole
