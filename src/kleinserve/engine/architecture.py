"""The shape of a klein checkpoint without its weights: parameter counts per component.

Built on ``accelerate.init_empty_weights``: each component is constructed from its ``config.json`` on
the meta device (no memory, no weights read), so the counts come from the very classes the server
loads, and we can see which parameters sit in ``nn.Linear`` layers (what weight quantisation shrinks)
and how big the repeated blocks are (what block and sequential offloading stream).

Where the configs come from: a diffusers directory's own ``transformer/``, ``text_encoder/`` and
``vae/`` configs when the weights are at hand, else the published geometry of klein 4B and 9B kept in
:data:`PUBLISHED_CONFIGS` (the values of the checkpoints' ``config.json`` files; the 4B and Base 4B
repos share one geometry, as do 9B and Base 9B), so ``kleinserve models --plan`` works before a
download. :func:`checkpoint_parameters` reads the safetensors headers of a directory (a few KB per
file) to cross-check the count against what is really on disk.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kleinserve.engine.variants import Variant
from kleinserve.errors import WeightsUnavailableError

COMPONENTS = ("text_encoder", "transformer", "vae")

# Geometry of the published checkpoints (values from their config.json files; everything not listed
# is the class default, which the checkpoints use too).
PUBLISHED_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "4B": {
        "transformer": {
            "num_layers": 5,
            "num_single_layers": 20,
            "num_attention_heads": 24,
            "attention_head_dim": 128,
            "joint_attention_dim": 7680,
            "in_channels": 128,
            "guidance_embeds": False,
        },
        "text_encoder": {  # Qwen3-4B
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
        },
        "vae": {},  # AutoencoderKLFlux2's defaults are FLUX.2's VAE
    },
    "9B": {
        "transformer": {
            "num_layers": 8,
            "num_single_layers": 24,
            "num_attention_heads": 32,
            "attention_head_dim": 128,
            "joint_attention_dim": 12288,
            "in_channels": 128,
            "guidance_embeds": False,
        },
        "text_encoder": {  # Qwen3-8B
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "tie_word_embeddings": False,
        },
        "vae": {},
    },
}


@dataclass(frozen=True)
class LinearShape:
    """One ``nn.Linear`` weight: what quantisation replaces."""

    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class ComponentShape:
    """Parameter counts of one pipeline component (tied weights counted once)."""

    name: str
    parameters: int
    linears: tuple[LinearShape, ...]
    largest_block: int  # parameters of the largest element of the component's block lists
    outside_blocks: int  # parameters not inside any block list (embeddings, norms, heads)
    largest_leaf: int  # parameters of the largest single module holding parameters directly
    config: dict[str, Any]

    @property
    def linear_parameters(self) -> int:
        return sum(linear.numel for linear in self.linears)


@dataclass(frozen=True)
class ModelShape:
    """A checkpoint's components, and where the numbers came from."""

    components: dict[str, ComponentShape]
    source: str  # "config.json files in DIR" or "published klein 4B geometry"

    def __getitem__(self, name: str) -> ComponentShape:
        return self.components[name]


def _unique_parameters(module: torch.nn.Module) -> dict[int, torch.Tensor]:
    return {id(p): p for p in module.parameters()}


def _count(params: dict[int, torch.Tensor]) -> int:
    return sum(p.numel() for p in params.values())


def describe(name: str, module: torch.nn.Module, config: dict[str, Any]) -> ComponentShape:
    """Count a (meta or real) module's parameters the ways the memory plan needs them.

    ``parameters`` also counts persistent buffers (the VAE's batch-norm statistics): they are stored
    and loaded like weights.
    """
    everything = {id(t): t for t in module.state_dict(keep_vars=True).values()}
    seen: set[int] = set()
    linears = []
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear) and id(sub.weight) not in seen:
            seen.add(id(sub.weight))
            linears.append(LinearShape(sub.out_features, sub.in_features))
    in_blocks: dict[int, torch.Tensor] = {}
    largest_block = 0
    for sub in module.modules():
        if isinstance(sub, torch.nn.ModuleList):
            for block in sub:
                if not isinstance(block, torch.nn.Module):
                    continue
                params = _unique_parameters(block)
                fresh = {k: v for k, v in params.items() if k not in in_blocks}
                if fresh:  # nested lists are inside an outer block already
                    largest_block = max(largest_block, _count(params))
                    in_blocks.update(fresh)
    largest_leaf = max(
        (sum(p.numel() for p in sub.parameters(recurse=False)) for sub in module.modules()),
        default=0,
    )
    outside = {k: v for k, v in everything.items() if k not in in_blocks}
    return ComponentShape(
        name=name,
        parameters=_count(everything),
        linears=tuple(linears),
        largest_block=largest_block,
        outside_blocks=_count(outside),
        largest_leaf=largest_leaf,
        config=config,
    )


def _empty_component(name: str, config: dict[str, Any]) -> torch.nn.Module:
    """Construct one component on the meta device from its config."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        if name == "transformer":
            from diffusers import Flux2Transformer2DModel

            model: torch.nn.Module = Flux2Transformer2DModel.from_config(config)
            return model
        if name == "vae":
            from diffusers import AutoencoderKLFlux2

            vae: torch.nn.Module = AutoencoderKLFlux2.from_config(config)
            return vae
        from transformers import Qwen3Config, Qwen3ForCausalLM

        encoder: torch.nn.Module = Qwen3ForCausalLM(Qwen3Config.from_dict(config))
        return encoder


def read_config(directory: Path, what: str = "") -> dict[str, Any]:
    """The ``config.json`` of a component directory, or a clear error (``what``: e.g. "the decoder's ")."""
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WeightsUnavailableError(f"cannot read {what}{path}: {err}") from None
    if not isinstance(data, dict):
        raise WeightsUnavailableError(f"{path} does not hold a JSON object")
    return data


_CACHE: dict[str, ModelShape] = {}


def model_shape(
    variant: Variant, directory: Path | None = None, vae_config: dict[str, Any] | None = None
) -> ModelShape:
    """Parameter counts of ``directory``'s components, or of ``variant``'s published checkpoint;
    ``vae_config`` is laid over the VAE's config (another decoder: engine/decoder.py)."""
    key = str(directory.resolve()) if directory is not None else f"published:{variant.parameters}"
    if vae_config:
        key += f"|vae:{json.dumps(vae_config, sort_keys=True)}"
    if key in _CACHE:
        return _CACHE[key]
    components = {}
    for name in COMPONENTS:
        if directory is not None:
            config = read_config(directory / name)
        else:
            config = dict(PUBLISHED_CONFIGS[variant.parameters][name])
        if name == "vae" and vae_config:
            config = {**config, **vae_config}
        components[name] = describe(name, _empty_component(name, config), config)
    source = (
        f"config.json files in {directory}"
        if directory is not None
        else (f"published klein {variant.parameters} geometry (no local weights)")
    )
    shape = ModelShape(components, source)
    _CACHE[key] = shape
    return shape


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file (8-byte little-endian length, then JSON)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header: dict[str, Any] = json.loads(handle.read(length))
    return header


def checkpoint_parameters(component_dir: Path) -> int | None:
    """Parameters stored in a component directory's safetensors files (headers only), or ``None``."""
    files = sorted(component_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        for name, entry in safetensors_header(path).items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in entry["shape"]:
                numel *= int(dim)
            total += numel
    return total
