"""``immune-train prepare``: import, choose answers, de-duplicate, fit the token budget, split."""

from __future__ import annotations

import json
import logging
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.reasons import Reason
from trainer.dataset.captured import captured_records
from trainer.dataset.chat_jsonl import import_chat_jsonl
from trainer.dataset.problems import Problems
from trainer.dataset.profiled import ProfiledImport, request_sizes
from trainer.dataset.records import ChatMessage, ChatRecord, file_sha256, write_records
from trainer.dataset.slips import DEFAULT_TEACHERS, SlipsTask, answer_parts, import_slips
from trainer.errors import TrainerError
from trainer.prompts import get_profile
from trainer.prompts.compose import OfflineComposer
from trainer.records import RequestFit

log = logging.getLogger(__name__)

TRUNCATION_MARKER = "\n[... incident truncated by immune-train: {kept} of {total} characters kept ...]"

TokenCounter = Callable[[list[dict[str, str]]], int]


@dataclass(frozen=True)
class Source:
    """One input: a Slips dataset for a task, or a generic chat JSONL file."""

    path: Path
    task: str
    slips: bool

    @classmethod
    def parse(cls, spec: str) -> Source:
        """``slips-summary=FILE``, ``slips-risk=FILE`` or ``[TASK=]FILE.jsonl`` (task default: ``chat``)."""
        task, _, name = spec.rpartition("=")
        task = task or "chat"
        return cls(Path(name), task, slips=task in ("slips-summary", "slips-risk"))


@dataclass
class PrepareOptions:
    max_tokens: int = 4096
    eval_fraction: float = 0.1
    seed: int = 3407
    teachers: Sequence[str] = DEFAULT_TEACHERS
    fatal_errors: bool = False
    #: Per Slips task, which parts of the teacher's answer to learn (default: all of them).
    answer_parts: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: Render the Slips incidents as this client profile's requests (trainer.prompts), with
    #: offline contract answers; records over ``max_tokens`` are then dropped, never cut.
    prompt_profile: str | None = None
    #: With a profile: also its practice requests (reductions for incidents small enough not to need them).
    practice: bool = True
    #: An operator's capture archive (immune-fleet capture pull): the requests the fleet really
    #: received, read by ``prompt_profile``; their answers are the device model's, for distill to replace.
    from_capture: Path | None = None


@dataclass
class PrepareResult:
    train: Path
    eval: Path
    stats: dict[str, Any] = field(default_factory=dict)


def text_token_counter(tokenizer: Any) -> Callable[[str], int]:
    """Count the tokens of a plain text (an answer) with the model's tokenizer."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


def chat_token_counter(tokenizer: Any) -> TokenCounter:
    """Count a conversation's tokens as training will see them: rendered by the model's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise TrainerError(
            Reason.MISSING_CHAT_TEMPLATE,
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template; "
            "train from an instruct model or add one to its tokenizer_config.json",
        )

    def count(messages: list[dict[str, str]]) -> int:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    return count


def fit_budget(record: ChatRecord, count: TokenCounter, budget: int) -> tuple[ChatRecord, int] | None:
    """The record with its longest prompt message cut (head kept, visible marker) to fit ``budget``
    tokens, and its token count; None when even an empty prompt would not fit."""
    messages = [m.model_dump() for m in record.messages]
    if (tokens := count(messages)) <= budget:
        return record, tokens
    longest = max(range(len(messages) - 1), key=lambda i: len(messages[i]["content"]))
    text = messages[longest]["content"]

    def with_prefix(length: int) -> list[dict[str, str]]:
        cut = text[:length]
        newline = cut.rfind("\n")
        if newline > length // 2:  # prefer whole lines
            cut = cut[:newline]
        trial = [dict(m) for m in messages]
        trial[longest]["content"] = cut + TRUNCATION_MARKER.format(kept=len(cut), total=len(text))
        return trial

    low, high = 0, len(text)  # invariant: a prefix of `low` characters fits, in `tokens` tokens
    if (tokens := count(with_prefix(0))) > budget:
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if (trial := count(with_prefix(middle))) <= budget:
            low, tokens = middle, trial
        else:
            high = middle - 1
    fitted = with_prefix(low)
    truncated = record.model_copy(
        update={"truncated": True, "messages": [ChatMessage.model_validate(m) for m in fitted]}
    )
    return truncated, tokens


