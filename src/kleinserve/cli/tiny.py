"""``kleinserve make-tiny``: random-weight checkpoints with the real architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kleinserve.cli.console import fail, out_console


def make_tiny_command(
    directory: Annotated[Path, typer.Argument(help="Where to write the checkpoint.")],
    variant: Annotated[
        str, typer.Option(help="distilled (like klein 4B/9B), base (like Base 4B/9B) or kv (like klein 9B-KV).")
    ] = "distilled",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    preset: Annotated[
        str,
        typer.Option(help="tiny (a few MB, the default) or bench (klein 4B's real widths, few blocks, ~7 GB)."),
    ] = "tiny",
    classifier: Annotated[
        Optional[str],
        typer.Option(
            "--classifier",
            help="Write a tiny safety-checker classifier instead, that always says nsfw or normal.",
        ),
    ] = None,
    lora: Annotated[
        bool, typer.Option("--lora", help="Also write a random LoRA for it to DIRECTORY/lora/tiny.safetensors.")
    ] = False,
    small_decoder: Annotated[
        bool,
        typer.Option(
            "--small-decoder", help="Also write a random small decoder (BFL's layout) to DIRECTORY/small-decoder."
        ),
    ] = False,
    preview_decoder: Annotated[
        bool,
        typer.Option(
            "--preview-decoder", help="Also write a random tiny autoencoder for previews to DIRECTORY/preview-decoder."
        ),
    ] = False,
) -> None:
    """Write a random-weight klein checkpoint (real architecture) for tests, demos and `kleinserve bench`."""
    from kleinserve.engine.tiny import PRESETS, make_tiny, make_tiny_lora

    if classifier is not None:
        from kleinserve.engine.tiny_classifier import make_tiny_classifier

        if classifier not in ("nsfw", "normal"):
            fail(f"--classifier must be nsfw or normal, not {classifier!r}")
        make_tiny_classifier(directory, classifier, seed)  # type: ignore[arg-type]
        out_console.print(f"wrote a tiny {classifier} image classifier to {directory}", highlight=False)
        return

    if variant not in ("distilled", "base", "kv"):
        fail(f"--variant must be distilled, base or kv, not {variant!r}")
    if preset not in PRESETS:
        fail(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    make_tiny(directory, variant, seed, preset)  # type: ignore[arg-type]
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    out_console.print(f"wrote a {preset} {variant} checkpoint to {directory} ({size / 1e6:.1f} MB)", highlight=False)
    if lora:
        path = make_tiny_lora(directory, directory / "lora" / "tiny.safetensors", seed)
        out_console.print(f"wrote a tiny LoRA to {path} (serve it with --lora {path.parent})", highlight=False)
    if small_decoder:
        from kleinserve.engine.decoder import make_tiny_small_decoder

        path = make_tiny_small_decoder(directory, directory / "small-decoder", seed)
        out_console.print(f"wrote a random small decoder to {path} (serve it with --decoder small={path})")
    if preview_decoder:
        from kleinserve.engine.tiny import make_tiny_autoencoder

        channels = 4 * PRESETS[preset].latent_channels  # the transformer's packed latents
        path = make_tiny_autoencoder(directory / "preview-decoder", channels, seed)
        out_console.print(
            f"wrote a tiny preview decoder to {path} (serve it with --preview-decoder {path})", highlight=False
        )
