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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from kleinserve.engine.cache import PromptCache
from kleinserve.engine.guidance import guided_noise_one_batch
from kleinserve.engine.kv import ReferenceKV, use_kv_processors
from kleinserve.engine.preview import Previewer, PreviewFn
from kleinserve.engine.stepcache import StepCache, in_cache_context, step_caching
from kleinserve.engine.vae import decode_latents
from kleinserve.engine.variants import Variant
from kleinserve.errors import GenerationCancelledError, ResourceExhaustedError

if TYPE_CHECKING:
    from diffusers import Flux2KleinPipeline

    from kleinserve.engine.lora import Adapters

Stage = Literal["encode_prompt", "encode_references", "denoise", "decode"]
DEFAULT_SIZE = 1024
REFERENCE_MAX_PIXELS = 1024 * 1024  # diffusers shrinks larger references to this area
MAX_SEQUENCE_LENGTH = 512


@dataclass(frozen=True)
class Progress:
    """Where a generation is: ``step`` of ``total`` within ``stage``.

    ``preview`` (denoising steps only) decodes this request's current x0 estimate to small images
    when called (engine/preview.py); it costs nothing unless called, and only during the callback.
    """

    stage: Stage
    step: int
    total: int
    preview: PreviewFn | None = None


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


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


class _StopEncoding(Exception):
    """Raised from a forward hook once the deepest tapped text-encoder layer has run."""


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
        n_layers = pipeline.text_encoder.config.num_hidden_layers
        if max(self.layers) >= n_layers:
            # hidden_states[n_layers] would be the final-norm output, which klein never taps.
            raise ValueError(f"text encoder has {n_layers} layers; cannot tap layer {max(self.layers)}")
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

    # -- stage 1: prompt ------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """The prompt embedding ``(1, 512, 3 * hidden)``: stacked hidden states of the tapped layers.

        Runs the decoder layers only up to the deepest tap; the final norm and the LM head never run.
        """
        pipe = self.pipeline
        text = pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        tokens = pipe.tokenizer(
            text,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=MAX_SEQUENCE_LENGTH,
        )
        encoder = pipe.text_encoder
        device = self._text_encoder_device or encoder.device
        captured: dict[int, torch.Tensor] = {}
        deepest = max(self.layers)

        def capture(index: int) -> Callable[..., None]:
            def hook(_module: torch.nn.Module, _args: object, output: object) -> None:
                captured[index] = output[0] if isinstance(output, tuple) else output  # type: ignore[assignment]
                if index == deepest:
                    raise _StopEncoding

            return hook

        # hidden_states[k] is the output of decoder layer k - 1 (k = 0 is the token embedding).
        modules = {k: encoder.model.layers[k - 1] if k > 0 else encoder.model.embed_tokens for k in self.layers}
        handles = [modules[k].register_forward_hook(capture(k)) for k in self.layers]
        try:
            # The whole model is called (not encoder.model) so offloading hooks on it run.
            encoder(
                input_ids=tokens["input_ids"].to(device),
                attention_mask=tokens["attention_mask"].to(device),
                use_cache=False,
            )
        except _StopEncoding:
            pass
        finally:
            for handle in handles:
                handle.remove()
        stacked = torch.stack([captured[k] for k in self.layers], dim=1).to(encoder.dtype)
        batch, channels, seq_len, hidden = stacked.shape
        return stacked.permute(0, 2, 1, 3).reshape(batch, seq_len, channels * hidden).to(self.device)

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

    # -- stage 2: references --------------------------------------------------------------------

    def preprocess_reference(self, image: Image.Image) -> torch.Tensor:
        """Resize (to at most 1 MP) and crop a reference to the 16-pixel grid, as diffusers does."""
        processor = self.pipeline.image_processor
        width, height = image.size
        if width * height > REFERENCE_MAX_PIXELS:
            image = processor._resize_to_target_area(image, REFERENCE_MAX_PIXELS)
            width, height = image.size
        multiple = self.pipeline.vae_scale_factor * 2
        width, height = (width // multiple) * multiple, (height // multiple) * multiple
        tensor: torch.Tensor = processor.preprocess(image, height=height, width=width, resize_mode="crop")
        return tensor

    @torch.inference_mode()
    def encode_references(
        self, images: Sequence[Image.Image], batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """VAE latents and position ids of the references, and the first reference's (width, height)."""
        pipe = self.pipeline
        tensors = [self.preprocess_reference(image) for image in images]
        first_size = (int(tensors[0].shape[-1]), int(tensors[0].shape[-2]))
        latents, ids = pipe.prepare_image_latents(
            images=tensors,
            batch_size=batch_size,
            generator=None,  # references are encoded with the posterior mode: no randomness
            device=self.device,
            dtype=pipe.vae.dtype,
        )
        return latents, ids, first_size

    # -- stages 3 and 4: denoise and decode -----------------------------------------------------

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
        text_ids = pipe._prepare_text_ids(prompt_embeds).to(self.device)
        negative_embeds = negative_ids = None
        if cfg:
            negative_embeds = self.negative_embedding(inputs.negative_prompt).expand(n, -1, -1)
            negative_ids = pipe._prepare_text_ids(negative_embeds).to(self.device)
        timings["encode_prompt"] = time.perf_counter() - started

        if (inputs.strength is not None or inputs.mask is not None) and inputs.references:
            return self._generate_from_image(inputs, report, cancelled, timings, prompt_embeds, text_ids, cfg,
                                             negative_embeds, negative_ids)  # fmt: skip

        ref_latents = ref_ids = None
        width, height = inputs.width, inputs.height
        if inputs.references:
            started = time.perf_counter()
            report(Progress("encode_references", 0, len(inputs.references)))
            ref_latents, ref_ids, first_size = self.encode_references(inputs.references, n)
            if width is None or height is None:
                width, height = first_size
            timings["encode_references"] = time.perf_counter() - started
        width = width or DEFAULT_SIZE
        height = height or DEFAULT_SIZE
        self._check_cancel(cancelled)

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

        kv = None
        if self.variant.kv_cache and ref_latents is not None and ref_ids is not None:
            # klein 9B-KV: reference K/V computed at step 0 and reused (engine/kv.py); local to this call.
            kv = ReferenceKV(ref_latents, ref_ids)
        return self._denoise_and_decode(
            inputs, report, cancelled, timings, started, seeds, scheduler, timesteps, latents, latent_ids,
            ref_latents, ref_ids, kv, prompt_embeds, text_ids, cfg, negative_embeds, negative_ids, width, height,
        )  # fmt: skip

    def _generate_from_image(
        self,
        inputs: EngineInputs,
        report: ProgressCallback,
        cancelled: CancelCheck,
        timings: dict[str, float],
        prompt_embeds: torch.Tensor,
        text_ids: torch.Tensor,
        cfg: bool,
        negative_embeds: torch.Tensor | None,
        negative_ids: torch.Tensor | None,
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
        start = starting_point(
            self.pipeline, inputs.references, strength, inputs.steps, scheduler, generators,
            prompt_embeds.dtype, self.device,
        )  # fmt: skip
        blend = None
        if inputs.mask is not None:
            blend = mask_blend(self.pipeline, inputs.mask, start, prompt_embeds.dtype, self.device)
        timings["encode_references"] = time.perf_counter() - started
        self._check_cancel(cancelled)
        return self._denoise_and_decode(
            inputs, report, cancelled, timings, time.perf_counter(), seeds, scheduler, start.timesteps,
            start.latents, start.latent_ids, start.condition_latents, start.condition_ids, None, prompt_embeds,
            text_ids, cfg, negative_embeds, negative_ids, start.width, start.height, blend,
        )  # fmt: skip

    def _denoise_and_decode(
        self,
        inputs: EngineInputs,
        report: ProgressCallback,
        cancelled: CancelCheck,
        timings: dict[str, float],
        started: float,
        seeds: list[int],
        scheduler: Any,
        timesteps: torch.Tensor,
        latents: torch.Tensor,
        latent_ids: torch.Tensor,
        ref_latents: torch.Tensor | None,
        ref_ids: torch.Tensor | None,
        kv: ReferenceKV | None,
        prompt_embeds: torch.Tensor,
        text_ids: torch.Tensor,
        cfg: bool,
        negative_embeds: torch.Tensor | None,
        negative_ids: torch.Tensor | None,
        width: int,
        height: int,
        blend: Callable[[Any, int, torch.Tensor], torch.Tensor] | None = None,
    ) -> EngineOutput:
        """The denoising loop and the VAE decode, shared by every kind of generation. ``blend``
        (inpainting) rewrites the latents after each scheduler step."""
        pipe = self.pipeline
        steps = inputs.steps

        def step(noise: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, i: int) -> torch.Tensor:
            stepped: torch.Tensor = scheduler.step(noise, t, latents, return_dict=False)[0]
            return stepped if blend is None else blend(scheduler, i, stepped)

        model_input_ids = latent_ids if ref_ids is None else torch.cat([latent_ids, ref_ids], dim=1)
        transformer = pipe.transformer
        # With step caching, each pass names its branch for the cache hooks, as diffusers' pipeline does.
        cond, uncond = in_cache_context(transformer, "cond"), in_cache_context(transformer, "uncond")
        for i, t in enumerate(timesteps):
            self._check_cancel(cancelled)
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            if kv is not None:
                noise = kv.predict(transformer, latents, latent_ids, timestep / 1000, prompt_embeds, text_ids)
                latents = step(noise, t, latents, i)
                report(self._denoised(i, timesteps, scheduler, latents, noise, latent_ids, width, height))
                continue
            model_input = latents if ref_latents is None else torch.cat([latents, ref_latents], dim=1)
            model_input = model_input.to(transformer.dtype)
            one_batch = self.cfg_in_one_batch and cond is transformer  # step-cache hooks want one pass per branch
            if cfg and one_batch and negative_embeds is not None and negative_ids is not None:
                noise = guided_noise_one_batch(
                    transformer, model_input, timestep / 1000, prompt_embeds, negative_embeds, text_ids,
                    negative_ids, model_input_ids, latents.size(1), inputs.guidance,
                )  # fmt: skip
                latents = step(noise, t, latents, i)
                report(self._denoised(i, timesteps, scheduler, latents, noise, latent_ids, width, height))
                continue
            noise = cond(
                hidden_states=model_input,
                timestep=timestep / 1000,
                guidance=None,
                encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids,
                img_ids=model_input_ids,
                return_dict=False,
            )[0][:, : latents.size(1)]
            if cfg:
                negative = uncond(
                    hidden_states=model_input,
                    timestep=timestep / 1000,
                    guidance=None,
                    encoder_hidden_states=negative_embeds,
                    txt_ids=negative_ids,
                    img_ids=model_input_ids,
                    return_dict=False,
                )[0][:, : latents.size(1)]
                noise = negative + inputs.guidance * (noise - negative)
            latents = step(noise, t, latents, i)
            report(self._denoised(i, timesteps, scheduler, latents, noise, latent_ids, width, height))
        if kv is not None:
            kv.clear()  # the references' K/V are this request's; never kept past it
        timings["denoise"] = time.perf_counter() - started
        self._check_cancel(cancelled)

        started = time.perf_counter()
        report(Progress("decode", 0, 1))
        images = self.decode(latents, latent_ids, width, height)
        timings["decode"] = time.perf_counter() - started
        report(Progress("decode", 1, 1))
        return EngineOutput(
            images=images,
            seeds=seeds,
            width=images[0].width,
            height=images[0].height,
            steps=steps,
            guidance=inputs.guidance,
            cfg=cfg,
            timings=timings,
        )

    def decode(self, latents: torch.Tensor, latent_ids: torch.Tensor, width: int, height: int) -> list[Image.Image]:
        """Unpack packed latents, undo the VAE batch-norm and decode to PIL images."""
        pipe = self.pipeline
        grid = pipe.vae_scale_factor * 2
        latents = pipe._unpack_latents_with_ids(latents, latent_ids, height // grid, width // grid)
        vae = pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
            latents.device, latents.dtype
        )
        latents = pipe._unpatchify_latents(latents * std + mean)
        decoded = decode_latents(vae, latents.to(self.device), self.vae_tile_above_pixels, pipe.vae_scale_factor)
        images: list[Image.Image] = pipe.image_processor.postprocess(decoded, output_type="pil")
        return images

    def _denoised(
        self,
        i: int,
        timesteps: torch.Tensor,
        scheduler: Any,
        latents: torch.Tensor,
        noise: torch.Tensor,
        latent_ids: torch.Tensor,
        width: int,
        height: int,
    ) -> Progress:
        """Progress after denoising step ``i``, with its lazy preview."""
        preview = self.previews.lazy(latents, noise, scheduler.sigmas, scheduler.step_index, latent_ids, width, height)
        return Progress("denoise", i + 1, len(timesteps), preview)

    @staticmethod
    def _check_cancel(cancelled: CancelCheck) -> None:
        if cancelled():
            raise GenerationCancelledError()
