"""The long-running commands: ``kleinserve serve`` (HTTP and models), ``api`` (HTTP only) and
``worker`` (models only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kleinserve.cli.console import err_console, fail
from kleinserve.cli.options import (
    BatchWindowOption,
    DataDirOption,
    DecoderOption,
    DeviceOption,
    DevicesOption,
    DtypeOption,
    FetchAllowOption,
    HostOption,
    InsecureNoAuthOption,
    LogFormatOption,
    LogLevelOption,
    LogPromptsOption,
    MaxBatchOption,
    MetricsOption,
    ModelOption,
    PortOption,
    PreviewDecoderOption,
    PublicUrlOption,
    SafetyAllowDisableOption,
    SafetyCheckerOption,
    SafetyPolicyOption,
    SafetyThresholdOption,
    VaeChannelsLastOption,
    VaeTileAboveOption,
    build_settings,
)
from kleinserve.errors import KleinserveError
from kleinserve.logs import configure_logging
from kleinserve.settings import Settings


def _key_store(settings: Settings) -> Any:
    from kleinserve.backends import key_store

    return key_store(settings)  # KLEINSERVE_DATABASE_URL: SQLite in the data dir, or PostgreSQL


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
    decoder: DecoderOption = None,
    vae_channels_last: VaeChannelsLastOption = False,
    vae_tile_above_pixels: VaeTileAboveOption = None,
    max_batch: MaxBatchOption = None,
    batch_window_ms: BatchWindowOption = None,
    preview_decoder: PreviewDecoderOption = None,
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

    settings = build_settings(
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
        decoder=decoder,
        vae_channels_last=vae_channels_last or None,
        vae_tile_above_pixels=vae_tile_above_pixels,
        max_batch=max_batch,
        batch_window_ms=batch_window_ms,
        preview_decoder=preview_decoder,
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
            fail(
                f"refusing to serve {settings.host} without API keys: anyone who can reach it could use it. "
                "Create a key first (kleinserve keys create --name NAME), bind to 127.0.0.1, or pass "
                "--insecure-no-auth if something in front of kleinserve checks access."
            )
        # Imported once the start is allowed: they bring in torch (seconds), which a refusal need not wait for.
        from kleinserve.api.app import create_app
        from kleinserve.api.server import run as run_http
        from kleinserve.engine.catalog import plan_models
        from kleinserve.engine.lora import check_sources
        from kleinserve.loras import parse_lora_options
        from kleinserve.placement import memory_plan_for

        served = plan_models(settings.models, settings.data_dir)
        memory = memory_plan_for(settings, served)
        offered = parse_lora_options(settings.loras)
        check_sources(offered)
    except KleinserveError as err:
        fail(err.message)
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
    if settings.decoder != "full" or settings.vae_channels_last:
        vae = [f"decoder {settings.decoder}"] + (["channels_last"] if settings.vae_channels_last else [])
        err_console.print(f"  VAE: {', '.join(vae)} (pixels differ from diffusers' default)", highlight=False)
    for line in memory.lines():
        err_console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
    if memory.fits is False:
        fail(f"refusing to start: {memory.refusal()}")
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

    settings = build_settings(
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
            fail(
                f"refusing to serve {settings.host} without API keys: create a key first (kleinserve keys create "
                "--name NAME), bind to 127.0.0.1, or pass --insecure-no-auth if something in front checks access."
            )
    except KleinserveError as err:
        fail(err.message)
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


def worker(
    model: ModelOption = None,
    data_dir: DataDirOption = None,
    device: DeviceOption = None,
    devices: DevicesOption = None,
    dtype: DtypeOption = None,
    decoder: DecoderOption = None,
    vae_channels_last: VaeChannelsLastOption = False,
    vae_tile_above_pixels: VaeTileAboveOption = None,
    max_batch: MaxBatchOption = None,
    batch_window_ms: BatchWindowOption = None,
    preview_decoder: PreviewDecoderOption = None,
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

    settings = build_settings(
        models=model,
        data_dir=data_dir,
        device=device,
        devices=devices,
        dtype=dtype,
        decoder=decoder,
        vae_channels_last=vae_channels_last or None,
        vae_tile_above_pixels=vae_tile_above_pixels,
        max_batch=max_batch,
        batch_window_ms=batch_window_ms,
        preview_decoder=preview_decoder,
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
        fail(err.message)
    for m in served:
        err_console.print(f"kleinserve worker: model {m.variant.id}: {m.directory}{'  (demo)' if m.demo else ''}")
    raise typer.Exit(asyncio.run(run_worker(settings, served)))
