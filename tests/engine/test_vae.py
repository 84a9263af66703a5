"""Tiled VAE decoding above a size (same image size, close to the whole decode, off by default) and
the VAE's memory format (default layout unless channels_last is asked for)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kleinserve.engine.engine import Engine, EngineInputs
from kleinserve.engine.loading import LoadOptions, load_placed, make_engine
from kleinserve.engine.vae import is_channels_last
from kleinserve.placement import load_options_for
from kleinserve.settings import Settings

CPU = torch.device("cpu")


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


def test_the_vae_keeps_the_default_layout_unless_channels_last_is_asked_for(
    distilled_engine: Engine, tiny_distilled: Path
) -> None:
    """channels_last is not bit-equal to diffusers' default layout on the CPU (engine/vae.py), so it
    is off by default; asked for, every convolution is channels_last and pixels move by rounding only."""
    vae = distilled_engine.pipeline.vae
    assert vae.decoder.conv_in.weight.is_contiguous() and not is_channels_last(vae)
    assert not Settings(_env_file=None).vae_channels_last
    pipeline, placement = load_placed(tiny_distilled, CPU, LoadOptions(torch.float32, vae_channels_last=True))
    assert is_channels_last(pipeline.vae) and not pipeline.vae.decoder.conv_in.weight.is_contiguous()
    inputs = EngineInputs("a red fox in snow", 2, 1.0, 3, width=64, height=64)
    default = np.asarray(distilled_engine.generate(inputs).images[0], dtype=np.int16)
    engine = make_engine(pipeline, placement, distilled_engine.variant)
    nhwc = np.asarray(engine.generate(inputs).images[0], dtype=np.int16)
    assert np.abs(nhwc - default).max() <= 2


def test_settings_choose_channels_last(tmp_path: Path) -> None:
    _, options = load_options_for(Settings(_env_file=None, data_dir=tmp_path, vae_channels_last=True), CPU)
    assert options.vae_channels_last and "VAE channels_last" in options.describe()
