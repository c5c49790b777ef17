"""``immune-fleet capture``: pull what devices captured of Slips' requests into the operator's archive
(one signed command per chunk), show what each device holds, purge it on the devices.

A command function may run past 60 lines: Typer declares each option in its signature; the bodies stay
under 60."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleet.client import FleetClient, FleetError
from fleet.ops import (
    ConfigOption,
    DeviceOption,
    GroupOption,
    JsonOption,
    TimeoutOption,
    ask_devices,
    command_targets,
    console,
    fleet_settings,
)
from fleet.settings import DEFAULT_FLEET_CONFIG
from shared.capture import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, CaptureChunk
from shared.capture_archive import CaptureArchive, Cursor
from shared.messages import CommandResponse
from shared.reasons import Reason

app = typer.Typer(help="Requests captured on devices: pull them for training, see what is held, purge.")

ArchiveOption = Annotated[
    Path | None,
    typer.Option("--archive", help="The operator's capture archive (default: data_dir/capture.db)."),
]
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(value: str | None, now: datetime | None = None) -> datetime | None:
    """``7d``, ``12h``, ``30m``, ``90s`` ago, or an ISO 8601 time (UTC when it has no zone)."""
    if value is None:
        return None
    now = now or datetime.now(UTC)
    if match := _DURATION.fullmatch(value.strip()):
        return now - timedelta(**{_UNITS[match[2]]: float(match[1])})
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise FleetError(
            Reason.USAGE, f"--since {value!r}: give a duration (7d, 12h, 30m, 90s) or an ISO 8601 time"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _check_chunk(device: str, after: int, cursor: Cursor | None, chunk: CaptureChunk) -> str | None:
    """Why a device's chunk cannot be taken as an answer to the pull (None: it can)."""
    start = after if cursor is None or cursor.store_id == chunk.store_id else 0
    seqs = [exchange.seq for exchange in chunk.exchanges]
    if any(b <= a for a, b in zip([start, *seqs], seqs, strict=False)):
        return f"{device} sent exchanges out of order or at or before {start}"
    if seqs and chunk.next_seq != seqs[-1]:
        return f"{device} said next_seq {chunk.next_seq} after sending up to {seqs[-1]}"
    if chunk.more and not seqs:
        return f"{device} said there is more but sent nothing"
    return None


