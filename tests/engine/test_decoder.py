"""``--decoder small``: BFL's small decoder replaces the VAE, resolved like the main weights, planned for."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kleinserve.engine.decoder import (
    SMALL_DECODER_REPO,
    SMALL_DECODER_WIDTHS,
    DecoderSpec,
    planned_config,
    read_config,
    resolve_decoder,
)
from kleinserve.engine.engine import Engine, EngineInputs
from kleinserve.engine.loading import LoadOptions, load_placed, make_engine
from kleinserve.engine.memory import plan_memory
from kleinserve.engine.variants import find_variant
from kleinserve.errors import InvalidParameterError, WeightsUnavailableError
from kleinserve.placement import load_options_for, memory_plan_for
from kleinserve.settings import Settings
from tests.conftest import png_bytes
from tests.engine.test_engine import diffusers_images

KLEIN_4B = find_variant("flux-2-klein-4b")
CPU = torch.device("cpu")
INPUTS = EngineInputs("a red fox in snow", 2, 1.0, 7, width=64, height=64)


def _stored(module: torch.nn.Module) -> int:
    """Numbers a module stores (weights and persistent buffers), as the memory plan counts them."""
    return sum(t.numel() for t in module.state_dict().values())


@pytest.fixture(scope="module")
def small_engine(tiny_distilled: Path, tiny_small_decoder: Path) -> Engine:
    pipeline, placement = load_placed(tiny_distilled, CPU, LoadOptions(torch.float32, vae=tiny_small_decoder))
    return make_engine(pipeline, placement, KLEIN_4B)


def test_the_small_decoder_replaces_the_decoder_and_keeps_the_encoder(
    small_engine: Engine, distilled_engine: Engine, tiny_small_decoder: Path
) -> None:
    vae, full = small_engine.pipeline.vae, distilled_engine.pipeline.vae
    widths = read_config(tiny_small_decoder)["decoder_block_out_channels"]
    assert vae.decoder.conv_in.out_channels == widths[-1] != full.decoder.conv_in.out_channels
    encoder, full_encoder = vae.encoder.state_dict(), full.encoder.state_dict()
    assert all(torch.equal(encoder[k], full_encoder[k]) for k in full_encoder)
    assert torch.equal(vae.bn.running_var, full.bn.running_var)


def test_small_decoder_pixels_are_diffusers_with_the_same_vae(small_engine: Engine, distilled_engine: Engine) -> None:
    """Exactly what ``Flux2KleinPipeline(..., vae=AutoencoderKLFlux2.from_pretrained(small))`` makes, and
    not the full decoder's pixels (the README says it changes pixels)."""
    expected = diffusers_images(small_engine, INPUTS.prompt, steps=2, guidance=1.0, seeds=[7], width=64, height=64)
    got = np.asarray(small_engine.generate(INPUTS).images[0])
    assert np.array_equal(got, expected[0])
    assert not np.array_equal(got, np.asarray(distilled_engine.generate(INPUTS).images[0]))


def test_references_encode_with_the_small_decoders_encoder(small_engine: Engine) -> None:
    reference = Image.open(io.BytesIO(png_bytes(64, 64))).convert("RGB")
    inputs = EngineInputs("make it blue", 2, 1.0, 5, width=64, height=64, references=[reference])
    expected = diffusers_images(
        small_engine, "make it blue", steps=2, guidance=1.0, seeds=[5], references=[reference], width=64, height=64
    )
    assert np.array_equal(np.asarray(small_engine.generate(inputs).images[0]), expected[0])


@pytest.mark.parametrize(
    ("text", "spec"),
    [("full", DecoderSpec()), ("small", DecoderSpec("small")), ("small=/x", DecoderSpec("small", Path("/x")))],
)
def test_decoder_option_parses(text: str, spec: DecoderSpec) -> None:
    assert DecoderSpec.parse(text) == spec and str(spec) == text


@pytest.mark.parametrize("text", ["tiny", "full=/x", "small="])
def test_a_bad_decoder_option_is_a_clear_error(text: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        DecoderSpec.parse(text)
    assert caught.value.field == "decoder"


def test_full_needs_nothing_and_a_local_small_decoder_is_checked(tmp_path: Path, tiny_distilled: Path) -> None:
    assert resolve_decoder(DecoderSpec()) is None
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        resolve_decoder(DecoderSpec("small", tmp_path / "nowhere"))
    with pytest.raises(WeightsUnavailableError, match=r"not a FLUX\.2 VAE"):
        resolve_decoder(DecoderSpec("small", tiny_distilled / "transformer"))


def test_the_hub_decoder_offline_and_not_cached_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError) as caught:
        resolve_decoder(DecoderSpec("small"))
    assert SMALL_DECODER_REPO in caught.value.message and "small=PATH" in caught.value.message
    # The memory plan does not download: it counts the published widths instead.
    assert planned_config(DecoderSpec("small")) == {"decoder_block_out_channels": list(SMALL_DECODER_WIDTHS)}


