"""Tiny random-weight FLUX.2 [klein] checkpoints of the real architecture (``kleinserve make-tiny``).

The hub cannot always be reached (CI, air-gapped hosts, demos), yet every part of the engine must
run on the real classes. This module writes a diffusers-format directory with the same component
classes as the published checkpoints (Flux2Transformer2DModel, AutoencoderKLFlux2, Qwen3ForCausalLM,
FlowMatchEulerDiscreteScheduler and a Qwen2-style byte-level BPE tokenizer with a chat template),
shrunk to a few MB. It keeps what the engine depends on: a 36-layer text encoder so the real layer
taps (9, 18, 27) exist, a VAE with the real 16-pixel latent grid, and ``is_distilled`` in
``model_index.json``. The same ``seed`` always writes the same weights.

``make_tiny_autoencoder`` writes a random tiny autoencoder for the previews' decoder
(engine/tiny_autoencoder.py) that fits these checkpoints' latents.

Two presets: ``tiny`` (the default; a few MB, for tests and demos) and ``bench`` (klein 4B's real
widths with only a few transformer blocks and the 28 text-encoder layers the deepest tap needs, written
in bfloat16, about 7 GB), so ``kleinserve bench`` measures matmuls of the real shapes on any machine.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

TinyKind = Literal["distilled", "base", "kv"]
TinyPresetName = Literal["tiny", "bench"]

# Text the tiny tokenizer's BPE merges are learned from; any fixed text gives a fixed vocabulary.
_CORPUS = (
    "a red fox in snow. a cat wearing a hat. put the hat from image 2 on the cat. "
    "a photo of a mountain lake at sunrise, highly detailed, cinematic lighting. "
    "the quick brown fox jumps over the lazy dog. an astronaut riding a horse on the moon. "
    "make it a watercolor painting. replace the background with a beach. user assistant system"
)
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# The Qwen3 chat template, reduced to what a prompt encoder needs: user turns and the
# generation prompt, with the empty thinking block Qwen3 adds when enable_thinking is false.
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)
# Qwen2's pre-tokenisation split (the published tokenizer's pattern).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEXT_HIDDEN = 32
TEXT_LAYERS = 36


@dataclass(frozen=True)
class TinyPreset:
    """The sizes of a random-weight checkpoint (everything else is the published architecture)."""

    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_head_dim: int
    heads: int
    head_dim: int
    double_blocks: int
    single_blocks: int
    latent_channels: int
    rope_axes: tuple[int, ...]
    timestep_channels: int
    vae_widths: tuple[int, ...]
    vae_layers_per_block: int
    vae_groups: int
    vae_mid_attention: bool
    dtype: torch.dtype


PRESETS: dict[str, TinyPreset] = {
    # A few MB: one block of each kind, 36 text layers of width 32, 4-channel latents.
    "tiny": TinyPreset(
        text_hidden=TEXT_HIDDEN,
        text_intermediate=64,
        text_layers=TEXT_LAYERS,
        text_heads=2,
        text_kv_heads=1,
        text_head_dim=16,
        heads=2,
        head_dim=16,
        double_blocks=1,
        single_blocks=1,
        latent_channels=4,
        rope_axes=(4, 4, 4, 4),
        timestep_channels=32,
        vae_widths=(4, 4, 4, 4),
        vae_layers_per_block=0,
        vae_groups=2,
        vae_mid_attention=False,
        dtype=torch.float32,
    ),
    # klein 4B's widths (Qwen3-4B text encoder cut to the 28 layers the 9/18/27 taps need; a 3072-wide
    # transformer of 24 x 128 heads with one double-stream and two single-stream blocks instead of 5 + 20;
    # the real VAE), in bfloat16.
    "bench": TinyPreset(
        text_hidden=2560,
        text_intermediate=9728,
        text_layers=28,
        text_heads=32,
        text_kv_heads=8,
        text_head_dim=128,
        heads=24,
        head_dim=128,
        double_blocks=1,
        single_blocks=2,
        latent_channels=32,
        rope_axes=(32, 32, 32, 32),
        timestep_channels=256,
        vae_widths=(128, 256, 512, 512),
        vae_layers_per_block=2,
        vae_groups=32,
        vae_mid_attention=True,
        dtype=torch.bfloat16,
    ),
}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (a 4B-wide text encoder in float32 would need 11 GB)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_tokenizer(directory: Path) -> None:
    """Write a Qwen2-style byte-level BPE tokenizer, learned offline from a fixed corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=131072,
    )
    wrapped.chat_template = _CHAT_TEMPLATE
    wrapped.save_pretrained(str(directory))
    _set_tokenizer_class(directory)


