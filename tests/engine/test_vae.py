"""Tiled VAE decoding above a size: same image size, close to the whole decode, off by default."""

from __future__ import annotations

import numpy as np

from kleinserve.engine.engine import Engine, EngineInputs


def test_tiles_only_above_the_setting(distilled_engine: Engine) -> None:
    engine = Engine(distilled_engine.pipeline, distilled_engine.variant)
    inputs = EngineInputs("a red fox in snow", 2, 1.0, 3, width=160, height=128)
    whole = np.asarray(engine.generate(inputs).images[0], dtype=np.int16)
    calls: list[int] = []
    vae = engine.pipeline.vae
    original = vae.tiled_decode
    vae.tiled_decode = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        engine.vae_tile_above_pixels = 160 * 128  # not above: decoded whole
        assert np.array_equal(np.asarray(engine.generate(inputs).images[0], dtype=np.int16), whole)
        assert calls == []
        engine.vae_tile_above_pixels = 64 * 64  # tiles of the tiny VAE's 64-pixel sample size
        tiled = np.asarray(engine.generate(inputs).images[0], dtype=np.int16)
    finally:
        del vae.tiled_decode
    # The tiny VAE's tiles are 64 pixels with random weights: seams differ visibly, the size does not.
    assert calls == [1] and tiled.shape == whole.shape and not np.array_equal(tiled, whole)
