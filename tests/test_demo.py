"""`make demo` itself: the script the Makefile runs, end to end, as a newcomer would run it. Each of its
steps checks what it shows (the model committed, the forged manifest rejected, the operator's status,
a non-empty summary, a swap under load with no failed request, the refusal in the daemon's log) and
exits 1 naming the step otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(900)


def test_make_demo_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    result = subprocess.run(
        [sys.executable, "-m", "tests.harness.demo", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "demo finished" in result.stdout
    assert "0 failed; served by" in result.stdout
    for step in ("committed", "rejected", "slips-summary-gemma", "immune-edge doctor"):
        assert step in result.stdout, step
    assert (out / "device" / "edge.log").is_file()
    assert (out / "keys" / "root-1.key").stat().st_mode & 0o777 == 0o600
