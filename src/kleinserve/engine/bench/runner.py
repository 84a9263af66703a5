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
import dataclasses
import functools
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import Flux2KleinPipeline

from kleinserve.engine.bench.cases import (
    CASES,
    Case,
    Runner,
    Setup,
    max_pixel_difference,
    psnr,
    reference_images,
    run_diffusers,
    run_kleinserve,
)
from kleinserve.engine.bench.measure import STAGES, StageClock, matmul_peak_tflops, peak_memory, synchronize
from kleinserve.engine.bench.serving import BenchServer
from kleinserve.engine.engine import Engine
from kleinserve.engine.stepcache import StepCache
from kleinserve.engine.variants import find_variant
from kleinserve.settings import Settings

SIDES = ("kleinserve", "diffusers")
HTTP = "http"
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
    # Also time every case through the HTTP server (engine/bench/serving.py), which is started on
    # the loaded engines; it needs the checkpoint's directory for the model list.
    http: bool = False
    checkpoint: Path | None = None
    # The step-cache settings of the ``stepcache`` case (None: STEP_CACHE_SETTINGS).
    step_caches: Sequence[str] | None = None

    def case(self, name: str) -> Case:
        case = CASES[name]
        if case.step_caches and self.step_caches is not None:
            for setting in self.step_caches:
                if StepCache.parse(setting) is None:
                    raise ValueError(f"step-cache setting {setting!r} is off; the uncached run is always timed")
            case = dataclasses.replace(case, step_caches=tuple(self.step_caches))
        return case


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


@dataclass(frozen=True)
class Side:
    """One way of running a case: kleinserve in process, diffusers, a step-cache setting, HTTP."""

    name: str
    runner: Runner
    # Timed runs get prompts of their own: this side shares the prompt cache with an earlier side
    # of the same run, whose prompts it would otherwise meet as cache hits.
    own_prompts: bool = False


def sides_for(case: Case, server: BenchServer | None) -> list[Side]:
    """kleinserve and diffusers, then one side per step-cache setting, then HTTP when asked for."""
    sides = [Side("kleinserve", run_kleinserve), Side("diffusers", run_diffusers)]
    for setting in case.step_caches:
        cache = StepCache.parse(setting)
        assert cache is not None
        sides.append(Side(setting, functools.partial(run_kleinserve, step_cache=cache), own_prompts=True))
    if server is not None and server.serves(case):
        sides.append(Side(HTTP, server.run, own_prompts=True))
    return sides


def _one_run(
    side: Side, setup: Setup, case: Case, run: int, seed: int, refs: Sequence[Any], clock: StageClock
) -> tuple[float, dict[str, float], int | None, list[Any]]:
    clock.reset()
    tag = side.name.replace(":", "") if side.own_prompts and run > 0 else ""
    with peak_memory(setup.engine.device) as memory:
        synchronize(setup.engine.device)
        started = time.perf_counter()
        images = side.runner(setup, case, run, seed, refs, clock.add, tag=tag)
        synchronize(setup.engine.device)
        total = time.perf_counter() - started
    stages = {stage: clock.seconds.get(stage, 0.0) for stage in STAGES}
    stages["other"] = max(0.0, total - sum(stages.values()))
    return total, stages, memory["bytes"], images


