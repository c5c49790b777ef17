"""Admission: the checks a signed manifest and its files pass before a device uses them.

One pipeline, in a fixed order, with no I/O inside (in the spirit of python-tuf's trusted metadata
set): the caller reads the bytes (envelope, file facts, GGUF header) and hands them in; each step
is a named check that raises a ContractError with a stable reason code. The device's deployer,
``immune-edge verify``, ``immune-fleet verify`` and ``immune-train publish`` all run these steps.

Order: signature threshold -> schema -> expiry -> serial floor -> compatibility -> size and hash ->
GGUF header. Nothing unsigned is parsed as a manifest; nothing unverified reaches llama.cpp.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from shared.errors import ArtifactError, ContractError, SchemaError
from shared.gguf import GgufHeader
from shared.manifest import MANIFEST_PAYLOAD_TYPE, ArtifactFile, FileRole, Manifest
from shared.signing import Envelope, Keyring, Role, verify_envelope


class AdmissionError(ContractError):
    """A signed manifest this device must not install (older serial, wrong hardware...)."""


@dataclass(frozen=True)
class DeviceProfile:
    """What the compatibility check compares a manifest against."""

    cpu_arch: str
    ram_mb: int
    groups: tuple[str, ...]
    allowed_architectures: frozenset[str]


@dataclass(frozen=True)
class FileFacts:
    """What the caller read of one artifact file: its size, its sha256 and, for the model file, its
    parsed GGUF header (or the error parsing it raised)."""

    size: int
    sha256: str
    header: GgufHeader | ContractError | None = None


# -- the steps ---------------------------------------------------------------------------------------
def check_signature(envelope: Envelope | bytes, keyring: Keyring) -> bytes:
    """A threshold of trainer keys signed the payload; returns the verified payload bytes."""
    return verify_envelope(
        envelope, keyring, Role.TRAINER, MANIFEST_PAYLOAD_TYPE, what="manifest envelope"
    ).payload


def check_expiry(manifest: Manifest, now: datetime) -> None:
    if manifest.is_expired(now):
        raise SchemaError(
            "expired",
            f"manifest {manifest.name} serial {manifest.serial}: "
            f"expired at {manifest.expires_at.isoformat()}",
        )


def check_serial(manifest: Manifest, serial_floor: int) -> None:
    """Anti-rollback: only a strictly newer serial on the channel is accepted."""
    if manifest.serial <= serial_floor:
        raise AdmissionError(
            "serial-not-newer",
            f"manifest {manifest.name} serial {manifest.serial} is not newer than serial {serial_floor} "
            f"already accepted on channel {manifest.channel!r} (only an operator rollback goes back)",
        )


def check_compatibility(manifest: Manifest, device: DeviceProfile) -> None:
    """Architecture, RAM and device groups."""
    compat = manifest.compatibility
    if device.cpu_arch not in compat.cpu_arch:
        raise AdmissionError(
            "incompatible-arch",
            f"manifest {manifest.name} is built for {', '.join(compat.cpu_arch)}; this device is "
            f"{device.cpu_arch}",
        )
    if compat.min_ram_mb > device.ram_mb:
        raise AdmissionError(
            "insufficient-ram",
            f"manifest {manifest.name} needs {compat.min_ram_mb} MiB RAM; this device has {device.ram_mb}",
        )
    if compat.device_groups and not set(compat.device_groups) & set(device.groups):
        raise AdmissionError(
            "wrong-group",
            f"manifest {manifest.name} is for groups {', '.join(compat.device_groups)}; this device is in "
            f"{', '.join(device.groups) or 'no group'}",
        )


def check_file(entry: ArtifactFile, facts: FileFacts | None) -> None:
    """Exactly the declared size and sha256."""
    if facts is None:
        raise ArtifactError("missing-file", f"artifact {entry.name}: not available")
    if facts.size != entry.size:
        raise ArtifactError(
            "size-mismatch", f"artifact {entry.name}: size is {facts.size} bytes, manifest says {entry.size}"
        )
    if facts.sha256 != entry.sha256:
        raise ArtifactError(
            "hash-mismatch", f"artifact {entry.name}: sha256 is {facts.sha256}, manifest says {entry.sha256}"
        )


def check_model_header(
    manifest: Manifest, facts: FileFacts | None, allowed_architectures: Collection[str]
) -> GgufHeader:
    """The model file's GGUF header parsed, with an architecture this device allows."""
    header = facts.header if facts is not None else None
    if isinstance(header, ContractError):
        raise header
    if header is None:
        raise ArtifactError("bad-gguf", f"{manifest.model_file.name}: the GGUF header was not read")
    name = manifest.model_file.name
    if header.architecture not in allowed_architectures:
        raise ArtifactError(
            "bad-gguf",
            f"{name}: not an acceptable GGUF file: "
            f"architecture {header.architecture!r} is not allowed on this device",
        )
    check_adapter_binding(manifest, header)
    return header


