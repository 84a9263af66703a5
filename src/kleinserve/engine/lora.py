"""LoRA adapters on a loaded pipeline: loaded once, kept in an LRU cache, activated per job.

Loading is diffusers' ``Flux2LoraLoaderMixin.load_lora_weights`` (peft underneath), under the
adapter's name; a job's set is activated with ``set_adapters(names, adapter_weights=scales)``, and a job
without adapters runs with ``disable_lora()``. Scale 0 adds exactly zero to every adapted layer, so it
gives the base model's pixels; scale 1 gives what diffusers gives after ``load_lora_weights`` +
``set_adapters`` (the tests hold both).

Decisions: adapters are loaded on first use, not at start (an operator may offer many; at most
``capacity`` stay loaded per pipeline, the least recently used is deleted with ``delete_adapters``);
local sources are checked at start so a typo fails then. Activation is skipped when the next job uses
the same set as the last one. Jobs with different adapter sets must not share a batch (the adapters
are pipeline state). Fusing (``fuse_lora``) for long runs of one adapter is not done: it would have to
be undone exactly for the next job, and the unfused forward is what the pixel tests check.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kleinserve.errors import InvalidParameterError, WeightsUnavailableError
from kleinserve.loras import LoraSource

if TYPE_CHECKING:
    from diffusers import Flux2KleinPipeline

    from kleinserve.request import LoraChoice


class Adapters:
    """The LoRA adapters of one pipeline (shared by the engines of the variants it serves)."""

    def __init__(self, pipeline: Flux2KleinPipeline, offered: Mapping[str, LoraSource], capacity: int = 8) -> None:
        self.pipeline = pipeline
        self.offered = dict(offered)
        self.capacity = max(1, capacity)
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.active: tuple[tuple[str, float], ...] = ()
        self._lock = threading.Lock()

    def activate(self, choices: Sequence[LoraChoice]) -> None:
        """Make exactly ``choices`` (names and scales) active for the next generation."""
        wanted = tuple((c.name, float(c.scale)) for c in choices)
        with self._lock:
            if wanted == self.active:
                return
            if not wanted:
                if self.loaded:
                    self.pipeline.disable_lora()
                self.active = ()
                return
            if len(wanted) > self.capacity:
                raise InvalidParameterError("loras", f"at most {self.capacity} adapters can be loaded at once")
            names = [name for name, _ in wanted]
            for name in names:
                self._ensure_loaded(name, keep=names)
            self.pipeline.enable_lora()
            self.pipeline.set_adapters(names, adapter_weights=[scale for _, scale in wanted])
            self.active = wanted

    def _ensure_loaded(self, name: str, keep: Sequence[str]) -> None:
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return
        source = self.offered.get(name)
        if source is None:
            raise InvalidParameterError("loras", f"unknown LoRA adapter {name!r}")
        while len(self.loaded) >= self.capacity:
            victim = next(n for n in self.loaded if n not in keep)
            self.pipeline.delete_adapters(victim)
            del self.loaded[victim]
        self._load(source)
        self.loaded[name] = None

    def _load(self, lora: LoraSource) -> None:
        path = Path(lora.source).expanduser()
        try:
            if path.is_file():
                self.pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=lora.name)
            elif path.is_dir():
                self.pipeline.load_lora_weights(str(path), adapter_name=lora.name)
            else:  # a hub repo, optionally with a file: owner/repo or owner/repo/file.safetensors
                parts = lora.source.split("/")
                if len(parts) > 2 and parts[-1].endswith(".safetensors"):
                    repo, weight = "/".join(parts[:2]), "/".join(parts[2:])
                    self.pipeline.load_lora_weights(repo, weight_name=weight, adapter_name=lora.name)
                else:
                    self.pipeline.load_lora_weights(lora.source, adapter_name=lora.name)
        except Exception as err:
            # A half-registered adapter would break the next set_adapters.
            if lora.name in self.pipeline.get_list_adapters().get("transformer", []):
                self.pipeline.delete_adapters(lora.name)
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise WeightsUnavailableError(
                f"cannot load LoRA adapter {lora.name!r} from {lora.source}: {first}"
            ) from err


def check_sources(offered: Mapping[str, LoraSource]) -> None:
    """A path that does not exist is a start-up error, not a failed job later (hub ids load on first use)."""
    for lora in offered.values():
        if lora.source.startswith((".", "/", "~")) and not lora.local:
            raise WeightsUnavailableError(f"LoRA adapter {lora.name!r}: {lora.source} does not exist")
