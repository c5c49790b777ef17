"""Errors for bad trainer input (files, datasets, configs, keys): each names what was wrong."""

from __future__ import annotations

from shared.errors import ContractError


class TrainerError(ContractError):
    """A trainer step refused its input; ``reason`` is a short stable code, the message names the input."""
