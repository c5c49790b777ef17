"""Which client prompt version a request carries: Slips states it in every prompt as a line
``- Prompt version: alert-summary-v2``. Counting versions per model tells the fleet when a client
changed its prompts under a model trained for the earlier ones."""

from __future__ import annotations

import re
from collections.abc import Sequence

from edge.runtime.protocol import ChatMessage

#: A version is a short name; anything else on that line is not counted (label values stay bounded).
VERSION_LINE = re.compile(r"^\s*-?\s*Prompt version:\s*([A-Za-z0-9][A-Za-z0-9._-]{0,63})\s*$", re.MULTILINE)


def client_prompt_version(messages: Sequence[ChatMessage] | None, prompt: str | None = None) -> str | None:
    """The version line of the last message (or raw prompt) that has one."""
    texts = [prompt] if prompt is not None else [m.content for m in reversed(messages or [])]
    for text in texts:
        if isinstance(text, str) and (found := VERSION_LINE.findall(text)):
            return found[-1]
    return None
