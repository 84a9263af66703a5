"""make-tiny writes a small, deterministic checkpoint that diffusers' own pipeline loads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from diffusers import Flux2KleinPipeline
from safetensors.torch import load_file

from kleinserve.engine.tiny import TEXT_LAYERS, make_tiny
from kleinserve.engine.variants import VARIANTS


def _weights_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*.safetensors")):
        for name, tensor in sorted(load_file(str(path)).items()):
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def test_loads_with_diffusers_pipeline(tiny_distilled: Path, tiny_base: Path) -> None:
    for directory, distilled in ((tiny_distilled, True), (tiny_base, False)):
        pipe = Flux2KleinPipeline.from_pretrained(str(directory))
        assert pipe.config.is_distilled is distilled
        assert json.loads((directory / "model_index.json").read_text())["is_distilled"] is distilled
        assert type(pipe.text_encoder).__name__ == "Qwen3ForCausalLM"
        assert type(pipe.transformer).__name__ == "Flux2Transformer2DModel"
        assert type(pipe.vae).__name__ == "AutoencoderKLFlux2"
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert pipe.vae_scale_factor == 8  # the real 16-pixel grid once patchified


def test_is_small(tiny_distilled: Path) -> None:
    size = sum(f.stat().st_size for f in tiny_distilled.rglob("*") if f.is_file())
    assert size < 5_000_000


def test_text_encoder_has_the_tapped_layers(tiny_distilled: Path) -> None:
    config = json.loads((tiny_distilled / "text_encoder" / "config.json").read_text())
    assert config["num_hidden_layers"] == TEXT_LAYERS
    for variant in VARIANTS:
        assert max(variant.text_encoder_layers) < config["num_hidden_layers"]
    transformer = json.loads((tiny_distilled / "transformer" / "config.json").read_text())
    assert transformer["joint_attention_dim"] == len(VARIANTS[0].text_encoder_layers) * config["hidden_size"]


def test_tokenizer_is_byte_level_bpe_with_a_thinking_chat_template(tiny_distilled: Path) -> None:
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_distilled))
    tokenizer = pipe.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "un café ☕"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text.startswith("<|im_start|>user\nun café ☕<|im_end|>\n<|im_start|>assistant\n<think>")
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level: every character round-trips
    assert tokenizer.pad_token == "<|endoftext|>"


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path, tiny_distilled: Path) -> None:
    again = make_tiny(tmp_path / "again", "distilled", seed=0)
    other = make_tiny(tmp_path / "other", "distilled", seed=5)
    assert _weights_digest(again) == _weights_digest(tiny_distilled)
    assert _weights_digest(other) != _weights_digest(tiny_distilled)


def test_rejects_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distilled"):
        make_tiny(tmp_path, "turbo")  # type: ignore[arg-type]
