"""``wheelhouse.json``: what a Pi wheelhouse holds and what it is for, written by the build and read by the
check and the edge role. ``requirements.txt`` beside it pins every wheel by sha256, so pip on the device
refuses any byte that differs from what the operator built (``--require-hashes``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from packaging.requirements import Requirement
from packaging.utils import parse_wheel_filename
from pydantic import BaseModel, ConfigDict, Field

from shared.artifacts import sha256_file

INDEX_FILE = "wheelhouse.json"
REQUIREMENTS_FILE = "requirements.txt"


class WheelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(pattern=r"^[A-Za-z0-9_.+-]+\.whl$")
    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0)


class WheelhouseIndex(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    target: str
    machine: str
    python: str
    #: What the device installs, extras included (e.g. ``immune-edge[edge,systemd]==0.1.0``).
    requirement: str
    #: How llama.cpp was compiled for the target (docs/deploy.md explains each flag).
    llama_cmake_args: list[str]
    wheels: list[WheelEntry]


def render_requirements(index: WheelhouseIndex) -> str:
    """requirements.txt for ``pip install --no-index --require-hashes``: every wheel pinned by hash."""
    root = Requirement(index.requirement)
    lines = []
    for entry in sorted(index.wheels, key=lambda e: e.name):
        extras = f"[{','.join(sorted(root.extras))}]" if entry.name == root.name and root.extras else ""
        lines.append(f"{entry.name}{extras}=={entry.version} --hash=sha256:{entry.sha256}")
    return "\n".join(lines) + "\n"


def wheel_entries(folder: Path) -> list[WheelEntry]:
    """An entry (name, version, size, sha256) for every wheel in ``folder``."""
    entries = []
    for path in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        size, digest = sha256_file(path)
        entries.append(WheelEntry(file=path.name, name=name, version=str(version), sha256=digest, size=size))
    return entries


def write_index(folder: Path, index: WheelhouseIndex) -> None:
    """Write ``wheelhouse.json`` and the requirements.txt that pins its wheels."""
    (folder / REQUIREMENTS_FILE).write_text(render_requirements(index))
    (folder / INDEX_FILE).write_text(index.model_dump_json(indent=2) + "\n")
