"""Memory plans: exact weight counts (checked against the loaded weights and the files on disk), and refusal."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kleinserve.cli import app
from kleinserve.engine.architecture import COMPONENTS, checkpoint_parameters, model_shape
from kleinserve.engine.catalog import ServedModel
from kleinserve.engine.engine import Engine
from kleinserve.engine.memory import MemoryMode, plan_memory, weight_bytes
from kleinserve.engine.variants import find_variant
from kleinserve.errors import InvalidParameterError, ResourceExhaustedError
from kleinserve.runtime import Runtime
from kleinserve.settings import Settings

KLEIN_4B = find_variant("flux-2-klein-4b")
KLEIN_9B = find_variant("flux-2-klein-9b")


def test_counts_from_configs_match_the_safetensors_headers(tiny_distilled: Path) -> None:
    shape = model_shape(KLEIN_4B, tiny_distilled)
    for name in COMPONENTS:
        assert shape[name].parameters == checkpoint_parameters(tiny_distilled / name), name


def test_float32_plan_weighs_exactly_what_the_loaded_pipeline_holds(
    tiny_distilled: Path, distilled_engine: Engine
) -> None:
    plan = plan_memory([(KLEIN_4B.id, KLEIN_4B, tiny_distilled)], "cpu", torch.float32)
    planned = {c.name: c.weight_bytes for c in plan.models[0].components}
    for name in COMPONENTS:
        module = getattr(distilled_engine.pipeline, name)
        tensors = {id(t): t for t in module.state_dict(keep_vars=True).values()}.values()
        assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float32}
        # Every stored tensor counts, in the model's dtype (the VAE's int64 batch counter is one number).
        assert planned[name] == 4 * sum(t.numel() for t in tensors), name


def test_published_geometry_gives_the_published_sizes() -> None:
    four, nine = model_shape(KLEIN_4B), model_shape(KLEIN_9B)
    # Qwen3-4B (tied embeddings) and Qwen3-8B as published: 4.02 B and 8.19 B parameters.
    assert round(four["text_encoder"].parameters / 1e9, 2) == 4.02
    assert round(nine["text_encoder"].parameters / 1e9, 2) == 8.19
    # The transformers are what the names say: about 4 B and 9 B.
    assert 3.8e9 < four["transformer"].parameters < 4.0e9
    assert 9.0e9 < nine["transformer"].parameters < 9.2e9
    assert model_shape(find_variant("flux-2-klein-base-9b")) is nine  # Base shares the geometry


def test_quantisation_shrinks_only_linear_weights() -> None:
    shape = model_shape(KLEIN_4B)["transformer"]
    bf16 = weight_bytes(shape, 2, "none")
    int8 = weight_bytes(shape, 2, "int8")
    int4 = weight_bytes(shape, 2, "int4")
    assert bf16 == 2 * shape.parameters
    non_linear = 2 * (shape.parameters - shape.linear_parameters)
    assert int8 == non_linear + shape.linear_parameters + 3 * sum(lin.out_features for lin in shape.linears)
    assert non_linear < int4 < int8 < bf16


def test_offload_modes_order_the_peak_and_move_weights_to_host_ram() -> None:
    def plan(mode: MemoryMode) -> tuple[int, int]:
        p = plan_memory([(KLEIN_9B.id, KLEIN_9B, None)], "cuda:0", torch.bfloat16, mode, device_memory_gb=1000)
        return p.peak_bytes, p.host_bytes

    none, model, group, sequential = (plan(MemoryMode(offload=o)) for o in ("none", "model", "group", "sequential"))
    assert none[0] > model[0] > group[0] >= sequential[0]
    assert none[1] == 0 and model[1] == group[1] == sequential[1] > 30e9
    te_cpu = plan(MemoryMode(text_encoder_device="cpu"))
    assert none[0] - te_cpu[0] == model_shape(KLEIN_9B)["text_encoder"].parameters * 2
    assert plan(MemoryMode(quantize="int8"))[0] < none[0]


def test_a_plan_that_does_not_fit_is_refused_naming_what_would() -> None:
    plan = plan_memory([(KLEIN_4B.id, KLEIN_4B, None)], "cuda:0", torch.bfloat16, device_memory_gb=12)
    assert plan.fits is False
    with pytest.raises(ResourceExhaustedError) as caught:
        plan.check()
    message = caught.value.message
    assert "flux-2-klein-4b" in message and "12.00 GB" in message and "--offload model" in message
    assert plan_memory([(KLEIN_4B.id, KLEIN_4B, None)], "cuda:0", torch.bfloat16, device_memory_gb=24).fits


def test_unknown_modes_are_clear_errors() -> None:
    with pytest.raises(InvalidParameterError, match="offload"):
        MemoryMode(offload="disk")
    with pytest.raises(InvalidParameterError, match="quantize"):
        MemoryMode(quantize="int3")


def test_models_plan_command(tiny_distilled: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["models", "--plan", "--device", "cpu", "-m", f"flux-2-klein-4b={tiny_distilled}"])
    assert result.exit_code == 0, result.stderr
    assert "memory plan on cpu" in result.stdout and "transformer" in result.stdout and "-> fits" in result.stdout
    result = runner.invoke(
        app, ["models", "--plan", "--device", "cuda:0", "-m", "flux-2-klein-9b", "--device-memory", "16"]
    )
    assert result.exit_code == 0, result.stderr
    assert "does NOT fit" in result.stdout and "published klein 9B geometry" in result.stdout
    result = runner.invoke(app, ["models", "--plan", "--table", "--device", "cuda", "-m", "flux-2-klein-4b"])
    assert result.exit_code == 0 and result.stdout.startswith("| variant | bf16 |")


def test_serve_refuses_to_start_when_the_device_cannot_hold_the_models(tmp_path: Path, tiny_distilled: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "serve",
            "--model",
            f"flux-2-klein-4b={tiny_distilled}",
            "--device",
            "cpu",
            "--device-memory",
            "0.001",
            "--data-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 1
    assert "memory plan on cpu" in result.stderr and "refusing to start" in result.stderr


def test_runtime_does_not_load_models_that_do_not_fit(tmp_path: Path, tiny_distilled: Path) -> None:
    served = [ServedModel(KLEIN_4B, tiny_distilled)]
    runtime = Runtime(Settings(data_dir=tmp_path, device="cpu", device_memory=0.001), served)
    try:
        asyncio.run(runtime.start())
        assert not runtime.ready and runtime.load_error and "1.0 MB" in runtime.load_error
        assert runtime.memory is not None and runtime.memory.fits is False
    finally:
        runtime.stop()


def test_the_readme_table_is_what_the_plan_computes() -> None:
    from kleinserve.engine.memory import plan_table
    from kleinserve.engine.variants import VARIANTS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for line in plan_table(list(VARIANTS), "cuda", torch.bfloat16):
        assert line in readme.splitlines(), line
