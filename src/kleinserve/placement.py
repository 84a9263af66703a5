"""Where a process puts its models: the devices its workers run on, the load options and memory plan
the settings ask for there, loading every served model onto one device, and each device's state.

No torch at import: the ``api`` role imports this module (through runtime.py) and never loads models;
the engine is imported inside the functions that need it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine (torch) is imported only by roles that load models
    from pathlib import Path

    import torch

    from kleinserve.engine.cache import PromptCache
    from kleinserve.engine.catalog import ServedModel
    from kleinserve.engine.engine import Engine
    from kleinserve.engine.loading import LoadOptions
    from kleinserve.engine.memory import MemoryPlan
    from kleinserve.jobs.worker import Worker
    from kleinserve.loras import LoraSource
    from kleinserve.safety import SafetyChecker
    from kleinserve.settings import Settings

log = logging.getLogger(__name__)


def devices_for(settings: Settings) -> list[torch.device]:
    """The devices to run workers on: ``--devices`` (one worker each), else the one ``--device``."""
    from kleinserve.engine.device import pick_device, pick_devices

    return pick_devices(settings.devices) if settings.devices else [pick_device(settings.device)]


def load_options_for(settings: Settings, device: torch.device | None = None) -> tuple[torch.device, LoadOptions]:
    """The device and load options (dtype, memory mode, compile, attention) the settings ask for, checked."""
    from kleinserve.engine.device import pick_dtype
    from kleinserve.engine.loading import LoadOptions, check_options
    from kleinserve.engine.memory import MemoryMode

    device = device if device is not None else devices_for(settings)[0]
    mode = MemoryMode(settings.offload, settings.quantize, settings.quantize_text_encoder, settings.text_encoder_device)
    options = LoadOptions(
        pick_dtype(device, settings.dtype),
        mode,
        settings.compile,
        settings.attention_backend,
        vae=decoder_for(settings),
        vae_channels_last=settings.vae_channels_last,
    )
    check_options(device, options)
    return device, options


def decoder_for(settings: Settings) -> Path | None:
    """The small decoder's directory when ``--decoder small`` (HF cache, hub or PATH), else ``None``."""
    from kleinserve.engine.decoder import DecoderSpec, resolve_decoder

    return resolve_decoder(DecoderSpec.parse(settings.decoder))


def memory_plan_for(settings: Settings, served: list[ServedModel], device: torch.device | None = None) -> MemoryPlan:
    """The memory plan of ``served`` on one of the settings' devices (default: the first); workers
    sharing that device (``--devices cpu,cpu``) each hold their own copy, so the plan holds them all."""
    from kleinserve.engine.decoder import read_config
    from kleinserve.engine.memory import plan_served

    device, options = load_options_for(settings, device)
    vae_config = read_config(options.vae) if options.vae is not None else None
    plan = plan_served(
        served, device, options.dtype, options.mode, device_memory_gb=settings.device_memory, vae_config=vae_config
    )
    sharing = sum(1 for other in devices_for(settings) if other == device)
    if sharing > 1:
        plan = replace(plan, models=plan.models * sharing)
    return plan


def load_device(
    settings: Settings,
    served: list[ServedModel],
    loras: dict[str, LoraSource],
    device: torch.device,
    caches: dict[str, PromptCache],
    preloaded: dict[str, Engine] | None = None,
) -> tuple[dict[str, Engine], SafetyChecker | None]:
    """Load every served model onto ``device`` (warmed up when compiled), with its prompt cache (one
    per device in ``caches``: entries live on their device). ``preloaded``: engines the caller loaded
    already (``kleinserve bench``), used instead of loading ``served`` again."""
    from kleinserve.engine.cache import PromptCache
    from kleinserve.engine.catalog import load_engines
    from kleinserve.engine.classifier import safety_checker_from_settings
    from kleinserve.engine.loading import warm_up
    from kleinserve.engine.stepcache import StepCache

    _, options = load_options_for(settings, device)
    if preloaded is not None:
        engines = dict(preloaded)
    else:
        engines = load_engines(served, device, options.dtype, options, loras, settings.lora_cache)
    cache = caches.setdefault(str(device), PromptCache(settings.prompt_cache_bytes))
    tiny = None  # the previews' tiny autoencoder, one per device (engine/preview.py)
    if settings.preview_decoder:
        from kleinserve.engine.tiny_autoencoder import load_tiny_autoencoder

        tiny = load_tiny_autoencoder(settings.preview_decoder, device, options.dtype)
        log.info("previews on %s: tiny autoencoder %s", device, settings.preview_decoder)
    for engine in engines.values():
        engine.prompt_cache = cache
        engine.cfg_batch = {"on": True, "off": False}.get(settings.cfg_batch)
        engine.step_cache = StepCache.parse(settings.step_cache)
        engine.vae_tile_above_pixels = settings.vae_tile_above_pixels
        engine.previews.tiny = tiny
    if options.compile:  # compile now, not in the first request
        for engine in {id(e.pipeline): e for e in engines.values()}.values():
            warm_up(engine)
    # The previews' projection, derived in the background now rather than in the first preview; not
    # for engines the caller preloaded (bench times them: no background work beside its requests).
    if tiny is None and options.mode.offload == "none" and preloaded is None:
        for engine in {id(e.pipeline): e for e in engines.values()}.values():
            engine.previews.warm()
    return engines, safety_checker_from_settings(settings, device)


@dataclass
class DeviceState:
    """One device's worker as /readyz reports it."""

    device: str
    state: str = "loading"  # loading, ready or error
    error: str | None = None
    worker: Worker | None = None

    def describe(self, jobs: bool = False) -> dict[str, object]:
        """The device, its state and worker; with ``jobs`` (the operator's view: /readyz with the admin
        token) also the id of the job its worker is running, which no unauthenticated probe may learn."""
        body: dict[str, object] = {"device": self.device, "state": self.state}
        if self.worker is not None:
            body["worker"] = self.worker.name
            if jobs:
                body["job"] = self.worker.current_job_id
        if self.error:
            body["error"] = self.error
        return body

    def listed(self) -> dict[str, object]:
        """This device as the model lists show it: its state and whether its worker is running a job."""
        entry: dict[str, object] = {"device": self.device, "state": self.state}
        if self.worker is not None:
            entry["worker"] = self.worker.name
            entry["busy"] = self.worker.current_job_id is not None
        if self.error:
            entry["error"] = self.error
        return entry
