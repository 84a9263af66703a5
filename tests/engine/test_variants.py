"""The variant registry: defaults, and every provider's spelling of every id."""

from __future__ import annotations

import pytest

from kleinserve.engine.variants import VARIANTS, find_variant, variant_ids
from kleinserve.errors import UnknownModelError


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("flux-2-klein-4b", "flux-2-klein-4b"),
        ("black-forest-labs-flux-2-klein-9b", "flux-2-klein-9b"),  # Oxen
        ("black-forest-labs/flux-2-klein-9b", "flux-2-klein-9b"),  # 1min.ai, AIgateway
        ("flux2-klein-base-4b", "flux-2-klein-base-4b"),  # Verda
        ("black-forest-labs/FLUX.2-klein-base-9B", "flux-2-klein-base-9b"),  # hub repo id
        ("  FLUX-2-KLEIN-4B ", "flux-2-klein-4b"),
    ],
)
def test_every_spelling_finds_its_variant(name: str, expected: str) -> None:
    assert find_variant(name).id == expected


def test_unknown_model_lists_known_ids() -> None:
    with pytest.raises(UnknownModelError) as info:
        find_variant("flux-1-dev")
    assert "flux-1-dev" in info.value.message
    for variant_id in variant_ids():
        assert variant_id in info.value.message


def test_defaults_follow_distillation() -> None:
    for variant in VARIANTS:
        if variant.distilled:
            assert (variant.default_steps, variant.default_guidance, variant.uses_cfg) == (4, 1.0, False)
        else:
            assert (variant.default_steps, variant.default_guidance, variant.uses_cfg) == (50, 4.0, True)
        assert variant.repo_id.startswith("black-forest-labs/FLUX.2-klein-")
        assert variant.text_encoder_layers == (9, 18, 27)


def test_licences() -> None:
    for variant in VARIANTS:
        if "9b" in variant.id:
            assert variant.gated and "Non-Commercial" in variant.license
        else:
            assert not variant.gated and variant.license == "Apache-2.0"


def test_aliases_are_unique() -> None:
    names = [name.lower() for v in VARIANTS for name in v.all_names()]
    assert len(names) == len(set(names))
