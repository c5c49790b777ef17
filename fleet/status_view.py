"""How the operator sees a device: one row of plain values per device (shared by the status table and
``--json``) and the rich table drawn from those rows."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from fleet.client import DeviceView
from shared.throttle import active_flags


def _figure(view: DeviceView, name: str) -> float | None:
    """A figure from the latest telemetry, else from the retained status summary."""
    if view.telemetry is not None and (value := getattr(view.telemetry, name, None)) is not None:
        return float(value)
    return view.status.summary.get(name) if view.status else None


def device_row(view: DeviceView, stale_after_s: float, now: float) -> dict[str, Any]:
    """One device as plain values (the table and --json share it)."""
    status = view.status
    bits = _figure(view, "throttled_bits")
    return {
        "device": view.device_id,
        "online": view.online(stale_after_s, now),
        "groups": view.groups,
        "model": status.model.name if status and status.model else None,
        "serial": status.model.serial if status and status.model else None,
        "adapters": [f"{a.name} #{a.serial}" for a in status.adapters] if status else [],
        "deployment": status.deployment_state.value if status and status.deployment_state else None,
        "pinned": bool(status and status.pinned),
        "tokens_per_second": _figure(view, "tokens_per_second"),
        "ttft_ms": _figure(view, "ttft_ms"),
        "worker_rss_mb": _figure(view, "worker_rss_mb"),
        "mem_available_mb": _figure(view, "mem_available_mb"),
        "soc_temp_c": _figure(view, "soc_temp_c"),
        "throttled": active_flags(int(bits) if bits is not None else None),
        "last_seen_s": round(now - view.last_seen, 1) if view.last_seen else None,
        "last_result": status.last_result if status else None,
    }


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def device_table(rows: list[dict[str, Any]], title: str) -> Table:
    """The status table: one line per row of ``device_row``, a device's adapters under its model."""
    table = Table(title=title)
    for column in (
        "device",
        "online",
        "model",
        "state",
        "tok/s",
        "TTFT ms",
        "RAM MiB",
        "temp °C",
        "throttled",
        "seen",
    ):
        table.add_column(
            column, justify="right" if column in ("tok/s", "TTFT ms", "temp °C", "seen") else "left"
        )
    for row in rows:
        temp = row["soc_temp_c"]
        table.add_row(
            row["device"],
            "[green]yes[/]" if row["online"] else "[red]no[/]",
            f"{row['model'] or '-'} #{row['serial'] or '-'}"
            + "".join(f"\n + {adapter}" for adapter in row["adapters"])
            + (" [yellow](pinned)[/]" if row["pinned"] else ""),
            state_markup(row["deployment"]),
            _num(row["tokens_per_second"]),
            _num(row["ttft_ms"], 0),
            f"{_num(row['worker_rss_mb'], 0)} / {_num(row['mem_available_mb'], 0)} free",
            f"[red]{temp:.1f}[/]" if temp is not None and temp >= 78 else _num(temp),
            f"[red]{', '.join(row['throttled'])}[/]" if row["throttled"] else "-",
            f"{row['last_seen_s']:.0f}s" if row["last_seen_s"] is not None else "-",
        )
    return table


def state_markup(state: str | None) -> str:
    """A deployment state coloured by how it ended (as is when it has no colour)."""
    colour = {
        "committed": "green",
        "failed": "red",
        "rejected": "red",
        "rolled_back": "yellow",
        "offline": "dim",
    }.get(state or "")
    return f"[{colour}]{state}[/]" if colour else (state or "-")
