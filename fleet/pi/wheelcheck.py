"""Verify a wheelhouse against the device it is for, before anything is copied to or installed on it.

Read-only, in a fixed order, every finding kept (the operator fixes them all in one round):
1. the index (``wheelhouse.json``) parses and names the target;
2. every file it lists is there with its size and sha256, no wheel is there that it does not list, and
   requirements.txt pins exactly those wheels;
3. every wheel's tags can install on the target (machine, CPython version, glibc);
4. every shared library inside a wheel is an ELF object for the target's CPU (a wheel retagged by hand,
   or built on the wrong machine, is caught here, not by a crash on the Pi);
5. the requirement (immune-edge with its extras) and everything it needs, with the target's environment
   markers, is satisfied by the wheels present.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import Tag
from packaging.utils import NormalizedName, canonicalize_name, parse_wheel_filename
from packaging.version import Version
from pydantic import ValidationError

from fleet.pi.index import INDEX_FILE, REQUIREMENTS_FILE, WheelhouseIndex, render_requirements
from fleet.pi.target import Target
from shared.artifacts import sha256_file

#: The oldest manylinux the target's glibc (Debian 12: 2.36) is not older than.
TARGET_GLIBC = (2, 36)
ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: NormalizedName
    version: Version
    tags: frozenset[Tag]


def _platform_fits(platform: str, target: Target) -> bool:
    if platform == "any":
        return True
    if not platform.endswith(f"_{target.machine}"):
        return False
    if platform in (target.platform_tag, f"manylinux2014_{target.machine}"):
        return True
    if platform.startswith("manylinux_"):
        major, minor = platform.removeprefix("manylinux_").split("_")[:2]
        return (int(major), int(minor)) <= TARGET_GLIBC
    return False


def _tag_fits(tag: Tag, target: Target) -> bool:
    major, minor = target.python
    interpreters = {f"py{major}", f"py{major}{minor}", target.python_tag}
    interpreters |= {f"cp{major}{m}" for m in range(2, minor + 1)} if tag.abi == "abi3" else set()
    return (
        tag.interpreter in interpreters
        and tag.abi in {"none", "abi3", target.python_tag}
        and _platform_fits(tag.platform, target)
    )


def _elf_machine(header: bytes) -> int | None:
    if len(header) < 20 or not header.startswith(ELF_MAGIC):
        return None
    order = "little" if header[5] == 1 else "big"
    return int.from_bytes(header[18:20], order)


def _foreign_libraries(path: Path, target: Target) -> list[str]:
    foreign = []
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if ".so" not in Path(member).name:
                continue
            with archive.open(member) as handle:
                machine = _elf_machine(handle.read(20))
            if machine is not None and machine != target.elf_machine:
                foreign.append(f"{member} (ELF machine {machine}, the target's is {target.elf_machine})")
    return foreign


def _requires(path: Path) -> list[Requirement]:
    with zipfile.ZipFile(path) as archive:
        (metadata,) = [m for m in archive.namelist() if m.endswith(".dist-info/METADATA")]
        headers = HeaderParser().parsestr(archive.read(metadata).decode())
    return [Requirement(line) for line in headers.get_all("Requires-Dist") or []]


def _environment(target: Target, extra: str = "") -> dict[str, str]:
    env = dict(default_environment())
    major, minor = target.python
    env.update(
        platform_machine=target.machine, sys_platform="linux", platform_system="Linux", os_name="posix",
        implementation_name="cpython", platform_python_implementation="CPython",
        python_version=f"{major}.{minor}", python_full_version=f"{major}.{minor}.2", extra=extra,
    )  # fmt: skip
    return env


def _closure(root: Requirement, wheels: dict[NormalizedName, Wheel], target: Target) -> list[str]:
    problems: list[str] = []
    pending: list[tuple[Requirement, str]] = [(root, "the device")]
    seen: set[tuple[NormalizedName, frozenset[str]]] = set()
    while pending:
        requirement, needed_by = pending.pop()
        name = canonicalize_name(requirement.name)
        extras = frozenset(requirement.extras)
        wheel = wheels.get(name)
        if wheel is None:
            problems.append(f"no wheel for {requirement} (needed by {needed_by})")
            continue
        if not requirement.specifier.contains(wheel.version, prereleases=True):
            problems.append(f"{wheel.path.name} does not satisfy {requirement} (needed by {needed_by})")
            continue
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for dependency in _requires(wheel.path):
            if dependency.marker is None or any(
                dependency.marker.evaluate(_environment(target, extra)) for extra in ("", *extras)
            ):
                pending.append((dependency, wheel.path.name))
    return problems


def _load_index(folder: Path) -> tuple[WheelhouseIndex | None, list[str]]:
    path = folder / INDEX_FILE
    if not path.is_file():
        return None, [f"{path} is missing: build the wheelhouse with `make pi-wheels`"]
    try:
        return WheelhouseIndex.model_validate_json(path.read_bytes()), []
    except ValidationError as error:
        return None, [
            f"{path} is not a wheelhouse index: {error.errors()[0]['msg']} at {error.errors()[0]['loc']}"
        ]


def _files_match_index(folder: Path, index: WheelhouseIndex) -> list[str]:
    problems = []
    listed = {entry.file for entry in index.wheels}
    for entry in index.wheels:
        path = folder / entry.file
        if not path.is_file():
            problems.append(f"{entry.file} is listed in {INDEX_FILE} but missing")
        elif sha256_file(path) != (entry.size, entry.sha256):
            problems.append(f"{entry.file} differs from {INDEX_FILE} (size or sha256)")
    problems += [
        f"{p.name} is not listed in {INDEX_FILE}"
        for p in sorted(folder.glob("*.whl"))
        if p.name not in listed
    ]
    requirements = folder / REQUIREMENTS_FILE
    if not requirements.is_file() or requirements.read_text() != render_requirements(index):
        problems.append(f"{REQUIREMENTS_FILE} is missing or does not pin exactly the wheels in {INDEX_FILE}")
    return problems


def _wheels(paths: Iterable[Path]) -> tuple[dict[NormalizedName, Wheel], list[str]]:
    wheels: dict[NormalizedName, Wheel] = {}
    problems = []
    for path in paths:
        try:
            name, version, _, tags = parse_wheel_filename(path.name)
        except ValueError as error:
            problems.append(f"{path.name}: {error}")
            continue
        if name in wheels:
            problems.append(f"two wheels of {name}: {wheels[name].path.name} and {path.name}")
        wheels[name] = Wheel(path, name, version, frozenset(tags))
    return wheels, problems


def check_wheelhouse(folder: Path, target: Target, *, machine: str | None = None,
                     python: tuple[int, int] | None = None) -> list[str]:  # fmt: skip
    """Every reason ``folder`` cannot be installed with ``--no-index`` on ``target`` (empty: it can).

    ``machine``/``python`` are what the device itself reports (Ansible facts); a wheelhouse built for
    another target is refused by name before its files are looked at.
    """
    index, problems = _load_index(folder)
    if index is None:
        return problems
    if index.target != target.name:
        return [f"the wheelhouse is built for {index.target}, not {target.name}"]
    if machine is not None and machine != target.machine:
        return [f"the wheelhouse is for {target.machine} but the device is {machine}"]
    if python is not None and python != target.python:
        return [f"the wheelhouse is for Python {target.python[0]}.{target.python[1]} but the device has "
                f"{python[0]}.{python[1]}"]  # fmt: skip
    problems += _files_match_index(folder, index)
    present = [folder / e.file for e in index.wheels if (folder / e.file).is_file()]
    wheels, naming = _wheels(present)
    problems += naming
    for wheel in wheels.values():
        if not any(_tag_fits(tag, target) for tag in wheel.tags):
            tags = ", ".join(sorted(str(t) for t in wheel.tags))
            problems.append(f"{wheel.path.name} cannot install on {target.name} ({target.platform_tag}, "
                            f"{target.python_tag}): its tags are {tags}")  # fmt: skip
        problems += [f"{wheel.path.name}: {lib}" for lib in _foreign_libraries(wheel.path, target)]
    problems += _closure(Requirement(index.requirement), wheels, target)
    return problems
