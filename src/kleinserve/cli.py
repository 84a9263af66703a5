"""The ``kleinserve`` command: arguments -> settings -> library calls, and nothing more."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kleinserve.errors import InvalidParameterError, KleinserveError
from kleinserve.logs import configure_logging
from kleinserve.request import ASPECT_RATIOS, MEGAPIXELS, GenerationRequest, OutputFormat, size_for_aspect_ratio
from kleinserve.settings import Settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="kleinserve: FLUX.2 [klein] text-to-image and multi-reference editing, on your own hardware.",
)
err_console = Console(stderr=True)
out_console = Console()

_SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
_STAGE_LABELS = {
    "encode_prompt": "encoding prompt",
    "encode_references": "encoding references",
    "denoise": "denoising",
    "decode": "decoding",
}


def _fail(message: str) -> NoReturn:
    err_console.quiet = False  # muted only for the banner when logs are JSON
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as err:
        _fail(f"bad setting: {err}")


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


# Options more than one command takes, declared once.
DataDirOption = Annotated[Optional[Path], typer.Option("--data-dir", help="Jobs and results (with SQLite).")]
DeviceOption = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DevicesOption = Annotated[
    Optional[str],
    typer.Option(help="One worker per device, one queue: cuda:0,cuda:1, cpu,cpu or auto (every GPU)."),
]
DtypeOption = Annotated[Optional[str], typer.Option(help="auto, bfloat16, float16 or float32.")]
FetchAllowOption = Annotated[
    Optional[str],
    typer.Option("--fetch-allow", help="Comma-separated hosts or CIDR networks image URLs may reach."),
]
HostOption = Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1).")]
InsecureNoAuthOption = Annotated[
    bool, typer.Option("--insecure-no-auth", help="Allow a non-loopback address without API keys.")
]
LogFormatOption = Annotated[Optional[str], typer.Option("--log-format", help="text or json.")]
LogLevelOption = Annotated[Optional[str], typer.Option("--log-level", help="debug, info, warning or error.")]
LogPromptsOption = Annotated[
    bool, typer.Option("--log-prompts", help="Include prompts in job log lines (off by default).")
]
MetricsOption = Annotated[
    Optional[str], typer.Option("--metrics", help="GET /metrics: off (default), open, or admin (admin token).")
]
ModelOption = Annotated[
    Optional[list[str]],
    typer.Option("--model", "-m", help="ID or ID=PATH, repeatable; 'auto' (default) falls back to demo weights."),
]
NameOption = Annotated[str, typer.Argument(help="The key's name.")]
PortOption = Annotated[Optional[int], typer.Option(help="Port (default 8000).")]
PublicUrlOption = Annotated[Optional[str], typer.Option("--public-url", help="Base URL for result links.")]
SafetyAllowDisableOption = Annotated[
    bool, typer.Option("--safety-allow-disable", help="Let clients skip the checker per request.")
]
SafetyCheckerOption = Annotated[
    Optional[str],
    typer.Option("--safety-checker", help="off (default) or an image classifier, e.g. Falconsai/nsfw_image_detection."),
]
SafetyPolicyOption = Annotated[
    Optional[str], typer.Option("--safety-policy", help="flag, blur (default) or refuse a flagged image.")
]
SafetyThresholdOption = Annotated[
    Optional[float], typer.Option("--safety-threshold", help="nsfw score that flags an image (0.85).")
]


@app.command()
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
    seed: Annotated[Optional[int], typer.Option(help="Seed of the first image; image i uses seed + i.")] = None,
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="How many images.")] = 1,
    fmt: Annotated[
        Optional[str], typer.Option("--format", "-f", help="png, jpeg (jpg) or webp (default: from -o, else png).")
    ] = None,
    quality: Annotated[int, typer.Option(help="JPEG/WebP quality, 1-100.")] = 95,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory (created) or file name.")] = Path("out"),
) -> None:
    """Generate images from a prompt, optionally editing 1-4 reference images."""
    from kleinserve.engine.device import dtype_name, pick_device, pick_dtype
    from kleinserve.engine.images import InputPolicy, load_references
    from kleinserve.engine.weights import ModelSpec, load_engine
    from kleinserve.generation import run_request

    settings = _settings(device=device, dtype=dtype)
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
        torch_device = pick_device(settings.device)
        torch_dtype = pick_dtype(torch_device, settings.dtype)
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
            engine = load_engine(spec, torch_device, torch_dtype)
            load_seconds = time.perf_counter() - started

            def on_progress(p: Any) -> None:
                progress.update(task, description=_STAGE_LABELS[p.stage], completed=p.step, total=p.total)

            result = run_request(request, engine, references, on_progress=on_progress)
        paths = _output_paths(output, request.output_format, prompt, result.seeds)
        for path, encoded in zip(paths, result.images, strict=True):
            path.write_bytes(encoded.data)
    except KleinserveError as err:
        _fail(err.message)

    timing = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    err_console.print(
        f"{result.model}: {result.steps} steps, guidance {result.guidance:g}; load {load_seconds:.2f}s, {timing}",
        highlight=False,
    )
    for path, encoded, image_seed in zip(paths, result.images, result.seeds, strict=True):
        out_console.print(f"{path}  seed={image_seed}  {encoded.width}x{encoded.height}", highlight=False)


@app.command()
def serve(
    model: ModelOption = None,
    host: HostOption = None,
    port: PortOption = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Jobs, results and demo weights.")] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    devices: DevicesOption = None,
    device_memory: Annotated[
        Optional[float],
        typer.Option("--device-memory", help="GB the models may use on the device (default: what is free)."),
    ] = None,
    offload: Annotated[
        Optional[str], typer.Option(help="CPU offloading on a GPU: none, model, sequential or group.")
    ] = None,
    quantize: Annotated[Optional[str], typer.Option(help="Transformer weights: none, int8, fp8 or int4.")] = None,
    quantize_text_encoder: Annotated[
        Optional[str], typer.Option("--quantize-text-encoder", help="Text encoder weights: none, int8, fp8 or int4.")
    ] = None,
    text_encoder_device: Annotated[
        Optional[str], typer.Option("--text-encoder-device", help="Run the text encoder elsewhere, e.g. cpu.")
    ] = None,
    compile_blocks: Annotated[
        bool, typer.Option("--compile", help="torch.compile the transformer blocks (warmed up before ready).")
    ] = False,
    attention_backend: Annotated[
        Optional[str], typer.Option("--attention-backend", help="diffusers attention backend (native, flash, sage).")
    ] = None,
    lora: Annotated[
        Optional[list[str]],
        typer.Option("--lora", help="LoRA adapter to offer: NAME=PATH_OR_HUB_ID, a directory or a file; repeatable."),
    ] = None,
    public_url: PublicUrlOption = None,
    insecure_no_auth: InsecureNoAuthOption = False,
    fetch_allow: FetchAllowOption = None,
    log_level: LogLevelOption = None,
    log_format: Annotated[
        Optional[str], typer.Option("--log-format", help="text (default) or json: one JSON object per line.")
    ] = None,
    log_prompts: LogPromptsOption = False,
    metrics: MetricsOption = None,
    metrics_port: Annotated[
        Optional[int], typer.Option("--metrics-port", help="Also serve metrics on this port (no auth).")
    ] = None,
    safety_checker: SafetyCheckerOption = None,
    safety_policy: SafetyPolicyOption = None,
    safety_threshold: SafetyThresholdOption = None,
    safety_allow_disable: SafetyAllowDisableOption = False,
) -> None:
    """Run the HTTP server (Oxen.ai API and more) until interrupted."""
    import logging

    from kleinserve.access import Access, is_loopback
    from kleinserve.api.app import create_app
    from kleinserve.api.server import run as run_http
    from kleinserve.engine.catalog import plan_models
    from kleinserve.engine.lora import check_sources
    from kleinserve.loras import parse_lora_options
    from kleinserve.runtime import memory_plan_for

    settings = _settings(
        models=model,
        host=host,
        port=port,
        data_dir=data_dir,
        device=device,
        dtype=dtype,
        device_memory=device_memory,
        devices=devices,
        offload=offload,
        quantize=quantize,
        quantize_text_encoder=quantize_text_encoder,
        text_encoder_device=text_encoder_device,
        compile=compile_blocks or None,
        attention_backend=attention_backend,
        loras=lora,
        public_url=public_url,
        insecure_no_auth=insecure_no_auth or None,
        fetch_allow=fetch_allow,
        log_level=log_level,
        log_format=log_format,
        log_prompts=log_prompts or None,
        metrics=metrics,
        metrics_port=metrics_port,
        safety_checker=safety_checker,
        safety_policy=safety_policy,
        safety_threshold=safety_threshold,
        safety_allow_disable=safety_allow_disable or None,
    )
    configure_logging(settings.log_format, settings.log_level, log_prompts=settings.log_prompts)
    # With JSON logs, stderr carries JSON lines only: the banner for people is muted (errors still
    # print) and one "serving" log line says the same.
    err_console.quiet = settings.log_format == "json"
    os.umask(0o077)  # everything the server writes (jobs, keys, results, uploads, secret.key) is owner-only
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        key_store = _key_store(settings)
        keys_exist = key_store.any_active()
        if not keys_exist and not is_loopback(settings.host) and not settings.insecure_no_auth:
            _fail(
                f"refusing to serve {settings.host} without API keys: anyone who can reach it could use it. "
                "Create a key first (kleinserve keys create --name NAME), bind to 127.0.0.1, or pass "
                "--insecure-no-auth if something in front of kleinserve checks access."
            )
        served = plan_models(settings.models, settings.data_dir)
        memory = memory_plan_for(settings, served)
        offered = parse_lora_options(settings.loras)
        check_sources(offered)
    except KleinserveError as err:
        _fail(err.message)
    shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{shown_host}:{settings.port}"
    if any(m.demo for m in served):
        err_console.print(
            "[bold yellow]DEMO MODE:[/] no real weights could be found or downloaded; every model runs on tiny "
            "random weights and makes noise, not pictures. Pass --model ID or --model ID=PATH for real weights.",
            highlight=False,
        )
    err_console.print(f"kleinserve {url}", highlight=False)
    for m in served:
        err_console.print(f"  model {m.variant.id}: {m.directory}{'  (demo)' if m.demo else ''}", highlight=False)
    if offered:
        err_console.print(f"  LoRA adapters: {', '.join(sorted(offered))}", highlight=False, markup=False)
    for line in memory.lines():
        err_console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
    if memory.fits is False:
        _fail(f"refusing to start: {memory.refusal()}")
    err_console.print(f"  data dir: {settings.data_dir.resolve()}", highlight=False)
    required = Access.at_start(key_store, settings.host, settings.insecure_no_auth).keys_required()
    access = "API keys required" if required else "open (no API keys configured)"
    err_console.print(f"  access: {access}", highlight=False)
    err_console.print(f"  API docs: {url}/docs   readiness: {url}/readyz", highlight=False)
    logging.getLogger("kleinserve").info(
        "serving %s",
        url,
        extra={"models": {m.variant.id: str(m.directory) for m in served}, "demo": any(m.demo for m in served)},
    )
    if settings.metrics_port is not None:
        from kleinserve.metrics import serve_port

        serve_port(settings.metrics_port, settings.metrics_host)
    run_http(create_app(settings, served), settings)


@app.command()
def api(
    host: HostOption = None,
    port: PortOption = None,
    data_dir: DataDirOption = None,
    public_url: PublicUrlOption = None,
    insecure_no_auth: InsecureNoAuthOption = False,
    fetch_allow: FetchAllowOption = None,
    log_level: LogLevelOption = None,
    log_format: LogFormatOption = None,
    metrics: MetricsOption = None,
) -> None:
    """Run the HTTP API only (no models, no torch): jobs go to `kleinserve worker` processes sharing
    the database (KLEINSERVE_DATABASE_URL) and the results storage."""
    import uvicorn

    from kleinserve.access import is_loopback
    from kleinserve.api.app import create_app

    settings = _settings(
        host=host,
        port=port,
        data_dir=data_dir,
        public_url=public_url,
        insecure_no_auth=insecure_no_auth or None,
        fetch_allow=fetch_allow,
        log_level=log_level,
        log_format=log_format,
        metrics=metrics,
    )
    configure_logging(settings.log_format, settings.log_level, log_prompts=settings.log_prompts)
    err_console.quiet = settings.log_format == "json"  # JSON logs: stderr carries JSON lines only
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if not _key_store(settings).any_active() and not is_loopback(settings.host) and not settings.insecure_no_auth:
            _fail(
                f"refusing to serve {settings.host} without API keys: create a key first (kleinserve keys create "
                "--name NAME), bind to 127.0.0.1, or pass --insecure-no-auth if something in front checks access."
            )
    except KleinserveError as err:
        _fail(err.message)
    err_console.print(f"kleinserve api http://{settings.host}:{settings.port} (models: those of live workers)")
    uvicorn.run(
        create_app(settings, role="api"),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
    )


@app.command()
def worker(
    model: ModelOption = None,
    data_dir: DataDirOption = None,
    device: DeviceOption = None,
    devices: DevicesOption = None,
    dtype: DtypeOption = None,
    fetch_allow: FetchAllowOption = None,
    log_level: LogLevelOption = None,
    log_format: LogFormatOption = None,
    metrics_port: Annotated[
        Optional[int], typer.Option("--metrics-port", help="Serve this worker's Prometheus metrics on this port.")
    ] = None,
    log_prompts: LogPromptsOption = False,
    safety_checker: SafetyCheckerOption = None,
    safety_policy: SafetyPolicyOption = None,
    safety_threshold: SafetyThresholdOption = None,
    safety_allow_disable: SafetyAllowDisableOption = False,
) -> None:
    """Run a worker (no HTTP): load the models and run queued jobs for them until SIGTERM, which
    hands the running job back to the queue."""
    import asyncio

    from kleinserve.engine.catalog import plan_models
    from kleinserve.runtime import run_worker

    settings = _settings(
        models=model,
        data_dir=data_dir,
        device=device,
        devices=devices,
        dtype=dtype,
        fetch_allow=fetch_allow,
        log_level=log_level,
        log_format=log_format,
        metrics_port=metrics_port,
        log_prompts=log_prompts or None,
        safety_checker=safety_checker,
        safety_policy=safety_policy,
        safety_threshold=safety_threshold,
        safety_allow_disable=safety_allow_disable or None,
    )
    configure_logging(settings.log_format, settings.log_level, log_prompts=settings.log_prompts)
    err_console.quiet = settings.log_format == "json"  # JSON logs: stderr carries JSON lines only
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        served = plan_models(settings.models, settings.data_dir)
    except KleinserveError as err:
        _fail(err.message)
    for m in served:
        err_console.print(f"kleinserve worker: model {m.variant.id}: {m.directory}{'  (demo)' if m.demo else ''}")
    raise typer.Exit(asyncio.run(run_worker(settings, served)))


keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys; read their usage.")
app.add_typer(keys_app, name="keys")
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="The server's data directory.")]


def _key_store(settings: Settings) -> Any:
    from kleinserve.backends import key_store

    return key_store(settings)  # KLEINSERVE_DATABASE_URL: SQLite in the data dir, or PostgreSQL


def _keys(data_dir: Path | None) -> Any:
    """The key store of the settings, as a context that closes it (a PostgreSQL pool ends cleanly)."""
    from kleinserve.backends import opened_key_store

    return opened_key_store(_settings(data_dir=data_dir))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="A name for the key holder.")],
    rate: Annotated[Optional[str], typer.Option(help="Requests per minute, e.g. 60/min or 2/s.")] = None,
    image_rate: Annotated[Optional[str], typer.Option("--image-rate", help="Images per minute.")] = None,
    concurrency: Annotated[Optional[int], typer.Option(help="Jobs queued or running at once.")] = None,
    credits: Annotated[
        Optional[float], typer.Option(help="Credits to spend (prices: KLEINSERVE_PRICE_PER_IMAGE).")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Create a key. Its secret is printed once, on stdout, and stored only as a hash."""
    from kleinserve.keys import parse_rate

    try:
        with _keys(data_dir) as store:
            key, secret = store.create(
                name,
                requests_per_minute=parse_rate(rate, "rate") if rate else None,
                images_per_minute=parse_rate(image_rate, "image_rate") if image_rate else None,
                concurrency=concurrency,
                credits=credits,
            )
    except KleinserveError as err:
        _fail(err.message)
    err_console.print(f"created key {key.name!r}; keep the secret now, it is not shown again:", highlight=False)
    out_console.print(secret, highlight=False, soft_wrap=True)


