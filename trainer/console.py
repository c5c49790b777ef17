"""Where the trainer's commands write: tables and results on stdout, progress and problems on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn

console = Console()
err_console = Console(stderr=True)


def spinner(text: str) -> Progress:
    """A transient spinner on stderr for work with no measurable progress (use it as a context manager)."""
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), console=err_console, transient=True
    )
    progress.add_task(text, total=None)
    return progress
