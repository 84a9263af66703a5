"""Options more than one command takes, declared once, and the settings they become."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kleinserve.cli.console import fail
from kleinserve.settings import Settings


def build_settings(**overrides: Any) -> Settings:
    """Settings from the environment, overridden by the options given (``None``: not given)."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as err:
        fail(f"bad setting: {err}")


DataDirOption = Annotated[Optional[Path], typer.Option("--data-dir", help="Jobs and results (with SQLite).")]
DeviceOption = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DevicesOption = Annotated[
    Optional[str],
    typer.Option(help="One worker per device, one queue: cuda:0,cuda:1, cpu,cpu or auto (every GPU)."),
]
DtypeOption = Annotated[Optional[str], typer.Option(help="auto, bfloat16, float16 or float32.")]
FetchAllowOption = Annotated[
    Optional[str],
    typer.Option("--fetch-allow", help="Comma-separated hosts or CIDR networks image URLs may reach."),
]
HostOption = Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1).")]
InsecureNoAuthOption = Annotated[
    bool, typer.Option("--insecure-no-auth", help="Allow a non-loopback address without API keys.")
]
LogFormatOption = Annotated[Optional[str], typer.Option("--log-format", help="text or json.")]
LogLevelOption = Annotated[Optional[str], typer.Option("--log-level", help="debug, info, warning or error.")]
LogPromptsOption = Annotated[
    bool, typer.Option("--log-prompts", help="Include prompts in job log lines (off by default).")
]
MaxBatchOption = Annotated[
    Optional[int],
    typer.Option("--max-batch", help="Most compatible queued jobs denoised as one batch (default: 4 on CUDA, else 1)."),
]
BatchWindowOption = Annotated[
    Optional[float],
    typer.Option("--batch-window-ms", help="Milliseconds to wait for more compatible jobs to batch (20)."),
]
DecoderOption = Annotated[
    Optional[str],
    typer.Option(
        "--decoder",
        help="VAE decoder: full (default), small (BFL's FLUX.2-small-decoder: faster, other pixels) or small=PATH.",
    ),
]
VaeChannelsLastOption = Annotated[
    bool,
    typer.Option("--vae-channels-last", help="VAE convolutions in channels_last (pixels differ by rounding)."),
]
VaeTileAboveOption = Annotated[
    Optional[int],
    typer.Option("--vae-tile-above-pixels", help="Decode images with more pixels than this in tiles (0: never)."),
]
PreviewDecoderOption = Annotated[
    Optional[str],
    typer.Option(
        "--preview-decoder",
        help="Tiny autoencoder for live previews: a directory or hub repo id (fal/FLUX.2-Tiny-AutoEncoder); "
        "default: a latent-to-RGB projection.",
    ),
]
MetricsOption = Annotated[
    Optional[str], typer.Option("--metrics", help="GET /metrics: off (default), open, or admin (admin token).")
]
ModelOption = Annotated[
    Optional[list[str]],
    typer.Option("--model", "-m", help="ID or ID=PATH, repeatable; 'auto' (default) falls back to demo weights."),
]
PortOption = Annotated[Optional[int], typer.Option(help="Port (default 8000).")]
PublicUrlOption = Annotated[Optional[str], typer.Option("--public-url", help="Base URL for result links.")]
SafetyAllowDisableOption = Annotated[
    bool, typer.Option("--safety-allow-disable", help="Let clients skip the checker per request.")
]
SafetyCheckerOption = Annotated[
    Optional[str],
    typer.Option("--safety-checker", help="off (default) or an image classifier, e.g. Falconsai/nsfw_image_detection."),
]
SafetyPolicyOption = Annotated[
    Optional[str], typer.Option("--safety-policy", help="flag, blur (default) or refuse a flagged image.")
]
SafetyThresholdOption = Annotated[
    Optional[float], typer.Option("--safety-threshold", help="nsfw score that flags an image (0.85).")
]
