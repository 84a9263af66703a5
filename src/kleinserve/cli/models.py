"""``kleinserve models``: the klein variants, or (``--plan``) what they need in memory."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kleinserve.cli.console import fail, out_console
from kleinserve.cli.options import DecoderOption, build_settings
from kleinserve.errors import InvalidParameterError, KleinserveError


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
    decoder: DecoderOption = None,
) -> None:
    """List the klein variants, their defaults and every accepted id; or, with --plan, their memory needs."""
    from kleinserve.engine.variants import VARIANTS

    if plan:
        mode = (offload, quantize, quantize_text_encoder, text_encoder_device)
        _print_plan(model, device, dtype, mode, device_memory, table, decoder)
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
    memory_mode: tuple[str, str, str, str | None],
    device_memory: float | None,
    table: bool,
    decoder: str | None,
) -> None:
    import torch

    from kleinserve.engine.decoder import DecoderSpec, planned_config
    from kleinserve.engine.device import pick_device, pick_dtype
    from kleinserve.engine.memory import MemoryMode, plan_memory, plan_table
    from kleinserve.engine.variants import VARIANTS
    from kleinserve.engine.weights import ModelSpec, resolve_weights

    settings = build_settings(device=device, dtype=dtype, device_memory=device_memory, decoder=decoder)
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
        mode = MemoryMode(*memory_mode)
        vae_config = planned_config(DecoderSpec.parse(settings.decoder))  # nothing is downloaded
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
                vae_config=vae_config,
            )
            for line in result.lines():
                out_console.print(line, highlight=False, markup=False, soft_wrap=True)
            if result.fits is None:
                verdict = "capacity unknown here (pass --device-memory GB to check a fit)"
            else:
                verdict = "fits" if result.fits else f"does NOT fit: {result.refusal()}"
            out_console.print(f"  -> {verdict}", highlight=False, markup=False, soft_wrap=True)
    except KleinserveError as err:
        fail(err.message)
