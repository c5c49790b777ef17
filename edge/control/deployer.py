"""The deployment state machine: from a signed envelope to a committed (or rejected, failed, rolled
back) model, one persisted transition at a time.

queued -> downloading -> verifying -> staged -> activating -> trial -> committed
Any step may end in ``rejected`` (the input is bad: signature, serial, compatibility, integrity),
``failed`` (the device could not finish: network, disk) or ``rolled_back`` (the model went live and
was replaced by the previous one). Every transition is an outbox event. Deployments interrupted by a
restart resume where they stopped; downloads continue from their partial files.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge.control.activation import ActivationError, Activator
from edge.control.reporting import Reporter
from edge.control.trust import TrustStore
from edge.delivery.downloader import Downloader, ProgressCallback
from edge.delivery.store import ContentStore
from edge.delivery.verifier import (
    AdmissionError,
    DeviceProfile,
    check_compatibility,
    check_model_files,
    check_serial,
    open_manifest,
    peek_manifest,
)
from edge.state.ledger import Deployment, InstalledModel, Ledger
from shared.errors import ArtifactError, ContractError
from shared.manifest import Manifest
from shared.messages import DeploymentState

log = logging.getLogger(__name__)

#: Failures that say the device could not finish, not that the input was bad: retried later.
TRANSIENT_REASONS = frozenset({"download-failed", "disk-space", "disk-full", "io-error"})

_FORWARD = [
    DeploymentState.QUEUED,
    DeploymentState.DOWNLOADING,
    DeploymentState.VERIFYING,
    DeploymentState.STAGED,
    DeploymentState.ACTIVATING,
    DeploymentState.TRIAL,
    DeploymentState.COMMITTED,
]


@dataclass(frozen=True)
class Outcome:
    """What became of a request; ``result`` is a state name or ``already-installed``."""

    result: str
    message: str
    reason: str | None = None
    deployment_id: str | None = None
    serial: int | None = None

    @property
    def ok(self) -> bool:
        return self.result in (DeploymentState.COMMITTED.value, "already-installed", "rolled_back", "ok")


class _Run:
    """One deployment in progress: emits each forward state at most once, even across restarts."""

    def __init__(self, reporter: Reporter, deployment: Deployment, resumed: bool = False) -> None:
        self.reporter = reporter
        self.deployment = deployment
        # A new deployment's row starts as queued, but its queued event is still to be sent.
        self.reached: DeploymentState | None = deployment.state if resumed else None
        self.name: str | None = deployment.name
        self.serial: int | None = deployment.serial

    def advance(self, state: DeploymentState, reason: str | None = None) -> None:
        if self.reached is not None and _FORWARD.index(state) <= _FORWARD.index(self.reached):
            return
        self.reporter.transition(
            self.deployment.id, state, reason, self.name, self.serial, self.deployment.source
        )
        self.reached = state

    def end(self, state: DeploymentState, reason: str, message: str) -> Outcome:
        self.reporter.transition(
            self.deployment.id, state, message, self.name, self.serial, self.deployment.source
        )
        self.reporter.status()  # the retained status carries the result too
        log.log(
            logging.INFO if state is DeploymentState.COMMITTED else logging.WARNING,
            "deployment %s %s: %s",
            self.deployment.id,
            state.value,
            message,
        )
        return Outcome(state.value, message, reason, self.deployment.id, self.serial)


class Deployer:
    """Runs deployments, rollbacks, pins and garbage collection, one at a time (also across processes)."""

    def __init__(
        self,
        ledger: Ledger,
        reporter: Reporter,
        trust: TrustStore,
        store: ContentStore,
        downloader: Downloader,
        device: DeviceProfile,
        activator: Activator,
        keep_models: int,
    ) -> None:
        self.ledger = ledger
        self.reporter = reporter
        self.trust = trust
        self.store = store
        self.downloader = downloader
        self.device = device
        self.activator = activator
        self.keep_models = keep_models
        self._thread_lock = threading.Lock()
        self._lock_file = store.root / "deploy.lock"

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Serialise state changes between the daemon's threads and ``immune-edge install``."""
        with self._thread_lock, self._lock_file.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- deploy ------------------------------------------------------------------------------
    def deploy(
        self,
        envelope: bytes,
        source: str,
        local_files: Mapping[str, Path] | None = None,
        on_progress: ProgressCallback | None = None,
        resume: Deployment | None = None,
    ) -> Outcome:
        """Take a signed manifest envelope as far as it can go; never raises for bad input."""
        with self.exclusive():
            return self._deploy(envelope, source, local_files or {}, on_progress, resume)

    def _deploy(
        self,
        envelope: bytes,
        source: str,
        local_files: Mapping[str, Path],
        on_progress: ProgressCallback | None,
        resume: Deployment | None,
    ) -> Outcome:
        now = self.reporter.clock()
        try:
            manifest = open_manifest(envelope, self.trust.keyring, now)
        except ContractError as exc:
            run = _Run(self.reporter, resume or self.ledger.new_deployment(source, envelope), bool(resume))
            return run.end(DeploymentState.REJECTED, exc.reason, f"{exc.reason}: {exc}")
        current = self.ledger.current()
        if resume is None and current is not None and self._same(current, manifest):
            message = f"already-installed: {manifest.name} serial {manifest.serial} is the current model"
            log.info(message)
            self.reporter.status(note=message)
            return Outcome("already-installed", message, serial=manifest.serial)

        deployment = resume or self.ledger.new_deployment(source, envelope)
        self.ledger.describe_deployment(deployment.id, manifest.name, manifest.channel, manifest.serial)
        run = _Run(self.reporter, deployment, resumed=resume is not None)
        run.name, run.serial = manifest.name, manifest.serial
        run.advance(DeploymentState.QUEUED)
        try:
            check_serial(manifest, self.ledger.last_serial(manifest.channel))
            check_compatibility(manifest, self.device)
        except AdmissionError as exc:
            return run.end(DeploymentState.REJECTED, exc.reason, f"{exc.reason}: {exc}")

        run.advance(DeploymentState.DOWNLOADING)
        try:
            paths = self._fetch(manifest, local_files, on_progress)
        except ContractError as exc:
            state = DeploymentState.FAILED if exc.reason in TRANSIENT_REASONS else DeploymentState.REJECTED
            return run.end(state, exc.reason, f"{exc.reason}: {exc}")

        run.advance(DeploymentState.VERIFYING)
        try:
            header = check_model_files(manifest, paths, self.device.allowed_architectures)
        except ContractError as exc:
            # A blob with the right hash but a bad header came from a bad manifest: drop it now.
            self._discard_unused(manifest)
            return run.end(DeploymentState.REJECTED, exc.reason, f"{exc.reason}: {exc}")
        model = InstalledModel(
            channel=manifest.channel,
            serial=manifest.serial,
            name=manifest.name,
            envelope=envelope,
            model_sha256=manifest.model_file.sha256,
            digests=tuple(entry.sha256 for entry in manifest.files),
            installed_at=time.time(),
        )
        self.ledger.add_model(model)
        run.advance(DeploymentState.STAGED, f"GGUF v{header.version} {header.architecture}")
        return self._go_live(run, model)

    @staticmethod
    def _same(model: InstalledModel, manifest: Manifest) -> bool:
        return (model.channel, model.serial, model.model_sha256) == (
            manifest.channel,
            manifest.serial,
            manifest.model_file.sha256,
        )

    def _fetch(
        self, manifest: Manifest, local_files: Mapping[str, Path], on_progress: ProgressCallback | None
    ) -> dict[str, Path]:
        paths = {}
        for entry in manifest.files:
            if entry.name in local_files:
                paths[entry.name] = self.store.import_file(local_files[entry.name], entry.sha256, entry.size)
            else:
                paths[entry.name] = self.downloader.fetch(entry, on_progress)
        return paths

    def _discard_unused(self, manifest: Manifest) -> None:
        protected = self.ledger.in_use() | {d for m in self.ledger.models() for d in m.digests}
        for entry in manifest.files:
            if entry.sha256 not in protected:
                self.store.blob_path(entry.sha256).unlink(missing_ok=True)
                self.store.partial_path(entry.sha256).unlink(missing_ok=True)

    def _activate(self, run: _Run, model: InstalledModel, before: InstalledModel | None) -> Outcome | None:
        """Start ``model`` in the runtime; on failure serve ``before`` again and end the run as failed."""
        run.advance(DeploymentState.ACTIVATING)
        try:
            self.activator.activate(model)
        except ActivationError as exc:
            self.activator.restore(before)
            return run.end(DeploymentState.FAILED, exc.reason, f"{exc.reason}: {exc}")
        return None

    def _go_live(self, run: _Run, model: InstalledModel) -> Outcome:
        """activating -> trial -> committed, or back to what ran before."""
        before, before_previous = self.ledger.current(), self.ledger.previous()
        if (failed := self._activate(run, model, before)) is not None:
            return failed
        self.ledger.switch_to(model, accept_serial=True)
        run.advance(DeploymentState.TRIAL)
        try:
            if before is not None:  # with nothing to go back to, an unhealthy model beats none
                self.activator.trial(model)
        except ActivationError as exc:
            self._restore_pointers(before, before_previous)
            self.activator.restore(before)
            return run.end(DeploymentState.ROLLED_BACK, exc.reason, f"{exc.reason}: {exc}")
        self.activator.commit(model)
        outcome = run.end(
            DeploymentState.COMMITTED, "committed", f"{model.name} serial {model.serial} is the current model"
        )
        self._collect_garbage()
        return outcome

    def _restore_pointers(self, current: InstalledModel | None, previous: InstalledModel | None) -> None:
        if current is None:
            return
        if previous is not None:
            self.ledger.switch_to(previous, accept_serial=False)
        self.ledger.switch_to(current, accept_serial=False)

    # -- resume after restart ------------------------------------------------------------------
    def serve_current(self) -> None:
        """Have the runtime serve the current model (at start-up, after unfinished work is settled)."""
        with self.exclusive():
            self.activator.restore(self.ledger.current())

    def resume_unfinished(self) -> list[Outcome]:
        """Finish deployments a crash or restart interrupted."""
        outcomes = []
        for deployment in self.ledger.unfinished():
            if deployment.state in (DeploymentState.ACTIVATING, DeploymentState.TRIAL):
                outcomes.append(self._abandon_activation(deployment))
            elif deployment.envelope is not None:
                log.info("resuming deployment %s (%s)", deployment.id, deployment.state.value)
                outcomes.append(self.deploy(deployment.envelope, deployment.source, resume=deployment))
        return outcomes

    def _abandon_activation(self, deployment: Deployment) -> Outcome:
        """The daemon died while a model was going live: count that as unhealthy and go back."""
        with self.exclusive():
            run = _Run(self.reporter, deployment, resumed=True)
            current, previous = self.ledger.current(), self.ledger.previous()
            is_current = current is not None and (current.channel, current.serial) == (
                deployment.channel,
                deployment.serial,
            )
            if is_current and previous is not None:
                self.ledger.switch_to(previous, accept_serial=False)
                self.activator.restore(previous)
                return run.end(
                    DeploymentState.ROLLED_BACK,
                    "restart-during-trial",
                    f"restart-during-trial: the daemon stopped while serial {deployment.serial} was on "
                    f"trial; back to serial {previous.serial}",
                )
            return run.end(
                DeploymentState.FAILED,
                "interrupted",
                "interrupted: the daemon stopped during activation",
            )

    # -- operator actions ----------------------------------------------------------------------
    def rollback(self, serial: int | None, source: str) -> Outcome:
        """Go to the previous model or to a cached serial (the only way to a lower serial)."""
        with self.exclusive():
            target = self.ledger.previous() if serial is None else self.ledger.find_serial(serial)
            if target is None:
                what = "no previous model" if serial is None else f"serial {serial} is not cached"
                return Outcome("failed", f"rollback refused: {what}", "not-cached")
            return self._switch(target, source, DeploymentState.ROLLED_BACK, "rollback")

    def pin(self, serial: int | None, source: str) -> Outcome:
        """Stay on the current (or a cached) model; desired state is ignored until unpinned."""
        with self.exclusive():
            outcome = Outcome("ok", "pinned to the current model")
            if serial is not None:
                target = self.ledger.find_serial(serial)
                if target is None:
                    return Outcome("failed", f"pin refused: serial {serial} is not cached", "not-cached")
                current = self.ledger.current()
                if current is None or current.serial != serial:
                    outcome = self._switch(target, source, DeploymentState.COMMITTED, "pin")
                    if not outcome.ok:
                        return outcome
            self.ledger.set_pinned(True)
            self.reporter.status(note=f"pinned: {outcome.message}")
            return Outcome(
                "ok", f"pinned; {outcome.message}", deployment_id=outcome.deployment_id, serial=serial
            )

    def unpin(self) -> Outcome:
        with self.exclusive():
            self.ledger.set_pinned(False)
            self.reporter.status(note="unpinned")
            return Outcome("ok", "unpinned; desired state applies again")

    def _switch(self, target: InstalledModel, source: str, final: DeploymentState, verb: str) -> Outcome:
        """Make a cached, previously verified model current again (its blobs are re-checked)."""
        current = self.ledger.current()
        run = _Run(self.reporter, self.ledger.new_deployment(source, target.envelope))
        run.name, run.serial = target.name, target.serial
        self.ledger.describe_deployment(run.deployment.id, target.name, target.channel, target.serial)
        run.advance(DeploymentState.QUEUED)
        run.advance(DeploymentState.VERIFYING)
        try:
            manifest = target.manifest()
            for entry in manifest.files:
                path = self.store.blob_path(entry.sha256)
                if not path.is_file() or path.stat().st_size != entry.size:
                    raise ArtifactError(
                        "not-cached", f"{verb}: blob {entry.sha256[:12]} is missing or damaged"
                    )
            check_model_files(
                manifest,
                {e.name: self.store.blob_path(e.sha256) for e in manifest.files},
                self.device.allowed_architectures,
            )
        except ContractError as exc:
            return run.end(DeploymentState.FAILED, exc.reason, f"{exc.reason}: {exc}")
        if (failed := self._activate(run, target, current)) is not None:
            return failed
        self.ledger.switch_to(target, accept_serial=False)
        self.activator.commit(target)
        frm = f"serial {current.serial}" if current else "no model"
        outcome = run.end(final, verb, f"{verb}: {frm} -> {target.name} serial {target.serial}")
        return Outcome("ok", outcome.message, None, outcome.deployment_id, target.serial)

    # -- garbage collection ----------------------------------------------------------------
    def collect_garbage(self, wanted_envelopes: Sequence[bytes] = ()) -> list[str]:
        """Keep the newest ``keep_models`` models, the current and previous ones and the files of
        ``wanted_envelopes`` (desired, perhaps half downloaded); delete the rest."""
        wanted = set().union(*(_digests_of(envelope) for envelope in wanted_envelopes))
        with self.exclusive():
            return self._collect_garbage(wanted)

    def _collect_garbage(self, wanted: set[str] | None = None) -> list[str]:
        in_use = self.ledger.in_use()
        models = self.ledger.models()
        keep_models = models[: self.keep_models]
        pointers = {(m.channel, m.serial) for m in (self.ledger.current(), self.ledger.previous()) if m}
        dropped = [m for m in models[self.keep_models :] if (m.channel, m.serial) not in pointers]
        self.ledger.forget_models([(m.channel, m.serial) for m in dropped])
        keep = {d for m in keep_models for d in m.digests} | (wanted or set())
        for deployment in self.ledger.unfinished():
            keep |= _digests_of(deployment.envelope)
        return self.store.collect_garbage(keep, in_use)


def _digests_of(envelope: bytes | None) -> set[str]:
    """File digests an envelope's manifest names (unverified: only used to protect files from GC)."""
    manifest = peek_manifest(envelope) if envelope is not None else None
    return {entry.sha256 for entry in manifest.files} if manifest else set()


def envelope_digest(envelope: bytes) -> str:
    """Identity of a received envelope, for recognising redelivered retained messages."""
    return hashlib.sha256(envelope).hexdigest()
