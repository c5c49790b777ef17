"""``immune-train``: Slips data -> fine-tune -> GGUF export -> evaluation gate -> signed publish. This module
holds the data and training commands; trainer.release_cli the export, eval and publish ones.

Some command functions run past 60 lines: Typer declares each option in the signature. Their bodies
stay under 60, and the work itself lives in the modules they call."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, TextColumn
from rich.table import Table

from shared.cli_entry import run_cli
from shared.reasons import Reason
from trainer import release_cli
from trainer import toolchain as toolchain_module
from trainer.base_model import load_tokenizer
from trainer.console import console, err_console, spinner
from trainer.dataset.prepare import (
    PrepareOptions,
    Source,
    chat_token_counter,
    prepare,
    text_token_counter,
)
from trainer.dataset.slips import DEFAULT_TEACHERS
from trainer.errors import TrainerError
from trainer.prompts import get_profile

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune, export, evaluate and publish models for immune-edge devices.",
)


@app.command("toolchain")
def toolchain(
    cache_dir: Annotated[
        Path, typer.Option(help="Where prepared trees are kept.")
    ] = toolchain_module.DEFAULT_CACHE,
    sdist: Annotated[
        Path | None, typer.Option(exists=True, help="A llama-cpp-python sdist to use offline.")
    ] = None,
) -> None:
    """Prepare (once) the llama.cpp tree GGUF export needs, from the llama-cpp-python sdist."""
    with spinner("preparing the llama.cpp tree"):
        tree = toolchain_module.prepare_toolchain(cache_dir, sdist)
    console.print(f"llama.cpp tree ready: {tree.root}")
    for name, value in tree.environment().items():
        console.print(f"  {name}={value}")


@app.command("prepare")
def prepare_command(
    tokenizer: Annotated[
        str, typer.Option(help="Base model folder (or cached Hub id) whose tokenizer counts tokens.")
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Folder for train.jsonl, eval.jsonl, stats.json.")
    ],
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            help="slips-summary=FILE, slips-risk=FILE, or [TASK=]FILE.jsonl (chat, Alpaca or ShareGPT)."
        ),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(min=64, help="Token budget per conversation; incidents are cut to fit.")
    ] = 4096,
    eval_fraction: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.1,
    seed: int = 3407,
    teacher: Annotated[
        list[str] | None, typer.Option(help="Teacher preference, best first (repeatable).")
    ] = None,
    strict: Annotated[
        bool, typer.Option(help="Stop at the first malformed line instead of skipping it.")
    ] = False,
    answer_parts: Annotated[
        list[str] | None,
        typer.Option(
            help="TASK=PART[,PART]: which parts of a Slips teacher answer to learn, e.g. "
            "slips-summary=behavior_analysis (default: all parts; repeatable)."
        ),
    ] = None,
    prompt_profile: Annotated[
        str | None,
        typer.Option(
            help="Render the Slips incidents as this client's requests (e.g. alert-summary-v2) with "
            "offline answers that obey its output rules; give the summary and the risk dataset."
        ),
    ] = None,
    practice: Annotated[
        bool, typer.Option(help="With a profile: add reduction requests for incidents that need none.")
    ] = True,
    from_capture: Annotated[
        Path | None,
        typer.Option(
            help="An operator's capture archive (immune-fleet capture pull): the requests devices received, "
            "read by --prompt-profile; distill them before training."
        ),
    ] = None,
) -> None:
    """Import datasets into ChatML records, de-duplicate, fit the token budget and split train/eval."""
    parts: dict[str, tuple[str, ...]] = {}
    for spec in answer_parts or []:
        task, _, names = spec.partition("=")
        parts[task.strip()] = tuple(filter(None, (name.strip() for name in names.split(","))))
    options = PrepareOptions(
        max_tokens,
        eval_fraction,
        seed,
        tuple(teacher or DEFAULT_TEACHERS),
        strict,
        parts,
        prompt_profile,
        practice,
        from_capture,
    )
    if prompt_profile is not None:
        get_profile(prompt_profile)  # an unknown name fails before the tokenizer loads
    if not sources and from_capture is None:
        raise TrainerError(Reason.BAD_INPUT, "give at least one dataset, or --from-capture")
    with spinner("preparing records"):
        model_tokenizer = load_tokenizer(tokenizer)
        result = prepare(
            [Source.parse(s) for s in sources or []],
            output,
            chat_token_counter(model_tokenizer),
            options,
            text_token_counter(model_tokenizer),
        )
    stats = result.stats
    table = Table(title=f"dataset -> {output}")
    for column in ("split", "records", "incidents", "tasks", "tokens min/median/p95/max"):
        table.add_column(column)
    for split in ("train", "eval"):
        tokens = stats["tokens"][split]
        table.add_row(
            split,
            str(stats["records"][split]),
            str(stats["groups"][split]),
            ", ".join(f"{task} {n}" for task, n in stats["tasks"][split].items()),
            "/".join(str(tokens.get(k, "-")) for k in ("min", "median", "p95", "max")),
        )
    console.print(table)
    records = stats["records"]
    console.print(
        f"imported {records['imported']}, duplicates {records['duplicates']}, "
        f"too long {records['too_long']}, truncated {stats['truncated']}, "
        f"skipped inputs {stats['skipped_inputs']}; teachers {stats['teachers']}"
    )
    for problem in stats["problems"][:10]:
        err_console.print(f"skipped {problem}", highlight=False)
    if (fit := stats.get("requests")) is not None:
        console.print(
            f"{fit['profile']}: {fit['requests']} requests; the longest is {fit['longest_prompt_tokens']} "
            f"tokens ({fit['longest_request']}); real tokens run to {fit['max_ratio_to_estimate']}x the "
            "client's estimate; "
            f"with max_tokens {fit['max_tokens']} a model needs n_ctx >= {fit['context_needed']}"
        )


@app.command("distill")
def distill_command(
    data: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="A folder prepare --prompt-profile wrote.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the distilled files.")],
    teacher: Annotated[
        str, typer.Option(help="The teacher's OpenAI-compatible URL (server root, /v1 or the endpoint).")
    ],
    teacher_model: Annotated[str, typer.Option(help="The model name the teacher serves.")],
    api_key_file: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="A file holding the teacher's API key (Bearer)."),
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Requests in flight at once.")] = 4,
    timeout: Annotated[float, typer.Option(min=1.0, help="Seconds to wait for one answer.")] = 300.0,
) -> None:
    """Have a teacher model answer the profile's requests; answers that break the contract are left out.
    Rerun the same command to resume an interrupted run."""
    from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn

    from trainer.distill import Teacher, distill, pending_count

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the progress bar
    key = api_key_file.read_text().strip() if api_key_file else None
    settings = Teacher(teacher, teacher_model, key, concurrency, timeout)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err_console,
    )  # fmt: skip
    with progress:
        task_id = progress.add_task(f"asking {teacher_model}", total=pending_count(data, output))
        reports = distill(data, output, settings, on_outcome=lambda _: progress.advance(task_id))
    table = Table(title=f"distilled by {teacher_model} -> {output}")
    for column in ("file", "records", "resumed", "written", "left out"):
        table.add_column(column)
    for name, report in reports.items():
        left_out = ", ".join(f"{why} {n}" for why, n in sorted(report.left_out.items())) or "0"
        table.add_row(name, str(report.records), str(report.resumed), str(report.written), left_out)
    console.print(table)
    for report in reports.values():
        for record_id, reason in report.examples[:5]:
            err_console.print(f"left out {record_id}: {reason}", highlight=False)


@app.command("finetune")
def finetune_command(
    config: Annotated[Path, typer.Option("--config", "-c", exists=True, dir_okay=False, help="train.toml")],
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in output_dir.")] = False,
) -> None:
    """LoRA/QLoRA fine-tune with Unsloth + TRL on the assistant answers only."""
    from trainer.config import load_train_config
    from trainer.finetune import finetune

    result = finetune(load_train_config(config), resume=resume)
    table = Table(title=f"adapter -> {result.adapter_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(result.metrics.items()):
        table.add_row(name, f"{value:.4g}")
    console.print(table)
    console.print(f"run record: {result.run_file}")


release_cli.register(app)


def main() -> None:
    """Entry point: bad input ends with one clear line on stderr and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(app)


if __name__ == "__main__":
    main()
