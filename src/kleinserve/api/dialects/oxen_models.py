"""Oxen.ai's model catalogue: model ids, model objects and each caller's favourite models."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from kleinserve.api.auth import Caller
from kleinserve.api.dialects.oxen_schema import REQUEST_SCHEMA
from kleinserve.engine.variants import Variant
from kleinserve.errors import NotFoundError
from kleinserve.roster import AdvertisedModel
from kleinserve.runtime import Runtime

if TYPE_CHECKING:  # the engine (torch) stays out of api-only processes
    from kleinserve.engine.catalog import ServedModel


def oxen_id(variant: Variant) -> str:
    """Oxen's hyphenated id, e.g. ``black-forest-labs-flux-2-klein-4b``."""
    return f"black-forest-labs-{variant.id}"


def model_object(runtime: Runtime, variant: Variant, demo: bool) -> dict[str, Any]:
    """A model as Oxen's /models lists it, with the request schema under both of Oxen's keys."""
    steps = "fixed 4-step distilled" if variant.distilled else "undistilled, 50 steps with true CFG"
    return {
        "id": oxen_id(variant),
        "object": "model",
        "created": int(runtime.started_at),
        "owned_by": "black-forest-labs",
        "display_name": variant.display_name,
        "description": f"{variant.display_name} from Black Forest Labs ({steps}), served by kleinserve.",
        "summary": f"{variant.display_name}: text-to-image and multi-reference editing.",
        "model_type": "base",
        "endpoint": "/images/generate",
        "capabilities": {"input": ["text", "image"], "output": ["image"]},
        "pricing": {"method": "per_image", "cost_per_image": None},
        "fine_tuning": None,
        "deployments": deployments(runtime, variant),
        "developer": {"name": "Black Forest Labs", "logo": None},
        "source_model": variant.repo_id,
        "image_url": None,
        "released_at": None,
        "license": variant.license,
        "defaults": {"num_inference_steps": variant.default_steps, "guidance_scale": variant.default_guidance},
        "aliases": list(variant.all_names()),
        "demo": demo,
        "request_schema": REQUEST_SCHEMA,
        "json_request_schema": REQUEST_SCHEMA,
    }


FAVORITES = "favorites"  # storage folder: one JSON list of Oxen model ids per caller


def _favorites_key(caller: Caller) -> str:
    # Key ids are the owners; hashed so that no owner text ever shapes a storage path.
    owner = caller.owner or "open-server"
    return f"{FAVORITES}/{hashlib.sha256(owner.encode()).hexdigest()[:32]}.json"


def read_favorites(runtime: Runtime, caller: Caller) -> list[str]:
    try:
        stored = json.loads(runtime.read_asset(_favorites_key(caller)))
    except NotFoundError:
        return []
    return [item for item in stored if isinstance(item, str)] if isinstance(stored, list) else []


def write_favorites(runtime: Runtime, caller: Caller, ids: list[str]) -> None:
    runtime.storage.put(_favorites_key(caller), json.dumps(ids).encode(), "application/json")


def served_or_404(runtime: Runtime, model_id: str) -> ServedModel | AdvertisedModel:
    served = runtime.served_model(model_id)
    if served is None:
        raise NotFoundError(f"Model not found: {model_id}")
    return served


def deployments(runtime: Runtime, variant: Variant) -> list[dict[str, Any]]:
    """Oxen's deployments: one per device running the model (``status`` ``active`` when its worker is
    ready, else ``loading`` or ``error``), with kleinserve's device, worker and busy beside it."""
    listed = [
        {"status": "active" if entry["state"] == "ready" else entry["state"], **entry}
        for entry in runtime.model_devices(variant.id)
    ]
    return listed or [{"status": "active"}]
