"""Slips risk-assessment prompts and the verdict schema they are asked to follow, for the
structured-output tests and bench/api_chat.py."""

from __future__ import annotations

ASK = (
    "Assess the risk of this Slips alert. Answer in JSON with risk_level (low, medium, high or critical), "
    "cause and actions.\n"
)
ALERTS = [
    f"Slips alert: host 10.0.{i}.{i + 3} {what}"
    for i, what in enumerate(
        [
            "scanned 120 hosts on port 22",
            "sent 300 DNS queries to a DGA-like domain",
            "connected to a known C&C IP on port 4444",
            "performed a horizontal port scan of 445/TCP",
            "downloaded an executable over plain HTTP",
            "had 50 failed SSH logins",
            "made a connection to a blacklisted IP",
            "sent data to a self-signed TLS server",
            "resolved a domain registered yesterday",
            "used an unusual user agent",
            "made long connections to an IP in a foreign ASN",
            "sent ICMP timestamp requests",
            "did a vertical port scan of 10.0.0.1",
            "contacted a Tor exit node",
            "showed periodic beaconing every 60 s",
            "connected to port 3389 on 40 hosts",
            "uploaded 2 GB to an unknown server",
            "queried a known malware domain",
            "had an invalid TLS certificate",
            "sent SMTP traffic from a workstation",
        ]
    )
]


SCHEMA = {
    "type": "object",
    "properties": {
        "risk_level": {"type": "string", "enum": ["low", "medium", "high", "critical"]},
        "cause": {"type": "string"},
        "actions": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["risk_level", "cause", "actions"],
    "additionalProperties": False,
}
