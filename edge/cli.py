"""``immune-edge`` command line: run the daemon, install or verify a model offline, show state."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from edge.assembly import ControlPlane, software_version
from edge.config import DEFAULT_CONFIG_FILE, ApiSettings, EdgeConfig, RuntimeSettings, ThermalSettings
from edge.logs import LogFormat, setup_logging
from shared.admission import AdmissionInput, read_manifest_unverified, run_admission, verify_manifest
from shared.artifacts import read_file_facts
from shared.cli_entry import run_cli, transfer_progress
from shared.config import ConfigError, load_config
from shared.errors import ContractError
from shared.gguf import DEFAULT_ARCHITECTURES, read_gguf_header
from shared.manifest import FileRole, RuntimeProfile
from shared.outcome import Outcome
from shared.reasons import Reason
from shared.signing import Keyring

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="The immune-edge device daemon and its local tools.",
)
console = Console()
err_console = Console(stderr=True)
log = logging.getLogger(__name__)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Daemon config (TOML).")]


LogFormatOption = Annotated[
    LogFormat | None,
    typer.Option(
        "--log-format",
        help="auto (journald under systemd, else text on stderr), text, json or journal; "
        "overrides [logging] format.",
    ),
]


@app.command()
def run(
    config: ConfigOption = DEFAULT_CONFIG_FILE,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    log_format: LogFormatOption = None,
) -> None:
    """Run the daemon: receive signed manifests and commands over MQTT, deploy and report."""
    from edge.daemon import EdgeDaemon  # paho and the worker threads are only needed here

    settings = load_config(config, EdgeConfig)
    chosen = setup_logging(verbose, log_format or settings.logging.format, settings.device.id)
    log.info("immune-edge %s starting (log: %s)", software_version() or "(source tree)", chosen.value)
    daemon = EdgeDaemon(settings)

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
    """Install a signed manifest through the same checks and store as the daemon (offline/USB use).

    Exit status: 0 installed (or already installed); 1 bad invocation or config; 2 refused (bad
    signature, serial, compatibility, integrity, a model that failed): do not retry; 75 the device
    could not finish for now (download, disk): retry later."""
    setup_logging(False)
    envelope = manifest.read_bytes()
    node = ControlPlane.open(load_config(config, EdgeConfig))
    try:
        local = {}
        if artifact is not None:
            trusted = verify_manifest(envelope, node.trust.keyring, datetime.now(UTC))
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
    raise typer.Exit(install_exit_code(outcome))


#: ``immune-edge install`` exit statuses (scripts and Ansible tell retrying from giving up by them).
EXIT_INSTALLED = 0
#: Bad invocation, config or keyring (the one-line "REJECTED (...)" on stderr).
EXIT_USAGE = 1
#: The manifest or its model was refused: retrying the same input will not help.
EXIT_REFUSED = 2
#: The device could not finish for now (network, disk): retry later.
EXIT_RETRY_LATER = 75  # EX_TEMPFAIL in sysexits.h


def install_exit_code(outcome: Outcome) -> int:
    """0 installed, 2 refused (rejected, rolled back, a model that cannot load), 75 retry later."""
    if outcome.ok:
        return EXIT_INSTALLED
    return EXIT_RETRY_LATER if outcome.transient else EXIT_REFUSED


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
    """Explain which admission checks a manifest and model file pass on this device, and why others
    fail: the same pipeline the daemon runs (shared.admission)."""
    envelope = manifest.read_bytes()
    claimed = read_manifest_unverified(envelope)  # only to look up the channel's floor and file name
    if config is not None:
        node = ControlPlane.open(load_config(config, EdgeConfig))
        try:
            trusted = node.trust.keyring
            given = node.deployer.device_state(claimed.channel if claimed else "")
        finally:
            node.close()
        allowed = node.deployer.device.allowed_architectures
    elif keyring is not None:
        trusted, given = Keyring.from_json(keyring.read_bytes()), AdmissionInput()
        allowed = DEFAULT_ARCHITECTURES
    else:
        raise ContractError(Reason.USAGE, "give --config (device state) or --keyring")
    name = claimed.model_file.name if claimed else artifact.name
    facts = {name: read_file_facts(artifact, FileRole.MODEL, allowed)}
    given = replace(given, files=facts, all_files=False, allowed_architectures=allowed)
    steps = run_admission(envelope, trusted, datetime.now(UTC), given)
    table = Table(title=f"{manifest.name} + {artifact.name}")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for step in steps:
        mark = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "[yellow]skipped[/]"}[step.passed]
        table.add_row(step.name, mark, step.detail)
    console.print(table)
    if any(step.passed is False for step in steps):
        raise typer.Exit(1)


@app.command()
def status(config: ConfigOption = DEFAULT_CONFIG_FILE) -> None:
    """Show the current and cached models and recent deployments from the state directory."""
    node = ControlPlane.open(load_config(config, EdgeConfig))
    try:
        ledger = node.ledger
        pointers = {
            m.key: f"{which}{' adapter' if slot else ''}"
            for slot in ["", *ledger.adapter_slots()]
            for which, m in (("previous", ledger.previous(slot)), ("current", ledger.current(slot)))
            if m is not None
        }
        table = Table(title=f"{node.config.device.fleet}/{node.config.device.id} cached models and adapters")
        for column in ("serial", "name", "channel", "kind", "sha256", "pointer"):
            table.add_column(column)
        for model in ledger.models():
            kind = f"adapter of {model.manifest.base.name}" if model.manifest.base else "model"
            row = (str(model.serial), model.name, model.channel, kind, model.model_sha256[:16])
            table.add_row(*row, pointers.get(model.key, ""))
        console.print(table)
        last = node.ledger.last_deployment()
        console.print(
            f"pinned: {node.ledger.pinned}; unsent messages: {len(node.outbox)}; last deployment: "
            f"{last.state.value + ' ' + (last.reason or '') if last else 'none'}"
        )
    finally:
        node.close()


@app.command()
def doctor(
    config: ConfigOption = DEFAULT_CONFIG_FILE,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON report (for Ansible).")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker and the API.")] = 5.0,
) -> None:
    """Check this device as an operator would before calling for help: config, keyring, TLS files,
    broker, store, current model, API endpoints, sensors, systemd unit. Exit status 1 when a check
    fails (warnings do not)."""
    from edge.doctor import Verdict, examine

    logging.basicConfig(level=logging.WARNING, force=True)  # the table is the output, not log lines
    report = examine(config, timeout)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        colours = {Verdict.PASS: "green", Verdict.WARN: "yellow", Verdict.FAIL: "red", Verdict.SKIP: "dim"}
        table = Table(title=f"immune-edge doctor: {report.device or config}")
        for column in ("check", "verdict", "detail"):
            table.add_column(column)
        for check in report.checks:
            verdict = f"[{colours[check.verdict]}]{check.verdict.value}[/]"
            table.add_row(check.name, verdict, check.detail)
        console.print(table)
    raise typer.Exit(1 if report.failed else 0)


def _default(settings: type[BaseModel], field: str) -> Any:
    """A ``serve`` option's default is the settings model's own (one source of truth with ``run``)."""
    return settings.model_fields[field].default


# Long because each option is declared in the signature (Typer's way); the body is about 40 lines.
@app.command()
def serve(
    model: Annotated[Path, typer.Option("--model", "-m", help="GGUF file to serve.")],
    host: Annotated[str, typer.Option(help="TCP address (loopback unless you mean it).")] = _default(
        ApiSettings, "host"
    ),
    port: Annotated[
        int, typer.Option(help="TCP port; 11434 is where Slips looks by default. 0: no TCP.")
    ] = _default(ApiSettings, "port"),
    socket_path: Annotated[
        Path | None, typer.Option("--socket", help="Also serve on this Unix socket.")
    ] = None,
    chat_format: Annotated[
        str | None, typer.Option(help="llama-cpp-python chat format, e.g. chatml.")
    ] = _default(RuntimeProfile, "chat_format"),
    name: Annotated[str | None, typer.Option(help="Model name clients use (default: file stem).")] = None,
    alias: Annotated[list[str] | None, typer.Option(help="Extra model names (repeatable).")] = None,
    n_ctx: Annotated[int, typer.Option(help="Context window in tokens.")] = _default(RuntimeProfile, "n_ctx"),
    threads: Annotated[
        int | None, typer.Option(help="Inference threads (default: measured at load).")
    ] = _default(RuntimeSettings, "n_threads"),
    threads_batch: Annotated[
        int | None,
        typer.Option(help="Prompt-processing threads (default: --threads if given, else measured)."),
    ] = _default(RuntimeSettings, "n_threads_batch"),
    max_tokens_cap: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = _default(
        ApiSettings, "max_tokens_cap"
    ),
    queue: Annotated[int, typer.Option(help="Requests that may wait; more get 429.")] = _default(
        ApiSettings, "queue"
    ),
    prefix_reuse: Annotated[
        bool, typer.Option(help="Reuse the KV state of shared prompt prefixes (off only to measure it).")
    ] = _default(RuntimeSettings, "prefix_reuse"),
    prompt_cache_mb: Annotated[
        int, typer.Option(help="RAM for KV states of older prompts (0: reuse the previous prompt's only).")
    ] = _default(RuntimeSettings, "prompt_cache_mb"),
    request_timeout: Annotated[
        float, typer.Option(help="Seconds a request may take, waiting included.")
    ] = _default(ApiSettings, "request_timeout_s"),
    token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the token TCP clients must send (Bearer or x-api-key)."),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(help="NAME=FILE: serve a LoRA adapter GGUF of this model as NAME (repeatable)."),
    ] = None,
) -> None:
    """Serve one local GGUF over the OpenAI/Ollama-compatible API, without MQTT (development, single
    box). The options are fields of the same settings ``run`` reads from edge.toml ([api], [runtime])
    and reach the worker through the same data plane."""
    from edge.assembly import DataPlane, HostPaths

    setup_logging(False)
    if read_gguf_header(model, None).kind != "model":  # refuse a non-GGUF file before llama.cpp sees it
        raise ConfigError(
            Reason.BAD_OPTION, f"--model {model}: a GGUF adapter, not a model (serve it with --adapter)"
        )
    adapters = dict(_adapter_option(spec) for spec in adapter or [])
    api = ApiSettings(
        host=host,
        port=port,
        socket=socket_path,
        queue=queue,
        max_tokens_cap=max_tokens_cap,
        aliases=alias or [],
        request_timeout_s=request_timeout,
        bearer_token_file=token_file,
    )
    runtime = RuntimeSettings(
        n_threads=threads,
        n_threads_batch=threads_batch,
        prefix_reuse=prefix_reuse,
        prompt_cache_mb=prompt_cache_mb,
    )
    plane = DataPlane(api, runtime, ThermalSettings(), None, HostPaths())
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        plane.start()
        plane.runtime.serve_file(
            model, name or model.stem, RuntimeProfile(chat_format=chat_format, n_ctx=n_ctx)
        )
        for adapter_name, adapter_file in adapters.items():
            plane.runtime.adapters.serve(adapter_name, adapter_file, key=adapter_name)
        log.info("serving %s", model)
        stopping.wait()
    finally:
        plane.close()


def _adapter_option(spec: str) -> tuple[str, Path]:
    """``NAME=FILE`` of ``serve --adapter``, the file checked to be a LoRA adapter GGUF."""
    name, sep, file = spec.partition("=")
    if not sep or not name or not file:
        raise ConfigError(Reason.BAD_OPTION, f"--adapter {spec!r}: expected NAME=FILE")
    header = read_gguf_header(Path(file), None)
    if (header.kind, header.adapter_type) != ("adapter", "lora"):
        raise ConfigError(Reason.BAD_OPTION, f"--adapter {spec!r}: {file} is not a LoRA adapter GGUF")
    return name, Path(file)


def main() -> None:
    """Entry point: bad input ends with one clear line on stderr and exit status 1."""
    run_cli(app)


if __name__ == "__main__":
    main()
