"""What the bench measures besides wall time: stage times, transformer FLOPs, matmul peak, peak memory.

Stage times come from forward hooks on the *shared* modules, so kleinserve and diffusers are timed by
the same clock at the same points: the time spent inside the text encoder's layers (encode prompt),
the VAE encoder (encode references), the transformer (denoise) and the VAE decoder (decode). What a
pipeline does between those calls (scheduler, packing, pre- and post-processing) shows as ``other``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

STAGES = ("encode_prompt", "encode_references", "denoise", "decode", "encode_image")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a clock read after it covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class StageClock:
    """Accumulates the time spent in groups of modules, per stage, through forward hooks.

    Nested calls within a group count once (only the outermost call is timed). Also counts the
    transformer's calls and, when ``count_flops`` is on, the FLOPs they perform.
    """

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)
    transformer_calls: int = 0
    transformer_flops: int = 0
    count_flops: bool = False
    _depth: dict[str, int] = field(default_factory=dict)
    _started: dict[str, float] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)
    _flop_mode: Any = None

    def attach(self, pipeline: Any) -> None:
        """Hook the stage modules of a Flux2Klein pipeline (shared by every pipeline on them)."""
        encoder = pipeline.text_encoder.model
        groups: dict[str, list[torch.nn.Module]] = {
            "encode_prompt": [encoder.embed_tokens, *encoder.layers, encoder.norm],
            "encode_references": [pipeline.vae.encoder],
            "denoise": [pipeline.transformer],
            "decode": [pipeline.vae.decoder],
        }
        for extra, stage in (("quant_conv", "encode_references"), ("post_quant_conv", "decode")):
            module = getattr(pipeline.vae, extra, None)
            if isinstance(module, torch.nn.Module):
                groups[stage].append(module)
        for stage, modules in groups.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._enter(stage)))
                self._handles.append(module.register_forward_hook(self._leave(stage), always_call=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.seconds = {}
        self.transformer_calls = 0
        self.transformer_flops = 0

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def _enter(self, stage: str) -> Any:
        def hook(_module: torch.nn.Module, _args: object) -> None:
            depth = self._depth.get(stage, 0)
            self._depth[stage] = depth + 1
            if depth == 0:
                synchronize(self.device)
                self._started[stage] = time.perf_counter()
                if stage == "denoise":
                    self.transformer_calls += 1
                    if self.count_flops:
                        from torch.utils.flop_counter import FlopCounterMode

                        self._flop_mode = FlopCounterMode(display=False)
                        self._flop_mode.__enter__()

        return hook

    def _leave(self, stage: str) -> Any:
        def hook(_module: torch.nn.Module, _args: object, _output: object) -> None:
            depth = self._depth.get(stage, 1) - 1
            self._depth[stage] = depth
            if depth == 0:
                synchronize(self.device)
                self.add(stage, time.perf_counter() - self._started.pop(stage))
                if stage == "denoise" and self._flop_mode is not None:
                    self._flop_mode.__exit__(None, None, None)
                    self.transformer_flops += int(self._flop_mode.get_total_flops())
                    self._flop_mode = None

        return hook


@functools.cache
def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    """The best TFLOP/s of a square ``size`` matmul in ``dtype`` on ``device`` (the reference peak).

    Measured once per process and device/dtype (``--modes`` benches several loads on one device).
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up (allocations, kernel choice)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e12


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _rss_high_water() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Yields a dict that, on exit, holds the peak memory of the block (bytes) and what it measured.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU (Linux): the process's resident-set
    high-water mark, reset through ``/proc/self/clear_refs`` (so it includes the loaded weights).
    """
    result: dict[str, Any] = {"bytes": None, "kind": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):
            _CLEAR_REFS.write_text("5")
    try:
        yield result
    finally:
        if device.type == "cuda":
            result.update(bytes=int(torch.cuda.max_memory_allocated(device)), kind="cuda_max_allocated")
        else:
            result.update(bytes=_rss_high_water(), kind="rss_high_water")