def check_adapter_binding(manifest: Manifest, header: GgufHeader) -> None:
    """A model manifest ships a model; an adapter manifest ships a LoRA adapter exported against
    exactly the base it names."""
    name = manifest.model_file.name
    if manifest.base is None:
        if header.kind != "model":
            raise ArtifactError(
                "not-a-model",
                f"{name} is a GGUF {header.kind!r}: an adapter needs a manifest naming its base",
            )
        return
    if header.kind != "adapter" or header.adapter_type != "lora":
        raise ArtifactError(
            "not-an-adapter",
            f"{name} is a GGUF {header.kind!r} ({header.adapter_type or 'no adapter type'}), "
            "but the manifest describes a LoRA adapter",
        )
    if header.base_sha256 != manifest.base.sha256:
        raise ArtifactError(
            "base-mismatch",
            f"{name} was exported against base sha256 {header.base_sha256 or '(not recorded)'}, "
            f"the manifest names {manifest.base.name} with sha256 {manifest.base.sha256}",
        )


# -- the pipeline, in three phases ---------------------------------------------------------------------
def verify_manifest(envelope: Envelope | bytes, keyring: Keyring, now: datetime | None = None) -> Manifest:
    """Phase 1, before anything else is read: signature, schema, expiry. Returns the verified
    manifest, the only one later phases (and the device) work with."""
    payload = check_signature(envelope, keyring)
    manifest = Manifest.from_json(payload)
    check_expiry(manifest, now or datetime.now(UTC))
    return manifest


def check_known_bad(manifest: Manifest, known_bad: Mapping[tuple[str, int], str]) -> None:
    """A serial this device marked bad (failed its trial, or interrupted too often) is refused with
    the original reason, whenever its desired state is seen again."""
    reason = known_bad.get((manifest.channel, manifest.serial))
    if reason is not None:
        raise AdmissionError(
            "known-bad", f"{manifest.name} serial {manifest.serial} was marked bad on this device: {reason}"
        )


def admit_for_device(
    manifest: Manifest,
    serial_floor: int,
    device: DeviceProfile,
    known_bad: Mapping[tuple[str, int], str] | None = None,
) -> None:
    """Phase 2, before any download: known bad, serial floor, compatibility."""
    check_known_bad(manifest, known_bad or {})
    check_serial(manifest, serial_floor)
    check_compatibility(manifest, device)


def admit_files(
    manifest: Manifest, files: Mapping[str, FileFacts], allowed_architectures: Collection[str]
) -> GgufHeader:
    """Phase 3, before llama.cpp sees a byte: every file's size and sha256, then the model's header."""
    for entry in manifest.files:
        check_file(entry, files.get(entry.name))
    return check_model_header(manifest, files.get(manifest.model_file.name), allowed_architectures)


