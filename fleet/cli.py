"""``immune-fleet`` command line: keys, keyrings, manifests, signing and verification.

Some command functions run past 60 lines: Typer declares each option in the signature. Their bodies
stay under 60, and the work itself lives in the modules they call."""

from __future__ import annotations

import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fleet import capture, ops
from fleet.pi import cli as pi_cli
from shared.admission import verify_manifest
from shared.artifacts import describe_artifact, verify_artifact_file
from shared.cli_entry import run_cli, transfer_progress
from shared.errors import ArtifactError, ContractError
from shared.manifest import MANIFEST_PAYLOAD_TYPE, BaseModelRef, Manifest, Quantization, RuntimeProfile
from shared.manifest_builder import (
    DEFAULT_CHANNEL,
    DEFAULT_CPU_ARCH,
    DEFAULT_LIFETIME_DAYS,
    DEFAULT_N_CTX,
    DEFAULT_TASK,
    ManifestSpec,
    build_manifest,
)
from shared.messages import COMMAND_PAYLOAD_TYPE, Command
from shared.reasons import Reason
from shared.schema import Contract
from shared.signing import (
    KEYRING_PAYLOAD_TYPE,
    Envelope,
    Keyring,
    Role,
    TrustedKey,
    apply_keyring_update,
    generate_key,
    load_private_key,
    sign_envelope,
    verify_envelope,
    write_private_key,
)
from shared.signing.keyring import Thresholds
from shared.topics import DEFAULT_ROOT, Topics, render_mosquitto_acl

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Operate an immune-edge fleet: keys, manifests, signatures, rollouts, status and reports.",
)
keys_app = typer.Typer(no_args_is_help=True, help="Generate and inspect signing keys.")
keyring_app = typer.Typer(no_args_is_help=True, help="Build trusted keyrings.")
manifest_app = typer.Typer(no_args_is_help=True, help="Build model manifests.")
app.add_typer(keys_app, name="keys")
app.add_typer(keyring_app, name="keyring")
app.add_typer(manifest_app, name="manifest")

console = Console()
err_console = Console(stderr=True)
log = logging.getLogger(__name__)


class PayloadKind(StrEnum):
    """What a DSSE envelope carries."""

    MANIFEST = "manifest"
    KEYRING = "keyring"
    COMMAND = "command"


_PAYLOADS: dict[PayloadKind, tuple[type[Contract], str, Role]] = {
    PayloadKind.MANIFEST: (Manifest, MANIFEST_PAYLOAD_TYPE, Role.TRAINER),
    PayloadKind.KEYRING: (Keyring, KEYRING_PAYLOAD_TYPE, Role.ROOT),
    PayloadKind.COMMAND: (Command, COMMAND_PAYLOAD_TYPE, Role.OPERATOR),
}


def _write_new(path: Path, data: bytes, force: bool) -> None:
    if path.exists() and not force:
        raise ContractError(Reason.EXISTS, f"{path}: already exists (use --force to replace it)")
    path.write_bytes(data)


def _key_table(keys: list[TrustedKey], title: str) -> Table:
    table = Table(title=title)
    for column in ("name", "role", "keyid"):
        table.add_column(column)
    for key in keys:
        table.add_row(key.name or "", key.role.value, key.keyid)
    return table


