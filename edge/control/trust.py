"""The device's keyring: the provisioned trust anchor, replaced only by root-signed updates."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from edge.delivery.store import fsync_dir
from shared.errors import ContractError
from shared.signing import Envelope, Keyring, apply_keyring_update

log = logging.getLogger(__name__)


class TrustStore:
    """Holds the current keyring; an accepted update is persisted (atomically) before it is used."""

    def __init__(self, anchor_file: Path, state_dir: Path) -> None:
        self._updated_file = state_dir / "keyring.json"
        self._lock = threading.Lock()
        keyring = Keyring.from_json(anchor_file.read_bytes(), what=f"keyring {anchor_file}")
        if self._updated_file.exists():
            updated = Keyring.from_json(self._updated_file.read_bytes(), what=f"keyring {self._updated_file}")
            # A re-provisioned anchor newer than the stored update wins; so does the update otherwise.
            if updated.version > keyring.version:
                keyring = updated
        self._keyring = keyring

    @property
    def keyring(self) -> Keyring:
        with self._lock:
            return self._keyring

    def update(self, envelope: Envelope) -> Keyring:
        """Verify and adopt a keyring update; raise SignatureError/SchemaError and keep the old one.

        The keyring in use arriving again (a retained message after reconnect) returns it unchanged.
        """
        with self._lock:
            try:
                if Keyring.from_json(envelope.payload_bytes()) == self._keyring:
                    return self._keyring
            except ContractError:
                pass  # let the full verification below name the problem
            new = apply_keyring_update(self._keyring, envelope)
            temporary = self._updated_file.with_suffix(".tmp")
            temporary.write_bytes(new.to_json())
            with temporary.open("rb") as handle:
                os.fsync(handle.fileno())
            temporary.replace(self._updated_file)
            fsync_dir(self._updated_file.parent)
            self._keyring = new
        log.info("keyring updated to version %d (%d keys)", new.version, len(new.keys))
        return new
