"""What every immune-edge command shares: the byte progress bar, and the ending where rejected
input becomes one line and exit status 1."""

from __future__ import annotations

import sys
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from shared.errors import ContractError, TransientError


def transfer_progress(console: Console, transient: bool = True) -> Progress:
    """A progress bar for bytes moved (downloads, uploads, hashing): description, bar, size, speed."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=transient,
    )


def run_cli(app: Callable[[], object]) -> None:
    """Run a Typer ``app``; a ContractError, TransientError or OSError is printed as one line on
    stderr, exit 1."""
    err_console = Console(stderr=True)
    try:
        app()
    except ContractError as exc:
        err_console.print(f"REJECTED ({exc.reason}): {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except TransientError as exc:  # the input may be fine: the same command may succeed later
        err_console.print(f"FAILED ({exc.reason}, try again): {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except OSError as exc:
        err_console.print(f"error: {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
