"""Where a variant's weights come from, and loading them.

``--model ID`` resolves the variant's hub repository through huggingface_hub: the local HF cache
first (``HF_HOME``), then a download (``HF_TOKEN`` for gated repos), unless ``HF_HUB_OFFLINE`` is set.
``--model ID=PATH`` serves a local diffusers-format directory under variant ``ID``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kleinserve.engine.engine import Engine
from kleinserve.engine.variants import Variant, find_variant
from kleinserve.errors import InvalidParameterError, WeightsUnavailableError

if TYPE_CHECKING:
    from diffusers import Flux2KleinPipeline

    from kleinserve.engine.loading import LoadOptions

KLEIN_PIPELINE = "Flux2KleinPipeline"
KV_PIPELINE = "Flux2KleinKVPipeline"
# Everything a Flux2KleinPipeline loads; the hub repos also hold single-file checkpoints we skip.
_ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "text_encoder/*",
    "transformer/*",
    "vae/*",
]


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve: a variant, and optionally a local directory holding its weights."""

    variant: Variant
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """Parse ``ID`` or ``ID=PATH`` (the ``--model`` syntax)."""
        name, sep, path = text.partition("=")
        if sep and not path.strip():
            raise InvalidParameterError("model", f"{text!r} has an empty path after '='")
        variant = find_variant(name)
        return cls(variant, Path(path).expanduser() if sep else None)

    def __str__(self) -> str:
        return f"{self.variant.id}={self.path}" if self.path else self.variant.id


def read_model_index(directory: Path) -> dict[str, Any]:
    """The ``model_index.json`` of a diffusers directory, or a clear error."""
    index = directory / "model_index.json"
    if not index.is_file():
        raise WeightsUnavailableError(
            f"{directory} is not a diffusers model directory (no model_index.json); "
            "point --model ID=PATH at a directory saved by diffusers or made by `kleinserve make-tiny`"
        )
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as err:
        raise WeightsUnavailableError(f"cannot read {index}: {err}") from None
    if not isinstance(data, dict) or data.get("_class_name") not in (KLEIN_PIPELINE, KV_PIPELINE):
        found = data.get("_class_name") if isinstance(data, dict) else None
        raise WeightsUnavailableError(f"{directory} holds a {found!r} model, not a {KLEIN_PIPELINE}")
    return data


def is_kv_checkpoint(index: dict[str, Any]) -> bool:
    """Whether a model index is klein 9B-KV's (saved as Flux2KleinKVPipeline: distilled, K/V-cached)."""
    return index.get("_class_name") == KV_PIPELINE


def check_local_directory(spec: ModelSpec) -> Path:
    """Check that a local directory exists and agrees with its variant on ``is_distilled``."""
    assert spec.path is not None
    directory = spec.path
    if not directory.is_dir():
        raise WeightsUnavailableError(f"model directory {directory} does not exist")
    index = read_model_index(directory)
    if is_kv_checkpoint(index) != spec.variant.kv_cache:
        raise WeightsUnavailableError(
            f"{directory} holds a klein 9B-KV checkpoint; serve it as flux-2-klein-9b-kv"
            if is_kv_checkpoint(index)
            else f"{directory} is not a klein 9B-KV checkpoint ({KV_PIPELINE}); {spec.variant.id} needs one"
        )
    distilled = bool(index.get("is_distilled", False)) or is_kv_checkpoint(index)
    if distilled != spec.variant.distilled:
        want = "distilled" if spec.variant.distilled else "undistilled (base)"
        have = "distilled" if distilled else "undistilled (base)"
        raise WeightsUnavailableError(
            f"{directory} holds a {have} checkpoint (is_distilled={str(distilled).lower()}), "
            f"but {spec.variant.id} is {want}; serve it under a matching variant id"
        )
    return directory


def _hub_advice(variant: Variant) -> str:
    advice = [f"pass --model {variant.id}=PATH to serve a local copy"]
    if variant.gated:
        advice.insert(
            0,
            f"accept the licence at https://huggingface.co/{variant.repo_id} and set HF_TOKEN (or run `hf auth login`)",
        )
    return "; ".join(advice)