def test_the_memory_plan_counts_the_small_decoder(
    tiny_distilled: Path, tiny_small_decoder: Path, small_engine: Engine
) -> None:
    served = [(KLEIN_4B.id, KLEIN_4B, tiny_distilled)]
    config = planned_config(DecoderSpec("small", tiny_small_decoder))
    full = plan_memory(served, "cpu", torch.float32).models[0].components
    small = plan_memory(served, "cpu", torch.float32, vae_config=config).models[0].components
    vae = {c.name: c for c in small}["vae"]
    assert vae.parameters == _stored(small_engine.pipeline.vae)
    assert vae.parameters < {c.name: c for c in full}["vae"].parameters
    # The published klein 4B geometry with BFL's widths: a smaller VAE than FLUX.2's.
    published = plan_memory([(KLEIN_4B.id, KLEIN_4B, None)], "cuda", torch.bfloat16, device_memory_gb=24)
    with_small = plan_memory(
        [(KLEIN_4B.id, KLEIN_4B, None)],
        "cuda",
        torch.bfloat16,
        device_memory_gb=24,
        vae_config={"decoder_block_out_channels": list(SMALL_DECODER_WIDTHS)},
    )
    vae_of = lambda plan: {c.name: c for c in plan.models[0].components}["vae"]  # noqa: E731
    assert vae_of(with_small).weight_bytes < vae_of(published).weight_bytes
    assert vae_of(with_small).activation_bytes < vae_of(published).activation_bytes


def test_settings_choose_the_small_decoder(tmp_path: Path, tiny_small_decoder: Path, tiny_distilled: Path) -> None:
    from kleinserve.engine.catalog import ServedModel

    settings = Settings(_env_file=None, data_dir=tmp_path, decoder=f"small={tiny_small_decoder}")
    _, options = load_options_for(settings, CPU)
    assert options.vae == tiny_small_decoder and "small decoder" in options.describe()
    plan = memory_plan_for(settings, [ServedModel(KLEIN_4B, tiny_distilled)], CPU)
    vae = load_placed(tiny_distilled, CPU, options)[0].vae
    assert {c.name: c for c in plan.models[0].components}["vae"].parameters == _stored(vae)
    with pytest.raises(ValueError):
        Settings(_env_file=None, decoder="tiny")


def test_make_tiny_writes_a_small_decoder_the_plan_and_the_server_take(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kleinserve.cli import app

    runner = CliRunner()
    made = runner.invoke(app, ["make-tiny", str(tmp_path / "tiny"), "--small-decoder"])
    assert made.exit_code == 0, made.stderr
    decoder = tmp_path / "tiny" / "small-decoder"
    assert resolve_decoder(DecoderSpec("small", decoder)) == decoder
    model = f"flux-2-klein-4b={tmp_path / 'tiny'}"
    plans = [
        runner.invoke(app, ["models", "--plan", "-m", model, "--device", "cpu", *extra]).stdout
        for extra in ([], ["--decoder", f"small={decoder}"])
    ]
    vae_lines = [next(line for line in plan.splitlines() if line.strip().startswith("vae")) for plan in plans]
    assert vae_lines[0] != vae_lines[1]  # the small decoder's weights and activations are counted
    bad = runner.invoke(app, ["models", "--plan", "-m", model, "--device", "cpu", "--decoder", "tiny"])
    assert bad.exit_code == 1 and "decoder" in bad.stderr


def test_bench_measures_with_the_small_decoder_and_channels_last(
    tmp_path: Path, tiny_distilled: Path, tiny_small_decoder: Path
) -> None:
    """Both sides (kleinserve and diffusers) decode with the same small decoder in channels_last."""
    import json

    from typer.testing import CliRunner

    from kleinserve.cli import app

    target = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench", "--model", f"flux-2-klein-4b={tiny_distilled}", "--dtype", "float32", "--size", "64",
            "--steps", "1", "--cases", "repeat", "--repeats", "1", "--decoder", f"small={tiny_small_decoder}",
            "--vae-channels-last", "--json", str(target),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(target.read_text())
    assert report["mode"] == "float32, offload none, small decoder, VAE channels_last"
    assert f"--decoder small={tiny_small_decoder}" in report["command"] and "--vae-channels-last" in report["command"]
    assert report["cases"][0]["max_pixel_diff"] == 0


def test_serve_says_which_decoder_it_uses(
    tmp_path: Path, tiny_distilled: Path, tiny_small_decoder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import kleinserve.api.server
    from kleinserve.cli import app

    monkeypatch.setattr(kleinserve.api.server, "run", lambda app, settings: None)  # the banner, not the server
    monkeypatch.setattr(os, "umask", lambda mask: 0o022)  # serve's owner-only umask stays out of this process
    args = ["serve", "--model", f"flux-2-klein-4b={tiny_distilled}", "--device", "cpu", "--data-dir", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--decoder", f"small={tiny_small_decoder}", "--vae-channels-last"])
    assert result.exit_code == 0, result.stderr
    assert f"VAE: decoder small={tiny_small_decoder}, channels_last" in " ".join(result.stderr.split())
