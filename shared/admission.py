"""Admission: the checks a signed manifest and its files pass before a device uses them.

One pipeline, in a fixed order, with no I/O inside (in the spirit of python-tuf's trusted metadata
set): the caller reads the bytes (envelope, file facts, GGUF header) and hands them in; each step
is a named check that raises a ContractError with a stable reason code. The device's deployer,
``immune-edge verify``, ``immune-fleet verify`` and ``immune-train publish`` all run these steps.

Order: signature threshold -> schema -> expiry (phase 1) -> known bad -> serial floor ->
compatibility -> an adapter's served base (phase 2, ``DEVICE_STEPS``) -> size and sha256 -> GGUF
header and adapter binding (phase 3, ``FILE_STEPS``). The step tables exist once: the device's
phases run every step and refuse one whose input is missing; ``run_admission`` reports each.
Nothing unsigned is parsed as a manifest; nothing unverified reaches llama.cpp.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from shared.errors import ArtifactError, ContractError, SchemaError
from shared.gguf import GgufHeader
from shared.manifest import MANIFEST_PAYLOAD_TYPE, ArtifactFile, FileRole, Manifest
from shared.reasons import Reason
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
            Reason.EXPIRED,
            f"manifest {manifest.name} serial {manifest.serial}: "
            f"expired at {manifest.expires_at.isoformat()}",
        )


def check_serial(manifest: Manifest, serial_floor: int) -> None:
    """Anti-rollback: only a strictly newer serial on the channel is accepted."""
    if manifest.serial <= serial_floor:
        raise AdmissionError(
            Reason.SERIAL_NOT_NEWER,
            f"manifest {manifest.name} serial {manifest.serial} is not newer than serial {serial_floor} "
            f"already accepted on channel {manifest.channel!r} (only an operator rollback goes back)",
        )


def check_compatibility(manifest: Manifest, device: DeviceProfile) -> None:
    """Architecture, RAM and device groups."""
    compat = manifest.compatibility
    if device.cpu_arch not in compat.cpu_arch:
        raise AdmissionError(
            Reason.INCOMPATIBLE_ARCH,
            f"manifest {manifest.name} is built for {', '.join(compat.cpu_arch)}; this device is "
            f"{device.cpu_arch}",
        )
    if compat.min_ram_mb > device.ram_mb:
        raise AdmissionError(
            Reason.INSUFFICIENT_RAM,
            f"manifest {manifest.name} needs {compat.min_ram_mb} MiB RAM; this device has {device.ram_mb}",
        )
    if compat.device_groups and not set(compat.device_groups) & set(device.groups):
        raise AdmissionError(
            Reason.WRONG_GROUP,
            f"manifest {manifest.name} is for groups {', '.join(compat.device_groups)}; this device is in "
            f"{', '.join(device.groups) or 'no group'}",
        )


def check_file(entry: ArtifactFile, facts: FileFacts | None) -> None:
    """Exactly the declared size and sha256."""
    if facts is None:
        raise ArtifactError(Reason.MISSING_FILE, f"artifact {entry.name}: not available")
    if facts.size != entry.size:
        raise ArtifactError(
            Reason.SIZE_MISMATCH,
            f"artifact {entry.name}: size is {facts.size} bytes, manifest says {entry.size}",
        )
    if facts.sha256 != entry.sha256:
        raise ArtifactError(
            Reason.HASH_MISMATCH,
            f"artifact {entry.name}: sha256 is {facts.sha256}, manifest says {entry.sha256}",
        )


def check_model_header(
    manifest: Manifest, facts: FileFacts | None, allowed_architectures: Collection[str]
) -> GgufHeader:
    """The model file's GGUF header parsed, with an architecture this device allows."""
    header = facts.header if facts is not None else None
    if isinstance(header, ContractError):
        raise header
    if header is None:
        raise ArtifactError(Reason.BAD_GGUF, f"{manifest.model_file.name}: the GGUF header was not read")
    name = manifest.model_file.name
    if header.architecture not in allowed_architectures:
        raise ArtifactError(
            Reason.BAD_GGUF,
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
                Reason.NOT_A_MODEL,
                f"{name} is a GGUF {header.kind!r}: an adapter needs a manifest naming its base",
            )
        return
    if header.kind != "adapter" or header.adapter_type != "lora":
        raise ArtifactError(
            Reason.NOT_AN_ADAPTER,
            f"{name} is a GGUF {header.kind!r} ({header.adapter_type or 'no adapter type'}), "
            "but the manifest describes a LoRA adapter",
        )
    check_recorded_base(name, header, manifest.base.name, manifest.base.sha256)


