"""Bad input lines and records: reported with where they are, then skipped or fatal."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from shared.reasons import Reason
from trainer.errors import TrainerError

log = logging.getLogger(__name__)


@dataclass
class Problems:
    """Collects what importers could not use. With ``fatal`` the first problem stops the run."""

    fatal: bool = False
    found: list[str] = field(default_factory=list)

    def report(self, where: str, message: str) -> None:
        """Record ``where`` (``file:line`` or ``file[index]``) and what was wrong there."""
        text = f"{where}: {message}"
        if self.fatal:
            raise TrainerError(Reason.BAD_INPUT, text)
        log.warning("skipped %s", text)
        self.found.append(text)
