"""VAE decoding: packed latents to images, whole or in tiles above a size so large images fit in
memory; channels_last.

:func:`decode_packed` unpacks the transformer's packed latents to the VAE's grid, undoes the VAE's
batch norm and unpatchifies them, as ``Flux2KleinPipeline`` does before its VAE decode.

Tiling: diffusers' ``AutoencoderKLFlux2.tiled_decode`` decodes overlapping tiles of ``sample_size``
pixels and blends their seams, so peak memory stays that of one tile. Blending changes pixels slightly
against a whole decode (and diffusers' pipeline, which decodes whole), so it is the operator's choice:
``KLEINSERVE_VAE_TILE_ABOVE_PIXELS`` (0, the default: never) tiles images with more pixels than that.

channels_last: the VAE is almost all 3x3 convolutions, which oneDNN (CPU) and cuDNN run faster on
NHWC tensors. The convolutions then accumulate in another order, so the output is *not* bit-equal to
the default layout's. Checked on the CPU (128x128, decoder and encoder separately): on klein's real
widths the decoder and the encoder both differ in float32 (by ~1e-5) and in bfloat16 (by ~0.02-0.06);
on the tiny test widths everything differs but the encoder in bfloat16. After conversion to uint8:
float32 moves about 0.1% of pixels by one level, bfloat16 most pixels by up to ~9 levels (512x512).
Exact parity with diffusers' pipeline is the default, so ``KLEINSERVE_VAE_CHANNELS_LAST`` is opt-in.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image


def use_channels_last(vae: torch.nn.Module) -> None:
    """Store the VAE's 4-D weights (its convolutions) in channels_last; its outputs follow."""
    vae.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # documented, not in the stubs


def is_channels_last(vae: torch.nn.Module) -> bool:
    """Whether every 4-D weight of ``vae`` is stored channels_last."""
    weights = [p for p in vae.parameters() if p.dim() == 4]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


def decode_latents(vae: Any, latents: torch.Tensor, tile_above_pixels: int, scale: int) -> torch.Tensor:
    """``vae`` decodes ``latents`` (unpatchified, normalised back); tiled when the image is large."""
    pixels = latents.shape[-1] * latents.shape[-2] * scale * scale
    if tile_above_pixels > 0 and pixels > tile_above_pixels:
        tiled: torch.Tensor = vae.tiled_decode(latents, return_dict=False)[0]
        return tiled
    whole: torch.Tensor = vae.decode(latents, return_dict=False)[0]
    return whole


def decode_packed(
    pipeline: Any,
    latents: torch.Tensor,
    latent_ids: torch.Tensor,
    width: int,
    height: int,
    device: torch.device,
    tile_above_pixels: int,
) -> list[Image.Image]:
    """Unpack packed latents, undo the VAE batch-norm and decode to PIL images."""
    grid = pipeline.vae_scale_factor * 2
    latents = pipeline._unpack_latents_with_ids(latents, latent_ids, height // grid, width // grid)
    vae = pipeline.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    latents = pipeline._unpatchify_latents(latents * std + mean)
    decoded = decode_latents(vae, latents.to(device), tile_above_pixels, pipeline.vae_scale_factor)
    images: list[Image.Image] = pipeline.image_processor.postprocess(decoded, output_type="pil")
    return images
