"""Reference K/V caching for klein 9B-KV, as diffusers' ``Flux2KleinKVPipeline`` does it.

klein 9B-KV was trained so that reference-image tokens attend only to themselves, modulated at a
fixed timestep; their keys and values then do not change across denoising steps. So step 0 runs the
transformer over the reference tokens (placed *before* the image tokens) in ``extract`` mode and
keeps every block's reference K/V; steps 1..n run on the image tokens alone in ``cached`` mode,
attending to the stored K/V. With 1-4 references this removes most of the sequence from every step
but the first. Only that checkpoint takes this path: the other klein models were not trained for it
and would make different pictures.

Pixels equal ``Flux2KleinKVPipeline``'s on the same weights (the tests hold the engine to it). The
cache belongs to one generation and is cleared when it ends, whatever happens, so a later request
never sees an earlier request's references.
"""

from __future__ import annotations

from typing import Any

import torch


def use_kv_processors(transformer: torch.nn.Module) -> None:
    """Install the attention processors that understand ``kv_cache_mode`` (the KV pipeline's own)."""
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )

    for block in transformer.transformer_blocks:  # type: ignore[union-attr]
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in transformer.single_transformer_blocks:  # type: ignore[union-attr]
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())


class ReferenceKV:
    """The reference tokens of one generation, turned into cached K/V at its first step."""

    def __init__(self, ref_latents: torch.Tensor, ref_ids: torch.Tensor) -> None:
        self.ref_latents = ref_latents
        self.ref_ids = ref_ids
        self.cache: Any = None

    def predict(
        self,
        transformer: Any,
        latents: torch.Tensor,
        latent_ids: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        text_ids: torch.Tensor,
    ) -> torch.Tensor:
        """The noise prediction for ``latents``: extracting the reference K/V first, reusing them after."""
        common = {"timestep": timestep, "guidance": None, "encoder_hidden_states": prompt_embeds, "txt_ids": text_ids}
        if self.cache is None:
            noise, self.cache = transformer(
                hidden_states=torch.cat([self.ref_latents, latents], dim=1).to(transformer.dtype),
                img_ids=torch.cat([self.ref_ids, latent_ids], dim=1),
                return_dict=False,
                kv_cache_mode="extract",
                num_ref_tokens=self.ref_latents.shape[1],
                **common,
            )
            return noise  # type: ignore[no-any-return]
        noise = transformer(
            hidden_states=latents.to(transformer.dtype),
            img_ids=latent_ids,
            return_dict=False,
            kv_cache=self.cache,
            kv_cache_mode="cached",
            **common,
        )[0]
        return noise  # type: ignore[no-any-return]

    def clear(self) -> None:
        if self.cache is not None:
            self.cache.clear()
            self.cache = None