@keys_app.command("generate")
def keys_generate(
    role: Annotated[Role, typer.Option(help="What the key will sign.")],
    name: Annotated[str, typer.Option(help="Label; files are NAME.key and NAME.pub.json.")],
    out_dir: Annotated[Path, typer.Option("--dir", help="Where to write the key files.")] = Path(),
) -> None:
    """Generate an ed25519 key: NAME.key (private, mode 0600) and NAME.pub.json (keyring entry)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    public = TrustedKey(keyid=key.keyid, role=role, public_key=key.public_b64, name=name)
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub.json"
    if public_path.exists():
        raise ContractError(Reason.EXISTS, f"{public_path}: already exists; refusing to replace a key")
    write_private_key(key, private_path)
    public_path.write_bytes(public.to_json())
    console.print(_key_table([public], f"new {role.value} key"))
    console.print(
        f"private key: {private_path} (mode 0600, keep it on this machine)\npublic entry: {public_path}"
    )


@keys_app.command("show")
def keys_show(
    files: Annotated[list[Path], typer.Argument(help="*.key, *.pub.json or keyring files.")],
) -> None:
    """Show keyid, role and name of key files or of every key in a keyring."""
    shown: list[TrustedKey] = []
    for path in files:
        if path.suffix == ".key":
            key = load_private_key(path)
            console.print(f"{path}: private ed25519 key, keyid {key.keyid}, public {key.public_b64}")
            continue
        data = path.read_bytes()
        try:
            shown.extend(Keyring.from_json(data, what=str(path)).keys)
        except ContractError:
            shown.append(TrustedKey.from_json(data, what=str(path)))
    if shown:
        console.print(_key_table(shown, "keys"))


def _parse_thresholds(values: list[str]) -> Thresholds:
    parsed: dict[str, int] = {}
    for value in values:
        role, sep, count = value.partition("=")
        if not sep or role not in Role.__members__.values() or not count.isdigit():
            raise ContractError(
                Reason.USAGE, f"--threshold {value!r}: expected ROLE=N with ROLE in root/trainer/operator"
            )
        parsed[role] = int(count)
    return Thresholds(**parsed)


@keyring_app.command("create")
def keyring_create(
    keys: Annotated[list[Path], typer.Argument(help="*.pub.json files of the trusted keys.")],
    output: Annotated[Path, typer.Option("-o", "--output")],
    version: Annotated[int, typer.Option(help="Must exceed the version devices hold now.")] = 1,
    threshold: Annotated[list[str] | None, typer.Option(help="ROLE=N, e.g. root=2 (default 1 each).")] = None,
    force: bool = False,
) -> None:
    """Build a keyring from public key files. Sign it with `sign --type keyring` to roll it out."""
    entries = [TrustedKey.from_json(path.read_bytes(), what=str(path)) for path in keys]
    keyring = Keyring(version=version, keys=entries, thresholds=_parse_thresholds(threshold or []))
    _write_new(output, keyring.to_json(), force)
    console.print(_key_table(entries, f"keyring version {version} -> {output}"))


@manifest_app.command("create")
def manifest_create(
    gguf: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The GGUF file to describe.")],
    name: Annotated[str, typer.Option(help="Model name devices and clients see.")],
    serial: Annotated[int, typer.Option(help="Monotonic per channel; devices refuse a serial <= theirs.")],
    url: Annotated[list[str], typer.Option(help="Download URL(s) of the GGUF (mirrors).")],
    output: Annotated[Path, typer.Option("-o", "--output")],
    channel: str = DEFAULT_CHANNEL,
    version: Annotated[str | None, typer.Option(help="Human version (default: the serial).")] = None,
    base_model: Annotated[str, typer.Option(help="The model this one was fine-tuned from.")] = "unknown",
    task: str = DEFAULT_TASK,
    quantization: Annotated[
        Quantization | None,
        typer.Option(help="Default: read from the file's header; refused if it contradicts the header."),
    ] = None,
    chat_format: Annotated[
        str | None, typer.Option(help="llama-cpp-python chat format, e.g. chatml.")
    ] = None,
    chat_template_file: Annotated[Path | None, typer.Option(help="Jinja chat template to embed.")] = None,
    system_prompt_file: Annotated[Path | None, typer.Option()] = None,
    n_ctx: int = DEFAULT_N_CTX,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    arch: Annotated[list[str] | None, typer.Option(help="aarch64 and/or x86_64 (default aarch64).")] = None,
    min_ram_mb: Annotated[
        int | None,
        typer.Option(help="Default: the file, its KV cache at --n-ctx and the runtime's overhead."),
    ] = None,
    group: Annotated[list[str] | None, typer.Option(help="Restrict to device group (repeatable).")] = None,
    expires_in_days: Annotated[int, typer.Option(min=1, max=3650)] = DEFAULT_LIFETIME_DAYS,
    base_file: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="For a LoRA adapter: the base GGUF it runs on."),
    ] = None,
    base_url: Annotated[
        list[str] | None, typer.Option(help="Where devices lacking the base can fetch it (repeatable).")
    ] = None,
    force: bool = False,
) -> None:
    """Describe a GGUF an operator already has: size, sha256 and quantization are read from the file.
    A LoRA adapter needs --base-file (and --base-url): the manifest binds it to that exact base."""
    if (base_file is None) != (not base_url):
        raise ArtifactError(Reason.BAD_OPTION, "--base-file and --base-url go together (for a LoRA adapter)")
    runtime = RuntimeProfile(
        chat_format=chat_format,
        chat_template=chat_template_file.read_text() if chat_template_file else None,
        system_prompt=system_prompt_file.read_text() if system_prompt_file else None,
        n_ctx=n_ctx,
        stop=stop or [],
    )
    spec = ManifestSpec(
        name=name,
        serial=serial,
        urls=url,
        runtime=runtime,
        channel=channel,
        version=version,
        base_model=base_model,
        task=task,
        quantization=quantization,
        cpu_arch=arch or DEFAULT_CPU_ARCH,
        min_ram_mb=min_ram_mb,
        device_groups=group or [],
        expires_in_days=expires_in_days,
    )
    with transfer_progress(err_console) as progress:
        if base_file is not None:
            task_id = progress.add_task(f"hashing {base_file.name}", total=base_file.stat().st_size)
            described = describe_artifact(
                base_file, base_url or [], on_progress=lambda n: progress.advance(task_id, n)
            )
            spec.base = BaseModelRef(
                name=base_file.stem, sha256=described.sha256, size=described.size, urls=described.urls
            )
        task_id = progress.add_task(f"hashing {gguf.name}", total=gguf.stat().st_size)
        manifest = build_manifest(gguf, spec, on_progress=lambda n: progress.advance(task_id, n))
    _write_new(output, manifest.to_json(), force)
    entry = manifest.model_file
    console.print(
        f"manifest {name} serial {serial}: {manifest.quantization.value}, {entry.size} bytes, "
        f"min RAM {manifest.compatibility.min_ram_mb} MiB, sha256 {entry.sha256} -> {output}"
    )


@app.command("acl")
def acl(
    fleet: Annotated[str, typer.Option(help="Fleet id.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="ACL file, or - for standard output.")],
    device: Annotated[
        list[str] | None,
        typer.Option(help="DEVICE[=GROUP,GROUP...] (repeatable): its certificate CN and groups."),
    ] = None,
    operator: Annotated[list[str] | None, typer.Option(help="Operator certificate CN (repeatable).")] = None,
    trainer: Annotated[list[str] | None, typer.Option(help="Trainer certificate CN (repeatable).")] = None,
    topic_root: str = DEFAULT_ROOT,
    force: bool = False,
) -> None:
    """Write the broker's mosquitto ACL for one fleet, generated from the topic contract."""
    devices: dict[str, list[str]] = {}
    for spec in device or []:
        name, _, groups = spec.partition("=")
        devices[name] = [g for g in groups.split(",") if g]
    text = render_mosquitto_acl(Topics(fleet, topic_root), devices, operator or [], trainer or [])
    if str(output) == "-":
        sys.stdout.write(text)
        return
    if output.exists() and output.read_text() == text:
        console.print(f"ACL unchanged: {output}")
        return
    _write_new(output, text.encode(), force)
    console.print(f"ACL for {len(devices)} device(s), {len(operator or [])} operator(s) -> {output}")


