"""``immune-fleet pi``: build the Raspberry Pi 5 wheelhouse and check one before it goes to a device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fleet.pi.root import EmulationError
from fleet.pi.target import PI5
from fleet.pi.wheelcheck import check_wheelhouse
from fleet.pi.wheelhouse import build_wheelhouse
from shared.errors import ContractError
from shared.reasons import Reason

pi_app = typer.Typer(
    no_args_is_help=True, help="Raspberry Pi 5: the prebuilt wheelhouse the fleet installs from."
)
console = Console()


def _python(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    major, minor = value.split(".")[:2]
    return int(major), int(minor)


@pi_app.command("wheels")
def wheels(
    out: Annotated[Path, typer.Option(help="The wheelhouse folder (replaced).")] = Path("dist/pi5-wheels"),
    project: Annotated[Path, typer.Option(help="The immune-edge checkout to build.")] = Path(),
) -> None:
    """Build every wheel a Pi 5 needs (llama-cpp-python cross-compiled; cached under ~/.cache/immune-edge)."""
    try:
        index = build_wheelhouse(out, project.resolve(), PI5)
    except EmulationError as error:
        raise ContractError(Reason.WHEELHOUSE_BUILD, str(error)) from error
    table = Table(title=f"{PI5.name} wheelhouse: {out}")
    for column in ("wheel", "size"):
        table.add_column(column)
    for entry in index.wheels:
        table.add_row(entry.file, f"{entry.size / 1e6:.1f} MB")
    console.print(table)


@pi_app.command("check-wheels")
def check_wheels(
    folder: Annotated[Path, typer.Argument(help="A wheelhouse built by `immune-fleet pi wheels`.")],
    machine: Annotated[str | None, typer.Option(help="The device's `uname -m`.")] = None,
    python: Annotated[str | None, typer.Option(help="The device's Python (3.11).")] = None,
) -> None:
    """Exit 0 when FOLDER installs on a Pi 5 with --no-index; otherwise exit 1 listing every reason."""
    problems = check_wheelhouse(folder, PI5, machine=machine, python=_python(python))
    if problems:
        raise ContractError(
            Reason.WHEELHOUSE, f"{folder} cannot be installed on {PI5.name}:\n- " + "\n- ".join(problems)
        )
    console.print(
        f"OK: {folder} installs on {PI5.name} ({PI5.platform_tag}, {PI5.python_tag})", soft_wrap=True
    )


def register(app: typer.Typer) -> None:
    """Add ``pi`` to ``immune-fleet``."""
    app.add_typer(pi_app, name="pi")
