"""Step caching for the Base variants, through diffusers' own cache hooks.

Over 50 steps a Base model's transformer output changes little from one step to the next, so some
steps can reuse (or extrapolate) earlier results. diffusers ships this as hooks on the transformer
(``transformer.enable_cache(config)``); kleinserve applies them around one generation's denoising
loop and removes them after, so no state crosses requests and other requests run uncached:

- ``taylorseer``: TaylorSeer. Every ``interval``-th step (``threshold`` is read as the interval,
  default 5) runs fully; the others extrapolate the attention outputs with a first-order Taylor step.

Not offered: diffusers 0.42's First Block Cache fails on Flux2's transformer (its tail hook subtracts
a list from a tensor: a TypeError inside diffusers' own ``Flux2KleinPipeline`` too), and MagCache
needs per-model calibration ratios that BFL does not publish for klein.

Opt-in: per server (``KLEINSERVE_STEP_CACHE``, e.g. ``taylorseer:5``) and per request
(``cache: {"type", "threshold"}``); never on the 4-step distilled variants, where there is nothing
to skip. It changes pixels: ``kleinserve bench`` reports each setting's speed and PSNR against the
uncached run. The pixels equal diffusers' ``Flux2KleinPipeline`` with the same cache enabled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

StepCacheType = Literal["taylorseer"]
STEP_CACHE_TYPES: tuple[str, ...] = ("taylorseer",)
DEFAULT_THRESHOLDS = {"taylorseer": 5.0}


@dataclass(frozen=True)
class StepCache:
    """A step-caching method and its one knob."""

    type: StepCacheType
    threshold: float

    @classmethod
    def parse(cls, text: str) -> StepCache | None:
        """``off``, ``TYPE`` or ``TYPE:THRESHOLD`` (the server setting's syntax)."""
        name, _, value = text.strip().partition(":")
        if name in ("", "off", "none"):
            return None
        if name not in STEP_CACHE_TYPES:
            raise ValueError(f"step cache type must be one of {', '.join(STEP_CACHE_TYPES)} or off, not {name!r}")
        threshold = float(value) if value else DEFAULT_THRESHOLDS[name]
        return cls(name, threshold)  # type: ignore[arg-type]

    def diffusers_config(self) -> Any:
        from diffusers.hooks import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(cache_interval=max(1, round(self.threshold)))


@contextlib.contextmanager
def step_caching(transformer: Any, cache: StepCache | None) -> Iterator[None]:
    """The transformer with ``cache``'s hooks for the duration of the block (nothing when ``None``)."""
    if cache is None:
        yield
        return
    transformer.enable_cache(cache.diffusers_config())
    try:
        yield
    finally:
        transformer.disable_cache()


def in_cache_context(transformer: Any, name: str) -> Any:
    """``transformer`` called inside ``cache_context(name)`` when cache hooks are on; else itself."""
    if not getattr(transformer, "is_cache_enabled", False):
        return transformer

    def call(**kwargs: Any) -> Any:
        with transformer.cache_context(name):
            return transformer(**kwargs)

    return call