def is_compiled(transformer: torch.nn.Module) -> bool:
    """Whether ``transformer`` has compiled blocks (``--compile``: regional compilation)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules())


def run_case(
    setup: Setup, case: Case, options: BenchOptions, clock: StageClock, log: Log, server: BenchServer | None = None
) -> dict[str, Any]:
    """Warm up every side, then alternate timed runs; medians, ratios, FLOPs, memory, pixel distances.

    The warm-up runs all use the same prompts and seeds, so their images are what the sides'
    pixels are compared on (timed runs of some sides have prompts of their own).
    """
    refs = reference_images(case.references, setup.size)
    sides = sides_for(case, server)
    flops: dict[str, int] = {}
    calls: dict[str, int] = {}
    warm: dict[str, list[Any]] = {}
    compiled = is_compiled(setup.engine.pipeline.transformer)
    for side in sides:  # warm-up, counting the transformer's FLOPs
        clock.count_flops = True
        try:
            # FLOPs are counted eagerly: torch.compile cannot trace under the counter's dispatch mode
            # (the compiled blocks compute the same FLOPs).
            with torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext():
                *_, warm[side.name] = _one_run(side, setup, case, 0, options.seed, refs, clock)
        finally:
            clock.count_flops = False
        flops[side.name], calls[side.name] = clock.transformer_flops, clock.transformer_calls
        if compiled:  # a second warm-up compiles for this case's shapes, out of the clock
            _one_run(side, setup, case, 0, options.seed, refs, clock)
    totals: dict[str, list[float]] = {side.name: [] for side in sides}
    stages: dict[str, list[dict[str, float]]] = {side.name: [] for side in sides}
    memory: dict[str, int | None] = {side.name: None for side in sides}
    for run in range(1, options.repeats + 1):
        for side in sides:
            total, stage_times, peak, _ = _one_run(side, setup, case, run, options.seed, refs, clock)
            totals[side.name].append(total)
            stages[side.name].append(stage_times)
            if peak is not None:
                memory[side.name] = max(memory[side.name] or 0, peak)
            log(f"  {case.name} run {run}: {side.name} {total:.2f}s")
    result: dict[str, Any] = {
        "name": case.name,
        "description": case.description,
        "images": case.images,
        "steps": setup.steps_for(case),
        "max_pixel_diff": max_pixel_difference(warm["kleinserve"], warm["diffusers"]),
    }
    for side in sides:
        median = statistics.median(totals[side.name])
        stage_medians = {k: statistics.median(s[k] for s in stages[side.name]) for k in (*STAGES, "other")}
        denoise = stage_medians["denoise"]
        achieved = flops[side.name] / denoise / 1e12 if denoise > 0 else None
        result[side.name] = {
            "median_seconds": median,
            "runs_seconds": totals[side.name],
            "images_per_second": case.images / median,
            "stages_median_seconds": stage_medians,
            "transformer_calls": calls[side.name],
            "transformer_tflop": flops[side.name] / 1e12,
            "denoise_tflops": achieved,
            "peak_memory_bytes": memory[side.name],
        }
    ours, theirs = result["kleinserve"]["median_seconds"], result["diffusers"]["median_seconds"]
    result["ratio"] = theirs / ours
    if HTTP in result:
        served = result[HTTP]["median_seconds"]
        result["http_ratio"] = theirs / served
        # http_ratio / ratio: 1.0 means no serving overhead; the issue asks for at least 0.95.
        result["http_vs_in_process"] = ours / served
        result["http_max_pixel_diff"] = max_pixel_difference(warm[HTTP], warm["kleinserve"])
    if case.step_caches:
        result["step_cache"] = [
            {
                "setting": setting,
                "median_seconds": result[setting]["median_seconds"],
                "vs_uncached": ours / result[setting]["median_seconds"],
                "vs_diffusers": theirs / result[setting]["median_seconds"],
                "psnr_db": psnr(warm[setting], warm["kleinserve"]),
                # Below 1: the cache skipped work (a threshold cache on random weights may never do).
                "flop_fraction": flops[setting] / flops["kleinserve"] if flops["kleinserve"] else None,
            }
            for setting in case.step_caches
        ]
    return result


def run_bench(engine: Engine, options: BenchOptions, log: Log = lambda _m: None) -> dict[str, Any]:
    """Run every case of ``options`` on ``engine`` (and diffusers over its modules); the JSON report."""
    unknown = [name for name in options.cases if name not in CASES]
    if unknown:
        raise ValueError(f"unknown bench case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    for name in options.cases:
        options.case(name)  # a bad step-cache setting fails now, not after the other cases ran
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
        "http": options.http,
        "matmul_peak_tflops": peak,
        "cases": [],
    }
    clock = StageClock(device)
    clock.attach(engine.pipeline)
    with contextlib.ExitStack() as stack:
        stack.callback(clock.detach)
        server = None
        if options.http:
            if options.checkpoint is None:
                raise ValueError("the HTTP side needs the checkpoint's directory")
            log("starting the HTTP server on the loaded engines")
            server = stack.enter_context(BenchServer(list(dict.fromkeys((engine, base))), options.checkpoint))
        for name in options.cases:
            case = options.case(name)
            log(f"case {name}: {case.description}")
            with kv_twins(setup) if case.kv else contextlib.nullcontext():
                case_result = run_case(setup, case, options, clock, log, server)
            for side in case_result:
                numbers = case_result[side]
                if isinstance(numbers, dict) and "denoise_tflops" in numbers:
                    achieved = numbers["denoise_tflops"]
                    numbers["peak_fraction"] = achieved / peak if achieved is not None else None
            report["cases"].append(case_result)
    _compare_kv_with_plain(report)
    return report


def _compare_kv_with_plain(report: dict[str, Any]) -> None:
    """``kvN`` cases also get ``vs_plain``: the plain pipeline's refN time over the KV path's."""
    by_name = {case["name"]: case for case in report["cases"]}
    for case in report["cases"]:
        plain = by_name.get(case["name"].replace("kv", "ref")) if case["name"].startswith("kv") else None
        if plain is not None:
            case["vs_plain"] = plain["diffusers"]["median_seconds"] / case["kleinserve"]["median_seconds"]
