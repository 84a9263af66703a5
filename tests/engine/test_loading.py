"""Loading options on the CPU: int8 really quantises, offload hooks keep the pixels, bad combinations are refused.

What needs CUDA (fp8, int4, offloading onto a GPU, flash attention) cannot run here; these tests cover
the refusals, and run the offload hooks with the CPU standing in for the GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kleinserve.engine.engine import Engine, EngineInputs
from kleinserve.engine.loading import (
    LoadOptions,
    check_options,
    compile_transformer,
    load_placed,
    make_engine,
    place,
    warm_up,
)
from kleinserve.engine.memory import MemoryMode, plan_memory
from kleinserve.engine.variants import find_variant
from kleinserve.engine.weights import read_pipeline
from kleinserve.errors import InvalidParameterError
from tests.engine.test_engine import diffusers_images

KLEIN_4B = find_variant("flux-2-klein-4b")
CPU = torch.device("cpu")
INPUTS = EngineInputs("a red fox in snow", 2, 1.0, 7, width=64, height=64)
INT8 = MemoryMode(quantize="int8", quantize_text_encoder="int8")


def pixels(engine: Engine) -> np.ndarray:
    return np.asarray(engine.generate(INPUTS).images[0])


@pytest.fixture(scope="module")
def base_pixels(distilled_engine: Engine) -> np.ndarray:
    return pixels(distilled_engine)


@pytest.fixture(scope="module")
def int8_engine(tiny_distilled: Path) -> Engine:
    pipeline, placement = load_placed(tiny_distilled, CPU, LoadOptions(torch.float32, INT8))
    return make_engine(pipeline, placement, KLEIN_4B)


def _stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly torchao) tensor really holds: the sum of its inner tensors."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(_stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def test_int8_really_quantises_and_weighs_what_the_plan_says(int8_engine: Engine, tiny_distilled: Path) -> None:
    transformer = int8_engine.pipeline.transformer
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m.weight).__name__ == "Int8Tensor" for m in linears)
    encoder = int8_engine.pipeline.text_encoder
    assert type(encoder.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    plan = plan_memory([(KLEIN_4B.id, KLEIN_4B, tiny_distilled)], "cpu", torch.float32, INT8)
    planned = {c.name: c.weight_bytes for c in plan.models[0].components}
    tensors = {id(t): t for t in transformer.state_dict(keep_vars=True).values()}.values()
    assert planned["transformer"] == sum(_stored_bytes(t) for t in tensors)


def test_int8_engine_matches_diffusers_on_the_same_quantised_weights(
    int8_engine: Engine, base_pixels: np.ndarray
) -> None:
    expected = diffusers_images(int8_engine, INPUTS.prompt, steps=2, guidance=1.0, seeds=[7], width=64, height=64)
    got = pixels(int8_engine)
    assert np.array_equal(got, expected[0])
    assert not np.array_equal(got, base_pixels)  # quantisation changed the arithmetic


@pytest.mark.parametrize(
    "mode",
    [MemoryMode(offload="model"), MemoryMode(offload="group", text_encoder_device="cpu")],
    ids=["model", "group-te-cpu"],
)
def test_offload_hooks_give_the_same_pixels(mode: MemoryMode, tiny_distilled: Path, base_pixels: np.ndarray) -> None:
    """The CPU stands in for the GPU: the hooks run, move nothing, and must not change the arithmetic."""
    pipeline = read_pipeline(tiny_distilled, torch.float32)
    engine = make_engine(pipeline, place(pipeline, CPU, mode), KLEIN_4B)
    if mode.offload == "model":
        assert hasattr(pipeline.transformer, "_hf_hook")
    else:
        assert hasattr(pipeline.transformer, "_diffusers_hook") and not hasattr(
            pipeline.text_encoder, "_diffusers_hook"
        )
    assert np.array_equal(pixels(engine), base_pixels)


def test_native_attention_backend_keeps_the_pixels(tiny_distilled: Path, base_pixels: np.ndarray) -> None:
    pipeline, placement = load_placed(tiny_distilled, CPU, LoadOptions(torch.float32, attention_backend="native"))
    assert np.array_equal(pixels(make_engine(pipeline, placement, KLEIN_4B)), base_pixels)


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        (LoadOptions(mode=MemoryMode(offload="model")), "offload", "needs a GPU"),
        # accelerate's sequential hooks cannot run with the CPU as the execution device (a TypeError
        # in their post-forward, diffusers' own pipeline too): refused before anything loads.
        (LoadOptions(mode=MemoryMode(offload="sequential")), "offload", "--offload sequential needs a GPU"),
        (LoadOptions(mode=MemoryMode(quantize="fp8")), "quantize", "compute capability 8.9"),
        (LoadOptions(mode=MemoryMode(quantize_text_encoder="int4")), "quantize_text_encoder", "need CUDA"),
        (LoadOptions(attention_backend="warp"), "attention_backend", "is not one of"),
        (LoadOptions(mode=MemoryMode(text_encoder_device="tpu:9")), "text_encoder_device", "not a torch device"),
    ],
)
def test_combinations_the_cpu_cannot_run_are_refused(options: LoadOptions, field: str, words: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        check_options(CPU, options)
    assert caught.value.field == field and words in caught.value.message


@pytest.mark.parametrize(
    "options",
    [
        LoadOptions(mode=MemoryMode(offload="sequential", quantize="int8")),
        LoadOptions(mode=MemoryMode(offload="sequential"), compile=True),
    ],
)
def test_combinations_no_device_can_run_are_refused(options: LoadOptions) -> None:
    with pytest.raises(InvalidParameterError, match="sequential"):
        check_options(torch.device("cuda"), options)


def test_an_attention_backend_that_is_not_installed_is_a_clear_error(tiny_distilled: Path) -> None:
    with pytest.raises(InvalidParameterError, match="flash cannot be used here"):
        load_placed(tiny_distilled, CPU, LoadOptions(torch.float32, attention_backend="flash"))


def test_regional_compilation_traces_every_block_whole_and_keeps_the_pixels(
    tiny_distilled: Path, base_pixels: np.ndarray
) -> None:
    """``eager`` runs dynamo's tracing (fullgraph: a graph break fails) without inductor's slow codegen;
    inductor itself was run by hand on this CPU (README)."""
    pipeline, placement = load_placed(tiny_distilled, CPU, LoadOptions(torch.float32))
    compile_transformer(pipeline, backend="eager")
    engine = make_engine(pipeline, placement, KLEIN_4B)
    transformer = pipeline.transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in blocks)
    warm_up(engine)  # the default size, one step
    assert np.array_equal(pixels(engine), base_pixels)


def test_serve_with_sequential_offload_on_the_cpu_stops_at_start(
    tmp_path: Path, tiny_distilled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clear one-line error before any weight is read, not a crash in the first job."""
    import os

    from typer.testing import CliRunner

    from kleinserve.cli import app

    monkeypatch.setattr(os, "umask", lambda mask: 0o022)  # serve's owner-only umask stays out of this process

    args = ["serve", "--model", f"flux-2-klein-4b={tiny_distilled}", "--device", "cpu", "--offload", "sequential"]
    result = CliRunner().invoke(app, [*args, "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "--offload sequential needs a GPU" in result.stderr and "Traceback" not in result.stderr
