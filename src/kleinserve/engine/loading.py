"""How a pipeline is loaded and placed: quantisation, offloading, attention backend, compilation.

Everything here goes through the libraries' documented APIs, nothing is done by hand:

- ``--quantize`` / ``--quantize-text-encoder``: diffusers' ``PipelineQuantizationConfig`` with a
  ``TorchAoConfig`` per component (diffusers' for the transformer, transformers' for the Qwen3 text
  encoder). int8 is torchao's ``Int8WeightOnlyConfig`` (CPU and GPU); fp8 is
  ``Float8DynamicActivationFloat8WeightConfig`` (real fp8 matmuls: CUDA compute capability 8.9+);
  int4 is ``Int4WeightOnlyConfig`` with the tinygemm ``tile_packed_to_4d`` layout (CUDA kernels that
  ship with torch). The VAE is never quantised.
- ``--offload``: ``enable_model_cpu_offload``, ``enable_sequential_cpu_offload`` or
  ``enable_group_offload`` (block level, one block per group, CUDA streams on CUDA).
- ``--text-encoder-device``: the text encoder (needed only for prompts the cache has not seen) lives
  on another device, usually ``cpu``, and is left out of offloading.
- ``--attention-backend``: diffusers' attention dispatcher (``set_attention_backend``).
- ``--decoder small``: BFL's small decoder replaces the checkpoint's VAE (engine/decoder.py);
  ``--vae-channels-last``: the VAE's weights in channels_last memory format (engine/vae.py).
- ``--compile``: regional compilation (``compile_repeated_blocks``: the repeated transformer blocks are
  compiled once and reused), warmed up by the runtime before ``/readyz`` turns 200.

Decisions: combinations that cannot work are refused by :func:`check_options` before any weight is
read (offloading on the CPU, fp8/int4 without a suitable CUDA device, sequential offload of quantised
weights or under ``torch.compile``), so a server never starts into a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kleinserve.engine.engine import Engine, EngineInputs
from kleinserve.engine.memory import MemoryMode
from kleinserve.engine.vae import use_channels_last
from kleinserve.engine.variants import Variant
from kleinserve.errors import InvalidParameterError, ResourceExhaustedError

if TYPE_CHECKING:
    from diffusers import Flux2KleinPipeline

FP8_MIN_CAPABILITY = (8, 9)  # Ada Lovelace, Hopper and newer have fp8 tensor cores
INT4_GROUP_SIZE = 128


@dataclass(frozen=True)
class LoadOptions:
    """Everything about how a pipeline is loaded besides where its weights are."""

    dtype: torch.dtype = torch.float32
    mode: MemoryMode = field(default_factory=MemoryMode)
    compile: bool = False
    attention_backend: str | None = None  # None: diffusers' default (native SDPA)
    vae: Path | None = None  # a VAE replacing the checkpoint's (--decoder small; engine/decoder.py)
    vae_channels_last: bool = False  # the VAE's convolutions in channels_last (engine/vae.py)

    def describe(self) -> str:
        parts = [str(self.dtype).removeprefix("torch."), self.mode.label()]
        if self.vae is not None:
            parts.append("small decoder")
        if self.vae_channels_last:
            parts.append("VAE channels_last")
        if self.attention_backend:
            parts.append(f"attention {self.attention_backend}")
        if self.compile:
            parts.append("compiled")
        return ", ".join(parts)


def check_options(device: torch.device, options: LoadOptions) -> None:
    """Refuse, with the reason, a combination ``device`` cannot run. Nothing is loaded."""
    mode = options.mode
    if mode.offload != "none" and device.type == "cpu":
        raise InvalidParameterError(
            "offload", f"--offload {mode.offload} needs a GPU; on the CPU the weights are in RAM already"
        )
    if mode.offload == "sequential" and (mode.quantize != "none" or mode.quantize_text_encoder != "none"):
        raise InvalidParameterError(
            "offload",
            "--offload sequential streams each layer's weights through the meta device, which quantised "
            "weights do not survive; use --offload group or model with --quantize",
        )
    if options.compile and mode.offload == "sequential":
        raise InvalidParameterError(
            "compile", "--compile cannot trace through --offload sequential's per-layer hooks; use group or model"
        )
    if mode.text_encoder_device is not None:
        try:
            te = torch.device(mode.text_encoder_device)
        except (RuntimeError, ValueError):
            raise InvalidParameterError(
                "text_encoder_device", f"{mode.text_encoder_device!r} is not a torch device"
            ) from None
        if te.type == "cuda" and not torch.cuda.is_available():
            raise InvalidParameterError("text_encoder_device", "CUDA was asked for but torch sees no CUDA device")
    for flag, quant in (("quantize", mode.quantize), ("quantize_text_encoder", mode.quantize_text_encoder)):
        if quant == "fp8":
            _require_fp8(flag, device)
        elif quant == "int4" and device.type != "cuda":
            raise InvalidParameterError(
                flag, f"int4 weights need CUDA (torch's tinygemm kernels); use int8 on {device.type}"
            )
        if quant != "none":
            _require_torchao(flag)
    if options.attention_backend is not None:
        _check_backend_name(options.attention_backend)


def _require_fp8(flag: str, device: torch.device) -> None:
    if device.type != "cuda":
        raise InvalidParameterError(
            flag, f"fp8 needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper or newer), not {device.type}; use int8"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise InvalidParameterError(
            flag,
            f"fp8 needs compute capability 8.9+ (Ada, Hopper or newer); {torch.cuda.get_device_name(device)} "
            f"has {capability[0]}.{capability[1]}; use int8",
        )


def _require_torchao(flag: str) -> None:
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise InvalidParameterError(flag, "quantisation needs torchao: pip install torchao") from None


def _check_backend_name(name: str) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = sorted(b.value for b in AttentionBackendName)
    if name.lower() not in known:
        raise InvalidParameterError("attention_backend", f"{name!r} is not one of {', '.join(known)}")


def _torchao_config(quantization: str) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
    )

    if quantization == "int8":
        return Int8WeightOnlyConfig()
    if quantization == "fp8":
        return Float8DynamicActivationFloat8WeightConfig()
    return Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")


def quantization_config(mode: MemoryMode) -> Any:
    """diffusers' ``PipelineQuantizationConfig`` for ``mode``, or ``None`` when nothing is quantised."""
    mapping: dict[str, Any] = {}
    if mode.quantize != "none":
        from diffusers import TorchAoConfig

        mapping["transformer"] = TorchAoConfig(_torchao_config(mode.quantize))
    if mode.quantize_text_encoder != "none":
        from transformers import TorchAoConfig as TransformersTorchAoConfig

        mapping["text_encoder"] = TransformersTorchAoConfig(_torchao_config(mode.quantize_text_encoder))
    if not mapping:
        return None
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping=mapping)


