#!/usr/bin/env python3
"""Time VAE decoding: the default layout against channels_last, and the full decoder against the small one.

Decodes the same random latents with each variant in turn (default, channels_last, small decoder,
alternating after a warm-up), prints the median seconds, the speed-up against the default and how
far each variant's uint8 pixels are from the default's (channels_last is float rounding; the small
decoder is another network, so its distance on random weights means nothing). The VAE is the one in
``--checkpoint DIR`` (``DIR/vae``: real weights or ``kleinserve make-tiny DIR --preset bench``), or, by
default, a random one of klein's real VAE geometry (the bench preset's) built in memory. The small
decoder is ``--small-decoder DIR`` or a random one of BFL's widths (96/192/384/384).

    .venv/bin/python scripts/measure_vae.py                            # 512x512, bfloat16, 3 runs
    .venv/bin/python scripts/measure_vae.py --dtype float32 --size 1024 --runs 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kleinserve.engine.decoder import SMALL_DECODER_WIDTHS, read_decoder
from kleinserve.engine.vae import decode_latents, use_channels_last

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
BENCH_VAE: dict[str, Any] = {  # klein's VAE (engine/tiny.py's bench preset; AutoencoderKLFlux2 defaults)
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 32,
    "norm_num_groups": 32,
    "mid_block_add_attention": True,
}


def _pixels(decoded: torch.Tensor) -> torch.Tensor:
    """What diffusers' image processor turns a decode into: uint8 values."""
    return ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a klein checkpoint directory (its vae/ is timed)")
    parser.add_argument("--small-decoder", type=Path, help="a small decoder directory (default: random, BFL's widths)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each variant after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    from diffusers import AutoencoderKLFlux2

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    if args.checkpoint:
        full = read_decoder(args.checkpoint / "vae", dtype)
    else:
        full = AutoencoderKLFlux2(**BENCH_VAE).to(dtype)
    if args.small_decoder:
        small = read_decoder(args.small_decoder, dtype)
    else:
        config = {k: v for k, v in full.config.items() if not k.startswith("_")}
        small = AutoencoderKLFlux2.from_config({**config, "decoder_block_out_channels": SMALL_DECODER_WIDTHS})
        small = small.to(dtype)
    nhwc = copy.deepcopy(full)
    use_channels_last(nhwc)
    variants = {"default": full.eval(), "channels_last": nhwc.eval(), "small decoder": small.eval()}
    side = args.size // (2 ** (len(full.config.block_out_channels) - 1))
    latents = torch.randn(1, full.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    latents = latents.to(dtype)
    times: dict[str, list[float]] = {name: [] for name in variants}
    pixels: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for run in range(args.runs + 1):
            for name, vae in variants.items():
                start = time.perf_counter()
                decoded = decode_latents(vae, latents, 0, 8)
                if run:
                    times[name].append(time.perf_counter() - start)
                pixels[name] = _pixels(decoded)
    base = statistics.median(times["default"])
    print(f"VAE decode, {args.size}x{args.size}, {args.dtype}, {torch.get_num_threads()} threads, {args.runs} runs")
    for name in variants:
        median = statistics.median(times[name])
        diff = (pixels[name].int() - pixels["default"].int()).abs()
        changed = float((diff > 0).float().mean()) * 100
        print(
            f"  {name:14s} {median:8.2f} s  {base / median:5.2f}x  "
            f"pixels vs default: max {int(diff.max())} levels, {changed:.2f}% changed"
        )


if __name__ == "__main__":
    main()
