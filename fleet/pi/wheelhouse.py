"""Build the Pi 5 wheelhouse: every wheel the device needs for linux aarch64 / CPython 3.11, so a Pi installs
with ``pip install --no-index --require-hashes`` and needs neither a compiler nor a package index.

- llama-cpp-python: cross-compiled (llama_build), cached by version and flags;
- systemd-python: a small C extension with no aarch64 wheel on PyPI, compiled inside the emulated arm64
  build root (seconds of C; cached by version);
- immune-edge: built from this checkout;
- everything else: the aarch64 wheels from PyPI (``pip download --platform``), nothing built from source.
The index and requirements.txt are written last, and the finished folder is checked by wheelcheck before it is
called done: a wheelhouse that would fail on the device fails here first."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.utils import parse_wheel_filename

from fleet.pi.index import WheelhouseIndex, wheel_entries, write_index
from fleet.pi.llama_build import build_llama_wheel, cmake_args
from fleet.pi.root import BUILD_PACKAGES, Chroot, EmulationError, base_root, cache_dir, copy_root
from fleet.pi.target import PI5, Target
from fleet.pi.wheelcheck import TARGET_GLIBC, check_wheelhouse

log = logging.getLogger(__name__)

SYSTEMD_PYTHON_VERSION = "235"
DEVICE_EXTRAS = ("edge", "systemd")


def _pip_platforms(target: Target) -> list[str]:
    # pip download --platform takes exact tags: list every manylinux the target's glibc accepts.
    many = [f"manylinux_2_{minor}_{target.machine}" for minor in range(TARGET_GLIBC[1], 16, -1)]
    return [*many, f"manylinux2014_{target.machine}", target.platform_tag]


def build_systemd_wheel(target: Target = PI5, version: str = SYSTEMD_PYTHON_VERSION,
                        cache: Path | None = None) -> Path:  # fmt: skip
    """systemd-python for the target, compiled in a copy of the emulated build root (cached by version)."""
    done = (cache or cache_dir()) / "wheels" / f"systemd-python-{version}-{target.name}"
    found = sorted(done.glob("systemd_python-*.whl"))
    if found:
        return found[0]
    build_root = base_root(target, extra=BUILD_PACKAGES, cache=cache)
    with tempfile.TemporaryDirectory(prefix="systemd-python-", dir=build_root.parent) as scratch:
        root = copy_root(build_root, Path(scratch) / "root")
        log.info("compiling systemd-python %s in the emulated %s root", version, target.debian_arch)
        with Chroot(root) as chroot:
            # The copy is private to this build: its /build is nobody else's.
            chroot.run(["python3", "-m", "venv", "/build/venv"])
            chroot.run(["/build/venv/bin/pip", "wheel", "--no-deps", "--use-pep517", "--no-binary", ":all:",
                        "-w", "/build/out", f"systemd-python=={version}"])  # fmt: skip
        (built,) = (root / "build/out").glob("*.whl")
        done.mkdir(parents=True, exist_ok=True)
        final = done / built.name
        shutil.copyfile(built, final)
    return final


def _project_wheel(project: Path, out: Path) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(project)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise EmulationError(f"building the immune-edge wheel failed: {result.stderr[-2000:]}")
    (wheel,) = out.glob("immune_edge-*.whl")
    return wheel


def build_wheelhouse(
    out: Path, project: Path, target: Target = PI5, cache: Path | None = None
) -> WheelhouseIndex:
    """Fill ``out`` (emptied first) with the target's wheelhouse and return its index."""
    llama = build_llama_wheel(target, cache=cache)
    systemd = build_systemd_wheel(target, cache=cache)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as scratch:
        local = Path(scratch)
        own = _project_wheel(project, local)
        for wheel in (llama, systemd):
            shutil.copyfile(wheel, local / wheel.name)
        _, version, _, _ = parse_wheel_filename(own.name)
        requirement = f"immune-edge[{','.join(DEVICE_EXTRAS)}]=={version}"
        major, minor = target.python
        platforms = [arg for platform in _pip_platforms(target) for arg in ("--platform", platform)]
        log.info("collecting the %s wheels of every dependency", target.machine)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", *platforms,
             "--python-version", f"{major}.{minor}", "--implementation", "cp", "--abi", target.python_tag,
             "--abi", "abi3", "--abi", "none", "--find-links", str(local), "-d", str(out), requirement],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise EmulationError(f"collecting the {target.machine} wheels failed: {result.stderr[-3000:]}")
    index = WheelhouseIndex(
        target=target.name, machine=target.machine, python=f"{major}.{minor}", requirement=requirement,
        llama_cmake_args=cmake_args(target), wheels=wheel_entries(out),
    )  # fmt: skip
    write_index(out, index)
    problems = check_wheelhouse(out, target)
    if problems:
        raise EmulationError("the wheelhouse just built fails its own check:\n" + "\n".join(problems))
    return index
