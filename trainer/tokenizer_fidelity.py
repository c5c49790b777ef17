"""Tokenizer fidelity through export: an exported GGUF must split text into exactly the token ids the
base model used, or the fine-tune's weights meet tokens they were never trained on.

The exported file is read by llama-cpp-python (the Pi's runtime). The reference is the base GGUF
read the same way, or, for a Hugging Face base, the base's own tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from shared.reasons import Reason
from trainer.errors import TrainerError

Tokenize = Callable[[str], list[int]]

#: Text every check includes besides the real prompts: IPs, ports, arrows, bullets, Markdown, accents,
#: CJK, emoji, control tokens as plain text, runs of spaces and a bare newline.
PROBES = (
    "Source IP: 192.168.1.113 | Timewindow: 25\n• 00:02-00:27 - 223.142.160.232:443/TCP → [HIGH]",
    "Events:  2957 | to  449 unique destinations on port  80/TCP\n  12 more",
    "**Activity:** horizontal port scan  (440 hosts)\n\n```plaintext\nThreat Level: 15.4\n```",
    "Ünïcödé résumé naïve — 日本語のテキスト 🙂 \t tabs\tand   spaces\n",
    "<|im_start|>user\nIs 10.0.0.1 scanning?<|im_end|>\n<|im_start|>assistant\n",
)


class FidelityReport(BaseModel):
    """What the check compared."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reference: str
    samples: int
    tokens: int


@dataclass(frozen=True)
class Reference:
    """Where the expected token ids come from."""

    label: str
    tokenize: Tokenize
    close: Callable[[], None] = lambda: None


def gguf_tokenizer(path: Path) -> tuple[Tokenize, Callable[[], None]]:
    """A GGUF's own tokenizer in llama-cpp-python (vocabulary only, no weights)."""
    from llama_cpp import Llama

    if not path.is_file():
        raise TrainerError(Reason.MISSING_GGUF, f"{path}: no such GGUF file")
    try:
        model = Llama(model_path=str(path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise TrainerError(
            Reason.LOAD_FAILED, f"{path.name}: llama-cpp-python cannot read it ({exc})"
        ) from exc

    def tokenize(text: str) -> list[int]:
        return list(model.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    return tokenize, model.close


def gguf_reference(path: Path) -> Reference:
    tokenize, close = gguf_tokenizer(path)
    return Reference(f"base GGUF {path.name}", tokenize, close)


def hf_reference(tokenizer: Any, label: str) -> Reference:
    """A transformers tokenizer as the reference (special tokens in the text are parsed as such)."""

    def tokenize(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return Reference(f"base tokenizer {label}", tokenize)


def compare_tokenizers(candidate: Reference, reference: Reference, samples: Sequence[str]) -> FidelityReport:
    """Compare ``candidate``'s token ids with ``reference``'s on every sample (and PROBES);
    TrainerError('tokenizer-mismatch') naming the first sample and position that differ."""
    texts = [*PROBES, *samples]
    total = 0
    for index, text in enumerate(texts):
        expected, got = reference.tokenize(text), candidate.tokenize(text)
        if expected != got:
            at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), None)
            at = min(len(expected), len(got)) if at is None else at
            raise TrainerError(
                Reason.TOKENIZER_MISMATCH,
                f"the {candidate.label} tokenizes differently from the {reference.label}: sample "
                f"{index} ({text[:40]!r}...) differs at token {at}: expected {expected[at : at + 4]}, "
                f"got {got[at : at + 4]} ({len(expected)} vs {len(got)} tokens)",
            )
        total += len(expected)
    return FidelityReport(reference=reference.label, samples=len(texts), tokens=total)


def check_fidelity(exported: Path, reference: Reference, samples: Sequence[str]) -> FidelityReport:
    """An exported GGUF, read by llama-cpp-python, against ``reference``; the refusal names the
    export. The caller closes ``reference``."""
    tokenize, close = gguf_tokenizer(exported)
    try:
        return compare_tokenizers(Reference(f"export {exported.name}", tokenize), reference, samples)
    except TrainerError as exc:
        raise TrainerError(exc.reason, f"{exc}; refusing the export") from None
    finally:
        close()
