"""``kleinserve keys``: create, list and revoke API keys; read their usage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kleinserve.cli.console import err_console, fail, out_console
from kleinserve.cli.options import build_settings
from kleinserve.errors import KleinserveError

keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys; read their usage.")
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="The server's data directory.")]
NameOption = Annotated[str, typer.Argument(help="The key's name.")]


def _keys(data_dir: Path | None) -> Any:
    """The key store of the settings, as a context that closes it (a PostgreSQL pool ends cleanly)."""
    from kleinserve.backends import opened_key_store

    return opened_key_store(build_settings(data_dir=data_dir))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="A name for the key holder.")],
    rate: Annotated[Optional[str], typer.Option(help="Requests per minute, e.g. 60/min or 2/s.")] = None,
    image_rate: Annotated[Optional[str], typer.Option("--image-rate", help="Images per minute.")] = None,
    concurrency: Annotated[Optional[int], typer.Option(help="Jobs queued or running at once.")] = None,
    credits: Annotated[
        Optional[float], typer.Option(help="Credits to spend (prices: KLEINSERVE_PRICE_PER_IMAGE).")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Create a key. Its secret is printed once, on stdout, and stored only as a hash."""
    from kleinserve.keys import parse_rate

    try:
        with _keys(data_dir) as store:
            key, secret = store.create(
                name,
                requests_per_minute=parse_rate(rate, "rate") if rate else None,
                images_per_minute=parse_rate(image_rate, "image_rate") if image_rate else None,
                concurrency=concurrency,
                credits=credits,
            )
    except KleinserveError as err:
        fail(err.message)
    err_console.print(f"created key {key.name!r}; keep the secret now, it is not shown again:", highlight=False)
    out_console.print(secret, highlight=False, soft_wrap=True)


@keys_app.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """List keys (names, prefixes, limits; never secrets)."""
    with _keys(data_dir) as store:
        keys = store.list()
    for key in keys:
        state = "revoked" if not key.active else "active"
        limits = ", ".join(
            f"{label} {value:g}"
            for label, value in (
                ("requests/min", key.requests_per_minute),
                ("images/min", key.images_per_minute),
                ("concurrency", key.concurrency),
                ("credits", key.credits),
            )
            if value is not None
        )
        out_console.print(f"{key.name}  {key.shown_prefix}...  {state}  {limits or 'no limits'}", highlight=False)


@keys_app.command("revoke")
def keys_revoke(name: NameOption, data_dir: DataDir = None) -> None:
    """Revoke a key: it stops working at once."""
    try:
        with _keys(data_dir) as store:
            store.revoke(name)
    except KleinserveError as err:
        fail(err.message)
    out_console.print(f"revoked {name}", highlight=False)


@keys_app.command("usage")
def keys_usage(name: NameOption, data_dir: DataDir = None) -> None:
    """What a key has generated and spent."""
    try:
        with _keys(data_dir) as store:
            key = store.get(name)
            usage = store.usage(key.id)
    except KleinserveError as err:
        fail(err.message)
    left = "unlimited" if key.credits is None else f"{key.credits - usage.spent:g} of {key.credits:g}"
    out_console.print(f"{name}: {usage.images} images in {usage.jobs} jobs, spent {usage.spent:g}; credits {left}")
    for model, row in sorted(usage.by_model.items()):
        out_console.print(f"  {model}: {row['images']:g} images, spent {row['spent']:g}", highlight=False)
