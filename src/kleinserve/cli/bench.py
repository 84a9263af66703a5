"""``kleinserve bench``: kleinserve against diffusers' pipelines on the same loaded weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kleinserve.cli.console import err_console, fail, out_console
from kleinserve.cli.options import DeviceOption, DtypeOption, build_settings
from kleinserve.errors import KleinserveError


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

    settings = build_settings(device=device, dtype=dtype)
    chosen = [c.strip() for c in cases.split(",") if c.strip()] or list(CASES)
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        fail(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    if size % 16 or size < 64 or repeats < 1 or base_steps < 1 or (steps is not None and steps < 1):
        fail("--size must be a multiple of 16 (at least 64); --repeats, --steps and --base-steps at least 1")
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