# -- the same steps, each reported (immune-edge verify) --------------------------------------------------
@dataclass(frozen=True)
class AdmissionInput:
    """Everything admission looks at. ``None`` leaves a step out (reported as not checked):
    ``serial_floor`` and ``device`` without device state, ``files`` without the artifact."""

    envelope: bytes
    keyring: Keyring
    now: datetime
    serial_floor: int | None = None
    device: DeviceProfile | None = None
    known_bad: Mapping[tuple[str, int], str] | None = None
    files: Mapping[str, FileFacts] | None = None
    allowed_architectures: Collection[str] | None = None


@dataclass(frozen=True)
class StepResult:
    """One named check: passed (True), failed (False) or not checked (None), and why."""

    name: str
    passed: bool | None
    detail: str


def run_admission(given: AdmissionInput) -> list[StepResult]:
    """Every step in pipeline order, each reported, so an operator sees all problems at once.
    Signature, schema and expiry stop the run when they fail (nothing can be read from an untrusted
    manifest); the GGUF header is read only when everything before it passed."""
    results: list[StepResult] = []
    try:
        manifest = verify_manifest(given.envelope, given.keyring, given.now)
    except ContractError as exc:
        results.append(StepResult("signature, schema, expiry", False, f"{exc.reason}: {exc}"))
        results.append(StepResult("the rest", None, "not checked: the manifest is not trusted"))
        return results
    results.append(
        StepResult(
            "signature, schema, expiry",
            True,
            f"{manifest.name} serial {manifest.serial}, expires {manifest.expires_at.isoformat()}",
        )
    )
    device, floor, files = given.device, given.serial_floor, given.files
    known_bad = given.known_bad
    steps: list[tuple[str, bool, Callable[[], object], str]] = [
        ("known bad", known_bad is not None, lambda: check_known_bad(manifest, known_bad or {}), "not bad"),
        (
            "serial (anti-rollback)",
            floor is not None,
            lambda: check_serial(manifest, floor or 0),
            f"> {floor}",
        ),
        (
            "compatibility",
            device is not None,
            lambda: device and check_compatibility(manifest, device),
            "arch, RAM and groups match this device",
        ),
        (
            "size and sha256",
            files is not None,
            # The files handed in (``immune-edge verify`` checks one artifact); the model file always.
            lambda: [
                check_file(entry, (files or {}).get(entry.name))
                for entry in manifest.files
                if entry.name in (files or {}) or entry.role is FileRole.MODEL
            ],
            f"{manifest.model_file.size} bytes",
        ),
    ]
    for name, applicable, check, detail in steps:
        if not applicable:
            results.append(StepResult(name, None, "not checked: give --config for this device's state"))
            continue
        try:
            check()
        except ContractError as exc:
            results.append(StepResult(name, False, f"{exc.reason}: {exc}"))
        else:
            results.append(StepResult(name, True, detail))
    results.append(_header_step(manifest, given, results))
    return results


def _header_step(manifest: Manifest, given: AdmissionInput, earlier: list[StepResult]) -> StepResult:
    """The GGUF header, read only when every earlier step passed."""
    device, files = given.device, given.files
    allowed = given.allowed_architectures or (device.allowed_architectures if device else None)
    if files is None or allowed is None or any(r.passed is False for r in earlier):
        return StepResult("GGUF header", None, "not checked: an earlier check failed")
    try:
        header = check_model_header(manifest, files.get(manifest.model_file.name), allowed)
    except ContractError as exc:
        return StepResult("GGUF header", False, f"{exc.reason}: {exc}")
    detail = f"v{header.version} {header.architecture}, {header.tensor_count} tensors"
    return StepResult("GGUF header", True, detail)


def read_manifest_unverified(envelope: bytes) -> Manifest | None:
    """The manifest inside an envelope WITHOUT verifying it, or None if unreadable. Only for
    bookkeeping that cannot hurt if lied to (which files to keep from GC, what a report shows) and for
    the device's own state database, whose rows were verified before they were written."""
    try:
        return Manifest.from_json(Envelope.from_json(envelope).payload_bytes())
    except ContractError:
        return None