def split_groups(records: Sequence[ChatRecord], eval_fraction: float, seed: int) -> set[str]:
    """The groups held out for evaluation: a seeded draw over whole groups, so no incident is in both."""
    groups = sorted({r.group for r in records})
    if len(groups) < 2 or eval_fraction <= 0:
        return set()
    random.Random(seed).shuffle(groups)  # noqa: S311 - a reproducible split, not a secret
    count = min(len(groups) - 1, max(1, round(len(groups) * eval_fraction)))
    return set(groups[:count])


def _length_stats(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "median": int(statistics.median(ordered)),
        "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        "max": ordered[-1],
    }


def _profiled_import(
    sources: Sequence[Source],
    options: PrepareOptions,
    problems: Problems,
    answer_count: Callable[[str], int] | None,
) -> ProfiledImport:
    profile = get_profile(options.prompt_profile or "")
    chat = [str(source.path) for source in sources if not source.slips]
    if chat:
        raise TrainerError(
            Reason.BAD_INPUT, f"a prompt profile renders Slips incidents; {chat[0]} is not a Slips dataset"
        )
    if answer_count is None:
        raise TrainerError(
            Reason.BAD_INPUT, "a prompt profile needs the model's tokenizer to fit its answers"
        )
    composer = OfflineComposer(answer_count)
    return ProfiledImport(profile, options.teachers, composer, problems, options.practice)


@dataclass
class _Imported:
    """What the importers produced, before de-duplication and the budget."""

    records: list[ChatRecord] = field(default_factory=list)
    captured: list[ChatRecord] = field(default_factory=list)
    profiled: ProfiledImport | None = None


def _check_answer_parts(options: PrepareOptions) -> None:
    for task, parts in options.answer_parts.items():
        if task not in ("slips-summary", "slips-risk"):
            raise TrainerError(Reason.BAD_ANSWER_PARTS, f"answer parts are for Slips tasks, not {task!r}")
        answer_parts(task, parts)  # type: ignore[arg-type] - checked just above


def _import(
    sources: list[Source],
    options: PrepareOptions,
    problems: Problems,
    answer_count: Callable[[str], int] | None,
) -> _Imported:
    """Every record of every input: captured requests, a profile's rendered requests, or the plain
    importers (a prompt profile replaces them: its records are the client's requests)."""
    imported = _Imported()
    if options.from_capture is not None:
        if options.prompt_profile is None:
            raise TrainerError(
                Reason.BAD_INPUT,
                "--from-capture needs --prompt-profile: the profile reads the captured requests",
            )
        profile = get_profile(options.prompt_profile)
        imported.captured = list(captured_records(options.from_capture, profile, problems))
        imported.records.extend(imported.captured)
    if options.prompt_profile is not None:
        if sources:
            imported.profiled = _profiled_import(sources, options, problems, answer_count)
            imported.records.extend(imported.profiled.records([source.path for source in sources]))
        return imported
    for source in sources:
        if source.slips:
            task: SlipsTask = "slips-summary" if source.task == "slips-summary" else "slips-risk"
            parts = options.answer_parts.get(task)
            imported.records.extend(import_slips(source.path, task, options.teachers, problems, parts))
        else:
            imported.records.extend(import_chat_jsonl(source.path, source.task, problems))
    return imported


def _unique(records: list[ChatRecord]) -> list[ChatRecord]:
    """The first record of each content, in order."""
    seen: set[str] = set()
    unique: list[ChatRecord] = []
    for record in records:
        key = record.content_key()
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


