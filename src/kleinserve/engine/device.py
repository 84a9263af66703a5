"""Choosing the torch device and dtype a model runs on."""

from __future__ import annotations

import torch

from kleinserve.errors import InvalidParameterError

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else must name a usable device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InvalidParameterError("device", f"{name!r} is not a torch device (try auto, cpu, cuda, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("device", "CUDA was asked for but torch sees no CUDA device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidParameterError("device", "MPS was asked for but is not available here")
    return device


def pick_devices(spec: str) -> list[torch.device]:
    """The devices of ``--devices``: a comma-separated list (repeats allowed: ``cpu,cpu`` runs two
    workers on the CPU), or ``auto`` for every visible CUDA GPU (one device from ``auto`` without)."""
    if spec.strip() == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", i) for i in range(count)] or [pick_device("auto")]
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise InvalidParameterError("devices", "name at least one device, e.g. cuda:0,cuda:1 or cpu,cpu")
    devices = []
    for name in names:
        device = pick_device(name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidParameterError("devices", f"{name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
        devices.append(device)
    return devices


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX); emulated bf16 is slow."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """``auto`` is bf16 on CUDA and MPS, and on CPUs with native bf16; float32 otherwise."""
    if name != "auto":
        dtype = _DTYPES.get(name.lower())
        if dtype is None:
            raise InvalidParameterError("dtype", f"{name!r} is not one of auto, bfloat16, float16, float32")
        return dtype
    if device.type in ("cuda", "mps"):
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype (``torch.bfloat16`` -> ``bfloat16``)."""
    return str(dtype).removeprefix("torch.")


def memory_rows(name: str) -> list[tuple[str, str, int]]:
    """``(device, kind, bytes)`` for the metrics: allocated, reserved and peak on CUDA, allocated and
    driver-reserved on MPS, nothing on the CPU (its memory is the process RSS)."""
    device = torch.device(name)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        label = f"cuda:{index}"
        return [
            (label, "allocated", torch.cuda.memory_allocated(index)),
            (label, "reserved", torch.cuda.memory_reserved(index)),
            (label, "peak", torch.cuda.max_memory_allocated(index)),
        ]
    if device.type == "mps" and torch.backends.mps.is_available():
        return [
            ("mps", "allocated", torch.mps.current_allocated_memory()),
            ("mps", "reserved", torch.mps.driver_allocated_memory()),
        ]
    return []
