#!/usr/bin/env python3
"""Time deriving the previews' latent-to-RGB projection (engine/preview.py) at klein's VAE widths.

Builds a random VAE of the bench preset's geometry in memory (as scripts/measure_vae.py does; no
checkpoint is written), times ``derive_projection`` (one batch of latent channels + 1 probes) and,
with ``--compare``, the first version's one probe per packed channel (129 decodes, 16 per call),
printing the seconds and the relative distance between the two matrices (random weights: the
distance says little about real ones, see tests/engine/test_preview.py).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_projection.py --compare
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from kleinserve.engine.preview import PROJECTION_GRID, _mean_colour, derive_projection

BENCH_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 32}


@torch.inference_mode()
def per_packed_channel(pipe: SimpleNamespace) -> torch.Tensor:
    """The first version's matrix: one probe per packed channel, decoded 16 at a time."""
    packed = int(pipe.vae.bn.running_mean.numel())
    base = torch.randn(1, packed, PROJECTION_GRID, PROJECTION_GRID, generator=torch.Generator().manual_seed(0))
    probes = base.repeat(packed + 1, 1, 1, 1)
    probes[torch.arange(1, packed + 1), torch.arange(packed)] += 1.0
    colours = torch.cat([_mean_colour(pipe, chunk) for chunk in torch.split(probes, 16)])
    return colours[1:] - colours[:1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", action="store_true", help="also time the per-packed-channel derivation")
    args = parser.parse_args()
    from diffusers import AutoencoderKLFlux2
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**BENCH_VAE, mid_block_add_attention=True).eval()
    pipe = SimpleNamespace(vae=vae, _unpatchify_latents=Flux2KleinPipeline._unpatchify_latents)
    start = time.perf_counter()
    matrix, _ = derive_projection(pipe)
    print(f"derive_projection (latent-channel probes): {time.perf_counter() - start:.2f} s")
    if args.compare:
        start = time.perf_counter()
        reference = per_packed_channel(pipe)
        print(f"per packed channel (first version): {time.perf_counter() - start:.2f} s")
        print(f"relative distance: {float((matrix - reference).norm() / reference.norm()):.3f}")


if __name__ == "__main__":
    main()