def _set_tokenizer_class(directory: Path) -> None:
    """Name the Qwen2 tokenizer class in tokenizer_config.json, as the published checkpoints do."""
    import json

    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_tiny(directory: Path, kind: TinyKind = "distilled", seed: int = 0, preset: TinyPresetName = "tiny") -> Path:
    """Write a random-weight klein checkpoint of ``preset``'s sizes to ``directory`` and return it.

    ``kind`` chooses ``is_distilled`` (``distilled`` like klein 4B/9B, ``base`` like Base 4B/9B), or
    ``kv``: a distilled checkpoint saved as ``Flux2KleinKVPipeline``, as klein 9B-KV is published.
    The directory loads with ``Flux2KleinPipeline.from_pretrained(directory)`` (``kv``: with
    ``Flux2KleinKVPipeline``).
    """
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    if kind not in ("distilled", "base", "kv"):
        raise ValueError(f"kind must be 'distilled', 'base' or 'kv', not {kind!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    size = PRESETS[preset]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    vocab_size = len(tokenizer)

    # Each component gets its own seed offset so changing one size never reshuffles the others.
    with _default_dtype(size.dtype):
        torch.manual_seed(seed)
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=vocab_size,
                hidden_size=size.text_hidden,
                intermediate_size=size.text_intermediate,
                num_hidden_layers=size.text_layers,
                num_attention_heads=size.text_heads,
                num_key_value_heads=size.text_kv_heads,
                head_dim=size.text_head_dim,
                max_position_embeddings=1024,
                tie_word_embeddings=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )

        torch.manual_seed(seed + 1)
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * size.latent_channels,  # latent channels, patchified 2 x 2
            num_layers=size.double_blocks,  # every preset has both kinds of block, so both run
            num_single_layers=size.single_blocks,
            attention_head_dim=size.head_dim,
            num_attention_heads=size.heads,
            joint_attention_dim=3 * size.text_hidden,  # three stacked text-encoder layers
            timestep_guidance_channels=size.timestep_channels,
            axes_dims_rope=size.rope_axes,
            guidance_embeds=False,
        )

        torch.manual_seed(seed + 2)
        vae = AutoencoderKLFlux2(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,  # 4 levels: the real 8x spatial factor
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=size.vae_widths,
            # tiny: 0, so the decoder still gets one resnet per level and encoder levels only downsample
            layers_per_block=size.vae_layers_per_block,
            latent_channels=size.latent_channels,
            norm_num_groups=size.vae_groups,
            sample_size=64 if preset == "tiny" else 1024,
            mid_block_add_attention=size.vae_mid_attention,
        )
    # Non-trivial latent statistics, so the batch-norm (de)normalisation is exercised.
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.1)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)

    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
    )
    components = {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }
    if kind == "kv":
        from diffusers import Flux2KleinKVPipeline

        pipeline: Flux2KleinPipeline | Flux2KleinKVPipeline = Flux2KleinKVPipeline(**components)
    else:
        pipeline = Flux2KleinPipeline(**components, is_distilled=(kind == "distilled"))
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" would interleave with our output
    pipeline.save_pretrained(str(directory))
    _set_tokenizer_class(directory / "tokenizer")
    return directory


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the double-stream blocks' attention projections


def make_tiny_lora(checkpoint: Path, output: Path, seed: int = 0, rank: int = 4) -> Path:
    """Write a random LoRA for the tiny checkpoint's transformer to the file ``output``.

    Built with peft's ``LoraConfig`` on the attention projections and saved with diffusers'
    ``save_lora_weights``, so it loads as any trained klein LoRA does. ``init_lora_weights=False``
    makes both matrices random (a fresh trained-from-zero LoRA would change nothing).
    """
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed + 3)
    transformer = Flux2Transformer2DModel.from_pretrained(str(Path(checkpoint) / "transformer"))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    transformer.add_adapter(config)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    Flux2KleinPipeline.save_lora_weights(
        str(output.parent),
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        weight_name=output.name,
    )
    return output


def make_tiny_autoencoder(directory: Path, latent_channels: int = 16, seed: int = 0) -> Path:
    """Write a random-weight tiny autoencoder for packed latents of ``latent_channels`` (4 x the VAE's
    latent channels: 16 for ``make-tiny``'s checkpoints, 128 for klein) to ``directory``."""
    from kleinserve.engine.tiny_autoencoder import Flux2TinyAutoEncoder

    torch.manual_seed(seed + 4)
    model = Flux2TinyAutoEncoder(
        latent_channels=latent_channels,
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        norm_groups=min(8, latent_channels // 4),
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    return directory
