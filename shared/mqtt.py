"""An MQTT v5 client with the credentials of an ``[mqtt]`` config section (TLS client certificate
and/or username and password file); the device agent and the operator tool both start from it."""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from shared.config import MqttSettings


def mqtt_client(settings: MqttSettings, client_id: str) -> mqtt.Client:
    """A paho client (callback API 2, MQTT v5) set up to authenticate as ``settings`` says."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    if settings.tls is not None:
        tls = settings.tls
        client.tls_set(
            ca_certs=str(tls.ca_file),
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
        )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password())
    return client
