"""True classifier-free guidance with both passes in one transformer batch (Base variants).

BFL's reference sampler runs the conditional and the unconditional pass as one batch of 2n; on a GPU
that is one launch of every kernel instead of two and fills the device better at small sizes. On a
CPU the matmuls are already large enough that batching gains little, so the engine's default
(``KLEINSERVE_CFG_BATCH=auto``) batches on CUDA only; ``on``/``off`` force it. The two results differ
from the two-pass run by float rounding only (the tests hold them to 2 uint8 levels).
"""

from __future__ import annotations

from typing import Any

import torch


def predict_noise(
    transformer: Any,
    model_input: torch.Tensor,
    timestep: torch.Tensor,
    embeds: torch.Tensor,
    text_ids: torch.Tensor,
    img_ids: torch.Tensor,
    image_tokens: int,
) -> torch.Tensor:
    """One transformer pass's noise prediction for the first ``image_tokens`` tokens (the image being
    made; reference tokens after them are conditioning only). ``timestep`` is already divided by 1000."""
    noise: torch.Tensor = transformer(
        hidden_states=model_input,
        timestep=timestep,
        guidance=None,
        encoder_hidden_states=embeds,
        txt_ids=text_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0][:, :image_tokens]
    return noise


def guide(positive: torch.Tensor, negative: torch.Tensor, guidance: float) -> torch.Tensor:
    """True CFG: ``negative + guidance * (positive - negative)``."""
    return negative + guidance * (positive - negative)


def guided_noise_one_batch(
    transformer: Any,
    model_input: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    negative_ids: torch.Tensor,
    img_ids: torch.Tensor,
    image_tokens: int,
    guidance: float,
) -> torch.Tensor:
    """``negative + guidance * (positive - negative)`` from one batched transformer call."""
    both = predict_noise(
        transformer,
        torch.cat([model_input, model_input]),
        torch.cat([timestep, timestep]),
        torch.cat([prompt_embeds, negative_embeds]),
        torch.cat([text_ids, negative_ids]),
        torch.cat([img_ids, img_ids]),
        image_tokens,
    )
    positive, negative = both.chunk(2)
    return guide(positive, negative, guidance)
