"""Memory plans: what a set of served models needs on a device, computed before loading anything.

A plan counts each component's weights in the chosen dtype and quantisation (from
:mod:`kleinserve.engine.architecture`: configs built on the meta device, so no weights are read) and
adds an estimate of the largest working set of activations for one image at the default size. How much
of that must sit on the device at once depends on the offload mode, following what diffusers does:

- ``none``: every component lives on the device; peak = all weights + the largest activations.
- ``model`` (``enable_model_cpu_offload``): one whole component is on the device at a time.
- ``sequential`` (``enable_sequential_cpu_offload``): one leaf module's weights at a time.
- ``group`` (``enable_group_offload``, block level, CUDA streams): one block on the device and the
  next one being prefetched, plus the parts outside the blocks.

Offloaded weights live in host RAM instead, so the plan also says how much of that is needed.
``--text-encoder-device cpu`` keeps the text encoder (only needed for prompts the cache has not seen)
in host RAM for good.

Decisions: the activation figures are estimates from the architecture (tokens x widths of the
largest tensors alive in one transformer block, in the VAE decoder at full resolution, and in the text
encoder), not measurements; weight figures are exact counts. A plan that does not fit is refused at
start with the modes that would fit; ``--device-memory GB`` replaces the detected capacity (to leave
room for other processes, or to plan for a card this machine does not have).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kleinserve.engine.architecture import ComponentShape, ModelShape, model_shape
from kleinserve.engine.variants import Variant
from kleinserve.errors import InvalidParameterError, ResourceExhaustedError

if TYPE_CHECKING:
    from kleinserve.engine.catalog import ServedModel

OFFLOADS = ("none", "model", "sequential", "group")
QUANTIZATIONS = ("none", "int8", "fp8", "int4")
TEXT_TOKENS = 512  # prompts are padded to 512 tokens
INT4_GROUP_SIZE = 128  # torchao's Int4WeightOnlyConfig default
GB = 1e9


@dataclass(frozen=True)
class MemoryMode:
    """How the weights are stored and placed: what ``--offload``, ``--quantize`` etc. chose."""

    offload: str = "none"
    quantize: str = "none"  # the transformer
    quantize_text_encoder: str = "none"
    text_encoder_device: str | None = None  # None: with the other components; "cpu": host RAM

    def __post_init__(self) -> None:
        if self.offload not in OFFLOADS:
            raise InvalidParameterError("offload", f"{self.offload!r} is not one of {', '.join(OFFLOADS)}")
        for name, value in (("quantize", self.quantize), ("quantize_text_encoder", self.quantize_text_encoder)):
            if value not in QUANTIZATIONS:
                raise InvalidParameterError(name, f"{value!r} is not one of {', '.join(QUANTIZATIONS)}")

    def label(self) -> str:
        parts = [f"offload {self.offload}"]
        if self.quantize != "none":
            parts.append(f"transformer {self.quantize}")
        if self.quantize_text_encoder != "none":
            parts.append(f"text encoder {self.quantize_text_encoder}")
        if self.text_encoder_device:
            parts.append(f"text encoder on {self.text_encoder_device}")
        return ", ".join(parts)

    def flags(self) -> str:
        """The command-line flags that choose this mode."""
        parts = [f"--offload {self.offload}"] if self.offload != "none" else []
        if self.quantize != "none":
            parts.append(f"--quantize {self.quantize}")
        if self.quantize_text_encoder != "none":
            parts.append(f"--quantize-text-encoder {self.quantize_text_encoder}")
        if self.text_encoder_device:
            parts.append(f"--text-encoder-device {self.text_encoder_device}")
        return " ".join(parts) or "--offload none"

    def quantization(self, component: str) -> str:
        if component == "transformer":
            return self.quantize
        if component == "text_encoder":
            return self.quantize_text_encoder
        return "none"  # the VAE is small and conv-heavy: never quantised


def weight_bytes(shape: ComponentShape, dtype_bytes: int, quantization: str) -> int:
    """Bytes of a component's weights; quantisation replaces ``nn.Linear`` weights only.

    int8 keeps one byte per weight plus a scale (model dtype) and a one-byte zero point per output
    channel; fp8 one byte per weight plus a float32 scale per output channel; int4 half a byte plus a
    scale and a zero point per group of 128 weights (torchao's layouts).
    """
    if quantization == "none":
        return shape.parameters * dtype_bytes
    linear = shape.linear_parameters
    rest = (shape.parameters - linear) * dtype_bytes
    if quantization == "int8":
        return rest + sum(lin.numel + lin.out_features * (dtype_bytes + 1) for lin in shape.linears)
    if quantization == "fp8":
        return rest + sum(lin.numel + lin.out_features * 4 for lin in shape.linears)
    return rest + sum(lin.numel // 2 + (lin.numel // INT4_GROUP_SIZE) * 2 * dtype_bytes for lin in shape.linears)


def activation_bytes(shape: ComponentShape, width: int, height: int, dtype_bytes: int) -> int:
    """Estimated largest activations of one forward pass for one image of ``width`` x ``height``."""
    config = shape.config
    if shape.name == "transformer":
        inner = int(config.get("num_attention_heads", 48)) * int(config.get("attention_head_dim", 128))
        mlp = int(inner * float(config.get("mlp_ratio", 3.0)))
        tokens = (width // 16) * (height // 16) + TEXT_TOKENS
        # A single-stream block holds: input, q/k/v, attention out, concat, output (7 x inner) and the
        # SwiGLU projection (2 x mlp), its activation and its share of the concat (2 x mlp).
        return tokens * (7 * inner + 4 * mlp) * dtype_bytes
    if shape.name == "vae":
        # The decoder's own widths when they differ from the encoder's (the small decoder).
        widths = config.get("decoder_block_out_channels") or config.get("block_out_channels", (128, 256, 512, 512))
        channels = tuple(widths)
        full_res = int(channels[1] if len(channels) > 1 else channels[0])
        # The last upsampler works at full resolution on the second-widest level's channels: its
        # input, output and the next block's normalised input are alive together.
        return 3 * full_res * width * height * dtype_bytes
    hidden = int(config.get("hidden_size", 2560))
    intermediate = int(config.get("intermediate_size", 4 * hidden))
    heads = int(config.get("num_attention_heads", 32))
    return TEXT_TOKENS * (4 * hidden + 3 * intermediate) * dtype_bytes + heads * TEXT_TOKENS * TEXT_TOKENS * 4


def gigabytes(size: int) -> str:
    """``17.57 GB``, or megabytes below 0.1 GB (tiny checkpoints)."""
    return f"{size / GB:.2f} GB" if size >= 0.1 * GB else f"{size / 1e6:.1f} MB"


def _params(count: int) -> str:
    return f"{count / 1e9:.3f} B" if count >= 1e8 else f"{count / 1e6:.3f} M"


@dataclass(frozen=True)
class ComponentPlan:
    """One component of one model in a plan."""

    name: str
    parameters: int
    quantization: str
    weight_bytes: int
    activation_bytes: int
    on_device_bytes: int  # the weights that must be on the device while this component runs
    placement: str  # "device", "offloaded" or "cpu"


@dataclass(frozen=True)
class ModelPlan:
    """The components of one loaded checkpoint (variants sharing a directory share it)."""

    models: tuple[str, ...]
    source: str
    components: tuple[ComponentPlan, ...]


def _plan_model(
    models: Sequence[str], shape: ModelShape, mode: MemoryMode, dtype_bytes: int, width: int, height: int
) -> ModelPlan:
    parts = []
    for name, component in shape.components.items():
        quant = mode.quantization(name)
        weights = weight_bytes(component, dtype_bytes, quant)
        ratio = weights / max(1, component.parameters)
        if name == "text_encoder" and mode.text_encoder_device == "cpu":
            placement, on_device = "cpu", 0
        elif mode.offload == "none":
            placement, on_device = "device", weights
        elif mode.offload == "model":
            placement, on_device = "offloaded", weights
        elif mode.offload == "sequential":
            placement, on_device = "offloaded", int(component.largest_leaf * ratio)
        else:  # group: one block resident, the next prefetched, plus what lies outside the blocks
            resident = 2 * component.largest_block + component.outside_blocks
            placement, on_device = "offloaded", int(min(component.parameters, resident) * ratio)
        parts.append(
            ComponentPlan(
                name=name,
                parameters=component.parameters,
                quantization=quant,
                weight_bytes=weights,
                activation_bytes=activation_bytes(component, width, height, dtype_bytes),
                on_device_bytes=on_device,
                placement=placement,
            )
        )
    return ModelPlan(tuple(models), shape.source, tuple(parts))


@dataclass(frozen=True)
class MemoryPlan:
    """What the served models need on ``device`` (and in host RAM) in ``mode``."""

    device: str
    dtype: str
    mode: MemoryMode
    width: int
    height: int
    models: tuple[ModelPlan, ...]
    capacity_bytes: int | None = None
    capacity_source: str = "unknown"
    host_capacity_bytes: int | None = None
    alternatives: tuple[MemoryMode, ...] = field(default=(), compare=False)

    @property
    def on_cpu(self) -> bool:
        return self.device.startswith("cpu")

    def _components(self) -> list[ComponentPlan]:
        return [c for m in self.models for c in m.components]

    @property
    def peak_bytes(self) -> int:
        """Expected peak on the device while generating one default-size image."""
        parts = self._components()
        if self.on_cpu:
            return sum(c.weight_bytes for c in parts) + max((c.activation_bytes for c in parts), default=0)
        on_device = [c for c in parts if c.placement != "cpu"]
        if self.mode.offload == "none":
            resident = sum(c.on_device_bytes for c in on_device)
            return resident + max((c.activation_bytes for c in on_device), default=0)
        return max((c.on_device_bytes + c.activation_bytes for c in on_device), default=0)

    @property
    def host_bytes(self) -> int:
        """Host RAM for weights kept off the device (offloaded components, a CPU text encoder)."""
        if self.on_cpu:
            return 0
        parts = self._components()
        held = sum(c.weight_bytes for c in parts if c.placement in ("offloaded", "cpu"))
        cpu_activations = max((c.activation_bytes for c in parts if c.placement == "cpu"), default=0)
        return held + cpu_activations

    @property
    def fits(self) -> bool | None:
        """Whether the device (and host RAM) can hold the plan; ``None`` when the capacity is unknown."""
        if self.capacity_bytes is None:
            return None
        if self.peak_bytes > self.capacity_bytes:
            return False
        return not (self.host_capacity_bytes is not None and self.host_bytes > self.host_capacity_bytes)

    def lines(self) -> list[str]:
        """The plan in words, one line each (printed at start and by ``kleinserve models --plan``)."""
        out = [
            f"memory plan on {self.device} ({self.dtype}, {self.mode.label()}), one {self.width}x{self.height} "
            "image (weights counted from the checkpoints' configs; activations estimated):"
        ]
        for model in self.models:
            out.append(f"  {', '.join(model.models)}  [{model.source}]")
            for c in model.components:
                quant = f" {c.quantization}" if c.quantization != "none" else ""
                out.append(
                    f"    {c.name:<13}{c.parameters / 1e9:7.3f} B params  {c.weight_bytes / GB:7.2f} GB{quant:<6} "
                    f"on {c.placement:<9} activations ~{c.activation_bytes / GB:.2f} GB"
                )
        capacity = "unknown" if self.capacity_bytes is None else f"{self.capacity_bytes / GB:.2f} GB"
        out.append(
            f"  expected peak on {self.device}: {self.peak_bytes / GB:.2f} GB of {capacity} ({self.capacity_source})"
        )
        if self.host_bytes:
            host = "unknown" if self.host_capacity_bytes is None else f"{self.host_capacity_bytes / GB:.2f} GB"
            out.append(f"  host RAM for offloaded weights: {self.host_bytes / GB:.2f} GB of {host} available")
        return out

    def refusal(self) -> str:
        """Why this plan cannot start, and what would fit."""
        assert self.capacity_bytes is not None
        models = ", ".join(name for m in self.models for name in m.models)
        if self.peak_bytes > self.capacity_bytes:
            why = (
                f"{models} need about {gigabytes(self.peak_bytes)} on {self.device} ({self.dtype}, "
                f"{self.mode.label()}), but it has {gigabytes(self.capacity_bytes)} ({self.capacity_source})"
            )
        else:
            why = (
                f"{models} need {gigabytes(self.host_bytes)} of host RAM for offloaded weights, but only "
                f"{gigabytes(self.host_capacity_bytes or 0)} is available"
            )
        fitting = [m.flags() for m in self.alternatives[:4]]
        if fitting:
            advice = "these would fit: " + " | ".join(fitting)
        else:
            advice = "no offload/quantisation mode fits either; serve fewer or smaller models"
        return f"{why}. {advice}. (--device-memory GB overrides the detected capacity.)"

    def check(self) -> None:
        """Raise :class:`ResourceExhaustedError` when the plan does not fit."""
        if self.fits is False:
            raise ResourceExhaustedError(self.refusal())


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def device_capacity(device: str, override_gb: float | None = None) -> tuple[int | None, str]:
    """Bytes the device can give the models, and where the figure came from."""
    if override_gb is not None:
        return int(override_gb * GB), "set by --device-memory"
    parsed = torch.device(device)
    if parsed.type == "cpu":
        available = _meminfo_available()
        return available, "available host RAM" if available is not None else "unknown"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return None, "no CUDA device on this machine"
        free, _total = torch.cuda.mem_get_info(parsed)
        return int(free), "free CUDA memory now"
    if parsed.type == "mps" and torch.backends.mps.is_available():
        return int(torch.mps.recommended_max_memory()), "MPS recommended maximum"
    return None, f"unknown for {parsed.type}"


# Modes suggested when the chosen one does not fit, from least to most costly in speed.
SUGGESTED_MODES: tuple[MemoryMode, ...] = (
    MemoryMode(text_encoder_device="cpu"),
    MemoryMode(quantize="int8"),
    MemoryMode(quantize="int8", quantize_text_encoder="int8"),
    MemoryMode(quantize="fp8", quantize_text_encoder="fp8"),
    MemoryMode(offload="model"),
    MemoryMode(offload="model", quantize="int8", quantize_text_encoder="int8"),
    MemoryMode(offload="group"),
    MemoryMode(offload="group", quantize="int8", quantize_text_encoder="int8"),
    MemoryMode(offload="sequential"),
)


def plan_memory(
    served: Iterable[tuple[str, Variant, Path | None]],
    device: str,
    dtype: torch.dtype,
    mode: MemoryMode = MemoryMode(),
    *,
    width: int = 1024,
    height: int = 1024,
    device_memory_gb: float | None = None,
    vae_config: dict[str, Any] | None = None,
) -> MemoryPlan:
    """The memory plan of ``served`` (model id, variant, weights directory or ``None``) on ``device``.

    Variants served from the same directory share one loaded pipeline, as the server loads them.
    ``vae_config`` overrides the checkpoints' VAE config (``--decoder small``: engine/decoder.py).
    """
    grouped: dict[str, tuple[list[str], Variant, Path | None]] = {}
    for model_id, variant, directory in served:
        key = str(directory.resolve()) if directory is not None else f"published:{variant.id}"
        grouped.setdefault(key, ([], variant, directory))[0].append(model_id)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    shapes = [(ids, model_shape(variant, directory, vae_config)) for ids, variant, directory in grouped.values()]
    capacity, source = device_capacity(device, device_memory_gb)
    # Host RAM is checked only when the device is on this machine (not when planning for another).
    local = torch.device(device).type == "cpu" or (capacity is not None and device_memory_gb is None)
    host = None if torch.device(device).type == "cpu" or not local else _meminfo_available()

    def build(chosen: MemoryMode) -> MemoryPlan:
        return MemoryPlan(
            device=device,
            dtype=str(dtype).removeprefix("torch."),
            mode=chosen,
            width=width,
            height=height,
            models=tuple(_plan_model(ids, shape, chosen, dtype_bytes, width, height) for ids, shape in shapes),
            capacity_bytes=capacity,
            capacity_source=source,
            host_capacity_bytes=host,
        )

    plan = build(mode)
    if plan.fits is False:
        cpu = torch.device(device).type == "cpu"
        candidates = [m for m in SUGGESTED_MODES if not (cpu and (m.offload != "none" or m.text_encoder_device))]
        fitting = tuple(m for m in candidates if m != mode and build(m).fits)
        plan = replace(plan, alternatives=fitting)
    return plan


def plan_served(
    served: Sequence[ServedModel],
    device: torch.device | str,
    dtype: torch.dtype,
    mode: MemoryMode = MemoryMode(),
    device_memory_gb: float | None = None,
    vae_config: dict[str, Any] | None = None,
) -> MemoryPlan:
    """The plan of the models a server serves (demo models included: they are real, tiny checkpoints)."""
    return plan_memory(
        [(m.variant.id, m.variant, m.directory) for m in served],
        str(device),
        dtype,
        mode,
        device_memory_gb=device_memory_gb,
        vae_config=vae_config,
    )


# The columns of the README's hardware table (``kleinserve models --plan --table``).
TABLE_MODES: tuple[tuple[str, MemoryMode], ...] = (
    ("bf16", MemoryMode()),
    ("bf16, TE on CPU", MemoryMode(text_encoder_device="cpu")),
    ("int8", MemoryMode(quantize="int8", quantize_text_encoder="int8")),
    ("fp8", MemoryMode(quantize="fp8", quantize_text_encoder="fp8")),
    ("int4", MemoryMode(quantize="int4", quantize_text_encoder="int4")),
    ("model offload", MemoryMode(offload="model")),
    ("model offload + int8", MemoryMode(offload="model", quantize="int8", quantize_text_encoder="int8")),
    ("group offload", MemoryMode(offload="group")),
    ("sequential offload", MemoryMode(offload="sequential")),
)


def plan_table(variants: Sequence[Variant], device: str, dtype: torch.dtype) -> list[str]:
    """A Markdown table: expected peak device memory (GB) per variant and mode, published geometry."""
    header = "| variant | " + " | ".join(label for label, _ in TABLE_MODES) + " |"
    rows = [header, "|" + "---|" * (len(TABLE_MODES) + 1)]
    for variant in variants:
        cells = []
        for _label, mode in TABLE_MODES:
            plan = plan_memory([(variant.id, variant, None)], device, dtype, mode, device_memory_gb=1e6)
            cells.append(f"{plan.peak_bytes / GB:.1f}")
        rows.append(f"| {variant.id} | " + " | ".join(cells) + " |")
    return rows