def _fit(
    records: list[ChatRecord], count: TokenCounter, options: PrepareOptions, problems: Problems
) -> tuple[list[ChatRecord], dict[str, int], int]:
    """The records within ``max_tokens`` (cut to fit where allowed), their lengths, and how many were
    dropped; TrainerError when none is left."""
    kept: list[ChatRecord] = []
    lengths: dict[str, int] = {}
    too_long = 0
    for record in records:
        if options.prompt_profile is not None:  # a client's request is trained on as sent, or not at all
            tokens = count([m.model_dump() for m in record.messages])
            fitted = (record, tokens) if tokens <= options.max_tokens else None
        else:
            fitted = fit_budget(record, count, options.max_tokens)
        if fitted is None:
            too_long += 1
            log.warning("dropped %s: it exceeds %d tokens", record.id, options.max_tokens)
            continue
        kept.append(fitted[0])
        lengths[record.id] = fitted[1]
    if not kept:
        if too_long:
            reason = f"all {too_long} records exceed {options.max_tokens} tokens even with the incident cut"
        else:
            reason = problems.found[0] if problems.found else "the inputs are empty"
        raise TrainerError(Reason.EMPTY_DATASET, f"no usable records: {reason}")
    return kept, lengths, too_long


def prepare(
    sources: Iterable[Source],
    output_dir: Path,
    count: TokenCounter,
    options: PrepareOptions,
    answer_count: Callable[[str], int] | None = None,
) -> PrepareResult:
    """Build ``train.jsonl``, ``eval.jsonl`` and ``stats.json`` in ``output_dir`` from ``sources``
    (``answer_count``: tokens of a plain text, which a prompt profile's answers are fitted with)."""
    _check_answer_parts(options)
    problems = Problems(fatal=options.fatal_errors)
    imported = _import(list(sources), options, problems, answer_count)
    unique = _unique(imported.records)
    kept, lengths, too_long = _fit(unique, count, options, problems)

    held_out = split_groups(kept, options.eval_fraction, options.seed)
    train = [r for r in kept if r.group not in held_out]
    evaluation = [r for r in kept if r.group in held_out]

    output_dir.mkdir(parents=True, exist_ok=True)
    result = PrepareResult(train=output_dir / "train.jsonl", eval=output_dir / "eval.jsonl")
    write_records(result.train, train)
    write_records(result.eval, evaluation)
    splits = {"train": train, "eval": evaluation}
    result.stats = {
        "records": {
            "imported": len(imported.records),
            "duplicates": len(imported.records) - len(unique),
            "too_long": too_long,
            **{split: len(rows) for split, rows in splits.items()},
        },
        "skipped_inputs": len(problems.found),
        "problems": problems.found[:50],
        "tasks": {split: dict(Counter(r.task for r in rows)) for split, rows in splits.items()},
        "teachers": dict(Counter(r.teacher for r in kept if r.teacher)),
        "truncated": sum(r.truncated for r in kept),
        "tokens": {split: _length_stats([lengths[r.id] for r in rows]) for split, rows in splits.items()},
        "groups": {"train": len({r.group for r in train}), "eval": len(held_out)},
        "options": _options_record(options),
        "sha256": file_sha256(result.train, result.eval),
    }
    if options.prompt_profile is not None:
        profile = get_profile(options.prompt_profile)
        sizes = request_sizes(imported.profiled, count) if imported.profiled is not None else []
        sizes += [(r.id, count(r.prompt), int(r.meta["estimated_tokens"])) for r in imported.captured]
        result.stats["requests"] = RequestFit.of(profile.name, profile.max_tokens, sizes).model_dump(
            mode="json"
        )
    if options.from_capture is not None:
        result.stats["records"]["captured"] = len(imported.captured)
    (output_dir / "stats.json").write_text(json.dumps(result.stats, indent=2) + "\n")
    log.info("prepared %d train and %d eval records in %s", len(train), len(evaluation), output_dir)
    return result


def _options_record(options: PrepareOptions) -> dict[str, Any]:
    """The options that shaped the dataset, for stats.json."""
    record: dict[str, Any] = {
        "max_tokens": options.max_tokens,
        "eval_fraction": options.eval_fraction,
        "seed": options.seed,
        "teachers": list(options.teachers),
        "answer_parts": {task: list(parts) for task, parts in options.answer_parts.items()},
    }
    if options.prompt_profile is not None:
        record["prompt_profile"] = options.prompt_profile
    if options.from_capture is not None:
        record["from_capture"] = str(options.from_capture)
    return record
