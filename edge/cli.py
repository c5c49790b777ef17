"""``immune-edge`` command line: run the daemon, install or verify a model offline, show state."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from edge.config import DEFAULT_CONFIG_FILE, EdgeConfig
from edge.delivery.gguf_header import DEFAULT_ARCHITECTURES
from edge.delivery.verifier import (
    DeviceProfile,
    check_compatibility,
    check_model_files,
    check_serial,
    open_manifest,
    peek_manifest,
)
from edge.node import EdgeNode, device_profile
from shared.cli_entry import run_cli, transfer_progress
from shared.config import load_config
from shared.errors import ContractError
from shared.manifest import Manifest
from shared.signing import Keyring
from shared.verification import verify_artifact_file

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="The immune-edge device daemon and its local tools.",
)
console = Console()
err_console = Console(stderr=True)
log = logging.getLogger(__name__)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Daemon config (TOML).")]


def setup_logging(verbose: bool) -> None:
    """Log to journald when running under systemd with systemd-python installed, else to stderr."""
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    try:
        from systemd.journal import JournalHandler  # type: ignore[import-not-found]

        handler = JournalHandler(SYSLOG_IDENTIFIER="immune-edge")
    except ImportError:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


@app.command()
def run(
    config: ConfigOption = DEFAULT_CONFIG_FILE,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the daemon: receive signed manifests and commands over MQTT, deploy and report."""
    from edge.daemon import EdgeDaemon  # paho and the worker threads are only needed here

    setup_logging(verbose)
    daemon = EdgeDaemon(load_config(config, EdgeConfig))

    def _stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        daemon.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    daemon.run()


@app.command()
def install(
    manifest: Annotated[Path, typer.Argument(help="Signed manifest envelope (JSON).")],
    artifact: Annotated[
        Path | None, typer.Option("--artifact", "-a", help="The model file, instead of downloading it.")
    ] = None,
    config: ConfigOption = DEFAULT_CONFIG_FILE,
) -> None:
    """Install a signed manifest through the same checks and store as the daemon (offline/USB use)."""
    setup_logging(False)
    envelope = manifest.read_bytes()
    node = EdgeNode.open(load_config(config, EdgeConfig))
    try:
        local = {}
        if artifact is not None:
            trusted = open_manifest(envelope, node.trust.keyring, datetime.now(UTC))
            local[trusted.model_file.name] = artifact
        with transfer_progress(err_console, transient=False) as progress:
            task = progress.add_task("download", total=None)
            outcome = node.deployer.deploy(
                envelope,
                "local-install",
                local,
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    finally:
        node.close()
    colour = "green" if outcome.ok else "red"
    console.print(f"[{colour}]{outcome.result}[/]: {outcome.message}")
    if not outcome.ok:
        raise typer.Exit(1)


@dataclass
class _Check:
    name: str
    passed: bool | None  # None: not checked
    detail: str


def _run_checks(
    envelope: bytes, artifact: Path, keyring: Keyring, device: DeviceProfile | None, last_serial: int | None
) -> list[_Check]:
    checks: list[_Check] = []
    try:
        manifest: Manifest = open_manifest(envelope, keyring, datetime.now(UTC))
    except ContractError as exc:
        checks.append(_Check("signature, schema, expiry", False, f"{exc.reason}: {exc}"))
        return [*checks, _Check("artifact", None, "not checked: the manifest is not trusted")]
    checks.append(
        _Check(
            "signature, schema, expiry",
            True,
            f"{manifest.name} serial {manifest.serial}, expires {manifest.expires_at.isoformat()}",
        )
    )
    steps = [
        (
            "serial (anti-rollback)",
            last_serial is not None,
            lambda: check_serial(manifest, last_serial or 0),
            f"newer than {last_serial}",
        ),
        (
            "compatibility",
            device is not None,
            lambda: device and check_compatibility(manifest, device),
            "arch, RAM and groups match this device",
        ),
        (
            "size and sha256",
            True,
            lambda: verify_artifact_file(artifact, manifest.model_file),
            f"{manifest.model_file.size} bytes",
        ),
    ]
    for name, applicable, check, ok_detail in steps:
        if not applicable:
            checks.append(_Check(name, None, "not checked: give --config for this device's state"))
            continue
        try:
            check()
            checks.append(_Check(name, True, ok_detail))
        except ContractError as exc:
            checks.append(_Check(name, False, f"{exc.reason}: {exc}"))
    if all(c.passed is not False for c in checks):
        try:
            allowed = device.allowed_architectures if device else DEFAULT_ARCHITECTURES
            header = check_model_files(manifest, {manifest.model_file.name: artifact}, allowed)
            checks.append(
                _Check(
                    "GGUF header",
                    True,
                    f"v{header.version} {header.architecture}, {header.tensor_count} tensors",
                )
            )
        except ContractError as exc:
            checks.append(_Check("GGUF header", False, f"{exc.reason}: {exc}"))
    else:
        checks.append(_Check("GGUF header", None, "not checked: an earlier check failed"))
    return checks


@app.command()
def verify(
    manifest: Annotated[Path, typer.Argument(help="Signed manifest envelope (JSON).")],
    artifact: Annotated[Path, typer.Argument(help="The model file to check against it.")],
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Also check serial and compatibility for this device."),
    ] = None,
    keyring: Annotated[
        Path | None, typer.Option("--keyring", "-k", help="Trusted keyring (without --config).")
    ] = None,
) -> None:
    """Explain which checks a manifest and model file pass on this device, and why others fail."""
    envelope = manifest.read_bytes()
    if config is not None:
        node = EdgeNode.open(load_config(config, EdgeConfig))
        try:
            trusted, device = node.trust.keyring, device_profile(node.config)
            claimed = peek_manifest(envelope)
            last_serial = node.ledger.last_serial(claimed.channel) if claimed else 0
        finally:
            node.close()
    elif keyring is not None:
        trusted, device, last_serial = Keyring.from_json(keyring.read_bytes()), None, None
    else:
        raise ContractError("usage", "give --config (device state) or --keyring")
    table = Table(title=f"{manifest.name} + {artifact.name}")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    checks = _run_checks(envelope, artifact, trusted, device, last_serial)
    for check in checks:
        mark = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "[yellow]skipped[/]"}[check.passed]
        table.add_row(check.name, mark, check.detail)
    console.print(table)
    if any(check.passed is False for check in checks):
        raise typer.Exit(1)


