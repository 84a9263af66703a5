"""``kleinserve bench --modes``: the same cases in several memory/compute modes, side by side in one run.

A mode is the plain load in the chosen dtype (``plain``, also spelled by the dtype, e.g. ``bf16``)
or ``+``-joined parts: ``int8``/``fp8``/``int4`` (the transformer and the text encoder quantised
through torchao, engine/loading.py), ``compile`` (regional ``torch.compile`` of the transformer
blocks) and ``channels-last`` (the VAE in channels_last, engine/vae.py). ``--modes
bf16,int8,compile`` runs every case three times, each mode on its own freshly loaded weights, and
compares each mode's kleinserve medians and peak memory with the first mode's.

Decisions:
- One mode at a time in memory. Two copies of the weights may not fit, so modes cannot alternate
  run by run as the sides of a case do; the comparison across modes is between medians of runs made
  minutes apart, on the same machine, and the report says so. Within a mode, kleinserve and
  diffusers still alternate on the same (quantised or compiled) modules.
- Each mode's full report is kept (``modes[i].report``); ``mode_comparison`` holds the cross-mode
  figures per case: seconds, the in-mode ratio to diffusers, the speed-up over the first mode's
  kleinserve and over its diffusers, and the peak memory.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kleinserve.engine.bench.runner import BenchOptions, Log, run_bench
from kleinserve.engine.engine import Engine
from kleinserve.engine.loading import LoadOptions

QUANTISATIONS = ("int8", "fp8", "int4")
PLAIN_NAMES = ("plain", "none", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Mode:
    """One way of loading the weights for the bench."""

    name: str
    quantize: str = "none"
    compile: bool = False
    vae_channels_last: bool = False

    def load_options(self, base: LoadOptions) -> LoadOptions:
        mode = replace(base.mode, quantize=self.quantize, quantize_text_encoder=self.quantize)
        return replace(base, mode=mode, compile=self.compile, vae_channels_last=self.vae_channels_last)


def parse_modes(text: str) -> list[Mode]:
    """``bf16,int8,compile,int8+compile`` → modes; a clear ValueError on anything else."""
    modes: list[Mode] = []
    for raw in (part.strip() for part in text.split(",")):
        if not raw:
            continue
        quantize, compile_, channels_last = "none", False, False
        for token in (t.strip().lower() for t in raw.split("+")):
            if token in QUANTISATIONS and quantize == "none":
                quantize = token
            elif token == "compile" and not compile_:
                compile_ = True
            elif token == "channels-last" and not channels_last:
                channels_last = True
            elif token not in PLAIN_NAMES:
                raise ValueError(
                    f"bench mode {raw!r}: parts are plain (or the dtype), {', '.join(QUANTISATIONS)}, compile and "
                    "channels-last, joined by +"
                )
        modes.append(Mode(raw, quantize, compile_, channels_last))
    if not modes:
        raise ValueError("--modes names no mode")
    if len({(m.quantize, m.compile, m.vae_channels_last) for m in modes}) != len(modes):
        raise ValueError(f"--modes {text!r} names the same mode twice")
    return modes


def run_modes(
    load: Callable[[LoadOptions], Engine],
    base: LoadOptions,
    modes: Sequence[Mode],
    options: BenchOptions,
    log: Log = lambda _m: None,
) -> dict[str, Any]:
    """Load and bench each mode in turn; the first mode's report, with every mode's and the comparison."""
    reports: list[dict[str, Any]] = []
    for mode in modes:
        load_options = mode.load_options(base)
        log(f"mode {mode.name}: loading ({load_options.describe()})")
        engine = load(load_options)
        try:
            report = run_bench(engine, options, log)
        finally:
            del engine
            gc.collect()  # free this mode's weights before the next mode loads its own
        report["mode"] = load_options.describe()
        reports.append(report)
    combined = dict(reports[0])
    combined["modes"] = [{"name": m.name, "mode": r["mode"], "report": r} for m, r in zip(modes, reports, strict=True)]
    combined["mode_comparison"] = compare_modes(modes, reports)
    return combined


def compare_modes(modes: Sequence[Mode], reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case and mode: seconds, ratio to diffusers in that mode, speed-up over the first mode, memory."""
    first = {case["name"]: case for case in reports[0]["cases"]}
    rows = []
    for mode, report in zip(modes, reports, strict=True):
        for case in report["cases"]:
            ours = case["kleinserve"]
            baseline = first[case["name"]]
            rows.append(
                {
                    "case": case["name"],
                    "mode": mode.name,
                    "kleinserve_seconds": ours["median_seconds"],
                    "diffusers_seconds": case["diffusers"]["median_seconds"],
                    "ratio": case["ratio"],
                    "vs_first_mode": baseline["kleinserve"]["median_seconds"] / ours["median_seconds"],
                    "vs_first_mode_diffusers": baseline["diffusers"]["median_seconds"] / ours["median_seconds"],
                    "denoise_seconds": ours["stages_median_seconds"]["denoise"],
                    "denoise_vs_first_mode": _ratio(
                        baseline["kleinserve"]["stages_median_seconds"]["denoise"],
                        ours["stages_median_seconds"]["denoise"],
                    ),
                    "peak_memory_bytes": ours["peak_memory_bytes"],
                    "max_pixel_diff": case["max_pixel_diff"],
                }
            )
    return rows


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None
