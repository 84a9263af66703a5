"""Staged FLUX.2 [klein] generation on the diffusers and transformers components.

The stages of ``Flux2KleinPipeline.__call__`` are taken apart so that the server can cache prompt
embeddings, report progress after every step and cancel between steps: (1) prompt encoding that runs
the text encoder only up to its deepest tapped layer (the CFG negative too: "" or the request's
negative prompt, both through the prompt cache), (2) reference-image encoding, (3) the
flow-matching denoising loop, with true CFG for the undistilled variants, (4) VAE decoding.

Reproducibility contract: for the same weights, inputs, device and dtype this produces the pixels
``Flux2KleinPipeline`` produces with ``generator=torch.Generator("cpu").manual_seed(seed)``; image
``i`` of a request uses ``seed + i``. The tests hold the engine to it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from PIL import Image

from kleinserve.engine.cache import PromptCache
from kleinserve.engine.denoising import Blend, Conditioning, Denoiser, denoising_schedule
from kleinserve.engine.kv import ReferenceKV, use_kv_processors
from kleinserve.engine.preview import Previewer
from kleinserve.engine.progress import CancelCheck, Progress, ProgressCallback, check_cancel
from kleinserve.engine.prompt import check_layers, encode_prompt
from kleinserve.engine.references import encode_references, preprocess_reference
from kleinserve.engine.stepcache import StepCache, step_caching
from kleinserve.engine.vae import decode_packed
from kleinserve.engine.variants import Variant
from kleinserve.errors import ResourceExhaustedError

if TYPE_CHECKING:
    from diffusers import Flux2KleinPipeline

    from kleinserve.engine.lora import Adapters

DEFAULT_SIZE = 1024


@dataclass(frozen=True)
class EngineInputs:
    """Fully resolved inputs of one generation (defaults already applied by the caller)."""

    prompt: str
    steps: int
    guidance: float
    seed: int
    num_images: int = 1
    references: Sequence[Image.Image] = ()
    width: int | None = None
    height: int | None = None
    # The CFG negative of the Base variants; "" is diffusers' own negative. Ignored without CFG
    # (the request layer refuses a negative prompt there, so nothing is dropped silently).
    negative_prompt: str = ""
    # Step caching of the Base variants (engine/stepcache.py); None: every step runs in full.
    step_cache: StepCache | None = None
    # Image-to-image (engine/img2img.py): start from references[0] noised to this part of the
    # schedule, 0 < strength <= 1; None: text-to-image / reference editing.
    strength: float | None = None
    # Inpainting (engine/inpaint.py): ``L``, references[0]'s size, 255 = repaint, 0 = keep; with it
    # strength defaults to 1.0. None: no mask.
    mask: Image.Image | None = None


@dataclass
class EngineOutput:
    """Generated images with the parameters that actually made them."""

    images: list[Image.Image]
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance: float
    cfg: bool
    timings: dict[str, float] = field(default_factory=dict)


class Engine:
    """One loaded klein model on one device: typed inputs in, PIL images out.

    Not thread-safe: a worker owns an engine and runs one generation at a time.
    """

    def __init__(
        self,
        pipeline: Flux2KleinPipeline,
        variant: Variant,
        device: torch.device | None = None,
        text_encoder_device: torch.device | None = None,
    ) -> None:
        """``device`` is where the pipeline computes and ``text_encoder_device`` where the text
        encoder's inputs go; both default to where the weights are, and differ from it under
        offloading (engine/loading.py)."""
        self.pipeline = pipeline
        self.variant = variant
        self._device = device
        self._text_encoder_device = text_encoder_device
        self.adapters: Adapters | None = None  # LoRA adapters offered on this pipeline (engine/lora.py)
        self.layers = tuple(variant.text_encoder_layers)
        check_layers(pipeline.text_encoder, self.layers)
        self._empty_embedding: torch.Tensor | None = None
        if variant.kv_cache:
            use_kv_processors(pipeline.transformer)
        # Shared by the engines of a process (engine/cache.py); None: every prompt is encoded.
        self.prompt_cache: PromptCache | None = None
        # CFG's two passes as one batch (engine/guidance.py); None: on CUDA only (KLEINSERVE_CFG_BATCH).
        self.cfg_batch: bool | None = None
        self.vae_tile_above_pixels = 0  # tiled VAE decoding above this many pixels (engine/vae.py); 0: never
        self.step_cache: StepCache | None = None  # the server's default for Base requests (KLEINSERVE_STEP_CACHE)
        self.previews = Previewer(pipeline)  # live previews; .tiny set from KLEINSERVE_PREVIEW_DECODER

    @property
    def device(self) -> torch.device:
        device: torch.device = self._device or self.pipeline.transformer.device
        return device

    @property
    def cfg_in_one_batch(self) -> bool:
        return self.cfg_batch if self.cfg_batch is not None else self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.pipeline.transformer.dtype
        return dtype

    # -- stage 1: prompt (engine/prompt.py) -----------------------------------------------------

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """The prompt embedding ``(1, 512, 3 * hidden)``: stacked hidden states of the tapped layers.

        Runs the decoder layers only up to the deepest tap; the final norm and the LM head never run.
        """
        return encode_prompt(self.pipeline, self.layers, prompt, self._text_encoder_device, self.device)

    def prompt_embedding(self, prompt: str) -> torch.Tensor:
        """:meth:`encode_prompt` through the prompt cache, when the engine has one."""
        if self.prompt_cache is None:
            return self.encode_prompt(prompt)
        return self.prompt_cache.get_or_compute(self.variant.id, prompt, lambda: self.encode_prompt(prompt))

    def negative_embedding(self, negative_prompt: str) -> torch.Tensor:
        """The CFG negative: the empty prompt's embedding, or ``negative_prompt``'s through the cache."""
        return self.prompt_embedding(negative_prompt) if negative_prompt else self.empty_prompt_embedding()

    def empty_prompt_embedding(self) -> torch.Tensor:
        """The embedding of the empty prompt (the CFG negative): from the cache, else computed once."""
        if self.prompt_cache is not None:
            return self.prompt_embedding("")
        if self._empty_embedding is None:
            self._empty_embedding = self.encode_prompt("")
        return self._empty_embedding

    # -- stage 2: references (engine/references.py) ---------------------------------------------

    def preprocess_reference(self, image: Image.Image) -> torch.Tensor:
        """Resize (to at most 1 MP) and crop a reference to the 16-pixel grid, as diffusers does."""
        return preprocess_reference(self.pipeline, image)

    def encode_references(
        self, images: Sequence[Image.Image], batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """VAE latents and position ids of the references, and the first reference's (width, height)."""
        return encode_references(self.pipeline, images, batch_size, self.device)

    # -- stages 3 and 4: denoise (engine/denoising.py) and decode (engine/vae.py) ---------------

    @torch.inference_mode()
    def generate(
        self,
        inputs: EngineInputs,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        prompt_embedding: torch.Tensor | None = None,
    ) -> EngineOutput:
        """Run a whole generation. ``prompt_embedding`` may come from a cache of :meth:`encode_prompt`.

        Raises :class:`GenerationCancelledError` when ``should_cancel`` turns true between steps and
        :class:`ResourceExhaustedError` when the device runs out of memory.
        """
        try:
            step_cache = inputs.step_cache if self.variant.uses_cfg else None  # never on distilled variants
            with step_caching(self.pipeline.transformer, step_cache):
                return self._generate(inputs, on_progress, should_cancel, prompt_embedding)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise ResourceExhaustedError(
                f"out of {self.device} memory for {inputs.num_images} image(s) at this size; "
                "ask for fewer or smaller images"
            ) from None

    def _generate(
        self,
        inputs: EngineInputs,
        on_progress: ProgressCallback | None,
        should_cancel: CancelCheck | None,
        prompt_embedding: torch.Tensor | None,
    ) -> EngineOutput:
        pipe = self.pipeline
        report = on_progress or (lambda _p: None)
        cancelled = should_cancel or (lambda: False)
        timings: dict[str, float] = {}
        n = inputs.num_images
        cfg = self.variant.uses_cfg and inputs.guidance > 1.0 and not pipe.config.is_distilled

        started = time.perf_counter()
        report(Progress("encode_prompt", 0, 1))
        embedding = prompt_embedding if prompt_embedding is not None else self.prompt_embedding(inputs.prompt)
        prompt_embeds = embedding.expand(n, -1, -1)
        text = Conditioning(prompt_embeds, pipe._prepare_text_ids(prompt_embeds).to(self.device))
        if cfg:
            negative_embeds = self.negative_embedding(inputs.negative_prompt).expand(n, -1, -1)
            negative_ids = pipe._prepare_text_ids(negative_embeds).to(self.device)
            text = replace(text, negative_embeds=negative_embeds, negative_ids=negative_ids)
        timings["encode_prompt"] = time.perf_counter() - started

        if (inputs.strength is not None or inputs.mask is not None) and inputs.references:
            return self._generate_from_image(inputs, report, cancelled, timings, text)

        conditioning = text
        width, height = inputs.width, inputs.height
        if inputs.references:
            started = time.perf_counter()
            report(Progress("encode_references", 0, len(inputs.references)))
            ref_latents, ref_ids, first_size = self.encode_references(inputs.references, n)
            if width is None or height is None:
                width, height = first_size
            kv = None
            if self.variant.kv_cache:
                # klein 9B-KV: reference K/V computed at step 0 and reused (engine/kv.py); local to this call.
                kv = ReferenceKV(ref_latents, ref_ids)
            conditioning = replace(text, ref_latents=ref_latents, ref_ids=ref_ids, kv=kv)
            timings["encode_references"] = time.perf_counter() - started
        width = width or DEFAULT_SIZE
        height = height or DEFAULT_SIZE
        check_cancel(cancelled)

        started = time.perf_counter()
        seeds = [inputs.seed + i for i in range(n)]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        latents, latent_ids = pipe.prepare_latents(
            batch_size=n,
            num_latents_channels=pipe.transformer.config.in_channels // 4,
            height=height,
            width=width,
            dtype=prompt_embeds.dtype,
            device=self.device,
            generator=generators,
        )
        scheduler, timesteps = denoising_schedule(pipe, inputs.steps, latents.shape[1], self.device)
        denoiser = self._denoiser(inputs, scheduler, timesteps, conditioning, width, height)
        return self._denoise_and_decode(
            inputs, denoiser, latents, latent_ids, seeds, report, cancelled, timings, started
        )

    def _generate_from_image(
        self,
        inputs: EngineInputs,
        report: ProgressCallback,
        cancelled: CancelCheck,
        timings: dict[str, float],
        text: Conditioning,
    ) -> EngineOutput:
        """Image-to-image with ``inputs.strength`` (engine/img2img.py), inpainting where ``inputs.mask``
        says (engine/inpaint.py): the output has the first image's size."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from kleinserve.engine.img2img import starting_point
        from kleinserve.engine.inpaint import DEFAULT_STRENGTH, mask_blend

        strength = inputs.strength if inputs.strength is not None else DEFAULT_STRENGTH
        if not 0 < strength <= 1:
            raise ValueError("strength must be in (0, 1]")
        started = time.perf_counter()
        report(Progress("encode_references", 0, len(inputs.references)))
        seeds = [inputs.seed + i for i in range(inputs.num_images)]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        dtype = text.prompt_embeds.dtype
        start = starting_point(
            self.pipeline, inputs.references, strength, inputs.steps, scheduler, generators, dtype, self.device
        )
        blend = None
        if inputs.mask is not None:
            blend = mask_blend(self.pipeline, inputs.mask, start, dtype, self.device)
        timings["encode_references"] = time.perf_counter() - started
        check_cancel(cancelled)
        conditioning = replace(text, ref_latents=start.condition_latents, ref_ids=start.condition_ids)
        denoiser = self._denoiser(inputs, scheduler, start.timesteps, conditioning, start.width, start.height, blend)
        return self._denoise_and_decode(
            inputs, denoiser, start.latents, start.latent_ids, seeds, report, cancelled, timings, time.perf_counter()
        )

    def _denoiser(
        self,
        inputs: EngineInputs,
        scheduler: object,
        timesteps: torch.Tensor,
        conditioning: Conditioning,
        width: int,
        height: int,
        blend: Blend | None = None,
    ) -> Denoiser:
        return Denoiser(
            self.pipeline.transformer, scheduler, timesteps, conditioning, inputs.guidance, self.previews,
            width, height, one_batch=self.cfg_in_one_batch, blend=blend,
        )  # fmt: skip

    def _denoise_and_decode(
        self,
        inputs: EngineInputs,
        denoiser: Denoiser,
        latents: torch.Tensor,
        latent_ids: torch.Tensor,
        seeds: list[int],
        report: ProgressCallback,
        cancelled: CancelCheck,
        timings: dict[str, float],
        started: float,
    ) -> EngineOutput:
        """The denoising loop and the VAE decode, shared by every kind of generation."""
        latents = denoiser.run(latents, latent_ids, report, cancelled)
        timings["denoise"] = time.perf_counter() - started
        check_cancel(cancelled)

        started = time.perf_counter()
        report(Progress("decode", 0, 1))
        images = self.decode(latents, latent_ids, denoiser.width, denoiser.height)
        timings["decode"] = time.perf_counter() - started
        report(Progress("decode", 1, 1))
        return EngineOutput(
            images=images,
            seeds=seeds,
            width=images[0].width,
            height=images[0].height,
            steps=inputs.steps,
            guidance=inputs.guidance,
            cfg=denoiser.conditioning.cfg,
            timings=timings,
        )

    def decode(self, latents: torch.Tensor, latent_ids: torch.Tensor, width: int, height: int) -> list[Image.Image]:
        """Unpack packed latents, undo the VAE batch-norm and decode to PIL images."""
        return decode_packed(self.pipeline, latents, latent_ids, width, height, self.device, self.vae_tile_above_pixels)