def check_recorded_base(file_name: str, header: GgufHeader, base_name: str, base_sha256: str) -> None:
    """The adapter file records (``immune_edge.base_sha256``) exactly the base it is said to run on."""
    if header.base_sha256 != base_sha256:
        raise ArtifactError(
            Reason.BASE_MISMATCH,
            f"{file_name} was exported against base sha256 {header.base_sha256 or '(not recorded)'}, "
            f"not {base_name} (sha256 {base_sha256})",
        )


def check_base_served(manifest: Manifest, served_base_sha256: str | None) -> None:
    """An adapter runs only on the base file it was trained against: the device's current model."""
    if manifest.base is None:
        return
    if served_base_sha256 != manifest.base.sha256:
        serving = f"sha256 {served_base_sha256}" if served_base_sha256 else "no base model"
        raise AdmissionError(
            Reason.BASE_MISMATCH,
            f"adapter {manifest.name} needs base {manifest.base.name} (sha256 {manifest.base.sha256}); "
            f"this device serves {serving}",
        )


# -- what the steps look at ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdmissionInput:
    """What the steps after the signature look at. ``None`` leaves a step out, which only ``run_admission``
    allows (reported as not checked): the device's phases refuse to run a step without its input.
    ``serial_floor``, ``device``, ``known_bad`` and ``served_base_sha256`` come from the device's
    state, ``files`` from the artifact."""

    serial_floor: int | None = None
    device: DeviceProfile | None = None
    known_bad: Mapping[tuple[str, int], str] | None = None
    #: sha256 of the base model the device serves; "" when it serves none (None: not known).
    served_base_sha256: str | None = None
    files: Mapping[str, FileFacts] | None = None
    #: False when ``files`` holds only the model file (``immune-edge verify`` checks one artifact).
    all_files: bool = True
    allowed_architectures: Collection[str] | None = None


def _allowed(given: AdmissionInput) -> Collection[str] | None:
    if given.allowed_architectures is not None:
        return given.allowed_architectures
    return given.device.allowed_architectures if given.device is not None else None


def _known_bad(manifest: Manifest, given: AdmissionInput) -> str:
    check_known_bad(manifest, given.known_bad or {})
    return "not bad"


def _serial(manifest: Manifest, given: AdmissionInput) -> str:
    check_serial(manifest, given.serial_floor or 0)
    return f"> {given.serial_floor}"


def _compatibility(manifest: Manifest, given: AdmissionInput) -> str:
    check_compatibility(manifest, cast(DeviceProfile, given.device))  # applies() said it is there
    return "arch, RAM and groups match this device"


def _base(manifest: Manifest, given: AdmissionInput) -> str:
    check_base_served(manifest, given.served_base_sha256)
    return f"made for the served base {manifest.base.name}" if manifest.base else "not an adapter"


def _files(manifest: Manifest, given: AdmissionInput) -> str:
    files = given.files or {}
    for entry in manifest.files:
        if given.all_files or entry.name in files or entry.role is FileRole.MODEL:
            check_file(entry, files.get(entry.name))
    return f"{manifest.model_file.size} bytes"


def _header(manifest: Manifest, given: AdmissionInput) -> GgufHeader:
    facts = (given.files or {}).get(manifest.model_file.name)
    return check_model_header(manifest, facts, _allowed(given) or ())


@dataclass(frozen=True)
class Step:
    """One named check after the signature: whether its input was given, and the check (it raises a
    ContractError, or returns what passed: a line for the operator, or the parsed header)."""

    name: str
    applies: Callable[[AdmissionInput], bool]
    check: Callable[[Manifest, AdmissionInput], object]
    #: What the step needs, named when it cannot run.
    needs: str


