"""`kleinserve bench` runs on tiny weights and writes the JSON it promises (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kleinserve.cli import app
from kleinserve.engine.bench.cases import CASES, STEP_CACHE_SETTINGS, prompts_for
from kleinserve.engine.bench.measure import STAGES
from kleinserve.engine.bench.modes import Mode, parse_modes
from kleinserve.engine.bench.report import tables
from kleinserve.engine.bench.runner import BenchOptions, run_bench
from kleinserve.engine.cache import PromptCache
from kleinserve.engine.engine import Engine
from kleinserve.engine.tiny import make_tiny


def test_bench_writes_its_json(tmp_path: Path, tiny_distilled: Path) -> None:
    target = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench", "--model", f"flux-2-klein-4b={tiny_distilled}", "--dtype", "float32", "--size", "64",
            "--steps", "1", "--base-steps", "1", "--cases", "ref1,cfg,kv1,queue4", "--repeats", "1",
            "--json", str(target),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "kleinserve vs diffusers" in result.stdout and "cfg" in result.stdout
    report = json.loads(target.read_text())
    assert report["model"] == "flux-2-klein-4b" and report["size"] == 64
    assert report["command"].startswith("kleinserve bench --model")
    assert report["matmul_peak_tflops"] > 0
    assert {"cpu", "device", "dtype", "torch", "diffusers"} <= set(report["machine"])
    assert [case["name"] for case in report["cases"]] == ["ref1", "cfg", "kv1", "queue4"]
    for case in report["cases"]:
        # Same weights, prompts and seeds on both sides: the exact paths give diffusers' pixels,
        # the batched one (queue4) differs by float rounding only.
        assert case["max_pixel_diff"] <= (2 if case["name"] == "queue4" else 0)
        assert case["ratio"] > 0
        for side in ("kleinserve", "diffusers"):
            numbers = case[side]
            assert len(numbers["runs_seconds"]) == 1
            assert set(numbers["stages_median_seconds"]) == {*STAGES, "other"}
            assert numbers["transformer_tflop"] > 0 and numbers["denoise_tflops"] > 0
            assert numbers["peak_fraction"] > 0
            assert numbers["peak_memory_bytes"] > 0
    ref1, cfg, kv1, queue4 = report["cases"]
    assert ref1["kleinserve"]["stages_median_seconds"]["encode_references"] > 0
    # One Base step with CFG: a conditional and an unconditional transformer pass on each side.
    assert cfg["kleinserve"]["transformer_calls"] == cfg["diffusers"]["transformer_calls"] == 2
    # The 9B-KV path against Flux2KleinKVPipeline: the reference tokens only at the first step.
    assert kv1["vs_plain"] > 0
    assert kv1["kleinserve"]["transformer_calls"] == kv1["diffusers"]["transformer_calls"] == 1
    # Four requests queued at once go through a Worker as one batch (one transformer call for the
    # step); diffusers calls the transformer once per request.
    assert (queue4["kleinserve"]["transformer_calls"], queue4["diffusers"]["transformer_calls"]) == (1, 4)
    assert queue4["kleinserve"]["stages_median_seconds"]["encode_image"] > 0


def test_bench_rejects_unknown_cases(tiny_distilled: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "--model", f"flux-2-klein-4b={tiny_distilled}", "--cases", "warp"])
    assert result.exit_code == 1 and "unknown case(s) warp" in result.stderr


def test_make_tiny_rejects_unknown_presets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preset"):
        make_tiny(tmp_path, "distilled", preset="huge")  # type: ignore[arg-type]


def test_bench_measures_a_memory_mode(tmp_path: Path, tiny_distilled: Path) -> None:
    target = tmp_path / "int8.json"
    result = CliRunner().invoke(
        app,
        [
            "bench", "--model", f"flux-2-klein-4b={tiny_distilled}", "--dtype", "float32", "--size", "64",
            "--steps", "1", "--cases", "repeat", "--repeats", "1", "--quantize", "int8", "--json", str(target),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(target.read_text())
    assert report["mode"] == "float32, offload none, transformer int8"
    assert "--quantize int8" in report["command"]
    assert report["cases"][0]["max_pixel_diff"] == 0  # both sides run the same quantised modules
    refused = CliRunner().invoke(app, ["bench", "--model", f"flux-2-klein-4b={tiny_distilled}", "--quantize", "fp8"])
    assert refused.exit_code == 1 and "fp8 needs a CUDA GPU" in refused.stderr


def test_unique_prompts_never_repeat_across_cases() -> None:
    # A prompt met by an earlier case would be a prompt-cache hit, timed as if it were new.
    seen: set[str] = set()
    for case in CASES.values():
        if not case.unique_prompts:
            continue
        for run in range(3):
            prompts = prompts_for(case, run)
            assert not seen & set(prompts), case.name
            seen |= set(prompts)


def test_step_caches_and_the_http_server_are_timed_beside_the_in_process_run(
    tiny_distilled: Path, distilled_engine: Engine
) -> None:
    # Own Engine object over the shared modules: the server sets its prompt cache and settings on it.
    engine = Engine(distilled_engine.pipeline, distilled_engine.variant)
    engine.prompt_cache = PromptCache(1 << 26)
    options = BenchOptions(
        size=64,
        steps=1,
        base_steps=5,
        cases=("unique", "queue4", "stepcache"),
        repeats=1,
        http=True,
        checkpoint=tiny_distilled,
        step_caches=("taylorseer:2",),
    )
    report = run_bench(engine, options)
    assert report["http"] is True
    unique, queue4, stepcache = report["cases"]
    # Through the server: the same pixels as in process, its own timings, both ratios.
    assert unique["http_max_pixel_diff"] == 0
    assert unique["http"]["median_seconds"] > 0 and unique["http"]["transformer_calls"] == 1
    assert unique["http_ratio"] > 0 and unique["http_vs_in_process"] > 0
    # Four requests at once, from four client threads: batched by the server's worker as in process
    # (how the arrivals split into batches may differ: within the batching rule's 2 levels).
    assert queue4["http_max_pixel_diff"] <= 2 and queue4["http"]["images_per_second"] > 0
    assert "http" not in stepcache  # the step-cache sides run in process only
    assert [item["setting"] for item in stepcache["step_cache"]] == ["taylorseer:2"]
    assert CASES["stepcache"].step_caches == STEP_CACHE_SETTINGS  # the default: every setting
    for item in stepcache["step_cache"]:
        # A fixed-interval cache skips work even on random weights, and changes the pixels.
        assert item["flop_fraction"] < 1
        assert item["psnr_db"] is not None and item["psnr_db"] > 0
        assert item["vs_uncached"] > 0 and item["vs_diffusers"] > 0
        assert stepcache[item["setting"]]["transformer_calls"] == 10  # 5 steps, CFG: 2 calls each
    titles = [str(table.title) for table in tables(report)]
    assert any("HTTP server" in t for t in titles) and any("step caching" in t for t in titles)


def test_modes_are_benched_side_by_side_through_the_cli(tmp_path: Path, tiny_distilled: Path) -> None:
    assert parse_modes("bf16, int8+compile,channels-last") == [
        Mode("bf16"),
        Mode("int8+compile", "int8", True),
        Mode("channels-last", vae_channels_last=True),
    ]
    for wrong in ("int9", "bf16,plain", ""):
        with pytest.raises(ValueError):
            parse_modes(wrong)
    target = tmp_path / "modes.json"
    result = CliRunner().invoke(
        app,
        [
            "bench", "--model", f"flux-2-klein-4b={tiny_distilled}", "--dtype", "float32", "--size", "64",
            "--steps", "1", "--cases", "repeat", "--runs", "1", "--modes", "fp32,int8", "--http", "--json", str(target),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "modes side by side" in result.stdout and "through the HTTP server" in result.stdout
    report = json.loads(target.read_text())
    assert "--modes fp32,int8" in report["command"] and "--http" in report["command"]
    assert [(m["name"], m["mode"]) for m in report["modes"]] == [
        ("fp32", "float32, offload none"),
        ("int8", "float32, offload none, transformer int8, text encoder int8"),
    ]
    assert report["cases"] == report["modes"][0]["report"]["cases"]  # the first mode's report on top
    rows = report["mode_comparison"]
    assert [(r["case"], r["mode"]) for r in rows] == [("repeat", "fp32"), ("repeat", "int8")]
    assert rows[0]["vs_first_mode"] == 1.0 and rows[1]["vs_first_mode"] > 0
    assert all(r["peak_memory_bytes"] > 0 and r["max_pixel_diff"] == 0 for r in rows)
    for mode in report["modes"]:  # each mode also through the server, on its own load
        (case,) = mode["report"]["cases"]
        assert case["http_max_pixel_diff"] == 0 and case["http_ratio"] > 0


def test_bench_refuses_conflicting_or_bad_options(tiny_distilled: Path) -> None:
    model = f"flux-2-klein-4b={tiny_distilled}"
    for args, message in (
        (["--modes", "fp32,int8", "--quantize", "int8"], "drop --quantize"),
        (["--modes", "int9"], "bench mode 'int9'"),
        (["--cases", "stepcache", "--step-caches", "off"], "is off"),
        (["--cases", "stepcache", "--step-caches", "magic:3"], "step cache type"),
    ):
        result = CliRunner().invoke(app, ["bench", "--model", model, *args])
        assert result.exit_code == 1 and message in result.stderr, (args, result.stderr)
