"""TOML configuration files validated by pydantic; errors name the file, the key and the problem."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import ContractError, describe_validation_error
from shared.reasons import Reason
from shared.topics import DEFAULT_ROOT

CONFIG_DIR = Path("/etc/immune-edge")
STATE_DIR = Path("/var/lib/immune-edge")

#: Paths are plain strings in TOML; everything else is type-checked strictly.
ConfigPath = Annotated[Path, Field(strict=False)]


class ConfigError(ContractError):
    """A configuration file that cannot be read or does not validate."""


class ConfigModel(BaseModel):
    """Base for config sections: unknown keys are errors (catches typos), no silent type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TlsSettings(ConfigModel):
    """TLS towards the broker; a client certificate identifies the device (its CN is the username)."""

    ca_file: ConfigPath
    cert_file: ConfigPath | None = None
    key_file: ConfigPath | None = None

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class MqttSettings(ConfigModel):
    """How to reach the MQTT broker."""

    host: Annotated[str, Field(min_length=1, max_length=253)] = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    username: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    password_file: ConfigPath | None = None
    tls: TlsSettings | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    topic_root: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")] = DEFAULT_ROOT

    def password(self) -> str | None:
        """The password, read from its file (kept out of the config so the config can be world-readable)."""
        if self.password_file is None:
            return None
        return self.password_file.read_text().strip()


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def load_config(path: Path, model: type[ConfigT]) -> ConfigT:
    """Read a TOML file and validate it as ``model``; raise ConfigError naming file, key and problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(Reason.CONFIG_MISSING, f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(Reason.CONFIG_UNREADABLE, f"{path}: cannot read config ({exc})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(Reason.CONFIG_SYNTAX, f"{path}: invalid TOML: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(Reason.CONFIG_INVALID, describe_validation_error(exc, str(path), "key ")) from None