@keys_app.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """List keys (names, prefixes, limits; never secrets)."""
    with _keys(data_dir) as store:
        keys = store.list()
    for key in keys:
        state = "revoked" if not key.active else "active"
        limits = ", ".join(
            f"{label} {value:g}"
            for label, value in (
                ("requests/min", key.requests_per_minute),
                ("images/min", key.images_per_minute),
                ("concurrency", key.concurrency),
                ("credits", key.credits),
            )
            if value is not None
        )
        out_console.print(f"{key.name}  {key.shown_prefix}...  {state}  {limits or 'no limits'}", highlight=False)


@keys_app.command("revoke")
def keys_revoke(name: NameOption, data_dir: DataDir = None) -> None:
    """Revoke a key: it stops working at once."""
    try:
        with _keys(data_dir) as store:
            store.revoke(name)
    except KleinserveError as err:
        _fail(err.message)
    out_console.print(f"revoked {name}", highlight=False)


@keys_app.command("usage")
def keys_usage(name: NameOption, data_dir: DataDir = None) -> None:
    """What a key has generated and spent."""
    try:
        with _keys(data_dir) as store:
            key = store.get(name)
            usage = store.usage(key.id)
    except KleinserveError as err:
        _fail(err.message)
    left = "unlimited" if key.credits is None else f"{key.credits - usage.spent:g} of {key.credits:g}"
    out_console.print(f"{name}: {usage.images} images in {usage.jobs} jobs, spent {usage.spent:g}; credits {left}")
    for model, row in sorted(usage.by_model.items()):
        out_console.print(f"  {model}: {row['images']:g} images, spent {row['spent']:g}", highlight=False)


