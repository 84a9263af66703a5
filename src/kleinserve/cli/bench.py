"""``kleinserve bench``: kleinserve against diffusers' pipelines on the same loaded weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kleinserve.cli.console import err_console, fail, out_console
from kleinserve.cli.options import DecoderOption, DeviceOption, DtypeOption, VaeChannelsLastOption, build_settings
from kleinserve.errors import KleinserveError


def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="ID=PATH (or ID) of the weights to measure.")],
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    size: Annotated[int, typer.Option(help="Output width and height, a multiple of 16.")] = 512,
    steps: Annotated[Optional[int], typer.Option(help="Steps of the distilled cases (default: the variant's).")] = None,
    base_steps: Annotated[int, typer.Option("--base-steps", help="Steps of the Base (CFG) cases.")] = 50,
    cases: Annotated[str, typer.Option(help="Comma-separated cases (default: all).")] = "",
    repeats: Annotated[
        int,
        typer.Option(
            "--repeats",
            "--runs",
            help="Timed runs per side and case, after one warm-up; the sides alternate run by run and "
            "medians are reported (5 or more for robust figures).",
        ),
    ] = 3,
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
    decoder: DecoderOption = None,
    vae_channels_last: VaeChannelsLastOption = False,
    http: Annotated[
        bool,
        typer.Option(
            "--http",
            help="Also time every case (but kv and stepcache) as sync requests to the real server, started "
            "in this process on the same loaded weights; reports that ratio beside the in-process one.",
        ),
    ] = False,
    modes: Annotated[
        Optional[str],
        typer.Option(
            help="Bench several modes side by side, each on its own load, e.g. bf16,int8,compile "
            "(parts: the dtype or plain, int8/fp8/int4 for transformer and text encoder, compile, channels-last "
            "for the VAE; joined by +).",
        ),
    ] = None,
    step_caches: Annotated[
        Optional[str],
        typer.Option(
            "--step-caches",
            help="Settings the stepcache case times against the uncached run (default: "
            "taylorseer:2,taylorseer:3,taylorseer:5).",
        ),
    ] = None,
) -> None:
    """Time kleinserve against diffusers' pipelines on the same loaded weights; print a table, write JSON."""
    from kleinserve.engine.bench.cases import CASES
    from kleinserve.engine.bench.modes import parse_modes, run_modes
    from kleinserve.engine.bench.report import tables, write_json
    from kleinserve.engine.bench.runner import BenchOptions, run_bench
    from kleinserve.engine.cache import PromptCache
    from kleinserve.engine.decoder import DecoderSpec, resolve_decoder
    from kleinserve.engine.device import pick_device, pick_dtype
    from kleinserve.engine.engine import Engine
    from kleinserve.engine.loading import LoadOptions
    from kleinserve.engine.memory import MemoryMode
    from kleinserve.engine.weights import ModelSpec, load_engine, resolve_weights

    settings = build_settings(device=device, dtype=dtype, decoder=decoder)
    chosen = [c.strip() for c in cases.split(",") if c.strip()] or list(CASES)
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        fail(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    if size % 16 or size < 64 or repeats < 1 or base_steps < 1 or (steps is not None and steps < 1):
        fail("--size must be a multiple of 16 (at least 64); --repeats, --steps and --base-steps at least 1")
    if modes is not None and (quantize != "none" or quantize_text_encoder != "none" or compile_blocks):
        fail("--modes names the quantisation and compilation of each mode; drop --quantize and --compile")
    try:
        spec = ModelSpec.parse(model)
        torch_device = pick_device(settings.device)
        torch_dtype = pick_dtype(torch_device, settings.dtype)
        mode = MemoryMode(offload, quantize, quantize_text_encoder)
        vae = resolve_decoder(DecoderSpec.parse(settings.decoder))  # both sides decode with it
        load = LoadOptions(
            torch_dtype, mode, compile_blocks, attention_backend, vae=vae, vae_channels_last=vae_channels_last
        )
        try:
            chosen_modes = parse_modes(modes) if modes is not None else None
        except ValueError as err:
            fail(str(err))
        directory = resolve_weights(spec) if http else None
        options = BenchOptions(
            size=size,
            steps=steps,
            base_steps=base_steps,
            cases=chosen,
            repeats=repeats,
            http=http,
            checkpoint=directory,
            step_caches=None if step_caches is None else [s.strip() for s in step_caches.split(",") if s.strip()],
        )
        try:
            for name in chosen:
                options.case(name)  # a bad --step-caches setting fails before anything loads
        except ValueError as err:
            fail(str(err))

        def load_mode(load_options: LoadOptions) -> Engine:
            err_console.print(f"loading {spec} on {torch_device} ({load_options.describe()})", highlight=False)
            engine = load_engine(spec, torch_device, torch_dtype, options=load_options)
            engine.prompt_cache = PromptCache(settings.prompt_cache_bytes)  # as the server runs it
            return engine

        def log(message: str) -> None:
            err_console.print(message, highlight=False)

        if chosen_modes is not None:
            report = run_modes(load_mode, load, chosen_modes, options, log)
        else:
            report = run_bench(load_mode(load), options, log)
            report["mode"] = load.describe()
    except KleinserveError as err:
        fail(err.message)
    flags = {
        "--device": device,
        "--dtype": dtype,
        "--steps": steps,
        "--json": json_path,
        "--offload": None if offload == "none" else offload,
        "--quantize": None if quantize == "none" else quantize,
        "--quantize-text-encoder": None if quantize_text_encoder == "none" else quantize_text_encoder,
        "--attention-backend": attention_backend,
        "--decoder": decoder,
        "--modes": modes,
        "--step-caches": step_caches,
    }
    report["command"] = " ".join(
        [f"kleinserve bench --model {model} --size {size} --base-steps {base_steps} --repeats {repeats}"]
        + [f"--cases {','.join(chosen)}"]
        + [f"{flag} {value}" for flag, value in flags.items() if value is not None]
        + (["--compile"] if compile_blocks else [])
        + (["--vae-channels-last"] if vae_channels_last else [])
        + (["--http"] if http else [])
    )
    # Wide tables: a pipe or a narrow terminal still gets every column unwrapped (print(width=) alone
    # cannot exceed the console's own width, which is 80 when stdout is a file).
    narrow = out_console.width
    out_console.width = max(narrow, 170)
    try:
        for table in tables(report):
            out_console.print(table)
    finally:
        out_console.width = narrow
    if json_path is not None:
        write_json(report, json_path)
        err_console.print(f"wrote {json_path}", highlight=False)
