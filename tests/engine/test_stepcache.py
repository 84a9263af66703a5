"""Step caching through diffusers' hooks: diffusers' pixels with the same cache, opt-in, Base only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kleinserve.engine.engine import Engine, EngineInputs
from kleinserve.engine.stepcache import StepCache, step_caching
from kleinserve.errors import InvalidParameterError
from kleinserve.generation import step_cache_for
from kleinserve.request import GenerationRequest


def test_matches_diffusers_pipeline_with_the_same_cache(base_engine: Engine) -> None:
    cache = StepCache("taylorseer", 2)
    pipe = base_engine.pipeline
    pipe.set_progress_bar_config(disable=True)
    with step_caching(pipe.transformer, cache):
        expected = pipe(
            prompt="a cat wearing a hat", width=48, height=48, num_inference_steps=8, guidance_scale=4.0,
            generator=torch.Generator("cpu").manual_seed(2),
        ).images[0]  # fmt: skip
    assert not pipe.transformer.is_cache_enabled  # hooks removed after the block
    inputs = EngineInputs("a cat wearing a hat", 8, 4.0, 2, width=48, height=48, step_cache=cache)
    cached = base_engine.generate(inputs).images[0]
    assert not pipe.transformer.is_cache_enabled
    assert np.array_equal(np.asarray(cached), np.asarray(expected))
    plain = base_engine.generate(EngineInputs("a cat wearing a hat", 8, 4.0, 2, width=48, height=48)).images[0]
    assert not np.array_equal(np.asarray(cached), np.asarray(plain))  # a fixed interval skips even here


def test_opt_in_per_server_and_per_request_and_never_distilled(base_engine: Engine, distilled_engine: Engine) -> None:
    base = Engine(base_engine.pipeline, base_engine.variant)
    request = GenerationRequest.parse({"model": "flux-2-klein-base-4b", "prompt": "x"})
    assert step_cache_for(request, base) is None  # off unless asked for
    base.step_cache = StepCache("taylorseer", 4)  # the server's default
    assert step_cache_for(request, base) == StepCache("taylorseer", 4)
    chosen = GenerationRequest.parse(
        {"model": "flux-2-klein-base-4b", "prompt": "x", "cache": {"type": "taylorseer", "threshold": 3}}
    )
    assert step_cache_for(chosen, base) == StepCache("taylorseer", 3)
    off = GenerationRequest.parse({"model": "flux-2-klein-base-4b", "prompt": "x", "cache": {"type": "none"}})
    assert step_cache_for(off, base) is None
    with pytest.raises(InvalidParameterError, match="step caching works on the Base variants"):
        GenerationRequest.parse({"model": "flux-2-klein-4b", "prompt": "x", "cache": {"type": "taylorseer"}})
    distilled = Engine(distilled_engine.pipeline, distilled_engine.variant)
    distilled.step_cache = StepCache("taylorseer", 4)
    assert step_cache_for(GenerationRequest.parse({"model": "flux-2-klein-4b", "prompt": "x"}), distilled) is None


def test_server_setting_syntax() -> None:
    assert StepCache.parse("off") is None
    assert StepCache.parse("taylorseer") == StepCache("taylorseer", 5.0)
    assert StepCache.parse("taylorseer:4") == StepCache("taylorseer", 4.0)
    with pytest.raises(ValueError, match="step cache type"):
        StepCache.parse("magic")
