"""Slips-style alert-summary prompts built from the real incident dataset beside the repository
(../shared/datasets/slips): a fixed system prompt and instructions, then one incident's text."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

DATASET = (
    Path(__file__).resolve().parents[3] / "shared" / "datasets" / "slips" / "summarization_dataset_v3.json.gz"
)

SYSTEM_PROMPT = (
    "You assist the analysts of a network intrusion detection system. You receive one incident that "
    "the detector grouped from its alerts: the source address, the time window and the alerts in "
    "order. Be factual, do not invent hosts or ports, and say when the evidence is weak."
)
INSTRUCTIONS = (
    "Write a short summary of the incident below for the analyst on duty: what the source host did, "
    "which detections matter most, and how urgent a response is. Use at most five sentences.\n\n"
)


def incident_texts(count: int, max_words: int = 800) -> list[str]:
    """The first ``count`` incidents' text, cut to ``max_words`` words (about 2,800 SmolLM2 tokens)."""
    if not DATASET.is_file():
        raise SystemExit(f"{DATASET} is missing: the Slips datasets live beside the repository")
    records = json.loads(gzip.decompress(DATASET.read_bytes()))
    texts = []
    for record in records:
        words = record["dag_analysis"].split()
        if len(words) >= max_words // 2:
            texts.append(" ".join(words[:max_words]))
        if len(texts) == count:
            break
    return texts


def summary_messages(incident: str) -> list[dict[str, str]]:
    """The chat Slips would send for one incident."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": INSTRUCTIONS + incident},
    ]
