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


def http_table(report: dict[str, Any]) -> Table | None:
    """The cases timed through the HTTP server: both ratios and the serving overhead."""
    cases = [case for case in report["cases"] if "http_ratio" in case]
    if not cases:
        return None
    table = Table(title="through the HTTP server (sync requests timed by the client)")
    for column in ("case", "http s", "in-process s", "diffusers s", "ratio in process", "ratio via HTTP"):
        table.add_column(column, justify="left" if column == "case" else "right")
    table.add_column("HTTP / in-process ratio (>= 0.95)", justify="right")
    table.add_column("max px diff", justify="right")
    for case in cases:
        table.add_row(
            case["name"],
            f"{case['http']['median_seconds']:.2f}",
            f"{case['kleinserve']['median_seconds']:.2f}",
            f"{case['diffusers']['median_seconds']:.2f}",
            f"{case['ratio']:.2f}x",
            f"{case['http_ratio']:.2f}x",
            f"{case['http_vs_in_process']:.3f}",
            str(case["http_max_pixel_diff"]),
        )
    return table


def step_cache_table(report: dict[str, Any]) -> Table | None:
    """Each step-cache setting against the uncached run: speed, pixel distance, work skipped."""
    rows = [(case, item) for case in report["cases"] for item in case.get("step_cache", ())]
    if not rows:
        return None
    table = Table(title="step caching (Base with CFG) against the uncached kleinserve run")
    for column in ("setting", "steps", "s", "uncached s", "vs uncached", "vs diffusers", "PSNR dB", "FLOPs run"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for case, item in rows:
        table.add_row(
            item["setting"],
            str(case["steps"]),
            f"{item['median_seconds']:.2f}",
            f"{case['kleinserve']['median_seconds']:.2f}",
            f"{item['vs_uncached']:.2f}x",
            f"{item['vs_diffusers']:.2f}x",
            "identical" if item["psnr_db"] is None else f"{item['psnr_db']:.1f}",
            _pct(item["flop_fraction"]),
        )
    return table


def modes_table(report: dict[str, Any]) -> Table | None:
    """``--modes``: each mode's kleinserve median and memory against the first mode's, per case."""
    rows = report.get("mode_comparison")
    if not rows:
        return None
    first = report["modes"][0]["name"]
    table = Table(title=f"modes side by side (each on its own load; speed-ups against {first})")
    for column in ("case", "mode", "kleinserve s", "diffusers s", "vs diffusers", f"vs {first}", "denoise s"):
        table.add_column(column, justify="left" if column in ("case", "mode") else "right")
    for column in (f"denoise vs {first}", "peak GB", "max px diff"):
        table.add_column(column, justify="right")
    for row in rows:
        denoise_gain = row["denoise_vs_first_mode"]
        table.add_row(
            row["case"],
            row["mode"],
            f"{row['kleinserve_seconds']:.2f}",
            f"{row['diffusers_seconds']:.2f}",
            f"{row['ratio']:.2f}x",
            f"{row['vs_first_mode']:.2f}x",
            f"{row['denoise_seconds']:.2f}",
            "-" if denoise_gain is None else f"{denoise_gain:.2f}x",
            _gb(row["peak_memory_bytes"]),
            str(row["max_pixel_diff"]),
        )
    return table


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def tables(report: dict[str, Any]) -> list[Table]:
    """Every table the report has, in the order the CLI prints them."""
    optional = (http_table(report), step_cache_table(report), modes_table(report))
    return [summary_table(report), stage_table(report), *(table for table in optional if table is not None)]
