"""The deployment state machine: from a signed envelope to a committed (or rejected, failed, rolled
back) model, one persisted transition at a time.

queued -> downloading -> verifying -> staged -> activating -> trial -> committed
Any step may end in ``rejected`` (the input is bad: signature, serial, compatibility, integrity,
known bad), ``failed`` (the device could not finish: network, disk, load) or ``rolled_back`` (the
model went live, failed its trial and the previous one serves again). Every transition is an outbox
event. What a restart does to an unfinished deployment is the table in edge.control.recovery.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from edge.audit import Audit, RefusalKind
from edge.control.activation import ActivationError, Activator
from edge.control.gc import GarbageCollector
from edge.control.progress import DeploymentRun
from edge.control.reporting import Reporter
from edge.control.trust import TrustStore
from edge.delivery.downloader import Downloader, ProgressCallback
from edge.delivery.store import ContentStore
from edge.state.ledger import ChangeKind, Deployment, InstalledModel, Ledger, slot_of
from shared.admission import (
    AdmissionInput,
    DeviceProfile,
    FileFacts,
    admit_files,
    admit_for_device,
    verify_manifest,
)
from shared.artifacts import read_file_facts
from shared.errors import ArtifactError, ContractError, TransientError
from shared.gguf import GgufHeader
from shared.manifest import Manifest
from shared.messages import DeploymentState
from shared.outcome import Outcome, ResultCode
from shared.reasons import Reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GoLive:
    """How one kind of change goes live."""

    #: Raise the channel's anti-rollback floor to the serial (never for an operator's way back).
    raises_floor: bool
    #: Try the model in the trial window before committing (a new version only).
    trial: bool
    #: The run's terminal state and the reason it reports.
    end: DeploymentState
    reason: Reason
    #: Pin the device to the model once it is live.
    pins: bool = False


GO_LIVE: dict[ChangeKind, GoLive] = {
    ChangeKind.MODEL: GoLive(
        raises_floor=True, trial=True, end=DeploymentState.COMMITTED, reason=Reason.COMMITTED
    ),
    ChangeKind.ADAPTER: GoLive(
        raises_floor=True, trial=True, end=DeploymentState.COMMITTED, reason=Reason.COMMITTED
    ),
    ChangeKind.ROLLBACK: GoLive(
        raises_floor=False, trial=False, end=DeploymentState.ROLLED_BACK, reason=Reason.ROLLBACK
    ),
    ChangeKind.PIN: GoLive(
        raises_floor=False, trial=False, end=DeploymentState.COMMITTED, reason=Reason.PIN, pins=True
    ),
}


class Deployer:
    """Runs deployments one at a time (also across processes: ``immune-edge install``)."""

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
        audit: Audit,
    ) -> None:
        self.ledger = ledger
        self.audit = audit
        self.reporter = reporter
        self.trust = trust
        self.store = store
        self.downloader = downloader
        self.device = device
        self.activator = activator
        self.gc = GarbageCollector(ledger, store, keep_models)
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
        """Take a signed manifest envelope as far as it can go; never raises for bad input. A
        rejected manifest goes to the audit trail with its reason and source."""
        with self.exclusive():
            outcome = self._deploy(envelope, source, local_files or {}, on_progress, resume)
        if outcome.result is ResultCode.REJECTED:
            self.audit.refused(
                RefusalKind.MANIFEST,
                outcome.reason or Reason.REJECTED,
                source,
                outcome.message,
                deployment=outcome.deployment_id,
                serial=outcome.serial,
            )
        return outcome

    def _deploy(
        self,
        envelope: bytes,
        source: str,
        local_files: Mapping[str, Path],
        on_progress: ProgressCallback | None,
        resume: Deployment | None,
    ) -> Outcome:
        try:
            manifest = verify_manifest(envelope, self.trust.keyring, self.reporter.clock())
        except ContractError as exc:
            run = DeploymentRun(
                self.reporter, resume or self.ledger.new_deployment(source, envelope), bool(resume)
            )
            return run.fail(DeploymentState.REJECTED, exc)
        current = self.ledger.current(slot_of(manifest))
        if resume is None and current is not None and _same(current, manifest):
            return self._already_current(current, manifest, envelope, source)

        deployment = resume or self.ledger.new_deployment(source, envelope)
        kind = ChangeKind.ADAPTER if manifest.is_adapter else ChangeKind.MODEL
        self.ledger.describe_deployment(deployment.id, manifest.name, manifest.channel, manifest.serial, kind)
        run = DeploymentRun(self.reporter, deployment, resumed=resume is not None)
        run.name, run.serial, run.kind = manifest.name, manifest.serial, kind
        run.advance(DeploymentState.QUEUED)
        device_state = self.device_state(manifest.channel)
        try:
            admit_for_device(manifest, device_state)
        except ContractError as exc:
            return run.fail(DeploymentState.REJECTED, exc)

        run.advance(DeploymentState.DOWNLOADING)
        try:
            paths = self._fetch(manifest, local_files, on_progress)
        except TransientError as exc:
            return run.fail(DeploymentState.FAILED, exc)
        except ContractError as exc:
            return run.fail(DeploymentState.REJECTED, exc)

        run.advance(DeploymentState.VERIFYING)
        try:
            header = self._admit_stored(device_state, manifest, paths)
        except TransientError as exc:
            return run.fail(DeploymentState.FAILED, exc)
        except ContractError as exc:
            # A blob with the right hash but a bad header came from a bad manifest: drop it now.
            self._discard_unused(manifest)
            return run.fail(DeploymentState.REJECTED, exc)
        model = InstalledModel(manifest, envelope, time.time())
        self.ledger.add_model(model)
        run.advance(DeploymentState.STAGED, f"GGUF v{header.version} {header.architecture}")
        return self.go_live(run, model)

    def _already_current(
        self, current: InstalledModel, manifest: Manifest, envelope: bytes, source: str
    ) -> Outcome:
        """``manifest`` names the current model's serial: nothing to do, unless its contents differ."""
        if current.manifest != manifest:
            # One serial, two statements about it: whichever is genuine, neither is acted on.
            run = DeploymentRun(self.reporter, self.ledger.new_deployment(source, envelope))
            run.name, run.serial = manifest.name, manifest.serial
            reused = ArtifactError(
                Reason.SERIAL_REUSED,
                f"{manifest.channel} serial {manifest.serial} is installed with other contents; "
                "a changed manifest needs a new serial",
            )
            return run.fail(DeploymentState.REJECTED, reused)
        message = f"already-installed: {manifest.name} serial {manifest.serial} is the current model"
        log.info(message)
        self.reporter.status(note=message)
        return Outcome(result=ResultCode.ALREADY_INSTALLED, message=message, serial=manifest.serial)

    def device_state(self, channel: str) -> AdmissionInput:
        """What phase 2 compares a manifest on ``channel`` against: this device and its state
        database (the daemon, ``install`` and ``verify`` alike)."""
        base = self.ledger.current()
        return AdmissionInput(
            serial_floor=self.ledger.last_serial(channel),
            device=self.device,
            known_bad=self.ledger.bad_serials(),
            served_base_sha256=base.model_sha256 if base is not None else "",
        )

    def _fetch(
        self, manifest: Manifest, local_files: Mapping[str, Path], on_progress: ProgressCallback | None
    ) -> dict[str, Path]:
        paths = {}
        for entry in manifest.files:
            if entry.name in local_files:
                paths[entry.name] = self.store.import_file(local_files[entry.name], entry.sha256, entry.size)
            elif (seeded := self.store.from_seed(entry.sha256, entry.size)) is not None:
                paths[entry.name] = seeded
            else:
                paths[entry.name] = self.downloader.fetch(entry, on_progress)
        return paths

    def _admit_stored(
        self, given: AdmissionInput, manifest: Manifest, paths: Mapping[str, Path]
    ) -> GgufHeader:
        """Phase 3 of admission on the blobs in the store, read again."""
        return admit_files(manifest, replace(given, files=self._stored_facts(manifest, paths)))

    def _stored_facts(self, manifest: Manifest, paths: Mapping[str, Path]) -> dict[str, FileFacts]:
        """Size, sha256 and header of each stored blob, read from its bytes: a blob was hashed on
        its way in, but it may have changed since (an SD card's bit rot, a long-cached rollback
        target). A blob is named by its digest, so a mismatch is the store's fault, never the
        manifest's: the blob is dropped and the attempt fails as transient (the retry fetches it)."""
        facts = {}
        for entry in manifest.files:
            path = paths[entry.name]
            read = read_file_facts(path, entry.role, self.device.allowed_architectures)
            if (read.size, read.sha256) != (entry.size, entry.sha256):
                path.unlink(missing_ok=True)
                raise TransientError(
                    Reason.STORE_CORRUPT,
                    f"stored blob {entry.sha256} ({entry.name}) changed after it was verified: now "
                    f"{read.size} bytes with sha256 {read.sha256}; dropped, to be fetched again",
                )
            facts[entry.name] = read
        return facts

    def _discard_unused(self, manifest: Manifest) -> None:
        protected = self.ledger.in_use() | {d for m in self.ledger.models() for d in m.digests}
        for entry in manifest.files:
            if entry.sha256 not in protected:
                self.store.blob_path(entry.sha256).unlink(missing_ok=True)
                self.store.partial_path(entry.sha256).unlink(missing_ok=True)

    # -- going live ------------------------------------------------------------------------------
    def activate(
        self, run: DeploymentRun, model: InstalledModel, before: InstalledModel | None
    ) -> Outcome | None:
        """Start ``model`` in the runtime; on failure serve ``before`` again and end the run as failed
        (an interruption leaves the run to restart recovery)."""
        run.advance(DeploymentState.ACTIVATING)
        try:
            self.activator.activate(model)
        except TransientError as exc:
            return _interrupted(run, exc)
        except ActivationError as exc:
            self._restore(before, model.slot)
            return run.fail(DeploymentState.FAILED, exc)
        if not model.slot:
            self._serve_adapters_of(model)
        return None

    def _restore(self, model: InstalledModel | None, slot: str) -> None:
        """Serve ``model`` in ``slot`` again after a failed go-live (and, for a base, its adapters)."""
        self.activator.restore(model, slot)
        if not slot:
            self._serve_adapters_of(model)

    def _serve_adapters_of(self, base: InstalledModel | None) -> None:
        """The base changed (a new version went live, or the old one came back): serve each adapter's
        current version made for exactly this file on it. They passed their gate on these bytes; an
        adapter for another base waits for its own."""
        if base is None:
            return
        for slot in self.ledger.adapter_slots():
            adapter = self.ledger.current(slot)
            made_for = adapter.manifest.base if adapter is not None else None
            if adapter is not None and made_for is not None and made_for.sha256 == base.model_sha256:
                self.activator.restore(adapter, slot)

    def go_live(self, run: DeploymentRun, model: InstalledModel) -> Outcome:
        """The one way a model goes live, for every kind of change: activate, move the pointers,
        try it (a new version), commit, end the run. A failed trial is a model fault: that serial is
        marked bad on this device and what ran before serves again."""
        live = GO_LIVE[run.kind]
        before, before_previous = self.ledger.current(model.slot), self.ledger.previous(model.slot)
        if (failed := self.activate(run, model, before)) is not None:
            return failed
        self.ledger.switch_to(model, accept_serial=live.raises_floor)
        if live.trial:
            run.advance(DeploymentState.TRIAL)
            try:
                if before is not None:  # with nothing to go back to, an unhealthy model beats none
                    self.activator.trial(model)
            except TransientError as exc:
                return _interrupted(run, exc)
            except ActivationError as exc:
                self.ledger.set_pointers(model.slot, before, before_previous)  # as before the go-live
                self._restore(before, model.slot)
                self.ledger.mark_bad(model.channel, model.serial, f"{exc.reason}: {exc}")
                return run.fail(DeploymentState.ROLLED_BACK, exc)
        self.activator.commit(model)
        if live.pins:
            self.ledger.set_pinned(True)
        was = f"serial {before.serial}" if before is not None and before.key != model.key else "no model"
        message = (
            f"{model.name} serial {model.serial} is the current model"
            if live.end is DeploymentState.COMMITTED and not live.pins
            else f"{live.reason}: {was} -> {model.name} serial {model.serial}"
        )
        outcome = run.end(live.end, live.reason, message)
        self.gc.collect()
        return outcome

    def check_cached(self, run: DeploymentRun, model: InstalledModel) -> None:
        """An operator's target, verified once, is checked again where it lies in the store before it
        goes live: every blob present, its bytes against the manifest, the model's GGUF header."""
        run.advance(DeploymentState.VERIFYING)
        paths = {entry.name: self.store.blob_path(entry.sha256) for entry in model.manifest.files}
        for entry in model.manifest.files:
            if not paths[entry.name].is_file():
                raise ArtifactError(
                    Reason.NOT_CACHED, f"{run.kind.value}: blob {entry.sha256[:12]} is missing"
                )
        self._admit_stored(self.device_state(model.channel), model.manifest, paths)

    def collect_garbage(self, wanted_envelopes: Sequence[bytes] = ()) -> list[str]:
        """Garbage-collect the store between deployments (edge.control.gc)."""
        with self.exclusive():
            return self.gc.collect(wanted_envelopes)

    def serve_current(self) -> None:
        """Have the runtime serve the current model (at start-up, after unfinished work is settled)."""
        with self.exclusive():
            self.activator.restore(self.ledger.current())
            for slot in self.ledger.adapter_slots():
                self.activator.restore(self.ledger.current(slot), slot)


def _same(model: InstalledModel, manifest: Manifest) -> bool:
    return (
        model.key == (manifest.channel, manifest.serial) and model.model_sha256 == manifest.model_file.sha256
    )


def _interrupted(run: DeploymentRun, exc: ContractError) -> Outcome:
    """The daemon is stopping mid-activation: no terminal event; the row stays in its state, and the
    restart recovery table decides (edge.control.recovery)."""
    log.warning("deployment %s interrupted: %s", run.deployment.id, exc)
    return Outcome(
        result=ResultCode.FAILED,
        message=f"{exc.reason}: {exc}",
        reason=Reason.INTERRUPTED,
        deployment_id=run.deployment.id,
        serial=run.serial,
        transient=True,
    )
