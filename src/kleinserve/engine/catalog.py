"""Which models a server serves, and loading them onto a device.

``auto`` serves ``flux-2-klein-4b`` when its weights are in the HF cache or can be downloaded; when
they cannot, it serves all four variant ids on tiny random-weight checkpoints built in the data
directory, and marks them ``demo`` so every surface can say so. An explicit model never falls back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from kleinserve.engine.engine import Engine
from kleinserve.engine.loading import LoadOptions, load_placed, make_engine
from kleinserve.engine.lora import Adapters
from kleinserve.engine.tiny import make_tiny
from kleinserve.engine.variants import DEFAULT_VARIANT_ID, VARIANTS, Variant
from kleinserve.engine.weights import ModelSpec, resolve_weights
from kleinserve.errors import InvalidParameterError, WeightsUnavailableError
from kleinserve.loras import LoraSource

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class ServedModel:
    """A variant, the directory its weights load from, and whether they are demo weights."""

    variant: Variant
    directory: Path
    demo: bool = False


def demo_models(data_dir: Path) -> list[ServedModel]:
    """Every variant on tiny checkpoints kept in ``data_dir/demo`` (built once); 9B-KV on its own kind."""
    served = []
    for kind in ("distilled", "base", "kv"):
        directory = data_dir / "demo" / f"tiny-{kind}"
        if not (directory / "model_index.json").is_file():
            make_tiny(directory, kind)
        served += [ServedModel(v, directory, demo=True) for v in VARIANTS if _demo_kind(v) == kind]
    return served


def _demo_kind(variant: Variant) -> str:
    return "kv" if variant.kv_cache else "distilled" if variant.distilled else "base"


def plan_models(names: list[str], data_dir: Path, *, allow_download: bool = True) -> list[ServedModel]:
    """Resolve ``--model`` values (``auto``, ``ID``, ``ID=PATH``) to weight directories."""
    if not names:
        raise InvalidParameterError("model", "no model to serve")
    if AUTO in names:
        if len(names) > 1:
            raise InvalidParameterError("model", "'auto' cannot be combined with other --model values")
        spec = ModelSpec.parse(DEFAULT_VARIANT_ID)
        try:
            return [ServedModel(spec.variant, resolve_weights(spec, allow_download=allow_download))]
        except WeightsUnavailableError as err:
            log.warning("DEMO MODE: %s", err.message)
            log.warning(
                "DEMO MODE: serving every variant on tiny RANDOM weights: images are noise, not art. "
                "Pass --model to serve real weights."
            )
            return demo_models(data_dir)
    served: list[ServedModel] = []
    for name in names:
        spec = ModelSpec.parse(name)
        if any(s.variant.id == spec.variant.id for s in served):
            raise InvalidParameterError("model", f"{spec.variant.id} is given more than once")
        served.append(ServedModel(spec.variant, resolve_weights(spec, allow_download=allow_download)))
    return served


def load_engines(
    served: list[ServedModel],
    device: torch.device,
    dtype: torch.dtype,
    options: LoadOptions | None = None,
    loras: Mapping[str, LoraSource] | None = None,
    lora_cache: int = 8,
) -> dict[str, Engine]:
    """An engine per served variant; variants sharing a directory share one loaded pipeline.

    ``options`` (quantisation, offloading, attention backend, compilation) default to none of them;
    ``loras`` are offered on every pipeline, each with its own LRU cache of ``lora_cache`` adapters.
    """
    options = options or LoadOptions(dtype=dtype)
    loaded = {}
    adapters = {}
    engines = {}
    for model in served:
        if model.directory not in loaded:
            loaded[model.directory] = load_placed(model.directory, device, options)
            if loras:
                adapters[model.directory] = Adapters(loaded[model.directory][0], loras, lora_cache)
        engine = make_engine(*loaded[model.directory], model.variant)
        engine.adapters = adapters.get(model.directory)
        engines[model.variant.id] = engine
    return engines
