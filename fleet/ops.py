"""`immune-fleet` operations over MQTT: status, watch, staged rollout, rollback, pin/unpin, history,
collect and report. Commands are signed with the operator's keys; every answer is validated.

A command function may run past 60 lines: Typer declares each option in its signature; the bodies stay
under 60."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fleet.client import FleetClient, FleetError
from fleet.report import render_report
from fleet.rollout import FailureLimits, Rollout, RolloutState, start_or_resume
from fleet.settings import DEFAULT_FLEET_CONFIG, FleetSettings
from fleet.status_view import device_row, device_table, state_markup
from fleet.store import FleetStore
from shared.config import load_config
from shared.messages import CommandResponse
from shared.reasons import Reason

console = Console()
ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Operator config (env IMMUNE_FLEET_CONFIG).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
GroupOption = Annotated[str | None, typer.Option("--group", "-g", help="Only this device group.")]


def fleet_settings(path: Path) -> FleetSettings:
    """The operator's configuration file, validated."""
    return load_config(path, FleetSettings)


def status_rows(client: FleetClient, group: str | None) -> list[dict[str, Any]]:
    """Every device of ``group`` (all without one), as ``device_row`` values."""
    now = time.time()
    return [device_row(v, client.settings.stale_after_s, now) for v in client.snapshot(group)]


def status(
    config: ConfigOption = DEFAULT_FLEET_CONFIG,
    group: GroupOption = None,
    as_json: JsonOption = False,
    wait: Annotated[
        float, typer.Option(help="Gather statuses until none arrived for this many seconds (60 s at most).")
    ] = 1.5,
) -> None:
    """A table of devices: online, model, deployment state, tok/s, TTFT, RAM, temperature, throttling."""
    settings = fleet_settings(config)
    with FleetClient(settings) as client:
        client.settle(wait)
        rows = status_rows(client, group)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        console.print(device_table(rows, f"fleet {settings.fleet}" + (f", group {group}" if group else "")))


def watch(
    config: ConfigOption = DEFAULT_FLEET_CONFIG,
    group: GroupOption = None,
    interval: Annotated[float, typer.Option(help="Refresh period, seconds.")] = 2.0,
    count: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many refreshes (default: until Ctrl-C).")
    ] = None,
) -> None:
    """The status table, live (Ctrl-C to stop)."""
    settings = fleet_settings(config)
    with FleetClient(settings) as client, Live(console=console, auto_refresh=False) as live:
        client.settle()  # the retained statuses first, so the first table is not empty
        refreshes = 0
        try:
            while count is None or refreshes < count:
                live.update(
                    device_table(status_rows(client, group), f"fleet {settings.fleet} (live)"), refresh=True
                )
                refreshes += 1
                if count is None or refreshes < count:
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass


