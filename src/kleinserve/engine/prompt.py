"""Prompt encoding for FLUX.2 [klein]: the text encoder's hidden states at the variant's tapped layers.

The prompt goes through the tokenizer's chat template (thinking off) and is padded to
:data:`MAX_SEQUENCE_LENGTH` tokens, as ``Flux2KleinPipeline`` does. The decoder layers run only up to
the deepest tapped layer: a forward hook on it stops the model, so the later layers, the final norm
and the LM head never run. The embedding is the tapped hidden states stacked along the channels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

MAX_SEQUENCE_LENGTH = 512


class _StopEncoding(Exception):
    """Raised from a forward hook once the deepest tapped text-encoder layer has run."""


def check_layers(text_encoder: Any, layers: Sequence[int]) -> None:
    """Refuse taps past the text encoder's last decoder layer."""
    n_layers = text_encoder.config.num_hidden_layers
    if max(layers) >= n_layers:
        # hidden_states[n_layers] would be the final-norm output, which klein never taps.
        raise ValueError(f"text encoder has {n_layers} layers; cannot tap layer {max(layers)}")


@torch.inference_mode()
def encode_prompt(
    pipeline: Any, layers: Sequence[int], prompt: str, input_device: torch.device | None, device: torch.device
) -> torch.Tensor:
    """The prompt embedding ``(1, 512, len(layers) * hidden)`` on ``device``: stacked hidden states of
    the tapped ``layers``. The tokens go to ``input_device`` (default: where the encoder's weights are)."""
    text = pipeline.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    tokens = pipeline.tokenizer(
        text,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=MAX_SEQUENCE_LENGTH,
    )
    encoder = pipeline.text_encoder
    input_device = input_device or encoder.device
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def capture(index: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: object, output: object) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output  # type: ignore[assignment]
            if index == deepest:
                raise _StopEncoding

        return hook

    # hidden_states[k] is the output of decoder layer k - 1 (k = 0 is the token embedding).
    modules = {k: encoder.model.layers[k - 1] if k > 0 else encoder.model.embed_tokens for k in layers}
    handles = [modules[k].register_forward_hook(capture(k)) for k in layers]
    try:
        # The whole model is called (not encoder.model) so offloading hooks on it run.
        encoder(
            input_ids=tokens["input_ids"].to(input_device),
            attention_mask=tokens["attention_mask"].to(input_device),
            use_cache=False,
        )
    except _StopEncoding:
        pass
    finally:
        for handle in handles:
            handle.remove()
    stacked = torch.stack([captured[k] for k in layers], dim=1).to(encoder.dtype)
    batch, channels, seq_len, hidden = stacked.shape
    return stacked.permute(0, 2, 1, 3).reshape(batch, seq_len, channels * hidden).to(device)
