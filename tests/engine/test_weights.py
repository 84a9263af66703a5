"""Resolving and loading weights: local directories, the HF cache, and clear failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kleinserve.engine.device import pick_device, pick_dtype
from kleinserve.engine.variants import find_variant
from kleinserve.engine.weights import ModelSpec, load_engine, resolve_weights
from kleinserve.errors import InvalidParameterError, UnknownModelError, WeightsUnavailableError


def test_parse_id_and_id_path(tmp_path: Path) -> None:
    assert ModelSpec.parse("flux-2-klein-4b") == ModelSpec(find_variant("flux-2-klein-4b"))
    spec = ModelSpec.parse(f"black-forest-labs/flux-2-klein-base-9b={tmp_path}")
    assert spec.variant.id == "flux-2-klein-base-9b" and spec.path == tmp_path
    with pytest.raises(UnknownModelError):
        ModelSpec.parse("nope=/tmp")
    with pytest.raises(InvalidParameterError, match="empty path"):
        ModelSpec.parse("flux-2-klein-4b=")


def test_local_directory_serves_under_its_variant(tiny_distilled: Path) -> None:
    engine = load_engine(ModelSpec.parse(f"flux-2-klein-9b={tiny_distilled}"), torch.device("cpu"), torch.float32)
    assert engine.variant.id == "flux-2-klein-9b"


def test_is_distilled_must_agree(tiny_distilled: Path, tiny_base: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="is_distilled=true"):
        resolve_weights(ModelSpec.parse(f"flux-2-klein-base-4b={tiny_distilled}"))
    with pytest.raises(WeightsUnavailableError, match="is_distilled=false"):
        resolve_weights(ModelSpec.parse(f"flux-2-klein-4b={tiny_base}"))


def test_missing_and_foreign_directories(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        resolve_weights(ModelSpec.parse(f"flux-2-klein-4b={tmp_path / 'nothing'}"))
    with pytest.raises(WeightsUnavailableError, match=r"no model_index\.json"):
        resolve_weights(ModelSpec.parse(f"flux-2-klein-4b={tmp_path}"))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(WeightsUnavailableError, match="not a Flux2KleinPipeline"):
        resolve_weights(ModelSpec.parse(f"flux-2-klein-4b={tmp_path}"))


def test_corrupt_directory_is_a_clear_error(tmp_path: Path, tiny_distilled: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_distilled, broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    with pytest.raises(WeightsUnavailableError, match="cannot load the model"):
        load_engine(ModelSpec.parse(f"flux-2-klein-4b={broken}"), torch.device("cpu"), torch.float32)


def _hub_cache_copy(cache: Path, repo_id: str, source: Path) -> None:
    """Lay ``source`` out as huggingface_hub's cache does for ``repo_id`` at one revision."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(source, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)


def test_hub_id_found_in_the_hf_cache(tmp_path: Path, tiny_distilled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _hub_cache_copy(cache, "black-forest-labs/FLUX.2-klein-4B", tiny_distilled)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    directory = resolve_weights(ModelSpec.parse("flux-2-klein-4b"))
    assert (directory / "model_index.json").is_file()


def test_hub_unreachable_says_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_weights(ModelSpec.parse("flux-2-klein-9b"))
    message = info.value.message
    assert "not in the HF cache" in message and "HF_HUB_OFFLINE" in message
    assert "HF_TOKEN" in message and "licence" in message  # 9B is gated
    assert "--model flux-2-klein-9b=PATH" in message


def test_device_and_dtype_choice() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    assert pick_dtype(torch.device("cpu"), "float32") is torch.float32
    assert pick_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    assert pick_dtype(torch.device("cpu"), "auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(InvalidParameterError, match="dtype"):
        pick_dtype(torch.device("cpu"), "int8")
    with pytest.raises(InvalidParameterError, match="device"):
        pick_device("potato")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidParameterError, match="CUDA"):
            pick_device("cuda")
