"""The device's MQTT connection."""
