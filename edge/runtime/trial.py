"""The trial window: a model that passed its health gate serves real requests for ``trial_s`` and
is judged by its process's crashes, its requests' error rate and its decode speed."""

from __future__ import annotations

import statistics
import threading
import time

from edge.config import RuntimeSettings
from edge.control.activation import ActivationError, ActivationInterruptedError
from edge.runtime.router import ServedModel
from shared.reasons import Reason


def watch_trial(
    process: ServedModel,
    served: ServedModel,
    settings: RuntimeSettings,
    min_tokens_per_second: float,
    closing: threading.Event,
) -> None:
    """Return when ``served`` (a base, or an adapter running in ``process``) passed the window;
    raise ActivationError naming what failed, ActivationInterruptedError when ``closing`` is set."""
    started = time.monotonic()
    while time.monotonic() - started < settings.trial_s:
        if closing.wait(0.2):
            raise ActivationInterruptedError(Reason.SHUTDOWN, "the daemon stopped during the trial window")
        crashes = process.stats.crashes_since(started)
        if crashes >= settings.crash_limit:
            raise ActivationError(
                Reason.CRASH_LOOP, f"the worker crashed {crashes} times within the trial window"
            )
        total = served.stats.ok + served.stats.failed
        if (
            total >= settings.trial_min_requests
            and served.stats.failed / total > settings.trial_max_error_rate
        ):
            raise ActivationError(
                Reason.TRIAL_ERRORS,
                f"{served.stats.failed} of {total} requests failed during the trial window",
            )
    if (
        served.stats.decode_rates
        and (rate := statistics.median(served.stats.decode_rates)) < min_tokens_per_second
    ):
        raise ActivationError(
            Reason.TRIAL_SLOW,
            f"served {rate:.1f} tokens/s during the trial, floor {min_tokens_per_second:.1f}",
        )
