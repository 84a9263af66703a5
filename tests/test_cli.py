"""The kleinserve command, driven through its entry point on tiny checkpoints."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image
from typer.testing import CliRunner

from kleinserve.cli import app
from tests.conftest import ImageServer, png_bytes

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def model_arg(directory: Path, variant: str = "flux-2-klein-4b") -> str:
    return f"{variant}={directory}"


def test_text_to_image_with_aspect_ratio_n2_webp(tmp_path: Path, tiny_distilled: Path) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run(
        "generate",
        "a red fox in snow",
        "--model",
        model_arg(tiny_distilled),
        "--aspect-ratio",
        "16:9",
        "--megapixels",
        "0.25",
        "--seed",
        "7",
        "-n",
        "2",
        "--format",
        "webp",
        "--quality",
        "90",
        "-o",
        str(out),
    )
    assert code == 0, stderr
    files = sorted(out.iterdir())
    assert [f.suffix for f in files] == [".webp", ".webp"]
    for f in files:
        with Image.open(f) as image:
            assert image.format == "WEBP" and image.size == (688, 384)
    assert "seed=7" in stdout and "seed=8" in stdout and "688x384" in stdout
    assert "denoise" in stderr  # timings


def test_output_png_matches_diffusers_and_carries_parameters(tmp_path: Path, tiny_distilled: Path) -> None:
    target = tmp_path / "fox.png"
    code, stdout, stderr = run(
        "generate",
        "a fox",
        "--model",
        model_arg(tiny_distilled),
        "--width",
        "80",
        "--height",
        "64",
        "--seed",
        "3",
        "--steps",
        "3",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "-o",
        str(target),
    )
    assert code == 0, stderr
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_distilled))
    expected = pipe(
        prompt="a fox",
        width=80,
        height=64,
        num_inference_steps=3,
        guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    with Image.open(target) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
        params = json.loads(image.text["parameters"])
    assert params == {
        "generator": "kleinserve",
        "model": "flux-2-klein-4b",
        "prompt": "a fox",
        "seed": 3,
        "steps": 3,
        "guidance": 1.0,
        "width": 80,
        "height": 64,
    }
    assert str(target) in stdout


def test_generate_with_the_small_decoder(tmp_path: Path, tiny_distilled: Path, tiny_small_decoder: Path) -> None:
    """``--decoder small=PATH`` is diffusers' pipeline with that VAE (and not the full decoder's pixels)."""
    from diffusers import AutoencoderKLFlux2

    args = ["a fox", "-m", model_arg(tiny_distilled), "--width", "64", "--height", "64", "--seed", "3", "--steps", "2"]
    args += ["--dtype", "float32", "--device", "cpu"]
    code, _, stderr = run("generate", *args, "--decoder", f"small={tiny_small_decoder}", "-o", str(tmp_path / "s.png"))
    assert code == 0, stderr
    vae = AutoencoderKLFlux2.from_pretrained(str(tiny_small_decoder))
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_distilled), vae=vae)
    expected = pipe(
        prompt="a fox",
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    code, _, stderr = run("generate", *args, "-o", str(tmp_path / "f.png"))
    assert code == 0, stderr
    with Image.open(tmp_path / "s.png") as small, Image.open(tmp_path / "f.png") as full:
        assert np.array_equal(np.asarray(small.convert("RGB")), np.asarray(expected))
        assert not np.array_equal(np.asarray(small.convert("RGB")), np.asarray(full.convert("RGB")))


def test_no_seed_gets_a_random_one_that_is_reported(tmp_path: Path, tiny_distilled: Path) -> None:
    target = tmp_path / "r.png"
    code, stdout, _ = run(
        "generate", "random", "-m", model_arg(tiny_distilled), "--width", "64", "--height", "64", "-o", str(target)
    )
    assert code == 0
    reported = int(stdout.split("seed=")[1].split()[0])
    with Image.open(target) as image:
        assert json.loads(image.text["parameters"])["seed"] == reported


@pytest.mark.parametrize("fmt", ["png", "jpeg", "jpg", "webp"])
def test_references_as_file_url_base64_and_data_uri(
    tmp_path: Path, tiny_base: Path, image_server: ImageServer, fmt: str
) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes(96, 64))
    url = image_server.add(f"hat-{fmt}.png", png_bytes(48, 48, (10, 200, 10)))
    raw = base64.b64encode(png_bytes(40, 40, (0, 0, 200))).decode()
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes(32, 64)).decode()
    out = tmp_path / "out"
    code, _, stderr = run(
        "generate",
        "put the hat from image 2 on the cat",
        "-m",
        model_arg(tiny_base, "flux-2-klein-base-4b"),
        "-i",
        str(path),
        "-i",
        url,
        "-i",
        raw,
        "-i",
        data_uri,
        "--steps",
        "2",
        "--seed",
        "1",
        "--format",
        fmt,
        "-o",
        str(out),
    )
    assert code == 0, stderr
    (written,) = list(out.iterdir())
    with Image.open(written) as image:
        assert image.format == {"jpg": "JPEG"}.get(fmt, fmt.upper())
        assert image.size == (96, 64)  # the first reference's size
    assert "encode_references" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "flux-1-dev"], "unknown model 'flux-1-dev'"),
        (["--aspect-ratio", "7:3"], "aspect_ratio: must be one of"),
        (["--aspect-ratio", "1:1", "--megapixels", "3"], "megapixels: must be one of"),
        (["--width", "100", "--height", "64"], "width: width and height must be multiples of 16"),
        (["--width", "64"], "size: width and height must be given together"),
        (["--width", "64", "--height", "64", "--aspect-ratio", "1:1"], "not both"),
        (["--steps", "0"], "steps:"),
        (["--guidance", "nan"], "guidance:"),
        (["-n", "0"], "num_images:"),
        (["--format", "gif"], "output_format: must be one of png, jpeg"),
        (["--quality", "101"], "quality:"),
        (["-i", "/no/such/file.png"], "images[0]: no such file: /no/such/file.png"),
        (["-i", "not-an-image!"], "images[0]: is not a file, an http(s) URL, a data URI or base64"),
        (["-i", "https://127.0.0.1:1/x.png"], "images[0]: fetching"),
        (["-i", "ftp://example.com/x.png"], "unsupported URL scheme"),
        (["-o", "x.jpg", "--format", "png"], "does not match the file name"),
        (["--device", "potato"], "device:"),
        (["--decoder", "tiny"], "decoder"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, tiny_distilled: Path, args: list[str], message: str) -> None:
    full = ["generate", "a prompt", "--model", model_arg(tiny_distilled), *args]
    if "--model" in args:
        full = ["generate", "a prompt", *args]
    if "-o" not in args:
        full += ["-o", str(tmp_path / "out")]
    code, _, stderr = run(*full)
    assert code == 1
    text = " ".join(stderr.split())
    assert text.startswith("error: ") and message in text
    assert "Traceback" not in stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_too_many_references(tmp_path: Path, tiny_distilled: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(32, 32))
    images = [arg for _ in range(5) for arg in ("-i", str(path))]
    code, _, stderr = run("generate", "x", "-m", model_arg(tiny_distilled), *images, "-o", str(tmp_path / "o"))
    assert code == 1 and "at most 4 reference images" in stderr


def test_empty_prompt(tmp_path: Path, tiny_distilled: Path) -> None:
    code, _, stderr = run("generate", "   ", "-m", model_arg(tiny_distilled), "-o", str(tmp_path / "o"))
    assert code == 1 and "prompt: must not be empty" in stderr


def test_corrupt_reference_image(tmp_path: Path, tiny_distilled: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(png_bytes(64, 64)[:60])
    code, _, stderr = run("generate", "x", "-m", model_arg(tiny_distilled), "-i", str(path), "-o", str(tmp_path / "o"))
    assert code == 1 and "images[0]:" in stderr and "Traceback" not in stderr


def test_make_tiny_and_models(tmp_path: Path) -> None:
    code, stdout, _ = run("make-tiny", str(tmp_path / "tiny"), "--variant", "base", "--preview-decoder")
    assert code == 0 and "tiny base checkpoint" in stdout and "tiny preview decoder" in stdout
    assert json.loads((tmp_path / "tiny" / "model_index.json").read_text())["is_distilled"] is False
    decoder = json.loads((tmp_path / "tiny" / "preview-decoder" / "config.json").read_text())
    assert decoder["_class_name"] == "Flux2TinyAutoEncoder" and decoder["latent_channels"] == 16
    code, _, stderr = run("make-tiny", str(tmp_path / "t2"), "--variant", "turbo")
    assert code == 1 and "--variant must be distilled, base or kv" in stderr
    code, stdout, _ = run("models")
    assert code == 0 and "flux-2-klein-base-9b" in stdout


def test_console_script_entry_point(tmp_path: Path, tiny_distilled: Path) -> None:
    script = Path(sys.executable).parent / "kleinserve"
    good = ["generate", "entry point", "-m", model_arg(tiny_distilled), "--width", "64", "--height", "64",
            "--seed", "1", "-o", str(tmp_path / "e.png")]  # fmt: skip
    # Both runs at once: each is mostly a process importing torch.
    runs = [
        subprocess.Popen([str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args in (good, ["generate", "x", "--model", "nope"])
    ]
    try:
        (_, stderr), (_, bad_stderr) = [p.communicate(timeout=120) for p in runs]
    finally:
        for p in runs:
            p.kill()
    code, bad_code = (p.wait() for p in runs)
    assert code == 0, stderr
    assert (tmp_path / "e.png").is_file()
    assert bad_code == 1 and "unknown model" in bad_stderr and "Traceback" not in bad_stderr


def test_mask_inpaints_the_first_image(tmp_path: Path, tiny_distilled: Path) -> None:
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    image.write_bytes(png_bytes(64, 48))
    alpha = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
    alpha.paste((0, 0, 0, 0), (16, 16, 48, 32))  # transparent: repaint
    alpha.save(mask)
    out = tmp_path / "o.png"
    args = ["generate", "x", "-m", model_arg(tiny_distilled), "-i", str(image), "--steps", "2", "--seed", "3"]
    code, stdout, stderr = run(*args, "--mask", str(mask), "-o", str(out))
    assert code == 0, stderr
    assert "64x48" in stdout
    code, _, _ = run(*args, "-o", str(tmp_path / "plain.png"))
    assert code == 0 and not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "plain.png")))
    alpha.resize((48, 64)).save(mask)
    code, _, stderr = run(*args, "--mask", str(mask), "-o", str(tmp_path / "bad.png"))
    assert code == 1 and "mask: is 48x64 but the image it applies to (the first) is 64x48" in " ".join(stderr.split())


def test_help_names_the_models_as_written() -> None:
    """Rich reads "[klein]" as markup unless escaped; the top-level help kept "FLUX.2  text-to-image"."""
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "FLUX.2 [klein] text-to-image" in result.output
