"""Client prompt profiles: how a client (Slips) builds its requests, and the contract of its answers."""

from __future__ import annotations

from shared.reasons import Reason
from trainer.errors import TrainerError
from trainer.prompts.alert_summary import AlertSummaryProfile
from trainer.prompts.profile import PromptProfile
from trainer.prompts.risk import RiskProfile

PROFILES: dict[str, PromptProfile] = {p.name: p for p in (AlertSummaryProfile(), RiskProfile())}


def get_profile(name: str) -> PromptProfile:
    """The profile called ``name``; an unknown name is refused with the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise TrainerError(
            Reason.UNKNOWN_PROFILE, f"unknown prompt profile {name!r} (known: {', '.join(sorted(PROFILES))})"
        ) from None
