"""Which VAE decoder decodes: the checkpoint's own (``full``) or BFL's FLUX.2 small decoder (``small``).

``black-forest-labs/FLUX.2-small-decoder`` (Apache-2.0, not gated) is a whole ``AutoencoderKLFlux2`` in
diffusers format at the repository root (``config.json`` + ``diffusion_pytorch_model.safetensors``):
FLUX.2's encoder unchanged and a distilled decoder of narrower widths (``decoder_block_out_channels``
96/192/384/384 instead of 128/256/512/512, diffusers >= 0.38). BFL report about 1.4x faster decoding and
1.4x less decode memory with "minimal to zero quality loss". It replaces the pipeline's whole VAE, as
``Flux2KleinPipeline.from_pretrained(..., vae=AutoencoderKLFlux2.from_pretrained(repo))`` does: the
pixels are not the full decoder's, so it is the operator's choice (``--decoder small``).

``--decoder small`` resolves like ``--model ID``: the HF cache first, then a download unless
``HF_HUB_OFFLINE``; ``--decoder small=PATH`` reads a local directory of that layout (``kleinserve
make-tiny DIR --small-decoder`` writes a random one beside a tiny checkpoint, for tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kleinserve.engine import architecture
from kleinserve.errors import InvalidParameterError, WeightsUnavailableError

if TYPE_CHECKING:
    from diffusers import AutoencoderKLFlux2

DECODERS = ("full", "small")
SMALL_DECODER_REPO = "black-forest-labs/FLUX.2-small-decoder"
SMALL_DECODER_WIDTHS = (96, 192, 384, 384)
_ALLOW_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]
VAE_CLASS = "AutoencoderKLFlux2"


@dataclass(frozen=True)
class DecoderSpec:
    """``full``, ``small`` (BFL's hub repo) or ``small=PATH`` (a local copy)."""

    name: str = "full"
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> DecoderSpec:
        name, sep, path = text.strip().partition("=")
        if name not in DECODERS:
            raise InvalidParameterError("decoder", f"{text!r}: the decoder is one of full, small or small=PATH")
        if sep and (name == "full" or not path.strip()):
            raise InvalidParameterError("decoder", f"{text!r}: only small takes a path (small=PATH)")
        return cls(name, Path(path).expanduser() if sep else None)

    @property
    def small(self) -> bool:
        return self.name == "small"

    def __str__(self) -> str:
        return f"{self.name}={self.path}" if self.path else self.name


def _check_directory(directory: Path) -> Path:
    config = read_config(directory)
    if config.get("_class_name") != VAE_CLASS:
        raise WeightsUnavailableError(
            f"{directory} holds a {config.get('_class_name')!r}, not a FLUX.2 VAE ({VAE_CLASS}) for --decoder small"
        )
    if not (directory / "diffusion_pytorch_model.safetensors").is_file():
        raise WeightsUnavailableError(f"{directory} has no diffusion_pytorch_model.safetensors for --decoder small")
    return directory


def read_config(directory: Path) -> dict[str, Any]:
    """The ``config.json`` of a VAE directory, or a clear error."""
    return architecture.read_config(directory, "the decoder's ")


def resolve_decoder(spec: DecoderSpec, *, allow_download: bool = True) -> Path | None:
    """The directory of the small decoder's weights (``None`` for ``full``: the checkpoint's own VAE)."""
    if not spec.small:
        return None
    if spec.path is not None:
        if not spec.path.is_dir():
            raise WeightsUnavailableError(f"decoder directory {spec.path} does not exist")
        return _check_directory(spec.path)
    from huggingface_hub import constants, snapshot_download

    try:
        return _check_directory(
            Path(snapshot_download(SMALL_DECODER_REPO, allow_patterns=_ALLOW_PATTERNS, local_files_only=True))
        )
    except WeightsUnavailableError:
        raise
    except Exception:
        pass
    advice = f"pass --decoder small=PATH to use a local copy of {SMALL_DECODER_REPO}"
    if constants.HF_HUB_OFFLINE or not allow_download:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "downloads are disabled"
        raise WeightsUnavailableError(
            f"the small decoder ({SMALL_DECODER_REPO}) is not in the HF cache at {constants.HF_HUB_CACHE} and {why}; "
            + advice
        )
    try:
        return _check_directory(Path(snapshot_download(SMALL_DECODER_REPO, allow_patterns=_ALLOW_PATTERNS)))
    except WeightsUnavailableError:
        raise
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise WeightsUnavailableError(
            f"cannot get the small decoder: a download of {SMALL_DECODER_REPO} failed "
            f"({type(err).__name__}: {first}); " + advice
        ) from None


def planned_config(spec: DecoderSpec) -> dict[str, Any] | None:
    """The VAE config a memory plan counts for ``spec`` without downloading anything: the local or
    cached ``config.json`` when there is one, else the published geometry (FLUX.2's VAE with the small
    decoder's widths). ``None`` for ``full``."""
    if not spec.small:
        return None
    try:
        directory = resolve_decoder(spec, allow_download=False)
    except WeightsUnavailableError:
        if spec.path is not None:
            raise
        return {"decoder_block_out_channels": list(SMALL_DECODER_WIDTHS)}
    assert directory is not None
    return {k: v for k, v in read_config(directory).items() if not k.startswith("_")}


def read_decoder(directory: Path, dtype: torch.dtype, latent_channels: int | None = None) -> AutoencoderKLFlux2:
    """Load the small decoder's ``AutoencoderKLFlux2`` in ``dtype``; it must make the checkpoint's latents."""
    from diffusers import AutoencoderKLFlux2

    config = read_config(directory)
    if latent_channels is not None and config.get("latent_channels", 32) != latent_channels:
        raise WeightsUnavailableError(
            f"the decoder in {directory} works on {config.get('latent_channels', 32)} latent channels, "
            f"the checkpoint's VAE on {latent_channels}: they do not belong together"
        )
    from kleinserve.engine.weights import dtype_keyword

    try:
        vae: AutoencoderKLFlux2 = AutoencoderKLFlux2.from_pretrained(str(directory), **{dtype_keyword(): dtype})
    except Exception as err:
        raise WeightsUnavailableError(f"cannot load the decoder in {directory}: {err}") from err
    return vae


def make_tiny_small_decoder(checkpoint: Path, output: Path, seed: int = 0) -> Path:
    """Write a random small decoder for the tiny (or bench) checkpoint in ``checkpoint`` to ``output``.

    Like BFL's: the checkpoint's own encoder, batch-norm statistics and quantisation convolutions,
    and a random decoder of three quarters of the widths (``decoder_block_out_channels``).
    """
    from diffusers import AutoencoderKLFlux2

    full = AutoencoderKLFlux2.from_pretrained(str(Path(checkpoint) / "vae"))
    config = {k: v for k, v in full.config.items() if not k.startswith("_")}
    groups = int(config["norm_num_groups"])
    # Three quarters of each width (BFL: 128/256/512/512 -> 96/192/384/384), kept divisible by the groups.
    widths = [max(groups, (3 * w // 4) // groups * groups) for w in config["block_out_channels"]]
    config["decoder_block_out_channels"] = widths
    torch.manual_seed(seed + 4)
    small = AutoencoderKLFlux2.from_config(config)
    if small.dtype != full.dtype:
        small = small.to(full.dtype)
    keep = {k: v for k, v in full.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    missing, unexpected = small.load_state_dict(keep, strict=False)
    assert not unexpected and all(k.startswith(("decoder.", "post_quant_conv.")) for k in missing)
    output = Path(output)
    small.save_pretrained(str(output))
    return output
