"""Where a generation is, as the engine reports it between stages and steps, and how it is stopped.

The engine calls a :data:`ProgressCallback` at the start of each stage and after every denoising step,
and asks a :data:`CancelCheck` before each step: :func:`check_cancel` raises
:class:`GenerationCancelledError` when it answers true, so a cancelled job stops within one step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from kleinserve.engine.preview import PreviewFn
from kleinserve.errors import GenerationCancelledError

Stage = Literal["encode_prompt", "encode_references", "denoise", "decode"]


@dataclass(frozen=True)
class Progress:
    """Where a generation is: ``step`` of ``total`` within ``stage``.

    ``preview`` (denoising steps only) decodes this request's current x0 estimate to small images
    when called (engine/preview.py); it costs nothing unless called, and only during the callback.
    """

    stage: Stage
    step: int
    total: int
    preview: PreviewFn | None = None


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


def check_cancel(cancelled: CancelCheck) -> None:
    """Raise :class:`GenerationCancelledError` when ``cancelled`` says the generation should stop."""
    if cancelled():
        raise GenerationCancelledError()
