"""A tiny autoencoder for FLUX.2 latents (previews in milliseconds instead of a full VAE decode).

The architecture is the one of ``fal/FLUX.2-Tiny-AutoEncoder`` (Apache-2.0), published in diffusers
format (``config.json`` with ``"_class_name": "Flux2TinyAutoEncoder"`` and
``diffusion_pytorch_model.safetensors``): diffusers' :class:`AutoencoderTiny` (TAESD) on 32 latent
channels at 1/8 of the image, plus a stride-2 (transposed) convolution and a residual refinement
that take it to and from the 128-channel 2x2-packed latents at 1/16 of the image, the grid the
FLUX.2 transformer denoises. The repository ships that class as remote code
(``trust_remote_code``); it is defined here instead, with the same parameter names, so the checkpoint
loads with :meth:`from_pretrained` from a local directory or the HF cache and no code is fetched.

Latent space: the normalised, packed latents the transformer produces (BFL's FLUX.2 autoencoder
applies its batch norm inside ``encode``, so that is FLUX.2's "latent API"): previews decode the x0
estimate as it is, without the VAE's inverse batch norm. madebyollin's ``taef2`` (same latent API,
but blocks with a GroupNorm branch that :class:`AutoencoderTiny` lacks) is not supported.

``norm_groups`` (8 in the published model) is a kleinserve addition so that ``make-tiny``
(engine/tiny.py ``make_tiny_autoencoder``) can write a few-kB random model for tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderTiny
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from kleinserve.errors import WeightsUnavailableError

# What a diffusers-format tiny autoencoder repository holds.
_ALLOW_PATTERNS = ["config.json", "*.safetensors"]


class Flux2TinyAutoEncoder(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """FLUX.2 tiny autoencoder: images in [-1, 1] <-> packed latents ``(B, latent_channels, H/16, W/16)``."""

    @register_to_config  # type: ignore[untyped-decorator]
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 128,
        encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
        decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
        act_fn: str = "silu",
        upsampling_scaling_factor: int = 2,
        num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3),
        num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1),
        latent_magnitude: float = 3.0,
        latent_shift: float = 0.5,
        force_upcast: bool = False,
        scaling_factor: float = 0.13025,
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        unpacked = latent_channels // 4  # the VAE's own channels, before 2x2 packing
        self.tiny_vae = AutoencoderTiny(
            in_channels=in_channels,
            out_channels=out_channels,
            encoder_block_out_channels=tuple(encoder_block_out_channels),
            decoder_block_out_channels=tuple(decoder_block_out_channels),
            act_fn=act_fn,
            latent_channels=unpacked,
            upsampling_scaling_factor=upsampling_scaling_factor,
            num_encoder_blocks=tuple(num_encoder_blocks),
            num_decoder_blocks=tuple(num_decoder_blocks),
            latent_magnitude=latent_magnitude,
            latent_shift=latent_shift,
            force_upcast=force_upcast,
            scaling_factor=scaling_factor,
        )
        self.extra_encoder = nn.Conv2d(unpacked, latent_channels, kernel_size=4, stride=2, padding=1)
        self.extra_decoder = nn.ConvTranspose2d(latent_channels, unpacked, kernel_size=4, stride=2, padding=1)
        self.residual_encoder = _refinement(latent_channels, norm_groups)
        self.residual_decoder = _refinement(unpacked, norm_groups)

    def encode_packed(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to packed latents."""
        encoded = self.tiny_vae.encode(images, return_dict=False)[0]
        compressed: torch.Tensor = self.extra_encoder(encoded)
        return self.residual_encoder(compressed) + compressed  # type: ignore[no-any-return]

    def decode_packed(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents to images in [-1, 1] (16x their size)."""
        unpacked = self.extra_decoder(latents)
        refined = self.residual_decoder(unpacked) + unpacked
        decoded: torch.Tensor = self.tiny_vae.decode(refined, return_dict=False)[0]
        return decoded


def _refinement(channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        nn.GroupNorm(groups, channels),
        nn.SiLU(),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
    )


def resolve_tiny_autoencoder(source: str) -> Path:
    """The directory of ``source``: a local directory, else a hub repo id from the HF cache (then a
    download unless ``HF_HUB_OFFLINE``), as the main weights are found (engine/weights.py)."""
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise WeightsUnavailableError(f"preview decoder {local} has no config.json (diffusers format expected)")
        return local
    if local.exists() or source.count("/") != 1:
        raise WeightsUnavailableError(
            f"preview decoder {source!r} is neither a directory nor a hub repo id like fal/FLUX.2-Tiny-AutoEncoder"
        )
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=_ALLOW_PATTERNS, local_files_only=True))
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        raise WeightsUnavailableError(
            f"preview decoder {source} is not in the HF cache at {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is set"
        )
    try:
        return Path(snapshot_download(source, allow_patterns=_ALLOW_PATTERNS))
    except Exception as err:
        raise WeightsUnavailableError(f"cannot get preview decoder {source}: {type(err).__name__}: {err}") from None


def load_tiny_autoencoder(source: str, device: torch.device, dtype: torch.dtype) -> Flux2TinyAutoEncoder:
    """Load a tiny autoencoder (directory or hub repo id) onto ``device`` in ``dtype``, for inference."""
    directory = resolve_tiny_autoencoder(source)
    try:
        model = Flux2TinyAutoEncoder.from_pretrained(str(directory), torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:
        raise WeightsUnavailableError(f"cannot load preview decoder from {directory}: {err}") from None
    model.to(device=device)
    model.eval()
    model.requires_grad_(False)
    return model  # type: ignore[no-any-return]
