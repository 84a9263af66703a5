"""The flow-matching denoising loop of one FLUX.2 [klein] generation, shared by every kind of it.

:func:`denoising_schedule` sets a private scheduler as ``Flux2KleinPipeline`` does. :class:`Denoiser`
then runs the steps: cancellation is checked before each; the transformer sees the latents with the
reference latents appended (klein 9B-KV: their K/V computed at step 0 and reused, engine/kv.py); the
undistilled variants get true CFG, as two passes or as one batch of two (engine/guidance.py); the
scheduler steps, inpainting blends the kept area back (engine/inpaint.py), and progress is reported
with a lazy preview of the x0 estimate (engine/preview.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kleinserve.engine.guidance import guide, guided_noise_one_batch, predict_noise
from kleinserve.engine.kv import ReferenceKV
from kleinserve.engine.preview import Previewer
from kleinserve.engine.progress import CancelCheck, Progress, ProgressCallback, check_cancel
from kleinserve.engine.stepcache import in_cache_context

Blend = Callable[[Any, int, torch.Tensor], torch.Tensor]  # (scheduler, step index, stepped latents)


def denoising_schedule(pipe: Any, steps: int, image_seq_len: int, device: torch.device) -> tuple[Any, torch.Tensor]:
    """A private scheduler (the pipeline's own carries step state) set to ``steps`` timesteps as
    ``Flux2KleinPipeline`` sets them: linear sigmas unless the config uses flow sigmas, shifted by
    the empirical mu of the image's sequence length. Returns (scheduler, timesteps)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sigmas: np.ndarray | None = np.linspace(1.0, 1 / steps, steps)
    if getattr(scheduler.config, "use_flow_sigmas", False):
        sigmas = None
    mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=steps)
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler, timesteps


@dataclass(frozen=True)
class Conditioning:
    """What the images are denoised towards, one row per image: the prompt's embedding and text ids;
    with CFG the negative's (``None``: no CFG); the references' latents and position ids, or their
    cached K/V (``kv``, klein 9B-KV)."""

    prompt_embeds: torch.Tensor
    text_ids: torch.Tensor
    negative_embeds: torch.Tensor | None = None
    negative_ids: torch.Tensor | None = None
    ref_latents: torch.Tensor | None = None
    ref_ids: torch.Tensor | None = None
    kv: ReferenceKV | None = None

    @property
    def cfg(self) -> bool:
        return self.negative_embeds is not None


@dataclass
class Denoiser:
    """The denoising loop of one generation of a ``width`` x ``height`` image.

    ``one_batch``: CFG's two passes as one transformer batch (not with step caching, whose hooks want
    one pass per branch). ``blend`` (inpainting) rewrites the latents after each scheduler step.
    """

    transformer: Any
    scheduler: Any
    timesteps: torch.Tensor
    conditioning: Conditioning
    guidance: float
    previews: Previewer
    width: int
    height: int
    one_batch: bool = False
    blend: Blend | None = None

    def run(
        self, latents: torch.Tensor, latent_ids: torch.Tensor, report: ProgressCallback, cancelled: CancelCheck
    ) -> torch.Tensor:
        """Denoise ``latents`` (packed, at ``timesteps[0]``) through every timestep; the clean latents."""
        model_ids = (
            latent_ids
            if self.conditioning.ref_ids is None
            else torch.cat([latent_ids, self.conditioning.ref_ids], dim=1)
        )
        for i, t in enumerate(self.timesteps):
            check_cancel(cancelled)
            timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
            noise = self._noise(latents, latent_ids, model_ids, timestep)
            stepped: torch.Tensor = self.scheduler.step(noise, t, latents, return_dict=False)[0]
            latents = stepped if self.blend is None else self.blend(self.scheduler, i, stepped)
            report(self._progress(i, latents, noise, latent_ids))
        if self.conditioning.kv is not None:
            self.conditioning.kv.clear()  # the references' K/V are this request's; never kept past it
        return latents

    def _noise(
        self, latents: torch.Tensor, latent_ids: torch.Tensor, model_ids: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        """The (guided) noise prediction of one step for ``latents``: through the references' cached K/V
        (9B-KV), as one CFG batch, or as one pass per branch."""
        c, transformer = self.conditioning, self.transformer
        if c.kv is not None:
            return c.kv.predict(transformer, latents, latent_ids, timestep, c.prompt_embeds, c.text_ids)
        model_input = latents if c.ref_latents is None else torch.cat([latents, c.ref_latents], dim=1)
        model_input = model_input.to(transformer.dtype)
        tokens = latents.size(1)
        # With step caching, each pass names its branch for the cache hooks, as diffusers' pipeline does;
        # those hooks want one pass per branch, so CFG is batched only without them.
        cond = in_cache_context(transformer, "cond")
        if c.negative_embeds is None or c.negative_ids is None:
            return predict_noise(cond, model_input, timestep, c.prompt_embeds, c.text_ids, model_ids, tokens)
        if self.one_batch and cond is transformer:
            return guided_noise_one_batch(
                transformer, model_input, timestep, c.prompt_embeds, c.negative_embeds, c.text_ids,
                c.negative_ids, model_ids, tokens, self.guidance,
            )  # fmt: skip
        positive = predict_noise(cond, model_input, timestep, c.prompt_embeds, c.text_ids, model_ids, tokens)
        uncond = in_cache_context(transformer, "uncond")
        negative = predict_noise(uncond, model_input, timestep, c.negative_embeds, c.negative_ids, model_ids, tokens)
        return guide(positive, negative, self.guidance)

    def _progress(self, i: int, latents: torch.Tensor, noise: torch.Tensor, latent_ids: torch.Tensor) -> Progress:
        """Progress after denoising step ``i``, with its lazy preview."""
        scheduler = self.scheduler
        preview = self.previews.lazy(
            latents, noise, scheduler.sigmas, scheduler.step_index, latent_ids, self.width, self.height
        )
        return Progress("denoise", i + 1, len(self.timesteps), preview)
