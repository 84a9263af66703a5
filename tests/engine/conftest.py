"""Engine test fixtures."""

from __future__ import annotations

import pytest
import torch

from kleinserve.engine.bench import measure, runner


@pytest.fixture(autouse=True)
def small_matmul_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's reference peak is still measured, on a 1024² matmul instead of 4096² (a GPU's size,
    seconds of CPU per dtype on the tiny-weight runs here)."""

    def peak(device: torch.device, dtype: torch.dtype) -> float:
        return measure.matmul_peak_tflops(device, dtype, size=1024)

    monkeypatch.setattr(runner, "matmul_peak_tflops", peak)
