"""The models live workers serve, as an ``api`` process learns them from the workers' heartbeats.

An ``api`` process loads no models: it advertises those of the workers that sent a heartbeat in the
last three heartbeat intervals (:func:`advertised_models`), and where each runs, for the model lists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kleinserve.engine.variants import Variant, find_variant
from kleinserve.errors import UnknownModelError
from kleinserve.jobs.store.base import JobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdvertisedModel:
    """A model a live worker serves, as an ``api`` process describes it (no weights here)."""

    variant: Variant
    demo: bool = False


def advertised_models(
    store: JobStore, since: float
) -> tuple[list[AdvertisedModel], dict[str, list[dict[str, object]]]]:
    """The models of the workers alive since ``since`` (a model is a demo if any worker says so), and
    per model id, the live workers serving it (device, state, worker id)."""
    ids: dict[str, bool] = {}
    devices: dict[str, list[dict[str, object]]] = {}
    for worker in store.live_workers(since=since):
        demo_ids = set(worker.info.get("demo") or [])
        for model in worker.models:
            ids[model] = ids.get(model, False) or model in demo_ids
            entry = {"device": worker.info.get("device"), "state": "ready", "worker": worker.id}
            devices.setdefault(model, []).append(entry)
    advertised = []
    for model, is_demo in sorted(ids.items()):
        try:
            advertised.append(AdvertisedModel(find_variant(model), is_demo))
        except UnknownModelError:
            log.warning("a worker serves %s, which this version does not know", model)
    return advertised, devices
