"""An LRU cache of prompt embeddings, keyed by (model, prompt) and bounded in bytes.

Seed sweeps, ``n`` images, the Workbench's re-runs and every CFG negative (the empty prompt) send the
same prompt again; the text encoder is the costliest stage of a distilled 4-step run, and its output
depends only on the model and the prompt text. So an embedding is computed once and reused while it
fits in ``KLEINSERVE_PROMPT_CACHE_BYTES`` (0 disables caching). Entries stay on the engine's device.
Reuse is exact: the cached tensor is the one the text encoder returned, so pixels do not change.

One cache serves every model of a process (the key carries the model id); hits and misses are
counted for ``/metrics``. Thread-safe: workers compute outside the lock, so a slow encode never
blocks another worker's lookups (two workers missing the same prompt at once both compute it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache's counters."""

    hits: int
    misses: int
    entries: int
    bytes: int
    max_bytes: int


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class PromptCache:
    """Least-recently-used prompt embeddings, at most ``max_bytes`` of them."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be at least 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def get(self, model: str, prompt: str) -> torch.Tensor | None:
        """The cached embedding (now most recently used), counting a hit or a miss."""
        with self._lock:
            found = self._entries.get((model, prompt))
            if found is None:
                self._misses += 1
                return None
            self._entries.move_to_end((model, prompt))
            self._hits += 1
            return found

    def put(self, model: str, prompt: str, embedding: torch.Tensor) -> None:
        """Store ``embedding``, evicting the least recently used entries to stay within the bound."""
        size = tensor_bytes(embedding)
        if size > self.max_bytes:
            return  # larger than the whole cache (or caching is off)
        with self._lock:
            old = self._entries.pop((model, prompt), None)
            if old is not None:
                self._bytes -= tensor_bytes(old)
            while self._entries and self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= tensor_bytes(evicted)
            self._entries[(model, prompt)] = embedding
            self._bytes += size

    def get_or_compute(self, model: str, prompt: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached embedding of ``prompt``, else ``compute()``'s result, stored for next time."""
        found = self.get(model, prompt)
        if found is not None:
            return found
        embedding = compute()
        self.put(model, prompt, embedding)
        return embedding

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._entries), self._bytes, self.max_bytes)