@app.command()
def status(config: ConfigOption = DEFAULT_CONFIG_FILE) -> None:
    """Show the current and cached models and recent deployments from the state directory."""
    node = EdgeNode.open(load_config(config, EdgeConfig))
    try:
        current, previous = node.ledger.current(), node.ledger.previous()
        table = Table(title=f"{node.config.device.fleet}/{node.config.device.id} cached models")
        for column in ("serial", "name", "channel", "sha256", "pointer"):
            table.add_column(column)
        for model in node.ledger.models():
            key = (model.channel, model.serial)
            pointer = (
                "current"
                if current and key == (current.channel, current.serial)
                else "previous"
                if previous and key == (previous.channel, previous.serial)
                else ""
            )
            table.add_row(str(model.serial), model.name, model.channel, model.model_sha256[:16], pointer)
        console.print(table)
        last = node.ledger.last_deployment()
        console.print(
            f"pinned: {node.ledger.pinned}; unsent messages: {len(node.outbox)}; last deployment: "
            f"{last.state.value + ' ' + (last.reason or '') if last else 'none'}"
        )
    finally:
        node.close()


@app.command()
def serve(
    model: Annotated[Path, typer.Option("--model", "-m", help="GGUF file to serve.")],
    host: Annotated[str, typer.Option(help="TCP address (loopback unless you mean it).")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="TCP port; 11434 is where Slips looks by default. 0: no TCP.")
    ] = 11434,
    socket_path: Annotated[
        Path | None, typer.Option("--socket", help="Also serve on this Unix socket.")
    ] = None,
    chat_format: Annotated[
        str | None, typer.Option(help="llama-cpp-python chat format, e.g. chatml.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Model name clients use (default: file stem).")] = None,
    alias: Annotated[list[str] | None, typer.Option(help="Extra model names (repeatable).")] = None,
    n_ctx: Annotated[int, typer.Option(help="Context window in tokens.")] = 4096,
    threads: Annotated[
        int | None, typer.Option(help="Inference threads (default: measured at load).")
    ] = None,
    max_tokens_cap: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 1024,
    queue: Annotated[int, typer.Option(help="Requests that may wait; more get 429.")] = 8,
    prefix_reuse: Annotated[
        bool, typer.Option(help="Reuse the KV state of shared prompt prefixes (off only to measure it).")
    ] = True,
    prompt_cache_mb: Annotated[
        int, typer.Option(help="RAM for KV states of older prompts (0: reuse the previous prompt's only).")
    ] = 0,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds a request may take, waiting included.")
    ] = 300.0,
) -> None:
    """Serve one local GGUF over the OpenAI/Ollama-compatible API, without MQTT (development, single box)."""
    import time

    from edge.api.app import create_app
    from edge.api.generation import Serving
    from edge.api.server import bind_sockets, serve_api
    from edge.config import ApiSettings
    from edge.delivery.gguf_header import read_gguf_header
    from edge.metrics import Metrics
    from edge.runtime.handle import WorkerHandle
    from edge.runtime.protocol import LoadSpec
    from edge.runtime.router import ModelRouter, ServedModel

    setup_logging(False)
    read_gguf_header(model)  # refuse a non-GGUF file before llama.cpp sees it
    api = ApiSettings(
        host=host,
        port=port,
        socket=socket_path,
        queue=queue,
        max_tokens_cap=max_tokens_cap,
        aliases=alias or [],
        request_timeout_s=request_timeout,
    )
    sockets = bind_sockets(api)
    served_name = name or model.stem
    spec = LoadSpec(
        model_path=str(model),
        n_ctx=n_ctx,
        n_threads=threads,
        chat_format=chat_format,
        prefix_reuse=prefix_reuse,
    )
    worker = WorkerHandle(spec, served_name).start()
    router = ModelRouter(max_waiting=queue)
    router.serve(
        ServedModel(
            served_name, worker, n_ctx, max_tokens_cap, int(time.time()), api.aliases_for(served_name)
        )
    )
    try:
        serve_api(create_app(Serving(router, Metrics(), api.request_timeout_s)), sockets)
    finally:
        worker.stop()


def main() -> None:
    """Entry point: bad input ends with one clear line on stderr and exit status 1."""
    run_cli(app)


if __name__ == "__main__":
    main()