@app.command("sign")
def sign(
    payload: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="Manifest, keyring or command JSON.")
    ],
    key: Annotated[list[Path], typer.Option(help="Private key file (repeat for threshold signing).")],
    output: Annotated[Path, typer.Option("-o", "--output")],
    kind: Annotated[PayloadKind, typer.Option("--type", help="What the payload is.")] = PayloadKind.MANIFEST,
    force: bool = False,
) -> None:
    """Wrap a payload in a DSSE envelope signed by each key. The payload is validated first."""
    model, payload_type, _ = _PAYLOADS[kind]
    data = payload.read_bytes()
    model.from_json(data, what=str(payload))  # never sign something devices would reject
    envelope = sign_envelope(data, payload_type, [load_private_key(path) for path in key])
    _write_new(output, envelope.to_json(), force)
    console.print(f"signed {kind.value} {payload} with {len(envelope.signatures)} key(s) -> {output}")


@app.command("verify")
def verify(
    envelope_path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="DSSE envelope.")],
    keyring_path: Annotated[Path, typer.Option("--keyring", help="Trusted keyring JSON.")],
    artifact: Annotated[Path | None, typer.Option(help="Also check this file against the manifest.")] = None,
    kind: Annotated[PayloadKind, typer.Option("--type")] = PayloadKind.MANIFEST,
) -> None:
    """Verify an envelope against a keyring. Exit 0 when valid; otherwise exit 1 with a one-line reason."""
    keyring = Keyring.from_json(keyring_path.read_bytes(), what=str(keyring_path))
    envelope = Envelope.from_json(envelope_path.read_bytes(), what=str(envelope_path))
    if kind is PayloadKind.MANIFEST:
        manifest = verify_manifest(envelope, keyring)
        summary = (
            f"manifest {manifest.name} serial {manifest.serial} (expires {manifest.expires_at.isoformat()})"
        )
        if artifact is not None:
            entry = next((f for f in manifest.files if f.name == artifact.name), manifest.model_file)
            verify_artifact_file(artifact, entry)
            summary += (
                f"; {artifact} matches {entry.name} ({entry.size} bytes, sha256 {entry.sha256[:12]}...)"
            )
    elif kind is PayloadKind.KEYRING:
        updated = apply_keyring_update(keyring, envelope)
        summary = f"keyring update to version {updated.version} ({len(updated.keys)} keys)"
    else:
        verified = verify_envelope(envelope, keyring, Role.OPERATOR, COMMAND_PAYLOAD_TYPE, what="command")
        command = Command.from_json(verified.payload)
        summary = f"command {command.action.action} for {command.device_id} (nonce {command.nonce})"
    console.print(f"OK: {summary}")


ops.register(app)
capture.register(app)
pi_cli.register(app)


def main() -> None:
    """Entry point: bad input ends with one clear line on stderr and exit status 1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_cli(app)


if __name__ == "__main__":
    main()
