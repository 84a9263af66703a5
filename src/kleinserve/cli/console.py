"""Where the ``kleinserve`` commands write: people's messages on stderr, results on stdout."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

err_console = Console(stderr=True)
out_console = Console()


def fail(message: str) -> NoReturn:
    """Print ``message`` as an error and end the command with exit status 1."""
    err_console.quiet = False  # muted only for the banner when logs are JSON
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)
