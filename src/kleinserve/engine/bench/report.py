"""The bench report: a rich table for people and a JSON file for tools and the README."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from kleinserve.engine.bench.measure import STAGES


def _gb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e9:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def summary_table(report: dict[str, Any]) -> Table:
    """One row per case: medians, the ratio, pixel distance, denoise TFLOP/s and peak memory."""
    machine = report["machine"]
    table = Table(
        title=(
            f"kleinserve vs diffusers {machine['diffusers']}: {report['model']}, {report['size']}², "
            f"{machine['device']} {machine['dtype']}, matmul peak {report['matmul_peak_tflops']:.2f} TFLOP/s"
        )
    )
    for column in ("case", "images", "steps", "kleinserve s", "diffusers s", "speed-up", "max px diff"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for column in ("denoise TFLOP/s (ks / df)", "of peak (ks)", "peak GB (ks / df)"):
        table.add_column(column, justify="right")
    for case in report["cases"]:
        ours, theirs = case["kleinserve"], case["diffusers"]
        tflops = "/".join("-" if s["denoise_tflops"] is None else f"{s['denoise_tflops']:.2f}" for s in (ours, theirs))
        table.add_row(
            case["name"],
            str(case["images"]),
            str(case["steps"]),
            f"{ours['median_seconds']:.2f}",
            f"{theirs['median_seconds']:.2f}",
            f"{case['ratio']:.2f}x",
            str(case["max_pixel_diff"]),
            tflops,
            _pct(ours.get("peak_fraction")),
            f"{_gb(ours['peak_memory_bytes'])} / {_gb(theirs['peak_memory_bytes'])}",
        )
    return table


def stage_table(report: dict[str, Any]) -> Table:
    """Median seconds per stage, kleinserve / diffusers, per case."""
    table = Table(title="median seconds per stage (kleinserve / diffusers)")
    table.add_column("case")
    for stage in (*STAGES, "other"):
        table.add_column(stage.replace("_", " "), justify="right")
    for case in report["cases"]:
        ours = case["kleinserve"]["stages_median_seconds"]
        theirs = case["diffusers"]["stages_median_seconds"]
        table.add_row(case["name"], *(f"{ours[s]:.2f} / {theirs[s]:.2f}" for s in (*STAGES, "other")))
    return table


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
