"""Importer for generic chat data in JSONL: OpenAI-style ``messages``, Alpaca
(``instruction``/``input``/``output``) and ShareGPT (``conversations`` of ``from``/``value``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.reasons import Reason
from trainer.dataset.problems import Problems
from trainer.dataset.records import ChatRecord
from trainer.errors import TrainerError

_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


def _messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation of one row in whichever of the three formats it uses."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise ValueError("'messages' must be a list")
        return messages
    if "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list):
            raise ValueError("'conversations' must be a list")
        converted = []
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("from") not in _SHAREGPT_ROLES:
                raise ValueError(f"ShareGPT turn {turn!r:.60} needs 'from' in {sorted(_SHAREGPT_ROLES)}")
            converted.append({"role": _SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")})
        return converted
    if "instruction" in row and "output" in row:
        prompt = str(row["instruction"])
        if row.get("input"):
            prompt += "\n\n" + str(row["input"])
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": row["system"]})
        return messages
    raise ValueError("unknown format: expected 'messages', 'conversations' or 'instruction'+'output'")


def import_chat_jsonl(path: Path, task: str, problems: Problems) -> Iterator[ChatRecord]:
    """One record per line; a line that is not JSON or not a usable conversation is reported
    with its line number."""
    if not path.is_file():
        raise TrainerError(Reason.MISSING_DATA, f"{path}: no such JSONL file")
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                messages = _messages(row)
                record_id = str(row.get("id") or hashlib.sha256(line.encode()).hexdigest()[:16])
                yield ChatRecord(
                    id=f"{task}:{record_id}",
                    group=str(row.get("group") or record_id),
                    task=task,
                    source=path.name,
                    messages=messages,
                )
            except json.JSONDecodeError as exc:
                problems.report(where, f"not JSON ({exc.msg} at column {exc.colno})")
            except ValidationError as exc:
                error = exc.errors()[0]
                location = ".".join(str(part) for part in error["loc"])
                problems.report(where, f"{location + ': ' if location else ''}{error['msg']}")
            except ValueError as exc:
                problems.report(where, str(exc))
