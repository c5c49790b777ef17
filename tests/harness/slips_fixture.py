"""Small synthetic datasets in the exact formats of Stratosphere's Slips incident datasets
(``summarization_dataset`` and ``risk_dataset``), for trainer tests that must not depend on ../shared."""

from __future__ import annotations

import gzip
import json
import random
import uuid
from pathlib import Path
from typing import Any

_EVENTS = [
    ("Horizontal port scan to port 443/TCP. From {ip} to {n} unique destination IPs.", "HIGH"),
    ("non-SSL established connection to port 443. destination IP: {dst}.", "MEDIUM"),
    ("connection without DNS resolution to IP: {dst}.", "LOW"),
    ("Connection to a blacklisted IP {dst} (malware C&C list).", "HIGH"),
    ("Multiple reconnection attempts to {dst}:22/TCP.", "MEDIUM"),
]


def _incident(rng: random.Random, index: int) -> dict[str, Any]:
    ip = f"192.168.{rng.randint(0, 9)}.{rng.randint(2, 250)}"
    incident_id = str(uuid.UUID(int=rng.getrandbits(128)))
    lines = [
        "=" * 60,
        f"Incident: {incident_id}",
        f"Source IP: {ip} | Timewindow: {index + 1}",
        f"Threat Level: {rng.uniform(1, 20):.2f} | Events: {rng.randint(5, 900)}",
        "",
    ]
    chosen = rng.sample(_EVENTS, k=3)
    for minute, (text, level) in enumerate(chosen):
        dst = f"{rng.randint(11, 220)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        lines.append(f"• 10:{minute * 7:02d} - Event to {dst} [{level}]")
        lines.append("  - " + text.format(ip=ip, n=rng.randint(20, 900), dst=dst))
    base = {
        "incident_id": incident_id,
        "category": "Malware" if index % 5 else "Normal",
        "source_ip": ip,
        "timewindow": str(index + 1),
        "timeline": "1970-01-01 10:00:00 to 1970-01-01 11:00:00",
        "threat_level": 9.5,
        "event_count": 42,
        "dag_analysis": "\n".join(lines),
    }
    levels = [level for _, level in chosen]
    verdict = "High" if "HIGH" in levels else "Medium"
    return {
        "base": base,
        "summary": f"Host {ip} shows {', '.join(levels).lower()} severity activity: scanning and suspicious "
        f"connections. The host is likely compromised.",
        "behavior": f"**Source:** {ip}\n**Activity:** port scanning and connections to untrusted IPs.",
        "cause": f"**Possible Causes:**\n• Malware on {ip} scanning for targets.\n• A misconfigured scanner.",
        "risk": f"**Risk Level:** {verdict}\n\n**Justification:** {ip} contacted untrusted hosts.",
    }


def write_slips_fixture(directory: Path, incidents: int = 24, seed: int = 7) -> tuple[Path, Path]:
    """Write ``summarization_dataset.json.gz`` and ``risk_dataset.json.gz`` with ``incidents`` records.
    Every 6th incident's best teacher failed (its text is an error message), as in the real data."""
    rng = random.Random(seed)  # noqa: S311 - fixture data, not a secret
    summary_rows, risk_rows = [], []
    for index in range(incidents):
        item = _incident(rng, index)
        failed = index % 6 == 5
        best = "Incident x: LLM query failed - timeout" if failed else item["summary"]
        summary_rows.append(
            {
                **item["base"],
                "llm_gpt_4o_analysis": {
                    "summary": "```plaintext\n" + best + "\n```",
                    "behavior_analysis": item["behavior"],
                },
                "llm_gpt4o_mini_analysis": {
                    "summary": item["summary"],
                    "behavior_analysis": item["behavior"],
                },
            }
        )
        risk_rows.append(
            {
                **item["base"],
                "cause_risk_gpt_4o": {"cause_analysis": item["cause"], "risk_assessment": item["risk"]},
                "cause_risk_qwen2_5": {"cause_analysis": "LLM query failed", "risk_assessment": ""},
            }
        )
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / "summarization_dataset.json.gz", directory / "risk_dataset.json.gz")
    for path, rows in zip(paths, (summary_rows, risk_rows), strict=True):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            json.dump(rows, handle)
    return paths


def corpus_of(*paths: Path) -> list[str]:
    """All text in the fixture datasets, to train the tiny model's tokenizer on."""
    texts: list[str] = []
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for row in json.load(handle):
                texts.append(json.dumps(row, ensure_ascii=False).replace("\\n", "\n"))
    return texts