def pull(
    config: ConfigOption = DEFAULT_FLEET_CONFIG,
    device: DeviceOption = None,
    group: GroupOption = None,
    since: Annotated[
        str | None, typer.Option(help="Only exchanges captured since: 7d, 12h, 30m, or an ISO 8601 time.")
    ] = None,
    archive_path: ArchiveOption = None,
    chunk_kib: Annotated[
        int, typer.Option(min=4, max=MAX_CHUNK_BYTES // 1024, help="Largest answer per command, KiB.")
    ] = DEFAULT_CHUNK_BYTES // 1024,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 60.0,
) -> None:
    """Pull what devices captured since the last pull (one signed command per chunk) into the archive;
    an exchange seen on several devices is kept once."""
    settings = fleet_settings(config)
    puller = _Puller(CaptureArchive(archive_path or settings.capture_archive), parse_since(since), chunk_kib)
    try:
        with FleetClient(settings) as client:
            if group is not None:
                client.settle()
            pending = command_targets(client, device, group)
            puller.rows = {
                t: {"device": t, "pulled": 0, "new": 0, "chunks": 0, "error": None} for t in pending
            }
            columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
            with Progress(*columns, console=console, transient=True, disable=as_json) as progress:
                task = progress.add_task("pulling", total=None)
                while pending:  # one chunk from every device still sending, then the next round
                    pending = puller.round(client, pending, timeout)
                    total = sum(row["pulled"] for row in puller.rows.values())
                    progress.update(
                        task, description=f"pulling: {total} exchange(s), {len(pending)} device(s) left"
                    )
    finally:
        held = puller.archive.counts()
        puller.archive.close()
    rows = puller.rows
    for target, row in rows.items():
        row["archived_from_device"] = held.get(target, 0)
    if as_json:
        typer.echo(json.dumps(list(rows.values()), indent=2))
    else:
        table = Table("device", "pulled", "new", "chunks", "archived", "result", title="capture pull")
        for row in rows.values():
            result = f"[red]{row['error']}[/]" if row["error"] else "[green]ok[/]"
            table.add_row(
                row["device"],
                str(row["pulled"]),
                str(row["new"]),
                str(row["chunks"]),
                str(row["archived_from_device"]),
                result,
            )
        console.print(table)
    if any(row["error"] for row in rows.values()):
        raise typer.Exit(2)


class _Puller:
    """Sends the pull commands, checks the chunks and keeps them in the archive."""

    def __init__(self, archive: CaptureArchive, since: datetime | None, chunk_kib: int) -> None:
        self.archive = archive
        self.since = since
        self.chunk_bytes = chunk_kib * 1024
        #: Per device: exchanges pulled, new to the archive, chunks, and the error that stopped it.
        self.rows: dict[str, dict[str, Any]] = {}

    def _action(self, cursor: Cursor | None) -> dict[str, Any]:
        action: dict[str, Any] = {
            "action": "capture_pull",
            "after_seq": cursor.next_seq if cursor else 0,
            "max_bytes": self.chunk_bytes,
        }
        if cursor is not None:
            action["store_id"] = cursor.store_id
        if self.since is not None:
            action["since"] = self.since.isoformat()
        return action

    def round(self, client: FleetClient, devices: list[str], timeout: float) -> list[str]:
        """Ask each device for its next chunk; the devices that have more."""
        cursors = {device: self.archive.cursor(device) for device in devices}
        sent = {device: client.send_command(device, self._action(cursors[device])) for device in devices}
        deadline = time.monotonic() + timeout
        more: list[str] = []
        for device, correlation in sent.items():
            answer = client.response(correlation, max(deadline - time.monotonic(), 0))
            chunk = self._accepted(device, answer, cursors[device], timeout)
            if chunk is None:
                continue
            row = self.rows[device]
            row["new"] += self.archive.add(device, chunk.store_id, chunk.exchanges, chunk.next_seq)
            row["pulled"] += len(chunk.exchanges)
            row["chunks"] += 1
            if chunk.more:
                more.append(device)
        return more

    def _accepted(
        self, device: str, answer: CommandResponse | None, cursor: Cursor | None, timeout: float
    ) -> CaptureChunk | None:
        """The answer's chunk, or None with the device's error set."""
        if answer is None:
            problem: str | None = f"no answer within {timeout:.0f} s"
        elif not answer.ok:
            problem = answer.error or "refused"
        elif answer.capture is None:
            problem = "the answer carries no capture chunk"
        else:
            problem = _check_chunk(device, cursor.next_seq if cursor else 0, cursor, answer.capture)
        if problem is not None or answer is None:
            self.rows[device]["error"] = problem
            return None
        return answer.capture


def status(
    config: ConfigOption = DEFAULT_FLEET_CONFIG,
    device: DeviceOption = None,
    group: GroupOption = None,
    archive_path: ArchiveOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 30.0,
) -> None:
    """What each device holds (records, bytes, time range, redaction) and what the archive has of it."""
    settings = fleet_settings(config)
    answers = ask_devices(settings, device, group, lambda _target: {"action": "capture_status"}, timeout)
    path = archive_path or settings.capture_archive
    archived: dict[str, int] = {}
    if path.is_file():
        archive = CaptureArchive(path, create=False)
        archived = archive.counts()
        archive.close()
    if as_json:
        typer.echo(json.dumps({t: a.result if a else None for t, a in answers.items()}, indent=2))
        return
    table = Table(
        "device",
        "capture",
        "records",
        "KiB",
        "oldest",
        "newest",
        "redact",
        "archived",
        title="capture status",
    )
    for target, answer in answers.items():
        if answer is None or not answer.ok:
            table.add_row(
                target, "[red]no answer[/]" if answer is None else f"[red]{answer.error}[/]", *"-" * 6
            )
            continue
        r = answer.result
        table.add_row(
            target,
            ("[yellow]paused[/]" if r.get("capture_paused") else "[green]on[/]")
            if r.get("capture_enabled")
            else "off",
            str(r.get("capture_records", 0)),
            f"{int(r.get('capture_bytes') or 0) / 1024:.0f}",
            str(r.get("capture_oldest_at") or "-"),
            str(r.get("capture_newest_at") or "-"),
            str(r.get("capture_redact") or "-"),
            str(archived.get(target, 0)),
        )
    console.print(table)
    if not all(a is not None and a.ok for a in answers.values()):
        raise typer.Exit(2)


def purge(
    config: ConfigOption = DEFAULT_FLEET_CONFIG,
    device: DeviceOption = None,
    group: GroupOption = None,
    pulled_only: Annotated[
        bool, typer.Option("--pulled-only", help="Delete only what the archive already holds.")
    ] = False,
    archive_path: ArchiveOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Delete captured exchanges on the devices: all of them, or with --pulled-only what was pulled."""
    settings = fleet_settings(config)
    cursors: dict[str, Cursor | None] = {}
    if pulled_only:
        path = archive_path or settings.capture_archive
        if not path.is_file():
            raise FleetError(
                Reason.USAGE, f"--pulled-only: no capture archive at {path} (nothing was pulled)"
            )
        archive = CaptureArchive(path, create=False)
    what = "what was pulled" if pulled_only else "every captured exchange"
    if not yes and not typer.confirm(f"delete {what} on {device or f'group {group}'}?"):
        raise typer.Exit(1)

    def action(target: str) -> dict[str, Any] | None:
        if not pulled_only:
            return {"action": "capture_purge"}
        cursor = cursors.setdefault(target, archive.cursor(target))
        if cursor is None:
            return None
        return {"action": "capture_purge", "store_id": cursor.store_id, "up_to_seq": cursor.next_seq}

    try:
        answers = ask_devices(settings, device, group, action, timeout)
    finally:
        if pulled_only:
            archive.close()
    if as_json:
        typer.echo(
            json.dumps({t: a.model_dump(mode="json") if a else None for t, a in answers.items()}, indent=2)
        )
    else:
        table = Table("device", "ok", "message", "records left", title="capture purge")
        for target, answer in answers.items():
            if answer is None:
                note = (
                    "never pulled: nothing to purge"
                    if pulled_only and cursors.get(target) is None
                    else "no answer"
                )
                table.add_row(target, "-", note, "-")
                continue
            ok = "[green]yes[/]" if answer.ok else "[red]no[/]"
            table.add_row(
                target,
                ok,
                answer.error or str(answer.result.get("message", "")),
                str(answer.result.get("capture_records", "-")),
            )
        console.print(table)
    if any(a is not None and not a.ok for a in answers.values()) or any(
        a is None and not (pulled_only and cursors.get(t) is None) for t, a in answers.items()
    ):
        raise typer.Exit(2)


def register(parent: typer.Typer) -> None:
    """Add ``capture pull|status|purge`` to `immune-fleet`."""
    for command in (pull, status, purge):
        app.command(command.__name__)(command)
    parent.add_typer(app, name="capture")