def rollout(
    manifest: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="Trainer-signed manifest envelope.")
    ],
    config: ConfigOption = DEFAULT_FLEET_CONFIG,
    group: GroupOption = None,
    canary: Annotated[int, typer.Option(min=0, help="Devices in the first (canary) wave.")] = 1,
    waves: Annotated[str, typer.Option(help="Cumulative share of devices per wave.")] = "10%,50%,100%",
    max_failures: Annotated[
        int | None, typer.Option(min=0, help="Halt when more devices fail than this (0 without a rate).")
    ] = None,
    max_failure_rate: Annotated[
        str | None, typer.Option(help="Halt when more than this share of finished devices failed, e.g. 5%.")
    ] = None,
    min_finished: Annotated[
        int, typer.Option(min=1, help="Judge --max-failure-rate only once this many devices answered.")
    ] = 10,
    rate: Annotated[
        float | None, typer.Option(min=0.1, help="Devices started per minute (default: a wave at once).")
    ] = None,
    wave_timeout: Annotated[
        float, typer.Option(help="Seconds each device has to answer; silent ones count as offline or failed.")
    ] = 900.0,
    rollback: Annotated[
        bool, typer.Option(help="On halt, roll the halted wave's committed devices back.")
    ] = True,
    publish_desired: Annotated[
        bool, typer.Option(help="When done, publish the manifest as the group's (or fleet's) desired state.")
    ] = True,
    state_file: Annotated[
        Path | None, typer.Option("--state", help="Rollout state file (resumes if present).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Staged rollout: canary first, then waves; each wave waits for `committed` from all of its devices."""
    settings = fleet_settings(config)
    envelope = manifest.read_bytes()
    store = FleetStore(settings.db_path)  # the rollout's events go to `history` too
    with FleetClient(settings, listener=store.add) as client:
        client.settle()
        limits = FailureLimits.from_options(max_failures, max_failure_rate, min_finished)
        state, path = start_or_resume(
            client, envelope, state_file, group, canary, waves, limits, wave_timeout, rollback, rate
        )
        if not as_json:
            plan = " -> ".join(f"[{', '.join(w)}]" for w in state.waves)
            console.print(f"rollout of {state.manifest_name} #{state.serial}: {plan}\nstate: {path}")

        def progress(message: str, current: RolloutState) -> None:
            if not as_json:
                console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}")

        final = Rollout(client, envelope, state, path, progress).run()
        if final.status == "done" and publish_desired:
            topic = client.topics.desired_group(group) if group else client.topics.desired_fleet()
            client.publish_desired(topic, envelope)
            progress(f"published as retained desired state on {topic}", final)
    store.close()
    if as_json:
        typer.echo(final.model_dump_json(indent=2))
    else:
        table = Table("device", "result", "reason", title=f"rollout {final.status}")
        for device, result in sorted(final.devices.items()):
            table.add_row(device, state_markup(result.state), result.reason or "")
        console.print(table)
    if final.status != "done":
        raise typer.Exit(2)


def command_targets(client: FleetClient, device: str | None, group: str | None) -> list[str]:
    """The one device, or every device of the group that has reported a status."""
    if (device is None) == (group is None):
        raise FleetError(Reason.USAGE, "give exactly one of --device and --group")
    if device is not None:
        return [device]
    devices = [v.device_id for v in client.snapshot(group)]
    if not devices:
        raise FleetError(Reason.NO_DEVICES, f"no device of group {group} has reported a status")
    return devices


def ask_devices(
    settings: FleetSettings,
    device: str | None,
    group: str | None,
    action_for: Callable[[str], dict[str, Any] | None],
    timeout_s: float,
) -> dict[str, CommandResponse | None]:
    """Send each target its command at once (``action_for(target)``; None: that target is skipped), then
    collect the answers within one shared deadline (None: no answer, or not asked)."""
    with FleetClient(settings) as client:
        if group is not None:
            client.settle()
        targets = command_targets(client, device, group)
        sent = {}
        for target in targets:
            action = action_for(target)
            if action is not None:
                sent[target] = client.send_command(target, action)
        deadline = time.monotonic() + timeout_s
        answers: dict[str, CommandResponse | None] = dict.fromkeys(targets)
        for target, correlation in sent.items():
            answers[target] = client.response(correlation, max(deadline - time.monotonic(), 0))
    return answers


def _fan_out(
    config: Path,
    device: str | None,
    group: str | None,
    action: dict[str, Any],
    as_json: bool,
    timeout_s: float,
) -> None:
    """Send one command to each target at once, then show every answer."""
    answers = ask_devices(fleet_settings(config), device, group, lambda _target: action, timeout_s)
    if as_json:
        typer.echo(
            json.dumps({t: a.model_dump(mode="json") if a else None for t, a in answers.items()}, indent=2)
        )
    else:
        table = Table("device", "ok", "result", "model", "message", title=action["action"])
        for target, answer in answers.items():
            if answer is None:
                table.add_row(target, "[red]no[/]", "no answer", "-", f"nothing within {timeout_s:.0f} s")
                continue
            r = answer.result
            table.add_row(
                target,
                "[green]yes[/]" if answer.ok else "[red]no[/]",
                str(r.get("result", "-")),
                f"{r.get('model') or '-'} #{r.get('serial') or '-'}",
                answer.error or str(r.get("message", "")),
            )
        console.print(table)
    if not all(a is not None and a.ok for a in answers.values()):
        raise typer.Exit(2)


DeviceOption = Annotated[str | None, typer.Option("--device", "-d", help="One device.")]
SerialOption = Annotated[int | None, typer.Option(help="A cached serial (default: previous / current).")]
TimeoutOption = Annotated[float, typer.Option("--timeout", help="Seconds to wait for answers.")]
AdapterOption = Annotated[
    str | None, typer.Option("--adapter", help="A LoRA adapter's name: act on it instead of the base model.")
]


def _with_adapter(action: dict[str, Any], adapter: str | None) -> dict[str, Any]:
    # Only when given: a device from before adapters refuses a command with a field it does not know.
    return action | {"adapter": adapter} if adapter else action


def rollback(
    config: ConfigOption = DEFAULT_FLEET_CONFIG,
    device: DeviceOption = None,
    group: GroupOption = None,
    serial: SerialOption = None,
    adapter: AdapterOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 300.0,
) -> None:
    """Send devices back to their previous model (or a cached serial), or one adapter to its previous
    version."""
    _fan_out(
        config,
        device,
        group,
        _with_adapter({"action": "rollback", "serial": serial}, adapter),
        as_json,
        timeout,
    )


def pin(
    config: ConfigOption = DEFAULT_FLEET_CONFIG,
    device: DeviceOption = None,
    group: GroupOption = None,
    serial: SerialOption = None,
    adapter: AdapterOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 300.0,
) -> None:
    """Keep devices on their current (or a cached) model; new desired state is ignored until unpin.
    With --adapter and --serial, that adapter is switched to the serial first."""
    _fan_out(
        config, device, group, _with_adapter({"action": "pin", "serial": serial}, adapter), as_json, timeout
    )


def unpin(
    config: ConfigOption = DEFAULT_FLEET_CONFIG,
    device: DeviceOption = None,
    group: GroupOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 60.0,
) -> None:
    """Let devices follow desired state again."""
    _fan_out(config, device, group, {"action": "unpin"}, as_json, timeout)


def collect(
    config: ConfigOption = DEFAULT_FLEET_CONFIG,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
) -> None:
    """Record telemetry, events and statuses in the SQLite collector (until Ctrl-C, SIGTERM or
    --duration)."""
    settings = fleet_settings(config)
    store = FleetStore(settings.db_path)
    counts = {"telemetry": 0, "events": 0, "status": 0}
    # A service manager stops it with SIGTERM; a shell that started it in the background has it
    # ignore SIGINT. Either way it ends as after Ctrl-C: the database closed, the counts printed.
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    def record(kind: str, message: object) -> None:
        store.add(kind, message)
        if kind in counts:
            counts[kind] += 1

    started = time.monotonic()
    try:
        with FleetClient(settings, listener=record) as client, console.status("collecting") as spinner:
            while (duration is None or time.monotonic() - started < duration) and not stopping.is_set():
                spinner.update(
                    f"collecting into {settings.db_path}: {len(client.devices)} device(s), "
                    + ", ".join(f"{n} {k}" for k, n in counts.items())
                )
                stopping.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
    console.print(f"collected {', '.join(f'{n} {k}' for k, n in counts.items())} into {settings.db_path}")


def history(
    config: ConfigOption = DEFAULT_FLEET_CONFIG,
    device: DeviceOption = None,
    limit: Annotated[int, typer.Option(min=1)] = 50,
    as_json: JsonOption = False,
) -> None:
    """Deployment events recorded by `collect` and `rollout`."""
    settings = fleet_settings(config)
    store = FleetStore(settings.db_path)
    events = store.events(device, limit)
    store.close()
    if as_json:
        typer.echo(json.dumps([e.__dict__ for e in events], indent=2))
        return
    table = Table("at (UTC)", "device", "model", "state", "source", "reason", title="deployment history")
    for e in events:
        table.add_row(
            e.at[:19],
            e.device_id,
            f"{e.name or '-'} #{e.serial or '-'}",
            state_markup(e.state),
            e.source or "",
            e.reason or "",
        )
    console.print(table)


def report(
    html_file: Annotated[Path, typer.Option("--html", help="Where to write the page.")],
    config: ConfigOption = DEFAULT_FLEET_CONFIG,
) -> None:
    """A self-contained HTML page with charts per device over time (from the `collect` database)."""
    settings = fleet_settings(config)
    store = FleetStore(settings.db_path)
    page = render_report(store, settings.fleet)
    store.close()
    html_file.write_text(page, encoding="utf-8")
    console.print(f"wrote {html_file} ({len(page) // 1024} KiB)")


def register(app: typer.Typer) -> None:
    """Add the operations to the `immune-fleet` command."""
    for command in (status, watch, rollout, rollback, pin, unpin, history, collect, report):
        app.command(command.__name__)(command)
