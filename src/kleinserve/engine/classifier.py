"""The safety checker's image classifier: a transformers ``image-classification`` pipeline.

``--safety-checker MODEL`` names a hub repository (resolved like the main weights: the HF cache
first, then a download unless ``HF_HUB_OFFLINE`` is set) or a local directory. The documented
choice is ``Falconsai/nsfw_image_detection`` (ViT, Apache-2.0), the classifier Black Forest Labs'
FLUX.1 reference code runs; any image classifier with an ``nsfw`` label works (labels are compared
case-insensitively). The score of an image is the probability the model gives that label.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from kleinserve.errors import WeightsUnavailableError
from kleinserve.safety import SafetyChecker, SafetyPolicy
from kleinserve.settings import Settings

DEFAULT_CLASSIFIER = "Falconsai/nsfw_image_detection"
NSFW_LABEL = "nsfw"
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt"]


def resolve_classifier(name: str) -> Path:
    """A local directory holding the classifier ``name`` (a directory, or a hub repo id)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name.startswith("."):
        raise WeightsUnavailableError(f"safety checker directory {name} does not exist")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=_ALLOW_PATTERNS, local_files_only=True))
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        raise WeightsUnavailableError(
            f"safety checker {name} is not in the HF cache at {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is set; "
            "download it once (hf download REPO) or pass a local directory"
        )
    try:
        return Path(snapshot_download(name, allow_patterns=_ALLOW_PATTERNS))
    except Exception as err:
        raise WeightsUnavailableError(f"cannot download safety checker {name}: {err}") from None


class ImageClassifier:
    """Scores images for the ``nsfw`` label with a transformers image-classification pipeline."""

    def __init__(self, name: str, device: torch.device) -> None:
        from transformers import pipeline

        directory = resolve_classifier(name)
        try:
            self._pipeline: Any = pipeline("image-classification", model=str(directory), device=device)
        except Exception as err:
            raise WeightsUnavailableError(f"cannot load safety checker {name}: {err}") from None
        labels = {str(label).lower() for label in self._pipeline.model.config.id2label.values()}
        if NSFW_LABEL not in labels:
            raise WeightsUnavailableError(
                f"safety checker {name} has no {NSFW_LABEL!r} label (its labels: {', '.join(sorted(labels))})"
            )
        self.name = name

    def scores(self, images: Sequence[Image.Image]) -> list[float]:
        """The ``nsfw`` probability of each image, in order."""
        if not images:
            return []
        results = self._pipeline([image.convert("RGB") for image in images], top_k=None)
        return [
            float(next((r["score"] for r in result if str(r["label"]).lower() == NSFW_LABEL), 0.0))
            for result in results
        ]


def safety_checker_from_settings(settings: Settings, device: torch.device) -> SafetyChecker | None:
    """The operator's safety checker (``KLEINSERVE_SAFETY_CHECKER`` and friends), or ``None`` when off."""
    if settings.safety_checker.strip().lower() in ("", "off", "none"):
        return None
    return SafetyChecker(
        ImageClassifier(settings.safety_checker, device),
        SafetyPolicy(settings.safety_policy),
        settings.safety_threshold,
        allow_disable=settings.safety_allow_disable,
    )
