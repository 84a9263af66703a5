"""Running the bench: load once, warm up, then time kleinserve and diffusers alternately per case.

Decisions:
- One set of modules. The engine loads the weights; diffusers' ``Flux2KleinPipeline`` is the engine's
  own pipeline object, called as a user calls it, and the Base twin (for the CFG case) is a second
  pipeline over the *same* modules with ``is_distilled=False``. So both sides run identical weights,
  kernels and threads, and any difference is the code around them.
- Alternation. After one warm-up run of each side, runs alternate kleinserve, diffusers, kleinserve, ...
  so drifting machine load hits both; medians are reported, and the ratio is diffusers / kleinserve
  (above 1: kleinserve is faster). Runs of a pair use the same prompts and seeds, so their pixels are
  compared too (``max_pixel_diff``: 0 for exact paths, at most 2 for batched ones).
- FLOPs are counted once per side, on its warm-up run, with ``torch.utils.flop_counter`` around each
  transformer call, and divided by the median denoise time for the achieved TFLOP/s.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import Flux2KleinPipeline

from kleinserve.engine.bench.cases import (
    CASES,
    Case,
    Setup,
    max_pixel_difference,
    reference_images,
    run_diffusers,
    run_kleinserve,
)
from kleinserve.engine.bench.measure import STAGES, StageClock, matmul_peak_tflops, peak_memory, synchronize
from kleinserve.engine.engine import Engine
from kleinserve.engine.variants import find_variant
from kleinserve.settings import Settings

SIDES = ("kleinserve", "diffusers")
Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    """What to run; the CLI fills it from its flags."""

    size: int = 512
    steps: int | None = None  # default: the variant's
    base_steps: int = 50
    cases: Sequence[str] = tuple(CASES)
    repeats: int = 3
    seed: int = 42


def base_twin(engine: Engine) -> Engine:
    """An undistilled (Base) engine over ``engine``'s modules, for the CFG case."""
    if not engine.variant.distilled:
        return engine
    base_id = engine.variant.id.replace("flux-2-klein-", "flux-2-klein-base-")
    pipeline = Flux2KleinPipeline(**engine.pipeline.components, is_distilled=False)
    pipeline.set_progress_bar_config(disable=True)
    twin = Engine(pipeline, find_variant(base_id))
    twin.prompt_cache = engine.prompt_cache
    return twin


@contextlib.contextmanager
def kv_twins(setup: Setup) -> Iterator[None]:
    """A 9B-KV engine and ``Flux2KleinKVPipeline`` over the same modules, for the ``kv`` cases.

    Both install the KV attention processors on the shared transformer; the previous processors are
    put back afterwards, so the cases after these run as before.
    """
    from diffusers import Flux2KleinKVPipeline

    transformer = setup.engine.pipeline.transformer
    saved = dict(transformer.attn_processors)
    components = setup.engine.pipeline.components
    try:
        kv_pipeline = Flux2KleinKVPipeline(**components)
        kv_pipeline.set_progress_bar_config(disable=True)
        twin = Engine(Flux2KleinPipeline(**components, is_distilled=True), find_variant("flux-2-klein-9b-kv"))
        twin.prompt_cache = setup.engine.prompt_cache
        setup.kv_engine, setup.kv_pipeline = twin, kv_pipeline
        yield
    finally:
        setup.kv_engine = setup.kv_pipeline = None
        transformer.set_attn_processor(saved)


