"""Live previews: the denoising loop's current x0 estimate, decoded cheaply.

After step ``i`` the flow-matching Euler step has moved the latents to ``sigma_next`` along the
predicted velocity ``v`` (noise - x0), so the clean-image estimate is ``x0 = latents - sigma_next * v``
(exact for the step: ``x_t = (1 - sigma) x0 + sigma noise``). It lives where the transformer works:
2x2-packed latents (128 channels for klein, at 1/16 of the image), normalised by the VAE's batch norm.

:meth:`Previewer.lazy` wraps that in a callable the engine hands out in ``Progress.preview``: nothing
is computed unless someone calls it. Two decoders:

- **A tiny autoencoder** (engine/tiny_autoencoder.py; ``KLEINSERVE_PREVIEW_DECODER``: a directory or
  a hub repo id such as ``fal/FLUX.2-Tiny-AutoEncoder``), which decodes the packed, *normalised*
  latents directly: the VAE's inverse batch norm is not applied (TAE decoders take FLUX.2's latent API,
  the normalised latents; applying the inverse made previews darker and oversaturated, measured in
  IonDen/mlx-taef#41). Latents of outputs larger than the preview are resized (bilinear, antialiased)
  to the preview's grid first, so a 1024x1024 job decodes a 512x512 preview, a quarter of the work.
- **Otherwise, a linear projection** from the packed channels to RGB plus a bias, derived from the
  model's own VAE the first time a preview is asked for (so it follows whatever VAE the checkpoint
  ships, the tiny test ones included, and nothing is fitted to data): the VAE decodes, in one
  batch, a fixed random latent on a 2x2 packed grid (32x32 pixels) and that latent with each *latent*
  channel raised by 1 (about one standard deviation of normalised latents) at its four 2x2
  sub-positions, i.e. the four packed channels ``4k .. 4k+3``; the change of the mean colour (a
  finite-difference Jacobian of the decoder) is split between those four columns in proportion to
  their batch-norm std, which assumes the decoder answers a latent channel alike at each
  sub-position (see :func:`derive_projection`), and the bias makes the projection of the base latent
  its mean colour. It costs ``latent channels + 1`` (33 for klein) decodes of 32x32 pixels once per
  pipeline, instead of one per packed channel (129), and then one small matrix product per preview;
  the image is the latent grid (1/16 of the output)
  scaled up, blurry by design.

Previews are at most :data:`PREVIEW_MAX_SIDE` pixels on their long side, in the output's aspect ratio.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from kleinserve.engine.tiny_autoencoder import Flux2TinyAutoEncoder

log = logging.getLogger(__name__)

PREVIEW_MAX_SIDE = 512
PROJECTION_GRID = 2  # packed latent cells per side of the probe latents (32 x 32 pixels)
PreviewFn = Callable[[], list[Image.Image]]


def preview_size(width: int, height: int) -> tuple[int, int]:
    """The preview's (width, height): the output's, scaled down to :data:`PREVIEW_MAX_SIDE` at most."""
    scale = min(1.0, PREVIEW_MAX_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class Previewer:
    """Decodes previews for one pipeline: with ``tiny`` when set, else with the derived projection."""

    def __init__(self, pipeline: Any, tiny: Flux2TinyAutoEncoder | None = None) -> None:
        self.pipeline = pipeline
        self.tiny = tiny
        self._projection: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lock = threading.Lock()

    @property
    def kind(self) -> str:
        return "tiny-autoencoder" if self.tiny is not None else "latent-projection"

    def lazy(
        self,
        latents: torch.Tensor,
        velocity: torch.Tensor,
        sigmas: torch.Tensor,
        index: int,
        latent_ids: torch.Tensor,
        width: int,
        height: int,
        rows: Sequence[int] | None = None,
    ) -> PreviewFn:
        """A callable decoding the x0 estimate of ``rows`` (default: every row) after a step that
        left the scheduler at ``sigmas[index]``. Creating it computes nothing."""

        def preview() -> list[Image.Image]:
            with torch.inference_mode():
                sigma = sigmas[index].to(latents.device, torch.float32)
                x0 = latents.float() - sigma * velocity.float()
                if rows is not None:
                    x0 = x0[list(rows)]
                return self.images(x0, latent_ids, width, height)

        return preview

    @torch.inference_mode()
    def images(self, x0: torch.Tensor, latent_ids: torch.Tensor, width: int, height: int) -> list[Image.Image]:
        """Preview images of packed-sequence latents ``x0`` ``(B, seq, channels)``."""
        pipe = self.pipeline
        grid = pipe.vae_scale_factor * 2
        ids = latent_ids[:1].expand(x0.shape[0], -1, -1) if latent_ids.shape[0] != x0.shape[0] else latent_ids
        packed = pipe._unpack_latents_with_ids(x0, ids, height // grid, width // grid)  # (B, C, h, w)
        size = preview_size(width, height)
        if self.tiny is not None:
            tiny = self.tiny
            cells = (max(1, round(size[1] / grid)), max(1, round(size[0] / grid)))
            if cells != tuple(packed.shape[-2:]):  # decode at the preview's size, not the output's
                packed = torch.nn.functional.interpolate(packed.float(), cells, mode="bilinear", antialias=True)
            rgb = tiny.decode_packed(packed.to(tiny.device, tiny.dtype)).float()
        else:
            matrix, bias = self.projection()
            rgb = torch.einsum("bchw,cr->brhw", packed.float(), matrix.to(packed.device)) + bias.to(packed.device).view(
                1, 3, 1, 1
            )
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a)).resize(size, Image.Resampling.BILINEAR) for a in pixels]

    def warm(self) -> threading.Thread:
        """Derive the projection in a daemon thread now (at model load) rather than in the first
        preview; a preview asked for meanwhile waits for it. A failure is logged and left for the
        first preview to meet again."""

        def derive() -> None:
            try:
                self.projection()
            except Exception:  # a background convenience: the first preview retries
                log.warning("deriving the previews' projection failed", exc_info=True)

        thread = threading.Thread(target=derive, name="preview-projection", daemon=True)
        thread.start()
        return thread

    def projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (channels x 3) matrix and the bias of the latent-to-RGB projection (derived once)."""
        with self._lock:
            if self._projection is None:
                self._projection = derive_projection(self.pipeline)
            return self._projection


