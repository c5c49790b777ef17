"""How a staged model goes live. The serving runtime (edge.runtime.serving: workers, health gate,
trial window) plugs in here; a device with the runtime disabled only moves the store pointers, so
there ``committed`` means verified and in the store."""

from __future__ import annotations

import logging
from typing import Protocol

from edge.state.ledger import InstalledModel
from shared.errors import ContractError, TransientError

log = logging.getLogger(__name__)


class ActivationError(ContractError):
    """The model could not be started, or failed its health gate or trial window: a model fault."""


class ActivationInterruptedError(TransientError):
    """The daemon is stopping: the activation or trial did not finish, which says nothing about the
    model (the restart recovery table decides what happens next)."""


class Activator(Protocol):
    """What the deployer asks of the runtime."""

    def activate(self, model: InstalledModel) -> None:
        """Load ``model`` and route requests to it once healthy; raise ActivationError otherwise."""

    def trial(self, model: InstalledModel) -> None:
        """Watch the newly active model; raise ActivationError if it proves unhealthy."""

    def commit(self, model: InstalledModel) -> None:
        """``model`` passed its trial and stays: release what was kept for a rollback."""

    def restore(self, model: InstalledModel | None, slot: str = "") -> None:
        """Serve ``model`` (again, after a failed activation or trial, or at start-up; None: nothing)
        as the base model, or with ``slot`` as the adapter of that name."""


class StoreOnlyActivator:
    """No runtime attached: activation is the pointer switch alone."""

    def activate(self, model: InstalledModel) -> None:
        log.info("model %s serial %d is current (no runtime attached)", model.name, model.serial)

    def trial(self, model: InstalledModel) -> None:
        """Nothing runs, so nothing can fail."""

    def commit(self, model: InstalledModel) -> None:
        """Nothing was kept."""

    def restore(self, model: InstalledModel | None, slot: str = "") -> None:
        if model is not None:
            log.debug("model %s serial %d is current", model.name, model.serial)
