"""The runtime behind the deployer's Activator: blue/green model swaps with a health gate, a trial
window, automatic restore, and a supervisor that restarts crashed workers.

A swap: start a worker for the new model (beside the old one when RAM allows; otherwise the router
holds new requests and the old worker is drained and stopped first), warm it up, run the health gate,
flip routing, and keep the old worker as a warm standby until the new model is committed, so a
failed trial flips straight back.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edge.config import ApiSettings, RuntimeSettings, read_meminfo_mb
from edge.control.activation import ActivationError, ActivationInterruptedError
from edge.delivery.store import ContentStore
from edge.metrics import Metrics
from edge.runtime.handle import WorkerError, WorkerHandle
from edge.runtime.health import GateCriteria, GateError, run_health_gate
from edge.runtime.protocol import LoadSpec
from edge.runtime.router import ModelRouter, ServedModel
from edge.state.ledger import InstalledModel
from shared.admission import check_base_served
from shared.errors import ContractError
from shared.manifest import FileRole, Manifest, RuntimeProfile

log = logging.getLogger(__name__)

#: Chat templates are small Jinja files; anything larger is not one.
MAX_TEMPLATE_BYTES = 32 * 1024
#: Beyond the file itself: KV cache, compute buffers and the Python worker (measured ~60-120 MiB
#: for the bundled models at n_ctx 4096).
WORKER_OVERHEAD_MB = 160


@dataclass(frozen=True)
class _Plan:
    spec: LoadSpec
    criteria: GateCriteria
    manifest: Manifest


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
        self._restart_at: dict[int, float] = {}
        self._thread_cap: int | None = None
        self._closing = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)

    # -- Activator ----------------------------------------------------------------------------------
    def activate(self, model: InstalledModel) -> None:
        """Load ``model``, gate it and route to it; the model it replaces stays warm until commit.
        An adapter is loaded into the base's worker instead (``serve_adapter``)."""
        if model.manifest.is_adapter:
            self._bring_up_adapter(model, gate=True)
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
            raise ActivationError("not-serving", f"{model.name} serial {model.serial} is not being served")
        settings = self.settings
        started = time.monotonic()
        while time.monotonic() - started < settings.trial_s:
            if self._closing.wait(0.2):
                raise ActivationInterruptedError("shutdown", "the daemon stopped during the trial window")
            crashes = process.stats.crashes_since(started)
            if crashes >= settings.crash_limit:
                raise ActivationError(
                    "crash-loop", f"the worker crashed {crashes} times within the trial window"
                )
            total = served.stats.ok + served.stats.failed
            if (
                total >= settings.trial_min_requests
                and served.stats.failed / total > settings.trial_max_error_rate
            ):
                raise ActivationError(
                    "trial-errors",
                    f"{served.stats.failed} of {total} requests failed during the trial window",
                )
        health = model.manifest.health
        floor = health.min_tokens_per_second if health else 0.0
        if served.stats.decode_rates and (rate := statistics.median(served.stats.decode_rates)) < floor:
            raise ActivationError(
                "trial-slow", f"served {rate:.1f} tokens/s during the trial, floor {floor:.1f}"
            )

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
                self.remove_adapter(slot)
                return
            try:
                self._bring_up_adapter(model, gate=False)
            except ActivationError as exc:
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
            except ActivationError as exc:
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
                raise ActivationError("load-failed", str(exc)) from None
            self._apply_cap(worker)
            served = ServedModel(
                name=name,
                worker=worker,
                n_ctx=spec.n_ctx,
                max_tokens_cap=self.api.max_tokens_cap,
                created=int(time.time()),
                aliases=self.api.aliases_for(name),
                defaults=profile.sampling.model_dump(),
                system_prompt=profile.system_prompt,
                size_bytes=path.stat().st_size,
                chat_format=spec.chat_format or "template",
            )
            self._retire(self.router.serve(served))
            self.metrics.now_serving(name, None)
            self.metrics.loaded(worker.prompt_cache_bytes)

    # -- adapters -----------------------------------------------------------------------------------
    def serve_adapter(
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
                raise ActivationError("no-base", f"adapter {name} needs its base model served first")
            worker = base.worker
            served_now = next((a for a in self.router.adapters if a.name == name), None)
            if served_now is not None and served_now.adapter == key:
                return  # this version is already what ``name`` serves
            if any(a.adapter == key for a in self.router.adapters):
                raise ActivationError(
                    "name-clash", f"adapter version {key} is already loaded for another name"
                )
            # Still loaded when this worker served before (a base restored from warm standby).
            if key not in worker.adapters:
                try:
                    worker.load_adapter(key, str(path))
                except WorkerError as exc:
                    raise ActivationError("load-failed", f"adapter {name}: {exc}") from None
            system_prompt = profile.system_prompt if profile else base.system_prompt
            if criteria is not None:
                try:
                    run_health_gate(worker, criteria, system_prompt, adapter=key)
                except GateError as exc:
                    worker.drop_adapter(key)
                    raise ActivationError(exc.reason, f"adapter {name}: {exc}") from None
            served = ServedModel(
                name=name,
                worker=worker,
                n_ctx=base.n_ctx,
                max_tokens_cap=base.max_tokens_cap,
                created=int(time.time()),
                aliases=aliases,
                defaults=profile.sampling.model_dump() if profile else base.defaults,
                system_prompt=system_prompt,
                size_bytes=size_bytes,
                sha256=sha256,
                quantization=base.quantization,
                chat_format=base.chat_format,
                adapter=key,
                key=model_key,
            )
            try:
                replaced = self.router.serve_adapter(served)
            except ValueError as exc:
                worker.drop_adapter(key)
                raise ActivationError("name-clash", f"adapter {name}: {exc}") from None
            log.info("now serving adapter %s (%s) on %s", name, key, base.name)
            self._report_adapters()
            if replaced is not None:
                self._unload_adapter(replaced)

    def _bring_up_adapter(self, model: InstalledModel, gate: bool) -> None:
        """An installed adapter manifest served on the current base, which must be the file it was
        trained against."""
        manifest, base = model.manifest, self.router.active
        try:  # admitted on this base; the base may have changed since
            check_base_served(manifest, base.sha256 if base is not None else "")
        except ContractError as exc:
            raise ActivationError(exc.reason, str(exc)) from None
        plan = self._plan(model)
        self.serve_adapter(
            model.name,
            Path(plan.spec.model_path),
            key=f"{model.channel}#{model.serial}",
            criteria=plan.criteria if gate else None,
            profile=manifest.runtime,
            size_bytes=manifest.model_file.size,
            sha256=manifest.model_file.sha256,
            model_key=model.key,
        )

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter ``name``; requests already on it finish first."""
        with self._lock:
            removed = self.router.remove_adapter(name)
            self._report_adapters()
            if removed is not None:
                self._unload_adapter(removed)

    def _report_adapters(self) -> None:
        self.metrics.adapters_now({a.name: a.adapter or "" for a in self.router.adapters})

    def _unload_adapter(self, served: ServedModel) -> None:
        if not self.router.drain(served, self.settings.drain_timeout_s):
            log.warning("adapter %s still had %d requests after draining", served.name, served.inflight)
        try:
            served.worker.drop_adapter(served.adapter or "")
        except WorkerError as exc:
            log.warning("could not unload adapter %s: %s", served.name, exc)

    # -- internals ----------------------------------------------------------------------------------
    def _plan(self, model: InstalledModel) -> _Plan:
        if self.store is None:
            raise ActivationError("no-store", "this runtime serves a local file only (immune-edge serve)")
        manifest = model.manifest
        runtime = manifest.runtime
        template = runtime.chat_template
        for entry in manifest.files:
            if entry.role is FileRole.CHAT_TEMPLATE:
                if entry.size > MAX_TEMPLATE_BYTES:
                    raise ActivationError("bad-template", f"chat template {entry.name} is over 32 KiB")
                template = self.store.blob_path(entry.sha256).read_text(encoding="utf-8")
        spec = load_spec(self.settings, self.store.blob_path(manifest.model_file.sha256), runtime, template)
        gate = manifest.health
        criteria = GateCriteria(
            golden_prompts=tuple(gate.golden_prompts if gate else self.settings.golden_prompts),
            min_tokens_per_second=gate.min_tokens_per_second if gate else 0.0,
            max_rss_mb=gate.max_rss_mb if gate else None,
            max_tokens=self.settings.gate_max_tokens,
        )
        return _Plan(spec, criteria, manifest)

    def _fits_beside(self, plan: _Plan) -> bool:
        """Whether the new worker can load while the current one keeps serving."""
        if self.settings.swap != "auto":
            return self.settings.swap == "parallel"
        try:
            available = read_meminfo_mb(self.procfs_root, "MemAvailable")
        except (OSError, ValueError) as exc:
            log.warning("cannot read MemAvailable (%s): swapping sequentially", exc)
            return False
        needed = plan.manifest.model_file.size // (1024 * 1024) + WORKER_OVERHEAD_MB
        return available >= needed + self.settings.swap_headroom_mb

    def _bring_up(self, model: InstalledModel, gate: bool) -> ServedModel | None:
        """Start, (gate) and route to ``model``; return the model routing moved away from, still
        running (parallel swap) or None (sequential swap: it was drained and stopped first)."""
        if self._closing.is_set():
            raise ActivationInterruptedError("shutdown", "the daemon is stopping")
        plan = self._plan(model)
        if self.router.active is not None and not self._fits_beside(plan):
            log.info("not enough RAM for two workers: holding requests while %s loads", model.name)
            self._retire(self.router.hold())
        label = f"{model.name}#{model.serial}"
        try:
            worker = WorkerHandle(plan.spec, label).start(self.settings.load_timeout_s)
        except WorkerError as exc:
            raise ActivationError("load-failed", str(exc)) from None
        self._apply_cap(worker)  # the gate measures the model as it will run now
        if gate:
            try:
                report = run_health_gate(worker, plan.criteria, plan.manifest.runtime.system_prompt)
            except GateError as exc:
                worker.stop()
                raise ActivationError(exc.reason, str(exc)) from None
            log.info("%s passed its health gate at %.1f tokens/s", label, report.tokens_per_second)
        served = ServedModel(
            name=model.name,
            worker=worker,
            n_ctx=plan.spec.n_ctx,
            max_tokens_cap=self.api.max_tokens_cap,
            created=int(model.installed_at),
            aliases=self.api.aliases_for(model.name),
            defaults=plan.manifest.runtime.sampling.model_dump(),
            system_prompt=plan.manifest.runtime.system_prompt,
            key=model.key,
            size_bytes=plan.manifest.model_file.size,
            sha256=plan.manifest.model_file.sha256,
            quantization=str(plan.manifest.quantization),
            chat_format=plan.spec.chat_format or "template",
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

    def _supervise(self) -> None:
        """Restart the serving worker when it dies, with backoff; the trial window counts crashes."""
        while not self._closing.wait(0.25):
            with self._lock:
                served = self.router.active
                if served is None or served.worker.alive or self._closing.is_set():
                    continue
                now = time.monotonic()
                if id(served.worker) not in self._restart_at:
                    served.stats.crashes.append(now)
                    recent = served.stats.crashes_since(now - self.settings.crash_window_s)
                    self._restart_at[id(served.worker)] = now + min(2.0 ** (recent - 1) - 1, 30.0)
                    log.error("worker for %s died (%d crashes recently)", served.name, recent)
                if now < self._restart_at[id(served.worker)]:
                    continue
                self._restart(served)

    def _restart(self, served: ServedModel) -> None:
        dead = served.worker
        self._restart_at.pop(id(dead), None)
        try:
            served.worker = WorkerHandle(dead.restart_spec(), dead.name).start(self.settings.load_timeout_s)
        except WorkerError as exc:
            log.error("restart of %s failed: %s", served.name, exc)
            return  # counted as another crash on the next pass, with a longer backoff
        dead.stop()
        for adapter in self.router.adapters:  # they share the base's process
            adapter.worker = served.worker
        self._apply_cap(served.worker)
        self.metrics.worker_restarts.inc()


def load_spec(
    settings: RuntimeSettings, path: Path, profile: RuntimeProfile, template: str | None
) -> LoadSpec:
    """How a worker loads a model: the device's runtime settings plus the model's runtime profile.
    The one place both ``run`` (installed models) and ``serve`` (a local file) get their LoadSpec."""
    return LoadSpec(
        model_path=str(path),
        n_ctx=profile.n_ctx,
        n_threads=settings.n_threads,
        n_threads_batch=settings.n_threads_batch,
        n_batch=settings.n_batch,
        chat_format=None if template else profile.chat_format,
        chat_template=template,
        stop=profile.stop,
        prefix_reuse=settings.prefix_reuse,
        prompt_cache_mb=settings.prompt_cache_mb,
    )