@app.command("make-tiny")
def make_tiny_command(
    directory: Annotated[Path, typer.Argument(help="Where to write the checkpoint.")],
    variant: Annotated[
        str, typer.Option(help="distilled (like klein 4B/9B), base (like Base 4B/9B) or kv (like klein 9B-KV).")
    ] = "distilled",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    preset: Annotated[
        str,
        typer.Option(help="tiny (a few MB, the default) or bench (klein 4B's real widths, few blocks, ~7 GB)."),
    ] = "tiny",
    classifier: Annotated[
        Optional[str],
        typer.Option(
            "--classifier",
            help="Write a tiny safety-checker classifier instead, that always says nsfw or normal.",
        ),
    ] = None,
    lora: Annotated[
        bool, typer.Option("--lora", help="Also write a random LoRA for it to DIRECTORY/lora/tiny.safetensors.")
    ] = False,
) -> None:
    """Write a random-weight klein checkpoint (real architecture) for tests, demos and `kleinserve bench`."""
    from kleinserve.engine.tiny import PRESETS, make_tiny, make_tiny_lora

    if classifier is not None:
        from kleinserve.engine.tiny_classifier import make_tiny_classifier

        if classifier not in ("nsfw", "normal"):
            _fail(f"--classifier must be nsfw or normal, not {classifier!r}")
        make_tiny_classifier(directory, classifier, seed)  # type: ignore[arg-type]
        out_console.print(f"wrote a tiny {classifier} image classifier to {directory}", highlight=False)
        return

    if variant not in ("distilled", "base", "kv"):
        _fail(f"--variant must be distilled, base or kv, not {variant!r}")
    if preset not in PRESETS:
        _fail(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    make_tiny(directory, variant, seed, preset)  # type: ignore[arg-type]
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    out_console.print(f"wrote a {preset} {variant} checkpoint to {directory} ({size / 1e6:.1f} MB)", highlight=False)
    if lora:
        path = make_tiny_lora(directory, directory / "lora" / "tiny.safetensors", seed)
        out_console.print(f"wrote a tiny LoRA to {path} (serve it with --lora {path.parent})", highlight=False)


@app.command()
def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="ID=PATH (or ID) of the weights to measure.")],
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    size: Annotated[int, typer.Option(help="Output width and height, a multiple of 16.")] = 512,
    steps: Annotated[Optional[int], typer.Option(help="Steps of the distilled cases (default: the variant's).")] = None,
    base_steps: Annotated[int, typer.Option("--base-steps", help="Steps of the Base (CFG) cases.")] = 50,
    cases: Annotated[str, typer.Option(help="Comma-separated cases (default: all).")] = "",
    repeats: Annotated[int, typer.Option(help="Timed runs per side and case, after one warm-up.")] = 3,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here.")] = None,
    offload: Annotated[str, typer.Option(help="Memory mode to measure: none, model, sequential or group.")] = "none",
    quantize: Annotated[str, typer.Option(help="Transformer weights: none, int8, fp8 or int4.")] = "none",
    quantize_text_encoder: Annotated[
        str, typer.Option("--quantize-text-encoder", help="Text encoder weights: none, int8, fp8 or int4.")
    ] = "none",
    compile_blocks: Annotated[bool, typer.Option("--compile", help="Compile the transformer blocks.")] = False,
    attention_backend: Annotated[
        Optional[str], typer.Option("--attention-backend", help="diffusers attention backend.")
    ] = None,
) -> None:
    """Time kleinserve against diffusers' pipelines on the same loaded weights; print a table, write JSON."""
    from kleinserve.engine.bench.cases import CASES
    from kleinserve.engine.bench.report import stage_table, summary_table, write_json
    from kleinserve.engine.bench.runner import BenchOptions, run_bench
    from kleinserve.engine.cache import PromptCache
    from kleinserve.engine.device import dtype_name, pick_device, pick_dtype
    from kleinserve.engine.loading import LoadOptions
    from kleinserve.engine.memory import MemoryMode
    from kleinserve.engine.weights import ModelSpec, load_engine

    settings = _settings(device=device, dtype=dtype)
    chosen = [c.strip() for c in cases.split(",") if c.strip()] or list(CASES)
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        _fail(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    if size % 16 or size < 64 or repeats < 1 or base_steps < 1 or (steps is not None and steps < 1):
        _fail("--size must be a multiple of 16 (at least 64); --repeats, --steps and --base-steps at least 1")
    try:
        spec = ModelSpec.parse(model)
        torch_device = pick_device(settings.device)
        torch_dtype = pick_dtype(torch_device, settings.dtype)
        err_console.print(f"loading {spec} on {torch_device} ({dtype_name(torch_dtype)})", highlight=False)
        mode = MemoryMode(offload, quantize, quantize_text_encoder)
        load = LoadOptions(torch_dtype, mode, compile_blocks, attention_backend)
        err_console.print(f"memory mode: {load.describe()}", highlight=False)
        engine = load_engine(spec, torch_device, torch_dtype, options=load)
        engine.prompt_cache = PromptCache(settings.prompt_cache_bytes)  # as the server runs it
        options = BenchOptions(size=size, steps=steps, base_steps=base_steps, cases=chosen, repeats=repeats)
        report = run_bench(engine, options, log=lambda m: err_console.print(m, highlight=False))
    except KleinserveError as err:
        _fail(err.message)
    flags = {
        "--device": device,
        "--dtype": dtype,
        "--steps": steps,
        "--json": json_path,
        "--offload": None if offload == "none" else offload,
        "--quantize": None if quantize == "none" else quantize,
        "--quantize-text-encoder": None if quantize_text_encoder == "none" else quantize_text_encoder,
        "--attention-backend": attention_backend,
    }
    report["mode"] = load.describe()
    report["command"] = " ".join(
        [f"kleinserve bench --model {model} --size {size} --base-steps {base_steps} --repeats {repeats}"]
        + [f"--cases {','.join(chosen)}"]
        + [f"{flag} {value}" for flag, value in flags.items() if value is not None]
        + (["--compile"] if compile_blocks else [])
    )
    width = max(out_console.width, 170)  # wide tables; a pipe or a narrow terminal still gets every column
    out_console.print(summary_table(report), width=width)
    out_console.print(stage_table(report), width=width)
    if json_path is not None:
        write_json(report, json_path)
        err_console.print(f"wrote {json_path}", highlight=False)


@app.command()
def models(
    plan: Annotated[bool, typer.Option("--plan", help="Show the memory plan instead (nothing is loaded).")] = False,
    model: Annotated[
        Optional[list[str]], typer.Option("--model", "-m", help="With --plan: ID or ID=PATH (default: every variant).")
    ] = None,
    device: Annotated[
        Optional[str], typer.Option(help="With --plan: the device to plan for (cpu, cuda:0, ...).")
    ] = None,
    dtype: Annotated[Optional[str], typer.Option(help="With --plan: auto, bfloat16, float16 or float32.")] = None,
    offload: Annotated[str, typer.Option(help="With --plan: none, model, sequential or group.")] = "none",
    quantize: Annotated[str, typer.Option(help="With --plan: transformer weights none, int8, fp8 or int4.")] = "none",
    quantize_text_encoder: Annotated[
        str, typer.Option("--quantize-text-encoder", help="With --plan: text encoder none, int8, fp8 or int4.")
    ] = "none",
    text_encoder_device: Annotated[
        Optional[str], typer.Option("--text-encoder-device", help="With --plan: 'cpu' keeps the text encoder in RAM.")
    ] = None,
    device_memory: Annotated[
        Optional[float], typer.Option("--device-memory", help="With --plan: GB the device has (default: detected).")
    ] = None,
    table: Annotated[
        bool, typer.Option("--table", help="With --plan: peak GB per variant and mode, as a Markdown table.")
    ] = False,
) -> None:
    """List the klein variants, their defaults and every accepted id; or, with --plan, their memory needs."""
    from kleinserve.engine.variants import VARIANTS

    if plan:
        _print_plan(
            model, device, dtype, offload, quantize, quantize_text_encoder, text_encoder_device, device_memory, table
        )
        return
    for v in VARIANTS:
        kind = "distilled" if v.distilled else "undistilled, true CFG"
        out_console.print(
            f"[bold]{v.id}[/]  {v.display_name}: {kind}, default {v.default_steps} steps, guidance "
            f"{v.default_guidance:g}; {v.license}{' (gated)' if v.gated else ''}; {v.vram_note}",
            highlight=False,
        )
        out_console.print(f"    also accepted as: {', '.join(v.aliases)}", highlight=False)


def _print_plan(
    names: list[str] | None,
    device: str | None,
    dtype: str | None,
    offload: str,
    quantize: str,
    quantize_text_encoder: str,
    text_encoder_device: str | None,
    device_memory: float | None,
    table: bool,
) -> None:
    import torch

    from kleinserve.engine.device import pick_device, pick_dtype
    from kleinserve.engine.memory import MemoryMode, plan_memory, plan_table
    from kleinserve.engine.variants import VARIANTS
    from kleinserve.engine.weights import ModelSpec, resolve_weights

    settings = _settings(device=device, dtype=dtype, device_memory=device_memory)
    try:
        # Planning for a device this machine lacks is the point, so it is parsed, not required.
        try:
            torch_device = pick_device("auto") if settings.device == "auto" else torch.device(settings.device)
        except (RuntimeError, ValueError):
            raise InvalidParameterError("device", f"{settings.device!r} is not a torch device") from None
        torch_dtype = pick_dtype(torch_device, settings.dtype)
        specs = [ModelSpec.parse(name) for name in names] if names else [ModelSpec(v) for v in VARIANTS]
        if table:
            for line in plan_table([s.variant for s in specs], str(torch_device), torch_dtype):
                out_console.print(line, highlight=False, markup=False, soft_wrap=True)
            return
        mode = MemoryMode(offload, quantize, quantize_text_encoder, text_encoder_device)
        for spec in specs:
            try:
                directory = resolve_weights(spec, allow_download=False)
            except KleinserveError:
                if spec.path is not None:
                    raise
                directory = None  # not downloaded: plan from the published geometry
            result = plan_memory(
                [(spec.variant.id, spec.variant, directory)],
                str(torch_device),
                torch_dtype,
                mode,
                device_memory_gb=settings.device_memory,
            )
            for line in result.lines():
                out_console.print(line, highlight=False, markup=False, soft_wrap=True)
            if result.fits is None:
                verdict = "capacity unknown here (pass --device-memory GB to check a fit)"
            else:
                verdict = "fits" if result.fits else f"does NOT fit: {result.refusal()}"
            out_console.print(f"  -> {verdict}", highlight=False, markup=False, soft_wrap=True)
    except KleinserveError as err:
        _fail(err.message)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
