"""TOML config loading: every error names the file, the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ConfigError, ConfigModel, MqttSettings, load_config


class Sample(ConfigModel):
    fleet: str
    mqtt: MqttSettings = MqttSettings()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(text)
    return path


def test_valid_config_loads_with_defaults(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, 'fleet = "lab"\n[mqtt]\nport = 8883\n[mqtt.tls]\nca_file = "/x/ca.pem"\n'), Sample
    )
    assert config.mqtt.port == 8883
    assert config.mqtt.host == "127.0.0.1"
    assert str(config.mqtt.tls.ca_file) == "/x/ca.pem"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('fleet = "lab"\n[mqtt]\nport = "1883"\n', "key mqtt.port: Input should be a valid integer"),
        (
            'fleet = "lab"\n[mqtt]\nport = 70000\n',
            "key mqtt.port: Input should be less than or equal to 65535",
        ),
        ('fleet = "lab"\n[mqtt]\nhots = "x"\n', "key mqtt.hots: Extra inputs are not permitted"),
        ("[mqtt]\n", "key fleet: Field required"),
        (
            'fleet = "lab"\n[mqtt.tls]\nca_file = "a"\ncert_file = "b"\n',
            "key mqtt.tls: Value error, cert_file and key_file must be given together",
        ),
    ],
)
def test_invalid_values_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, Sample)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'fleet = "lab"\nport = = 3\n')
    with pytest.raises(ConfigError, match=r"edge.toml: invalid TOML: .*line 2"):
        load_config(path, Sample)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml", Sample)


def test_password_comes_from_its_own_file(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt.pass"
    secret.write_text("s3cret\n")
    path = write(tmp_path, f'fleet = "lab"\n[mqtt]\nusername = "pi-01"\npassword_file = "{secret}"\n')
    assert load_config(path, Sample).mqtt.password() == "s3cret"
