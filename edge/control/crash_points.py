"""Crash points for the restart-recovery tests: with ``IMMUNE_EDGE_KILL_AT=<kind>:<state>`` in its
environment the daemon SIGKILLs itself right after a deployment of that kind persisted and reported
that state, exactly where a power cut would leave it. Nothing sets the variable in production (the
unit file and Ansible do not); unset, each point is one dictionary lookup."""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "IMMUNE_EDGE_KILL_AT"


def crash_point(kind: str, state: str) -> None:
    """Die here, uncleanly, if the environment asks for this (kind, state)."""
    if os.environ.get(KILL_AT_ENV) == f"{kind}:{state}":
        os.kill(os.getpid(), signal.SIGKILL)