def machine_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What the numbers were measured on."""
    import diffusers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _one_run(
    side: str, setup: Setup, case: Case, run: int, seed: int, refs: Sequence[Any], clock: StageClock
) -> tuple[float, dict[str, float], int | None, list[Any]]:
    clock.reset()
    runner = run_kleinserve if side == "kleinserve" else run_diffusers
    with peak_memory(setup.engine.device) as memory:
        synchronize(setup.engine.device)
        started = time.perf_counter()
        images = runner(setup, case, run, seed, refs, clock.add)
        synchronize(setup.engine.device)
        total = time.perf_counter() - started
    stages = {stage: clock.seconds.get(stage, 0.0) for stage in STAGES}
    stages["other"] = max(0.0, total - sum(stages.values()))
    return total, stages, memory["bytes"], images


def run_case(setup: Setup, case: Case, options: BenchOptions, clock: StageClock, log: Log) -> dict[str, Any]:
    """Warm up both sides, then alternate timed runs; medians, ratio, FLOPs, memory, pixel distance."""
    refs = reference_images(case.references, setup.size)
    flops: dict[str, int] = {}
    calls: dict[str, int] = {}
    for side in SIDES:  # warm-up, counting the transformer's FLOPs
        clock.count_flops = True
        try:
            _one_run(side, setup, case, 0, options.seed, refs, clock)
        finally:
            clock.count_flops = False
        flops[side], calls[side] = clock.transformer_flops, clock.transformer_calls
    totals: dict[str, list[float]] = {side: [] for side in SIDES}
    stages: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    memory: dict[str, int | None] = {side: None for side in SIDES}
    pixel_diff = None
    for run in range(1, options.repeats + 1):
        outputs = {}
        for side in SIDES:
            total, stage_times, peak, outputs[side] = _one_run(side, setup, case, run, options.seed, refs, clock)
            totals[side].append(total)
            stages[side].append(stage_times)
            if peak is not None:
                memory[side] = max(memory[side] or 0, peak)
            log(f"  {case.name} run {run}: {side} {total:.2f}s")
        if pixel_diff is None:
            pixel_diff = max_pixel_difference(outputs["kleinserve"], outputs["diffusers"])
    result: dict[str, Any] = {
        "name": case.name,
        "description": case.description,
        "images": case.images,
        "steps": setup.steps_for(case),
        "max_pixel_diff": pixel_diff,
    }
    for side in SIDES:
        median = statistics.median(totals[side])
        stage_medians = {k: statistics.median(s[k] for s in stages[side]) for k in (*STAGES, "other")}
        denoise = stage_medians["denoise"]
        achieved = flops[side] / denoise / 1e12 if denoise > 0 else None
        result[side] = {
            "median_seconds": median,
            "runs_seconds": totals[side],
            "images_per_second": case.images / median,
            "stages_median_seconds": stage_medians,
            "transformer_calls": calls[side],
            "transformer_tflop": flops[side] / 1e12,
            "denoise_tflops": achieved,
            "peak_memory_bytes": memory[side],
        }
    result["ratio"] = result["diffusers"]["median_seconds"] / result["kleinserve"]["median_seconds"]
    return result


def run_bench(engine: Engine, options: BenchOptions, log: Log = lambda _m: None) -> dict[str, Any]:
    """Run every case of ``options`` on ``engine`` (and diffusers over its modules); the JSON report."""
    unknown = [name for name in options.cases if name not in CASES]
    if unknown:
        raise ValueError(f"unknown bench case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    device, dtype = engine.device, engine.dtype
    base = base_twin(engine)
    setup = Setup(
        engine=engine,
        base_engine=base,
        pipeline=engine.pipeline,
        base_pipeline=base.pipeline,
        kv_engine=None,
        kv_pipeline=None,
        size=options.size,
        steps=options.steps or engine.variant.default_steps,
        base_steps=options.base_steps,
        settings=Settings(max_steps=max(100, options.base_steps)),
    )
    engine.pipeline.set_progress_bar_config(disable=True)
    log(f"measuring the {dtype} matmul peak on {device}")
    peak = matmul_peak_tflops(device, dtype)
    report: dict[str, Any] = {
        "model": engine.variant.id,
        "machine": machine_info(device, dtype),
        "size": options.size,
        "repeats": options.repeats,
        "matmul_peak_tflops": peak,
        "cases": [],
    }
    clock = StageClock(device)
    clock.attach(engine.pipeline)
    try:
        for name in options.cases:
            log(f"case {name}: {CASES[name].description}")
            with kv_twins(setup) if CASES[name].kv else contextlib.nullcontext():
                case_result = run_case(setup, CASES[name], options, clock, log)
            for side in SIDES:
                achieved = case_result[side]["denoise_tflops"]
                case_result[side]["peak_fraction"] = achieved / peak if achieved is not None else None
            report["cases"].append(case_result)
    finally:
        clock.detach()
    _compare_kv_with_plain(report)
    return report


def _compare_kv_with_plain(report: dict[str, Any]) -> None:
    """``kvN`` cases also get ``vs_plain``: the plain pipeline's refN time over the KV path's."""
    by_name = {case["name"]: case for case in report["cases"]}
    for case in report["cases"]:
        plain = by_name.get(case["name"].replace("kv", "ref")) if case["name"].startswith("kv") else None
        if plain is not None:
            case["vs_plain"] = plain["diffusers"]["median_seconds"] / case["kleinserve"]["median_seconds"]
