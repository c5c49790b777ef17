"""A small tmpfs for disk-full tests: a real file system that really fills up (mounting needs root, as on
CI and on the Pi's provisioning host; elsewhere the test is skipped)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's syntax: 16m, 1m) at ``mount_point`` for the block."""
    mount_point.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Write zeros into ``directory/filler`` until its file system is full (another writer taking the
    space); returns the file, so a test can free the space again."""
    filler = directory / "filler"
    # Unbuffered: a buffered writer would raise ENOSPC again when closing with bytes left over.
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass
    return filler
