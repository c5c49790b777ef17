"""The runtime behind the deployer's Activator: blue/green model swaps with a health gate, a trial
window, automatic restore, and the thread cap of thermal back-off.

A swap: start a worker for the new model (beside the old one when RAM allows; otherwise the router
holds new requests and the old worker is drained and stopped first), warm it up, run the health gate,
flip routing, and keep the old worker as a warm standby until the new model is committed, so a
failed trial flips straight back. Adapters (adapters.py), how a model is loaded and listed
(loading.py), the trial window (trial.py) and crash restarts (supervisor.py) live beside it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from edge.config import ApiSettings, RuntimeSettings
from edge.control.activation import ActivationError, ActivationInterruptedError
from edge.delivery.store import ContentStore
from edge.metrics import Metrics
from edge.runtime.adapters import AdapterSlots
from edge.runtime.handle import WorkerError, WorkerHandle
from edge.runtime.health import GateError, run_health_gate
from edge.runtime.loading import fits_beside, load_spec, plan_installed, served_base
from edge.runtime.router import ModelRouter, ServedModel
from edge.runtime.supervisor import Supervisor
from edge.runtime.trial import watch_trial
from edge.state.ledger import InstalledModel
from shared.manifest import RuntimeProfile
from shared.reasons import Reason

log = logging.getLogger(__name__)


class ServingRuntime:
    """Runs the installed models and routes the API to the healthy one."""

    def __init__(
        self,
        router: ModelRouter,
        store: ContentStore | None,
        runtime: RuntimeSettings,
        api: ApiSettings,
        procfs_root: Path,
        metrics: Metrics,
    ) -> None:
        self.router = router
        self.store = store
        self.settings = runtime
        self.api = api
        self.procfs_root = procfs_root
        self.metrics = metrics
        self._lock = threading.RLock()
        self._standby: ServedModel | None = None
        self._thread_cap: int | None = None
        self._closing = threading.Event()
        self.adapters = AdapterSlots(router, store, runtime, metrics, self._lock)
        self._supervisor = Supervisor(router, runtime, metrics, self._lock, self._closing, self._apply_cap)

    # -- Activator ----------------------------------------------------------------------------------
    def activate(self, model: InstalledModel) -> None:
        """Load ``model``, gate it and route to it; the model it replaces stays warm until commit.
        An adapter is loaded into the base's worker instead (adapters.py)."""
        if model.manifest.is_adapter:
            self.adapters.serve_installed(model, gate=True)
            return
        with self._lock:
            old = self._bring_up(model, gate=True)
            if old is not None:
                self._retire(self._standby)
                self._standby = old

    def trial(self, model: InstalledModel) -> None:
        """Watch the new model (or adapter) for ``trial_s``: crashes of its process, its requests'
        error rate and decode speed."""
        process = self.router.active
        served = next((m for m in [process, *self.router.adapters] if m and m.key == model.key), None)
        if process is None or served is None:
            raise ActivationError(
                Reason.NOT_SERVING, f"{model.name} serial {model.serial} is not being served"
            )
        health = model.manifest.health
        floor = health.min_tokens_per_second if health else 0.0
        watch_trial(process, served, self.settings, floor, self._closing)

    def commit(self, model: InstalledModel) -> None:
        """The new model stays: stop the standby (an adapter's old version is already unloaded)."""
        if model.manifest.is_adapter:
            return
        with self._lock:
            self._retire(self._standby)
            self._standby = None

    def restore(self, model: InstalledModel | None, slot: str = "") -> None:
        """Serve ``model`` again (warm standby if there is one, else load it without a gate: it
        passed one before); ``None`` serves nothing. With ``slot``, the adapter of that name."""
        if slot:
            if model is None:
                self.adapters.remove(slot)
                return
            try:
                self.adapters.serve_installed(model, gate=False)
            except (ActivationError, ActivationInterruptedError) as exc:
                log.error("cannot serve adapter %s serial %d again: %s", model.name, model.serial, exc)
            return
        with self._lock:
            active = self.router.active
            if model is None:
                self._retire(self.router.serve(None))
                self._retire(self._standby)
                self._standby = None
                self.metrics.now_serving(None, None)
                return
            if active is not None and active.key == model.key and not self.router.held:
                return  # the failure happened before routing changed
            if self._standby is not None and self._standby.key == model.key and self._standby.worker.alive:
                failed, self._standby = self.router.serve(self._standby), None
                self.metrics.swaps.labels(kind="restore").inc()
                self.metrics.now_serving(model.name, model.serial)
                self._retire(failed)
                return
            self._retire(self._standby)
            self._standby = None
            try:
                self._retire(self._bring_up(model, gate=False))
            except (ActivationError, ActivationInterruptedError) as exc:
                log.error("cannot serve %s serial %d again: %s", model.name, model.serial, exc)
                if self.router.held:
                    self.router.serve(None)  # waiting requests get a clear 503 instead of a timeout

    # -- thermal back-off -------------------------------------------------------------------------
    def limit_threads(self, cap: int | None) -> None:
        """Run every worker on at most ``cap`` threads (None: back to the counts chosen at load).
        Workers started later (swap, restart) get the same cap."""
        with self._lock:
            self._thread_cap = cap
            for served in (self.router.active, self._standby):
                if served is not None:
                    self._apply_cap(served.worker)

    def defer_low_priority(self, on: bool) -> None:
        """While on, requests marked low priority are refused with a retry hint."""
        if on:
            self.router.defer_low_priority.set()
        else:
            self.router.defer_low_priority.clear()

    @property
    def standby(self) -> ServedModel | None:
        """The previous model, kept warm until the new one is committed."""
        return self._standby

    @property
    def threads(self) -> int | None:
        """Threads the serving worker generates with now."""
        active = self.router.active
        return active.worker.n_threads if active is not None and active.worker.alive else None

    @property
    def threads_batch(self) -> int | None:
        """Threads the serving worker processes prompts with now."""
        active = self.router.active
        return active.worker.n_threads_batch if active is not None and active.worker.alive else None

    def _apply_cap(self, worker: WorkerHandle) -> None:
        tuned, tuned_batch = worker.tuned_threads
        cap = self._thread_cap
        wanted = (tuned, tuned_batch) if cap is None else (min(tuned, cap), min(tuned_batch, cap))
        if wanted == (worker.n_threads, worker.n_threads_batch) or not worker.alive:
            return
        try:
            worker.set_threads(*wanted)
            log.info("%s now uses %d/%d threads", worker.name, *wanted)
        except WorkerError as exc:
            log.warning("cannot change the threads of %s: %s", worker.name, exc)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Supervise; requests wait (held) until the start-up ``restore`` decides what to serve."""
        self.router.hold()
        self._supervisor.start()

    def interrupt(self) -> None:
        """End a trial window early (the daemon is stopping); the deployment rolls back."""
        self._closing.set()

    def close(self) -> None:
        """Stop supervising and stop every worker."""
        self._closing.set()
        with self._lock:
            for served in (self.router.serve(None), self._standby):
                if served is not None:
                    served.worker.stop()
            self._standby = None

    def serve_file(self, path: Path, name: str, profile: RuntimeProfile) -> None:
        """``immune-edge serve``: one GGUF the operator chose, loaded with the same settings as an
        installed model (no manifest, so no gate and no trial)."""
        with self._lock:
            spec = load_spec(self.settings, path, profile, profile.chat_template)
            try:
                worker = WorkerHandle(spec, name).start(self.settings.load_timeout_s)
            except WorkerError as exc:
                raise ActivationError(Reason.LOAD_FAILED, str(exc)) from None
            self._apply_cap(worker)
            served = served_base(name, worker, spec, profile, self.api)
            self._retire(self.router.serve(served))
            self.metrics.now_serving(name, None)
            self.metrics.loaded(worker.prompt_cache_bytes)

    # -- internals ----------------------------------------------------------------------------------
    def _bring_up(self, model: InstalledModel, gate: bool) -> ServedModel | None:
        """Start, (gate) and route to ``model``; return the model routing moved away from, still
        running (parallel swap) or None (sequential swap: it was drained and stopped first)."""
        if self._closing.is_set():
            raise ActivationInterruptedError(Reason.SHUTDOWN, "the daemon is stopping")
        plan = plan_installed(self.store, self.settings, model)
        if self.router.active is not None and not fits_beside(self.settings, self.procfs_root, plan.manifest):
            log.info("not enough RAM for two workers: holding requests while %s loads", model.name)
            self._retire(self.router.hold())
        label = f"{model.name}#{model.serial}"
        try:
            worker = WorkerHandle(plan.spec, label).start(self.settings.load_timeout_s)
        except WorkerError as exc:
            raise ActivationError(Reason.LOAD_FAILED, str(exc)) from None
        self._apply_cap(worker)  # the gate measures the model as it will run now
        if gate:
            try:
                report = run_health_gate(worker, plan.criteria, plan.manifest.runtime.system_prompt)
            except GateError as exc:
                worker.stop()
                raise ActivationError(exc.reason, str(exc)) from None
            log.info("%s passed its health gate at %.1f tokens/s", label, report.tokens_per_second)
        served = served_base(
            model.name,
            worker,
            plan.spec,
            plan.manifest.runtime,
            self.api,
            manifest=plan.manifest,
            key=model.key,
            created=int(model.installed_at),
        )
        old = self.router.serve(served)
        self.metrics.loaded(worker.prompt_cache_bytes)
        self.metrics.swaps.labels(kind="activate" if gate else "restore").inc()
        self.metrics.now_serving(model.name, model.serial)
        log.info("now serving %s", label)
        return old

    def _retire(self, served: ServedModel | None) -> None:
        """Let requests already on ``served`` (out of routing) finish, then stop its worker."""
        if served is None:
            return
        if not self.router.drain(served, self.settings.drain_timeout_s):
            log.warning("%s still had %d requests after draining; stopping it", served.name, served.inflight)
        served.worker.stop()
