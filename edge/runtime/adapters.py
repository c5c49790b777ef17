"""LoRA adapters on the served base: loaded into the base's worker, gated, routed by name, and
unloaded once a replaced version has finished its requests."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from edge.config import RuntimeSettings
from edge.control.activation import ActivationError
from edge.delivery.store import ContentStore
from edge.metrics import Metrics
from edge.runtime.handle import WorkerError
from edge.runtime.health import GateCriteria, GateError, run_health_gate
from edge.runtime.loading import plan_installed, served_adapter
from edge.runtime.router import ModelRouter, ServedModel
from edge.state.ledger import InstalledModel
from shared.admission import check_base_served
from shared.errors import ContractError
from shared.manifest import RuntimeProfile
from shared.reasons import Reason

log = logging.getLogger(__name__)


class AdapterSlots:
    """The adapters the router serves beside their base, each under its own public name.

    ``lock`` is the serving runtime's: an adapter change never interleaves with a base swap."""

    def __init__(
        self,
        router: ModelRouter,
        store: ContentStore | None,
        settings: RuntimeSettings,
        metrics: Metrics,
        lock: threading.RLock,
    ) -> None:
        self.router = router
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self._lock = lock

    def serve(
        self,
        name: str,
        path: Path,
        key: str,
        aliases: tuple[str, ...] = (),
        criteria: GateCriteria | None = None,
        profile: RuntimeProfile | None = None,
        size_bytes: int = 0,
        sha256: str = "",
        model_key: tuple[str, int] | None = None,
    ) -> None:
        """Load a LoRA adapter into the active model's worker under ``key`` and route ``name`` (and
        ``aliases``) to it; with ``criteria`` it must pass the health gate first. The base and its
        other adapters keep serving: a replaced adapter of the same name finishes its requests and is
        then unloaded. ``key`` names this version inside the worker, distinct from the one it replaces."""
        with self._lock:
            base = self.router.active
            if base is None or base.adapter is not None:
                raise ActivationError(Reason.NO_BASE, f"adapter {name} needs its base model served first")
            worker = base.worker
            served_now = next((a for a in self.router.adapters if a.name == name), None)
            if served_now is not None and served_now.adapter == key:
                return  # this version is already what ``name`` serves
            if any(a.adapter == key for a in self.router.adapters):
                raise ActivationError(
                    Reason.NAME_CLASH, f"adapter version {key} is already loaded for another name"
                )
            # Still loaded when this worker served before (a base restored from warm standby).
            if key not in worker.adapters:
                try:
                    worker.load_adapter(key, str(path))
                except WorkerError as exc:
                    raise ActivationError(Reason.LOAD_FAILED, f"adapter {name}: {exc}") from None
            served = served_adapter(base, name, key, aliases, profile, size_bytes, sha256, model_key)
            if criteria is not None:
                try:
                    run_health_gate(worker, criteria, served.system_prompt, adapter=key)
                except GateError as exc:
                    worker.drop_adapter(key)
                    raise ActivationError(exc.reason, f"adapter {name}: {exc}") from None
            try:
                replaced = self.router.serve_adapter(served)
            except ValueError as exc:
                worker.drop_adapter(key)
                raise ActivationError(Reason.NAME_CLASH, f"adapter {name}: {exc}") from None
            log.info("now serving adapter %s (%s) on %s", name, key, base.name)
            self._report()
            if replaced is not None:
                self._unload(replaced)

    def serve_installed(self, model: InstalledModel, gate: bool) -> None:
        """An installed adapter manifest served on the current base, which must be the file it was
        trained against."""
        manifest, base = model.manifest, self.router.active
        try:  # admitted on this base; the base may have changed since
            check_base_served(manifest, base.sha256 if base is not None else "")
        except ContractError as exc:
            raise ActivationError(exc.reason, str(exc)) from None
        plan = plan_installed(self.store, self.settings, model)
        self.serve(
            model.name,
            Path(plan.spec.model_path),
            key=f"{model.channel}#{model.serial}",
            criteria=plan.criteria if gate else None,
            profile=manifest.runtime,
            size_bytes=manifest.model_file.size,
            sha256=manifest.model_file.sha256,
            model_key=model.key,
        )

    def remove(self, name: str) -> None:
        """Stop serving adapter ``name``; requests already on it finish first."""
        with self._lock:
            removed = self.router.remove_adapter(name)
            self._report()
            if removed is not None:
                self._unload(removed)

    def _report(self) -> None:
        self.metrics.adapters_now({a.name: a.adapter or "" for a in self.router.adapters})

    def _unload(self, served: ServedModel) -> None:
        if not self.router.drain(served, self.settings.drain_timeout_s):
            log.warning("adapter %s still had %d requests after draining", served.name, served.inflight)
        try:
            served.worker.drop_adapter(served.adapter or "")
        except WorkerError as exc:
            log.warning("could not unload adapter %s: %s", served.name, exc)