#: Phase 2, before any download.
DEVICE_STEPS: tuple[Step, ...] = (
    Step("known bad", lambda g: g.known_bad is not None, _known_bad, "the device's bad serials"),
    Step("serial (anti-rollback)", lambda g: g.serial_floor is not None, _serial, "the serial floor"),
    Step("compatibility", lambda g: g.device is not None, _compatibility, "the device profile"),
    Step("base (adapters)", lambda g: g.served_base_sha256 is not None, _base, "the served base model"),
)
#: Phase 3, before llama.cpp sees a byte.
FILE_STEPS: tuple[Step, ...] = (
    Step("size and sha256", lambda g: g.files is not None, _files, "the artifact files"),
    Step(
        "GGUF header",
        lambda g: g.files is not None and _allowed(g) is not None,
        _header,
        "the artifact and the allowed architectures",
    ),
)


# -- the pipeline, in three phases -------------------------------------------------------------------
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
            Reason.KNOWN_BAD,
            f"{manifest.name} serial {manifest.serial} was marked bad on this device: {reason}",
        )


def _run_all(steps: tuple[Step, ...], manifest: Manifest, given: AdmissionInput) -> object:
    """Every step, in order, failing closed (a step without its input is an error, never a pass);
    returns what the last one gave."""
    passed: object = None
    for step in steps:
        if not step.applies(given):
            raise ValueError(f"admission step {step.name!r} needs {step.needs}")
        passed = step.check(manifest, given)
    return passed


def admit_for_device(manifest: Manifest, given: AdmissionInput) -> None:
    """Phase 2, before any download: known bad, serial floor, compatibility, an adapter's base."""
    _run_all(DEVICE_STEPS, manifest, given)


def admit_files(manifest: Manifest, given: AdmissionInput) -> GgufHeader:
    """Phase 3, before llama.cpp sees a byte: every file's size and sha256, then the model's header."""
    return cast(GgufHeader, _run_all(FILE_STEPS, manifest, given))  # the last file step is the header


# -- the same steps, each reported (immune-edge verify) --------------------------------------------------
@dataclass(frozen=True)
class StepResult:
    """One named check: passed (True), failed (False) or not checked (None), and why."""

    name: str
    passed: bool | None
    detail: str


def run_admission(
    envelope: bytes, keyring: Keyring, now: datetime, given: AdmissionInput
) -> list[StepResult]:
    """Every step in pipeline order, each reported, so an operator sees all problems at once.
    Signature, schema and expiry stop the run when they fail (nothing can be read from an untrusted
    manifest); the GGUF header is read only when everything before it passed."""
    results: list[StepResult] = []
    try:
        manifest = verify_manifest(envelope, keyring, now)
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
    for step in (*DEVICE_STEPS, *FILE_STEPS):
        if not step.applies(given):
            results.append(StepResult(step.name, None, f"not checked: needs {step.needs} (give --config)"))
        elif step is FILE_STEPS[-1] and any(r.passed is False for r in results):
            results.append(StepResult(step.name, None, "not checked: an earlier check failed"))
        else:
            try:
                passed = step.check(manifest, given)
            except ContractError as exc:
                results.append(StepResult(step.name, False, f"{exc.reason}: {exc}"))
            else:
                results.append(StepResult(step.name, True, _shown(passed)))
    return results


def _shown(passed: object) -> str:
    if isinstance(passed, GgufHeader):
        return f"v{passed.version} {passed.architecture}, {passed.tensor_count} tensors"
    return str(passed)


def read_manifest_unverified(envelope: bytes) -> Manifest | None:
    """The manifest inside an envelope WITHOUT verifying it, or None if unreadable. Only for
    bookkeeping that cannot hurt if lied to (which files to keep from GC, what a report shows) and for
    the device's own state database, whose rows were verified before they were written."""
    try:
        return Manifest.from_json(Envelope.from_json(envelope).payload_bytes())
    except ContractError:
        return None