@torch.inference_mode()
def derive_projection(pipeline: Any, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear map from normalised packed latents to RGB in [-1, 1], from the pipeline's VAE
    (see the module docstring); float32 on the CPU.

    One batch of ``latent channels + 1`` probes: the base latent, and the base with the four packed
    channels ``4k .. 4k+3`` of latent channel ``k`` (its 2x2 sub-positions) raised by 1 each. The
    change of mean colour is the sum of those four columns; it is split between them in proportion
    to each packed channel's batch-norm std (a normalised step of 1 is a raw step of that std). The
    approximation: the decoder answers a raw change of a latent channel the same at each of the four
    sub-positions (true of a translation-invariant decoder away from the image's borders)."""
    vae = pipeline.vae
    std = torch.sqrt(vae.bn.running_var.float().cpu() + vae.config.batch_norm_eps)
    packed = int(std.numel())
    channels = packed // 4
    generator = torch.Generator("cpu").manual_seed(seed)
    base = torch.randn(1, packed, PROJECTION_GRID, PROJECTION_GRID, generator=generator)
    probes = base.repeat(channels + 1, 1, 1, 1)
    raised = probes[1:].view(channels, channels, 4, PROJECTION_GRID, PROJECTION_GRID)
    raised[torch.arange(channels), torch.arange(channels)] += 1.0
    colours = _mean_colour(pipeline, probes.to(vae.device, vae.dtype))
    change = colours[1:] - colours[:1]  # (channels, 3): one latent channel, all four sub-positions
    share = std.view(channels, 4) / std.view(channels, 4).sum(dim=1, keepdim=True)
    matrix = (change[:, None, :] * share[:, :, None]).reshape(packed, 3)
    bias = colours[0] - base.mean(dim=(2, 3))[0] @ matrix
    return matrix, bias


def _mean_colour(pipeline: Any, packed: torch.Tensor) -> torch.Tensor:
    """The mean RGB (in [-1, 1]) of the VAE's decode of normalised packed latents ``(B, C, h, w)``."""
    vae = pipeline.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(packed)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(packed)
    latents = pipeline._unpatchify_latents(packed * std + mean)
    decoded: torch.Tensor = vae.decode(latents, return_dict=False)[0]
    return decoded.float().clamp(-1, 1).mean(dim=(2, 3)).cpu()
