"""Garbage collection of the model store: keep the newest models, the current and previous ones,
whatever an unfinished deployment or a desired state still needs; delete the rest."""

from __future__ import annotations

from collections.abc import Sequence

from edge.delivery.store import ContentStore
from edge.state.ledger import Ledger
from shared.admission import read_manifest_unverified


class GarbageCollector:
    """Called by the deployer under its lock, so it never races a deployment."""

    def __init__(self, ledger: Ledger, store: ContentStore, keep_models: int) -> None:
        self.ledger = ledger
        self.store = store
        self.keep_models = keep_models

    def collect(self, wanted_envelopes: Sequence[bytes] = ()) -> list[str]:
        """Delete what is not kept (``wanted_envelopes``: desired state, perhaps half downloaded, is
        kept too); returns the removed file names."""
        ledger = self.ledger
        wanted = set().union(*(digests_of(envelope) for envelope in wanted_envelopes))
        models = ledger.models()
        pointers = {m.key for m in ledger.pointed()}
        dropped = [m for m in models[self.keep_models :] if m.key not in pointers]
        ledger.forget_models([m.key for m in dropped])
        keep = {d for m in models[: self.keep_models] for d in m.digests} | wanted
        for deployment in ledger.unfinished():
            keep |= digests_of(deployment.envelope)
        return self.store.collect_garbage(keep, ledger.in_use())


def digests_of(envelope: bytes | None) -> set[str]:
    """File digests an envelope's manifest names (unverified: only used to protect files from GC)."""
    manifest = read_manifest_unverified(envelope) if envelope is not None else None
    return {entry.sha256 for entry in manifest.files} if manifest else set()
