"""One GGUF measured on the held-out sets with llama-cpp-python, the runtime the Pi uses: perplexity of
the held-out conversations rendered with the GGUF's own chat template, and answers generated greedily and
scored by the task checks (trainer.task_checks). The fleet model's captured answers are scored the same
way. trainer.evaluate builds the gate's report from these measures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.reasons import Reason
from trainer.dataset.records import ChatRecord
from trainer.errors import TrainerError
from trainer.nll import llama_nll
from trainer.task_checks import task_scores


@dataclass
class EvalOptions:
    max_ppl_rise: float = 0.10
    ppl_records: int = 32
    ppl_ctx: int = 1024
    task_records: int = 8
    max_tokens: int = 220
    n_threads: int | None = None
    #: The context task answers are generated in (default: twice ppl_ctx); a profile's fit sets it.
    task_ctx: int | None = None


#: Per answer, the prompt's real size (taken out of the scores into Measured.prompt_tokens).
PROMPT_TOKENS = "prompt_tokens"


def open_gguf(
    path: Path, n_ctx: int, n_threads: int | None, logits_all: bool = False, adapter: Path | None = None
) -> Any:
    """A llama-cpp-python model on ``path``, the runtime the device uses."""
    from llama_cpp import Llama

    lora = str(adapter) if adapter is not None else None
    return Llama(
        model_path=str(path),
        lora_path=lora,
        n_ctx=n_ctx,
        n_threads=n_threads,
        logits_all=logits_all,
        verbose=False,
    )


def _render(model: Any, messages: list[dict[str, str]]) -> str:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = model.metadata.get("tokenizer.chat_template")
    if not template:
        raise TrainerError(
            Reason.MISSING_CHAT_TEMPLATE, "the GGUF has no tokenizer.chat_template to render with"
        )
    eos = model.detokenize([model.token_eos()], special=True).decode("utf-8", "replace")
    bos = model.detokenize([model.token_bos()], special=True).decode("utf-8", "replace")
    formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=False)
    return formatter(messages=messages).prompt


def record_nlls(
    path: Path, records: Sequence[ChatRecord], options: EvalOptions, adapter: Path | None = None
) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each record rendered with the GGUF's own chat template (with
    ``adapter`` applied to it, when given)."""
    model = open_gguf(path, options.ppl_ctx, options.n_threads, logits_all=True, adapter=adapter)
    results: list[tuple[float, int]] = []
    try:
        for record in records:
            text = _render(model, [m.model_dump() for m in record.messages])
            tokens = model.tokenize(text.encode("utf-8"), add_bos=True, special=True)[: options.ppl_ctx]
            if len(tokens) < 2:
                continue
            results.append((float(llama_nll(model, tokens).sum()), len(tokens) - 1))
    finally:
        model.close()
    return results


def perplexity_of(nlls: Sequence[tuple[float, int]]) -> float:
    """exp(mean NLL per token) over all records."""
    total_tokens = sum(count for _, count in nlls)
    if total_tokens == 0:
        raise TrainerError(Reason.EMPTY_DATASET, "no evaluation tokens: the held-out set is empty")
    return math.exp(sum(nll for nll, _ in nlls) / total_tokens)


def perplexity(path: Path, records: Sequence[ChatRecord], options: EvalOptions) -> float:
    """exp(mean negative log-likelihood) of every token after the first, each record in one window."""
    return perplexity_of(record_nlls(path, records, options))


def run_tasks(
    path: Path,
    records: Sequence[ChatRecord],
    options: EvalOptions,
    adapter: Path | None = None,
    answers: list[dict[str, object]] | None = None,
) -> list[dict[str, float]]:
    """Task scores of each held-out record, answers generated greedily as the edge would (each
    appended to ``answers`` when given)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def rouge(reference: str, prediction: str) -> float:
        return float(scorer.score(reference, prediction)["rougeL"].fmeasure)

    model = open_gguf(path, options.task_ctx or options.ppl_ctx * 2, options.n_threads, adapter=adapter)
    rows: list[dict[str, float]] = []
    answers = answers if answers is not None else []
    try:
        for record in records:
            reply = model.create_chat_completion(
                messages=record.prompt,  # type: ignore[arg-type]
                max_tokens=int(record.meta.get("max_tokens", options.max_tokens)),  # the client's own limit
                temperature=0.0,
            )
            choice = reply["choices"][0]  # type: ignore[index]
            answer = choice["message"]["content"] or ""
            scores = task_scores(record, answer, choice["finish_reason"] == "stop", rouge)
            scores[PROMPT_TOKENS] = float(reply["usage"]["prompt_tokens"])  # type: ignore[index]
            rows.append(scores)
            answers.append(
                {
                    "record": record.id,
                    "request": record.meta.get("request"),
                    "finish": choice["finish_reason"],
                    "answer": answer,
                }
            )
    finally:
        model.close()
    return rows


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the rows that have it."""
    names = sorted({name for row in rows for name in row})
    return {n: sum(r[n] for r in rows if n in r) / sum(1 for r in rows if n in r) for n in names}


@dataclass
class Measured:
    """One GGUF measured on the held-out sets."""

    path: Path
    nlls: list[tuple[float, int]]
    tasks: list[dict[str, float]]
    #: The real prompt size of each task record, in the same order.
    prompt_tokens: list[int]
    #: What it answered to each task record, in the same order.
    answers: list[dict[str, object]]


def measure(
    path: Path,
    ppl_set: Sequence[ChatRecord],
    task_set: Sequence[ChatRecord],
    options: EvalOptions,
    adapter: Path | None = None,
) -> Measured:
    """The GGUF at ``path`` (with ``adapter`` applied, when given): NLLs on ``ppl_set``, answers and
    their scores on ``task_set``."""
    nlls = record_nlls(path, ppl_set, options, adapter)
    answers: list[dict[str, object]] = []
    tasks = run_tasks(path, task_set, options, adapter, answers) if task_set else []
    prompt_tokens = [int(row.pop(PROMPT_TOKENS)) for row in tasks]
    return Measured(path, nlls, tasks, prompt_tokens, answers)


#: The baseline label of the fleet model's own captured answers (``eval --baseline-captured``).
CAPTURED = "captured"


def captured_answers(task_set: Sequence[ChatRecord]) -> Measured:
    """The answers the fleet's model gave to these very requests (``prepare --from-capture`` keeps them),
    scored like generated ones against the same references; no perplexity (there is no file)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    missing = [r.id for r in task_set if not r.meta.get("captured_answer")]
    if missing:
        raise TrainerError(
            Reason.BAD_BASELINE,
            f"{len(missing)} held-out record(s) (first: {missing[0]}) hold no captured answer: "
            "--baseline-captured needs records prepared with --from-capture",
        )
    rows, answers = [], []
    for record in task_set:
        answer, finish = record.meta["captured_answer"], record.meta.get("captured_finish", "")
        scores = task_scores(
            record, answer, finish == "stop", lambda a, b: float(scorer.score(a, b)["rougeL"].fmeasure)
        )
        rows.append(scores)
        answers.append(
            {"record": record.id, "request": record.meta.get("request"), "finish": finish, "answer": answer}
        )
    return Measured(Path(CAPTURED), [], rows, [], answers)
