"""`immune-fleet report --html`: one self-contained page (inline SVG, no scripts, no network) with
charts over time per device (tokens/s, temperature, memory) and deployments marked on them."""

from __future__ import annotations

import html
from datetime import UTC, datetime

from fleet.store import EventRow, FleetStore

WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM, PAD_TOP = 640, 180, 52, 26, 12
STATE_COLOURS = {"committed": "#2e7d32", "rolled_back": "#ef6c00", "failed": "#c62828", "rejected": "#c62828"}
#: (title, unit, [(telemetry field, legend, colour)])
CHARTS = (
    ("Generation speed", "tokens/s", [("tokens_per_second", "tokens/s", "#1565c0")]),
    ("SoC temperature", "°C", [("soc_temp_c", "SoC", "#c62828")]),
    (
        "Memory",
        "MiB",
        [("worker_rss_mb", "model worker RSS", "#6a1b9a"), ("mem_available_mb", "available", "#00897b")],
    ),
)

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#212121;background:#fafafa}
h1{margin:0 0 4px}h2{margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#616161;margin-bottom:16px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:14px}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:left}th{background:#eeeeee}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px}
.chart h3{margin:2px 6px 4px;font-size:14px}
.legend span{margin-right:12px;font-size:12px}
.ok{color:#2e7d32}.bad{color:#c62828}
"""


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


def _event_ts(event: EventRow) -> float:
    return datetime.fromisoformat(event.at).timestamp()


def _chart(
    title: str,
    unit: str,
    lines: list[tuple[str, str, str]],
    samples: list[dict[str, object]],
    events: list[EventRow],
) -> str:
    series = {
        field: [(float(s["ts"]), float(s[field])) for s in samples if isinstance(s.get(field), int | float)]  # type: ignore[arg-type]
        for field, _, _ in lines
    }
    points = [p for values in series.values() for p in values]
    if not points:
        return f'<div class="chart"><h3>{html.escape(title)}</h3><p>no data</p></div>'
    t0 = min(p[0] for p in points)
    t1 = max(max(p[0] for p in points), t0 + 1)
    top = max(p[1] for p in points) * 1.1 or 1.0
    plot_w, plot_h = WIDTH - PAD_LEFT - 10, HEIGHT - PAD_BOTTOM - PAD_TOP

    def x(t: float) -> float:
        return PAD_LEFT + (t - t0) / (t1 - t0) * plot_w

    def y(v: float) -> float:
        return PAD_TOP + plot_h - v / top * plot_h

    parts = [f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(title)}">']
    for i in range(5):  # grid and y labels
        value = top * i / 4
        parts.append(
            f'<line x1="{PAD_LEFT}" x2="{WIDTH - 10}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#eee"/>'
            f'<text x="{PAD_LEFT - 6}" y="{y(value) + 4:.1f}" font-size="11" '
            f'text-anchor="end">{value:.0f}</text>'
        )
    for t, anchor in ((t0, "start"), ((t0 + t1) / 2, "middle"), (t1, "end")):
        parts.append(
            f'<text x="{x(t):.1f}" y="{HEIGHT - 8}" font-size="11" text-anchor="{anchor}">{_clock(t)}</text>'
        )
    for event in events:
        t = _event_ts(event)
        colour = STATE_COLOURS.get(event.state)
        if colour is None or not t0 <= t <= t1:
            continue
        label = html.escape(f"{event.state} {event.name or ''} #{event.serial or ''}")
        parts.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{PAD_TOP}" y2="{PAD_TOP + plot_h}" stroke="{colour}" '
            f'stroke-dasharray="4 3" stroke-width="2"><title>{label}</title></line>'
            f'<text x="{x(t) + 3:.1f}" y="{PAD_TOP + 10}" font-size="10" fill="{colour}">{label}</text>'
        )
    for field, _, colour in lines:
        values = series[field]
        if values:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in values)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
    parts.append("</svg>")
    legend = "".join(
        f'<span style="color:{colour}">&#9632; {html.escape(name)}</span>' for _, name, colour in lines
    )
    heading = f"<h3>{html.escape(title)} ({html.escape(unit)})</h3>"
    return f'<div class="chart">{heading}{"".join(parts)}<div class="legend">{legend}</div></div>'


def _latest_table(series: dict[str, list[dict[str, object]]]) -> str:
    rows = []
    for device, samples in sorted(series.items()):
        last = samples[-1]
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (
                    device,
                    f"{last.get('model_name', '-')} #{last.get('model_serial', '-')}",
                    last.get("tokens_per_second", "-"),
                    last.get("soc_temp_c", "-"),
                    last.get("worker_rss_mb", "-"),
                    "yes" if last.get("throttled_now") else "no",
                    _clock(float(last["ts"])),  # type: ignore[arg-type]
                )
            )
            + "</tr>"
        )
    head = "".join(
        f"<th>{h}</th>" for h in ("device", "model", "tok/s", "temp °C", "worker MiB", "throttled", "last")
    )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _events_table(events: list[EventRow]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(e.at[:19])}</td><td>{html.escape(e.device_id)}</td>"
        f"<td>{html.escape(e.name or '-')} #{e.serial or '-'}</td>"
        f'<td class="{"ok" if e.state == "committed" else "bad" if e.state in STATE_COLOURS else ""}">'
        f"{html.escape(e.state)}</td><td>{html.escape(e.reason or '')}</td></tr>"
        for e in events
        if e.state in STATE_COLOURS
    )
    head = "".join(f"<th>{h}</th>" for h in ("at (UTC)", "device", "model", "result", "reason"))
    return f"<table><tr>{head}</tr>{rows}</table>"


def render_report(store: FleetStore, fleet: str) -> str:
    """The whole page as a string."""
    series = store.telemetry()
    events = store.events(limit=10_000)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"<h1>immune-edge fleet {html.escape(fleet)}</h1>",
        f'<div class="meta">{len(series)} device(s) with telemetry, {len(events)} deployment events; '
        f"generated {generated}</div>",
        "<h2>Now</h2>",
        _latest_table(series) if series else "<p>no telemetry collected yet</p>",
    ]
    for device in sorted(set(series) | {e.device_id for e in events}):
        device_events = [e for e in events if e.device_id == device]
        charts = "".join(
            _chart(title, unit, lines, series.get(device, []), device_events) for title, unit, lines in CHARTS
        )
        body.append(f'<h2>{html.escape(device)}</h2><div class="charts">{charts}</div>')
    body += ["<h2>Deployments</h2>", _events_table(events)]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>immune-edge fleet {html.escape(fleet)}</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>"
    )
