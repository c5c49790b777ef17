"""The context a published model gets: what its client profile's longest request needs, measured in
the model's own tokens (prepare over every incident, else eval on the held-out requests), never a
guess. A smaller context would make the device refuse the client's biggest requests."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from shared.manifest_builder import DEFAULT_N_CTX
from shared.reasons import Reason
from trainer.errors import TrainerError
from trainer.records import EvalReport, RequestFit


def request_fit_beside(data: Path) -> RequestFit | None:
    """prepare's request fit from the ``stats.json`` beside a dataset file, when it made one."""
    stats = data.parent / "stats.json"
    if not stats.is_file():
        return None
    try:
        found = json.loads(stats.read_text()).get("requests")
        return None if found is None else RequestFit.model_validate(found)
    except (json.JSONDecodeError, ValidationError, AttributeError) as exc:
        raise TrainerError(Reason.BAD_STATS, f"{stats}: not prepare's stats ({exc})") from None


def publish_context(report: EvalReport, n_ctx: int | None) -> int:
    """``n_ctx`` if given and big enough for the evaluated profile's requests; else what they need."""
    fit = report.requests
    if fit is None:
        return n_ctx or DEFAULT_N_CTX
    if n_ctx is None:
        return fit.context_needed
    if n_ctx < fit.context_needed:
        raise TrainerError(
            Reason.CONTEXT_TOO_SMALL,
            f"--n-ctx {n_ctx} is smaller than the {fit.context_needed} tokens {fit.profile} needs: its "
            f"longest request is {fit.longest_prompt_tokens} tokens ({fit.longest_request}) plus "
            f"max_tokens {fit.max_tokens}",
        )
    return n_ctx
