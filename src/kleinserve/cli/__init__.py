"""The ``kleinserve`` command: arguments -> settings -> library calls, and nothing more.

One module per command group; this one assembles them into the typer app (in the order ``--help``
lists them) and is the console-script entry point.
"""

from __future__ import annotations

import sys

import typer

from kleinserve.cli.bench import bench
from kleinserve.cli.console import err_console
from kleinserve.cli.generate import generate
from kleinserve.cli.keys import keys_app
from kleinserve.cli.models import models
from kleinserve.cli.serve import api, serve, worker
from kleinserve.cli.tiny import make_tiny_command

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=r"kleinserve: FLUX.2 \[klein] text-to-image and multi-reference editing, on your own hardware.",
)
app.command()(generate)
app.command()(serve)
app.command()(api)
app.command()(worker)
app.command("make-tiny")(make_tiny_command)
app.command()(bench)
app.command()(models)
app.add_typer(keys_app, name="keys")

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
