"""Tiny random ViT image classifiers with a fixed verdict (``kleinserve make-tiny --classifier``).

The safety checker's documented model is ``Falconsai/nsfw_image_detection`` (a ViT fine-tuned to
the labels ``normal`` and ``nsfw``), which cannot be downloaded in tests. These checkpoints have
the same classes (``ViTForImageClassification`` with a ``ViTImageProcessor``) and the same label
names, shrunk to a few KB, and load through the same transformers ``image-classification``
pipeline. The classification head's weights are zero and its bias fixed, so the verdict does not
depend on the image: ``nsfw`` always scores about 0.9999 (``verdict="nsfw"``) or about 0.0001
(``verdict="normal"``). Every safety policy can so be tested end to end, deterministically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

TinyVerdict = Literal["nsfw", "normal"]
LABELS = {0: "normal", 1: "nsfw"}  # as in Falconsai/nsfw_image_detection's config.json
_BIAS = 9.0  # softmax([0, 9]) = (0.000123, 0.999877)


def make_tiny_classifier(directory: Path, verdict: TinyVerdict = "nsfw", seed: int = 0) -> Path:
    """Write a tiny ViT classifier that always says ``verdict`` to ``directory``; return it."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    if verdict not in LABELS.values():
        raise ValueError(f"verdict must be nsfw or normal, not {verdict!r}")
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label=dict(LABELS),
        label2id={label: index for index, label in LABELS.items()},
    )
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([_BIAS, 0.0] if verdict == "normal" else [0.0, _BIAS]))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory
