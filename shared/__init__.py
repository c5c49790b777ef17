"""Contracts shared by the trainer, the edge daemon and the operator CLI.

Manifest and message schemas, DSSE signing with a role-based keyring, the MQTT
topic layout and the TOML config loader. Nothing here imports ``edge`` or ``trainer``.
"""
