"""``kleinserve generate``: images from a prompt (and reference images), written to files."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kleinserve.cli.console import err_console, fail, out_console
from kleinserve.cli.options import DecoderOption, DeviceOption, DtypeOption, build_settings
from kleinserve.errors import InvalidParameterError, KleinserveError
from kleinserve.request import ASPECT_RATIOS, MEGAPIXELS, GenerationRequest, OutputFormat, size_for_aspect_ratio

_SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
_STAGE_LABELS = {
    "encode_prompt": "encoding prompt",
    "encode_references": "encoding references",
    "denoise": "denoising",
    "decode": "decoding",
}


def _size(
    width: int | None, height: int | None, aspect_ratio: str | None, megapixels: float | None
) -> tuple[int | None, int | None]:
    if aspect_ratio is None and megapixels is None:
        return width, height
    if width is not None or height is not None:
        raise InvalidParameterError("size", "give either --width/--height or --aspect-ratio/--megapixels, not both")
    return size_for_aspect_ratio(aspect_ratio or "1:1", megapixels if megapixels is not None else 1.0)


def _output_format(flag: str | None, suffix_format: str | None) -> OutputFormat:
    try:
        return OutputFormat.parse(flag) if flag else OutputFormat(suffix_format or "png")
    except ValueError as err:
        raise InvalidParameterError("output_format", str(err)) from None


def _output_paths(output: Path, fmt: OutputFormat, prompt: str, seeds: list[int]) -> list[Path]:
    """Paths to write: ``output`` itself for one image with a file name, else files in a directory."""
    if output.suffix.lower() in _SUFFIX_FORMATS:
        output.parent.mkdir(parents=True, exist_ok=True)
        if len(seeds) == 1:
            return [output]
        return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(len(seeds))]
    output.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "image"
    extension = "jpg" if fmt is OutputFormat.JPEG else fmt.value
    paths = []
    for seed in seeds:
        path = output / f"{slug}-{seed}.{extension}"
        counter = 1
        while path.exists():
            path = output / f"{slug}-{seed}-{counter}.{extension}"
            counter += 1
        paths.append(path)
    return paths


def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw, or how to edit the reference images.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Variant id, or ID=PATH for a local directory.")] = (
        "flux-2-klein-4b"
    ),
    image: Annotated[
        Optional[list[str]],
        typer.Option("--image", "-i", help="Reference image (path, URL, base64 or data URI); repeatable."),
    ] = None,
    width: Annotated[Optional[int], typer.Option(help="Output width, a multiple of 16.")] = None,
    height: Annotated[Optional[int], typer.Option(help="Output height, a multiple of 16.")] = None,
    aspect_ratio: Annotated[
        Optional[str], typer.Option("--aspect-ratio", "-a", help=f"One of {', '.join(ASPECT_RATIOS)}.")
    ] = None,
    megapixels: Annotated[
        Optional[float], typer.Option(help=f"One of {', '.join(f'{m:g}' for m in MEGAPIXELS)} (with --aspect-ratio).")
    ] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default: the variant's).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale (default: the variant's).")] = None,
    negative_prompt: Annotated[
        Optional[str], typer.Option("--negative-prompt", help="What to steer away from (Base variants: true CFG).")
    ] = None,
    strength: Annotated[
        Optional[float], typer.Option(help="Image-to-image from the first -i image: 0-1 of the schedule.")
    ] = None,
    mask: Annotated[
        Optional[str],
        typer.Option(help="Inpainting mask for the first -i image: a PNG of its size, transparent = repaint."),
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the first image; image i uses seed + i.")] = None,
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="How many images.")] = 1,
    fmt: Annotated[
        Optional[str], typer.Option("--format", "-f", help="png, jpeg (jpg) or webp (default: from -o, else png).")
    ] = None,
    quality: Annotated[int, typer.Option(help="JPEG/WebP quality, 1-100.")] = 95,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    decoder: DecoderOption = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory (created) or file name.")] = Path("out"),
) -> None:
    """Generate images from a prompt, optionally editing 1-4 reference images."""
    from kleinserve.engine.decoder import DecoderSpec, resolve_decoder
    from kleinserve.engine.device import dtype_name, pick_device, pick_dtype
    from kleinserve.engine.images import InputPolicy, load_references
    from kleinserve.engine.loading import LoadOptions
    from kleinserve.engine.masks import check_mask_size, load_mask
    from kleinserve.engine.weights import ModelSpec, load_engine
    from kleinserve.generation import run_request

    settings = build_settings(device=device, dtype=dtype, decoder=decoder)
    try:
        spec = ModelSpec.parse(model)
        suffix_format = _SUFFIX_FORMATS.get(output.suffix.lower())
        chosen = _output_format(fmt, suffix_format)
        if suffix_format and chosen.value != suffix_format:
            raise InvalidParameterError("format", f"--format {chosen.value} does not match the file name {output.name}")
        w, h = _size(width, height, aspect_ratio, megapixels)
        request = GenerationRequest.parse(
            {
                "model": spec.variant.id,
                "prompt": prompt,
                "negative_prompt": negative_prompt,
                "strength": strength,
                "mask": mask,
                "images": image or [],
                "width": w,
                "height": h,
                "steps": steps,
                "guidance": guidance,
                "seed": seed,
                "num_images": num_images,
                "output_format": chosen,
                "quality": quality,
            },
            settings,
        )
        policy = InputPolicy.from_settings(settings, allow_paths=True, check_hosts=False)  # a local user
        references = load_references(request.images, policy)
        mask_image = load_mask(request.mask, policy) if request.mask else None
        if mask_image is not None:
            check_mask_size(mask_image.size, references[0].size)  # before the model loads
        torch_device = pick_device(settings.device)
        torch_dtype = pick_dtype(torch_device, settings.dtype)
        vae = resolve_decoder(DecoderSpec.parse(settings.decoder))  # --decoder small: before the model loads
        options = LoadOptions(torch_dtype, vae=vae) if vae is not None else None
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        ) as progress:
            task = progress.add_task(f"loading {spec} on {torch_device} ({dtype_name(torch_dtype)})", total=None)
            started = time.perf_counter()
            engine = load_engine(spec, torch_device, torch_dtype, options=options)
            load_seconds = time.perf_counter() - started

            def on_progress(p: Any) -> None:
                progress.update(task, description=_STAGE_LABELS[p.stage], completed=p.step, total=p.total)

            result = run_request(request, engine, references, mask=mask_image, on_progress=on_progress)
        paths = _output_paths(output, request.output_format, prompt, result.seeds)
        for path, encoded in zip(paths, result.images, strict=True):
            path.write_bytes(encoded.data)
    except KleinserveError as err:
        fail(err.message)

    timing = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    err_console.print(
        f"{result.model}: {result.steps} steps, guidance {result.guidance:g}; load {load_seconds:.2f}s, {timing}",
        highlight=False,
    )
    for path, encoded, image_seed in zip(paths, result.images, result.seeds, strict=True):
        out_console.print(f"{path}  seed={image_seed}  {encoded.width}x{encoded.height}", highlight=False)
