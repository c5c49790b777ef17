"""The operator's configuration (``fleet.toml``): which fleet, who the operator is, its signing keys and
the broker. Only MQTT is needed; the operator never talks to a device directly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field

from shared.config import CONFIG_DIR, ConfigModel, ConfigPath, MqttSettings
from shared.schema import Identifier

DEFAULT_FLEET_CONFIG = Path(os.environ.get("IMMUNE_FLEET_CONFIG", str(CONFIG_DIR / "fleet.toml")))


class FleetSettings(ConfigModel):
    """Everything `immune-fleet` needs beyond its command-line arguments."""

    fleet: Identifier
    #: Operator id: the MQTT client id prefix, the response topic, and the certificate CN with TLS.
    operator: Identifier = "operator"
    #: Operator private keys (mode 0600); commands are signed by all of them (threshold signing).
    operator_keys: Annotated[list[ConfigPath], Field(min_length=1, max_length=8)]
    mqtt: MqttSettings = MqttSettings()
    #: The collector database and rollout state files.
    data_dir: ConfigPath = Path.home() / ".local/state/immune-fleet"
    #: A device that said nothing for this long is shown offline even without its Last Will.
    stale_after_s: Annotated[float, Field(gt=0)] = 300.0
    #: Validity of each signed command.
    command_lifetime_s: Annotated[int, Field(ge=10, le=86400)] = 600

    @property
    def db_path(self) -> Path:
        return self.data_dir / "fleet.db"

    @property
    def capture_archive(self) -> Path:
        """Where `immune-fleet capture pull` keeps the exchanges devices captured."""
        return self.data_dir / "capture.db"

    @property
    def rollouts_dir(self) -> Path:
        return self.data_dir / "rollouts"