def resolve_from_hub(variant: Variant, *, allow_download: bool = True) -> Path:
    """The local snapshot directory of ``variant``'s hub repo: the HF cache, then a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(variant.repo_id, allow_patterns=_ALLOW_PATTERNS, local_files_only=True))
    except Exception:
        pass
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)
    cache = constants.HF_HUB_CACHE
    if offline or not allow_download:
        why = "HF_HUB_OFFLINE is set" if offline else "downloads are disabled"
        raise WeightsUnavailableError(
            f"weights for {variant.id} ({variant.repo_id}) are not in the HF cache at {cache} and {why}; "
            + _hub_advice(variant)
        )
    try:
        return Path(snapshot_download(variant.repo_id, allow_patterns=_ALLOW_PATTERNS))
    except GatedRepoError:
        reason = "the repository is gated and this token has no access"
    except RepositoryNotFoundError:
        reason = "the repository was not found (or needs a token)"
    except Exception as err:
        reason = f"the download failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    token_note = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "no HF_TOKEN is set"
    raise WeightsUnavailableError(
        f"cannot get weights for {variant.id}: not in the HF cache at {cache}, and a download of "
        f"{variant.repo_id} from the hub failed: {reason} ({token_note}); " + _hub_advice(variant)
    )


def resolve_weights(spec: ModelSpec, *, allow_download: bool = True) -> Path:
    """The directory holding ``spec``'s weights, checked; raises :class:`WeightsUnavailableError`."""
    if spec.path is not None:
        return check_local_directory(spec)
    directory = resolve_from_hub(spec.variant, allow_download=allow_download)
    return check_local_directory(ModelSpec(spec.variant, directory))


def dtype_keyword() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (0.42 deprecates the old name)."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def read_pipeline(
    directory: Path, dtype: torch.dtype, quantization_config: Any = None, vae: Path | None = None
) -> Flux2KleinPipeline:
    """Load a Flux2KleinPipeline's components from ``directory`` in ``dtype`` (on the CPU, or
    quantised as ``quantization_config`` says); placing it is the caller's business. ``vae``: a
    directory whose VAE replaces the checkpoint's (``--decoder small``, engine/decoder.py)."""
    from diffusers import Flux2KleinPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Our callers show their own progress; the libraries' per-component bars would interleave with it.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    extra: dict[str, Any] = {"quantization_config": quantization_config} if quantization_config is not None else {}
    if is_kv_checkpoint(read_model_index(directory)):
        extra["is_distilled"] = True  # the same components; the engine adds the K/V-cached path
    if vae is not None:
        from kleinserve.engine.decoder import read_config, read_decoder

        extra["vae"] = read_decoder(vae, dtype, read_config(directory / "vae").get("latent_channels", 32))
    try:
        pipeline = Flux2KleinPipeline.from_pretrained(str(directory), **{dtype_keyword(): dtype}, **extra)
    except Exception as err:
        raise WeightsUnavailableError(f"cannot load the model in {directory}: {err}") from err
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_pipeline(directory: Path, device: torch.device, dtype: torch.dtype) -> Flux2KleinPipeline:
    """Load a Flux2KleinPipeline's components from ``directory`` onto ``device`` in ``dtype``."""
    pipeline = read_pipeline(directory, dtype)
    try:
        return pipeline.to(device)
    except torch.OutOfMemoryError:
        from kleinserve.errors import ResourceExhaustedError

        raise ResourceExhaustedError(f"the model in {directory} does not fit in {device} memory") from None


def load_engine(
    spec: ModelSpec,
    device: torch.device,
    dtype: torch.dtype,
    *,
    allow_download: bool = True,
    options: LoadOptions | None = None,
) -> Engine:
    """Resolve ``spec``'s weights and load them as a ready :class:`Engine`; ``options`` choose
    quantisation, offloading, attention backend and compilation (engine/loading.py)."""
    directory = resolve_weights(spec, allow_download=allow_download)
    if options is None:
        return Engine(load_pipeline(directory, device, dtype), spec.variant)
    from kleinserve.engine.loading import load_placed, make_engine

    return make_engine(*load_placed(directory, device, options), spec.variant)
