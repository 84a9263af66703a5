"""Cross-request batching: each request's images within 2 uint8 levels of its unbatched twin."""

from __future__ import annotations

import numpy as np
from PIL import Image

from kleinserve.engine.batch import BatchItem, batch_key, generate_batch
from kleinserve.engine.engine import Engine, EngineInputs, EngineOutput
from kleinserve.engine.progress import Progress
from kleinserve.engine.stepcache import StepCache
from kleinserve.errors import GenerationCancelledError


def _alone(engine: Engine, inputs: EngineInputs) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in engine.generate(inputs).images]


def _close(output: EngineOutput, expected: list[np.ndarray]) -> None:
    assert len(output.images) == len(expected)
    for image, twin in zip(output.images, expected, strict=True):
        assert np.abs(np.asarray(image, dtype=np.int16) - twin).max() <= 2


def test_each_request_keeps_its_prompt_seeds_progress_and_pixels(distilled_engine: Engine) -> None:
    inputs = [
        EngineInputs("a red fox in snow", 3, 1.0, 10, width=48, height=32),
        EngineInputs("a cat wearing a hat", 3, 1.0, 20, num_images=2, width=48, height=32),
        EngineInputs("a mountain lake", 3, 1.0, 30, width=48, height=32),
    ]
    assert len({batch_key(distilled_engine, i) for i in inputs}) == 1
    seen: list[list[Progress]] = [[], [], []]
    items = [BatchItem(i, on_progress=seen[k].append) for k, i in enumerate(inputs)]
    outcomes = generate_batch(distilled_engine, items)
    for inp, outcome, progress in zip(inputs, outcomes, seen, strict=True):
        assert isinstance(outcome, EngineOutput)
        assert outcome.seeds == [inp.seed + i for i in range(inp.num_images)]
        _close(outcome, _alone(distilled_engine, inp))
        assert [p.step for p in progress if p.stage == "denoise"] == [1, 2, 3]
    # Rows stay with their request: another request's seed gives a far-away image.
    other = _alone(distilled_engine, EngineInputs("a red fox in snow", 3, 1.0, 30, width=48, height=32))
    assert np.abs(np.asarray(outcomes[0].images[0], dtype=np.int16) - other[0]).max() > 2  # type: ignore[union-attr]


def test_cancelling_one_request_leaves_the_others_running(distilled_engine: Engine) -> None:
    steps_done = []
    inputs = [EngineInputs(f"prompt {k}", 3, 1.0, k, width=32, height=32) for k in range(3)]
    items = [
        BatchItem(inputs[0]),
        BatchItem(inputs[1], on_progress=steps_done.append, should_cancel=lambda: len(steps_done) >= 1),
        BatchItem(inputs[2]),
    ]
    outcomes = generate_batch(distilled_engine, items)
    assert isinstance(outcomes[1], GenerationCancelledError)
    for k in (0, 2):
        assert isinstance(outcomes[k], EngineOutput)
        _close(outcomes[k], _alone(distilled_engine, inputs[k]))  # type: ignore[arg-type]


def test_base_cfg_and_references_batch_too(base_engine: Engine) -> None:
    rng = np.random.RandomState(3)
    refs = [Image.fromarray((rng.rand(40, 56, 3) * 255).astype("uint8")) for _ in range(2)]
    inputs = [
        EngineInputs("put the hat on the cat", 3, 4.0, 5, references=[refs[0]]),
        EngineInputs("make it a watercolor painting", 3, 4.0, 6, references=[refs[1]], negative_prompt="blurry"),
    ]
    assert batch_key(base_engine, inputs[0]) == batch_key(base_engine, inputs[1])
    outcomes = generate_batch(base_engine, [BatchItem(i) for i in inputs])
    for inp, outcome in zip(inputs, outcomes, strict=True):
        assert isinstance(outcome, EngineOutput) and outcome.cfg
        _close(outcome, _alone(base_engine, inp))


def test_incompatible_requests_have_other_keys(distilled_engine: Engine) -> None:
    key = batch_key(distilled_engine, EngineInputs("x", 4, 1.0, 1, width=64, height=64))
    assert key != batch_key(distilled_engine, EngineInputs("x", 3, 1.0, 1, width=64, height=64))
    assert key != batch_key(distilled_engine, EngineInputs("x", 4, 1.0, 1, width=64, height=48))
    assert key == batch_key(distilled_engine, EngineInputs("y", 4, 1.0, 9, num_images=3, width=64, height=64))
    # LoRA adapters and scales are shared by a batch (they are set on its one transformer).
    plain = EngineInputs("x", 4, 1.0, 1, width=64, height=64)
    assert batch_key(distilled_engine, plain, (("a", 1.0),)) != key
    assert batch_key(distilled_engine, plain, (("a", 1.0),)) != batch_key(distilled_engine, plain, (("a", 0.5),))
    # What the batched loop does not implement runs alone: image-to-image, inpainting, step caching.
    image = Image.new("RGB", (64, 64))
    assert batch_key(distilled_engine, EngineInputs("x", 4, 1.0, 1, references=[image], strength=0.5)) is None
    assert (
        batch_key(distilled_engine, EngineInputs("x", 4, 1.0, 1, references=[image], mask=image.convert("L"))) is None
    )
    cached = EngineInputs("x", 4, 4.0, 1, width=64, height=64, step_cache=StepCache("taylorseer", 5))
    assert batch_key(distilled_engine, cached) is None


def test_cfg_in_one_batch_is_within_two_levels_of_two_passes(base_engine: Engine) -> None:
    inputs = EngineInputs("a cat wearing a hat", 3, 4.0, 8, num_images=2, width=48, height=48)
    engine = Engine(base_engine.pipeline, base_engine.variant)  # the fixture keeps its two passes
    calls: list[int] = []
    handle = engine.pipeline.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        engine.cfg_batch = False
        two_passes = engine.generate(inputs)
        assert calls == [2, 2] * 3
        calls.clear()
        engine.cfg_batch = True
        one_batch = engine.generate(inputs)
        assert calls == [4] * 3  # conditional and unconditional rows together
    finally:
        handle.remove()
    _close(one_batch, [np.asarray(image, dtype=np.int16) for image in two_passes.images])