@dataclass(frozen=True)
class Placement:
    """Where a placed pipeline computes, and where the text encoder's inputs must go."""

    device: torch.device
    text_encoder_device: torch.device


def place(pipeline: Flux2KleinPipeline, device: torch.device, mode: MemoryMode) -> Placement:
    """Move ``pipeline`` onto ``device`` the way ``mode`` says (offload hooks included)."""
    te_device = torch.device(mode.text_encoder_device) if mode.text_encoder_device else None
    if mode.offload == "none":
        pipeline.to(device)
        if te_device is not None:
            pipeline.text_encoder.to(te_device)
        return Placement(device, te_device or device)
    encoder = pipeline.text_encoder
    if te_device is not None:
        # Keep a separately placed text encoder out of the offload hooks altogether (diffusers would
        # otherwise hook it, or move an excluded one onto the GPU first).
        pipeline.text_encoder = None
    try:
        if mode.offload == "group":
            use_stream = device.type == "cuda"
            pipeline.enable_group_offload(
                onload_device=device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=use_stream,
                non_blocking=use_stream,
            )
        elif mode.offload == "model":
            pipeline.enable_model_cpu_offload(device=device)
        else:
            pipeline.enable_sequential_cpu_offload(device=device)
    finally:
        if te_device is not None:
            pipeline.register_modules(text_encoder=encoder)
    if te_device is not None:
        encoder.to(te_device)
        return Placement(device, te_device)
    # An offloaded text encoder's hooks move its inputs; they start where it computes.
    return Placement(device, device)


def set_attention_backend(pipeline: Flux2KleinPipeline, name: str) -> None:
    """Route the transformer's attention through diffusers' dispatcher to ``name``; clear errors."""
    _check_backend_name(name)
    try:
        pipeline.transformer.set_attention_backend(name.lower())
    except Exception as err:  # diffusers raises plain errors for a backend that is not installed
        raise InvalidParameterError(
            "attention_backend", f"{name} cannot be used here: {str(err).splitlines()[0] if str(err) else err!r}"
        ) from None


def compile_transformer(pipeline: Flux2KleinPipeline, backend: str = "inductor") -> None:
    """Regional compilation of the repeated transformer blocks (diffusers' recommendation).

    ``fullgraph=True``: a graph break in a block is an error at warm-up, not a silent slowdown.
    ``backend`` is for tests (``eager`` traces the blocks without inductor's code generation).
    """
    pipeline.transformer.compile_repeated_blocks(fullgraph=True, backend=backend)


def load_placed(directory: Path, device: torch.device, options: LoadOptions) -> tuple[Flux2KleinPipeline, Placement]:
    """Read, quantise, place, route attention and compile a pipeline as ``options`` say."""
    from kleinserve.engine.weights import read_pipeline

    check_options(device, options)
    pipeline = read_pipeline(directory, options.dtype, quantization_config(options.mode), options.vae)
    if options.vae_channels_last:
        use_channels_last(pipeline.vae)  # before placing: moving a module keeps its tensors' layout
    try:
        placement = place(pipeline, device, options.mode)
    except torch.OutOfMemoryError:
        raise ResourceExhaustedError(
            f"the model in {directory} does not fit in {device} memory ({options.describe()})"
        ) from None
    if options.attention_backend:
        set_attention_backend(pipeline, options.attention_backend)
    if options.compile:
        compile_transformer(pipeline)
    return pipeline, placement


def make_engine(pipeline: Flux2KleinPipeline, placement: Placement, variant: Variant) -> Engine:
    return Engine(pipeline, variant, placement.device, placement.text_encoder_device)


WARM_UP_SIZES = ((1024, 1024),)  # the default size; other sizes compile on first use


def warm_up(engine: Engine) -> None:
    """One denoising step at each default size, so compilation happens before the server is ready."""
    for width, height in WARM_UP_SIZES:
        engine.generate(
            EngineInputs(
                "warm-up", steps=1, guidance=engine.variant.default_guidance, seed=0, width=width, height=height
            )
        )
