"""The prompt-embedding cache: LRU within a byte bound, counted, and exact (same pixels as diffusers)."""

from __future__ import annotations

import numpy as np
import torch

from kleinserve.engine.cache import PromptCache
from kleinserve.engine.engine import Engine, EngineInputs
from tests.engine.test_engine import diffusers_images


def _tensor(kib: int, fill: float = 0.0) -> torch.Tensor:
    return torch.full((kib * 256,), fill, dtype=torch.float32)  # 4 bytes each: kib KiB


def test_lru_within_the_byte_bound() -> None:
    cache = PromptCache(max_bytes=3 * 1024)
    for name in ("a", "b", "c"):
        cache.put("m", name, _tensor(1))
    assert cache.get("m", "a") is not None  # a is now the most recently used
    cache.put("m", "d", _tensor(1))  # evicts b, the least recently used
    assert cache.get("m", "b") is None
    assert all(cache.get("m", name) is not None for name in ("a", "c", "d"))
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.max_bytes) == (3, 3 * 1024, 3 * 1024)
    assert (stats.hits, stats.misses) == (4, 1)
    cache.put("m", "big", _tensor(2))  # needs two slots: evicts the two least recently used
    assert cache.stats().entries == 2 and cache.stats().bytes == 3 * 1024


def test_keys_are_model_and_prompt_and_oversize_entries_are_not_kept() -> None:
    cache = PromptCache(max_bytes=1024)
    cache.put("model-a", "p", _tensor(1, 1.0))
    assert cache.get("model-b", "p") is None
    assert cache.get("model-a", "p") is not None
    cache.put("model-a", "huge", _tensor(2))
    assert cache.get("model-a", "huge") is None
    off = PromptCache(max_bytes=0)
    calls = []
    for _ in range(2):
        off.get_or_compute("m", "p", lambda: calls.append(1) or _tensor(1))
    assert len(calls) == 2 and off.stats().entries == 0


def test_repeated_prompts_skip_the_text_encoder_and_keep_diffusers_pixels(base_engine: Engine) -> None:
    engine = Engine(base_engine.pipeline, base_engine.variant)  # a private engine: the fixture stays uncached
    engine.prompt_cache = PromptCache(max_bytes=64 * 1024 * 1024)
    runs = []
    encoder = engine.pipeline.text_encoder.model.embed_tokens
    handle = encoder.register_forward_hook(lambda *_a: runs.append(1))
    try:
        first = engine.generate(EngineInputs("a cat wearing a hat", 3, 4.0, 5, width=64, height=64))
        assert len(runs) == 2  # the prompt and the CFG negative
        second = engine.generate(EngineInputs("a cat wearing a hat", 3, 4.0, 6, width=64, height=64))
        assert len(runs) == 2  # both from the cache
    finally:
        handle.remove()
    stats = engine.prompt_cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (2, 2, 2)
    for output, seed in ((first, 5), (second, 6)):
        expected = diffusers_images(
            engine, "a cat wearing a hat", steps=3, guidance=4.0, seeds=[seed], width=64, height=64
        )
        assert np.array_equal(np.asarray(output.images[0]), expected[0])
