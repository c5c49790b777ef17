"""``immune-train export``, ``eval`` and ``publish``: from a trained run to a signed manifest on the fleet's
topic. The commands are added to the ``immune-train`` app by ``register``.

Some command functions run past 60 lines: Typer declares each option in the signature. Their bodies
stay under 60, and the work itself lives in the modules they call."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shared.cli_entry import transfer_progress
from shared.manifest import Quantization
from shared.manifest_builder import DEFAULT_CHANNEL, DEFAULT_CPU_ARCH, DEFAULT_TASK
from trainer import toolchain as toolchain_module
from trainer.console import console, err_console, spinner
from trainer.context import publish_context, request_fit_beside
from trainer.dataset.records import read_records
from trainer.dataset.slips import SUMMARY_SYSTEM_PROMPT
from trainer.records import EvalReport


def _quants(quant: str, target: str | None) -> list[Quantization]:
    """--quant's list, or the candidates of --target."""
    from trainer.export import parse_quants
    from trainer.targets import get_target

    return list(get_target(target).candidates) if target is not None else list(parse_quants(quant))


def export_command(
    run_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="The finetune output_dir.")],
    quant: Annotated[
        str, typer.Option(help="Comma-separated quantizations (F16 is always written).")
    ] = "q4_k_m,q5_k_m,q8_0",
    target: Annotated[
        str | None,
        typer.Option(help="Write the candidate types of this device target instead of --quant (pi5)."),
    ] = None,
    keep_merged: bool = False,
    imatrix: Annotated[
        bool,
        typer.Option(
            help="Quantize k-quants with an importance matrix from the training data (builds "
            "llama.cpp's llama-imatrix and llama-quantize once); the plain k-quant is kept beside."
        ),
    ] = False,
    imatrix_chunks: Annotated[int, typer.Option(min=1, help="512-token chunks of calibration text.")] = 64,
    adapter: Annotated[
        bool,
        typer.Option(
            help="Also write the LoRA alone as a GGUF adapter bound to the base GGUF it was trained on "
            "(the base must be a .gguf), checked by applying it in llama-cpp-python."
        ),
    ] = False,
    adapter_base: Annotated[
        str | None,
        typer.Option(
            help="Bind the adapter to the training base requantized to this type (gguf/<model>.<type>.gguf), "
            "the base the devices then hold: e.g. q4_k_m when the pretrained GGUF is a slower type."
        ),
    ] = None,
) -> None:
    """Merge the adapter and write checked GGUF files (same tokenizer as the base), offline."""
    from trainer.export import export, parse_quant
    from trainer.layout import RunLayout

    quants = _quants(quant, target)
    base_quant = parse_quant(adapter_base) if adapter_base is not None else None
    with spinner("preparing the llama.cpp tree"):
        tree = toolchain_module.prepare_toolchain()
    with spinner(f"exporting {', '.join(q.value for q in quants)}"):
        report = export(run_dir, quants, tree, keep_merged, imatrix, imatrix_chunks, adapter, base_quant)
    table = Table(title=f"GGUF -> {RunLayout(run_dir).export.root}")
    for column in ("quant", "file", "MiB", "tensor types", "imatrix", "sha256"):
        table.add_column(column)
    for item in report.files:
        types = ", ".join(f"{k} {v}" for k, v in sorted(item.tensor_types.items()))
        with_matrix = f"yes (plain: {item.without_imatrix})" if item.without_imatrix else "-"
        table.add_row(
            item.quant.value, item.file, f"{item.size / 2**20:.1f}", types, with_matrix, item.sha256[:12]
        )
    if (lora := report.adapter) is not None:
        table.add_row(
            "adapter",
            lora.file,
            f"{lora.size / 2**20:.1f}",
            f"{lora.tensors} LoRA tensors",
            "-",
            lora.sha256[:12],
        )
    console.print(table)
    if lora is not None:
        share = lora.size / lora.base_size
        made = f", requantized from {lora.trained_on}" if lora.trained_on else ""
        answered = "answered" if lora.answered else "NO TEXT"
        console.print(
            f"adapter for base {lora.base_file}{made} (sha256 {lora.base_sha256[:12]}): "
            f"{share:.1%} of its size, applied by llama-cpp-python: {answered}"
        )
    fidelity = report.tokenizer
    console.print(
        f"tokenizer identical to the {fidelity.reference}: "
        f"{fidelity.samples} samples, {fidelity.tokens} tokens"
    )


def eval_command(
    export_dir: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="The folder export wrote.")
    ],
    data: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="Held-out eval.jsonl from prepare.")
    ],
    quant: str = "q4_k_m,q5_k_m,q8_0",
    target: Annotated[
        str | None, typer.Option(help="Evaluate the candidate types of this device target instead (pi5).")
    ] = None,
    max_ppl_rise: Annotated[
        float, typer.Option(min=0.0, help="Largest perplexity rise vs F16 (0.1 = 10%).")
    ] = 0.10,
    ppl_records: int = 32,
    ppl_ctx: int = 1024,
    task_records: int = 8,
    max_tokens: Annotated[int, typer.Option(min=1, help="Answer budget (Slips asks for 220).")] = 220,
    threads: int | None = None,
    baseline: Annotated[
        Path | None,
        typer.Option(help="A GGUF to compare with on the same incidents: the base model or the champion."),
    ] = None,
    baseline_label: Annotated[
        str, typer.Option(help="What the baseline is, in tables and manifests.")
    ] = "base",
    baseline_captured: Annotated[
        bool,
        typer.Option(
            help="Compare with the fleet model's own captured answers to the same requests (records "
            "prepared with --from-capture), instead of a baseline GGUF."
        ),
    ] = False,
) -> None:
    """Perplexity vs F16, Slips task checks and (with --baseline) the comparison; writes eval.json."""
    from trainer.evaluate import evaluate
    from trainer.measure import EvalOptions

    quants = _quants(quant, target)
    options = EvalOptions(max_ppl_rise, ppl_records, ppl_ctx, task_records, max_tokens, n_threads=threads)
    fit = request_fit_beside(data)
    with spinner("evaluating with llama-cpp-python"):
        report = evaluate(
            export_dir,
            quants,
            list(read_records(data)),
            options,
            baseline,
            baseline_label,
            fit,
            baseline_captured,
        )
    table = Table(title=f"evaluation ({report.records['perplexity']} records; bound +{max_ppl_rise:.0%})")
    task_names = sorted({name for r in report.quants.values() for name in r.tasks})
    for column in ("quant", "perplexity", "vs F16", "no imatrix", "publish", *task_names):
        table.add_column(column)
    for name, result in report.quants.items():
        without = result.perplexity_without_imatrix
        table.add_row(
            name.value,
            f"{result.perplexity:.3f}",
            f"{result.perplexity_rise_vs_f16:+.2%}",
            f"{without:.3f}" if without else "-",
            "yes" if result.accepted else "REFUSED",
            *(f"{result.tasks.get(t, float('nan')):.2f}" for t in task_names),
        )
    if (lora := report.adapter) is not None:
        table.add_row(
            f"adapter on {lora.base_file}",
            f"{lora.perplexity:.3f}",
            f"{lora.perplexity_rise_vs_f16:+.2%}",
            "-",
            "-",
            *(f"{lora.tasks.get(t, float('nan')):.2f}" for t in task_names),
        )
    console.print(table)
    for name in report.quants:
        _print_comparison(report, name)
    if (requests := report.requests) is not None:
        console.print(
            f"{requests.profile}: longest request {requests.longest_prompt_tokens} tokens "
            f"({requests.longest_request}) + max_tokens {requests.max_tokens}: "
            f"publish with n_ctx >= {requests.context_needed}"
        )


def _print_comparison(report: EvalReport, quant: Quantization) -> None:
    """The baseline comparison of one file, as a table (nothing when eval made none)."""
    comparison = report.comparison
    if comparison is None or quant not in comparison.quants:
        return
    table = Table(title=f"{quant.value} vs {comparison.label} ({report.records['tasks']} incidents)")
    for column in ("metric", quant.value, comparison.label, "diff", "± stderr", "verdict"):
        table.add_column(column)
    for metric, row in comparison.quants[quant].items():
        table.add_row(
            metric, f"{row.challenger:.3f}", f"{row.baseline:.3f}", f"{row.diff:+.3f}", f"{row.stderr:.3f}",
            row.verdict,
        )  # fmt: skip
    console.print(table)


def publish_command(
    export_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    config: Annotated[Path, typer.Option("--config", "-c", exists=True, dir_okay=False, help="publish.toml")],
    name: Annotated[str, typer.Option(help="Model name devices and Slips see.")],
    quant: Quantization = Quantization.Q4_K_M,
    target: Annotated[
        str | None,
        typer.Option(
            help="Publish the type fastest on this device target (pi5) among the evaluated ones that pass "
            "the quality checks and the gate (--quant is then ignored)."
        ),
    ] = None,
    serial: Annotated[
        int | None, typer.Option(help="Default: the current Unix time (always increasing).")
    ] = None,
    channel: str = DEFAULT_CHANNEL,
    group: Annotated[
        str | None, typer.Option(help="Publish to this device group instead of the whole fleet.")
    ] = None,
    task: str = DEFAULT_TASK,
    base_model: str = "unknown",
    n_ctx: Annotated[
        int | None,
        typer.Option(
            help="Default: what the evaluated client profile's longest request needs (eval.json), else 4096; "
            "a context smaller than that need is refused."
        ),
    ] = None,
    arch: Annotated[list[str] | None, typer.Option(help="aarch64 and/or x86_64 (default aarch64).")] = None,
    min_ram_mb: Annotated[
        int | None,
        typer.Option(help="Default: the file, its KV cache at --n-ctx and the runtime's overhead."),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Finetune output_dir, for provenance (run.json).")
    ] = None,
    adapter: Annotated[
        bool,
        typer.Option(
            help="Publish the evaluated LoRA adapter (export --adapter) bound to its base, which is "
            "uploaded beside it, instead of a merged file (--quant is then ignored)."
        ),
    ] = False,
) -> None:
    """Upload an accepted GGUF, sign its manifest with the trainer key(s) and publish it retained."""
    from trainer.evaluate import load_eval
    from trainer.layout import RunLayout
    from trainer.publish import PublishRequest, load_publish_settings, publish
    from trainer.records import RunRecord

    settings = load_publish_settings(config)
    evaluation = load_eval(export_dir)
    _print_comparison(evaluation, quant)
    n_ctx = publish_context(evaluation, n_ctx)
    provenance = None
    if run_dir is not None and RunLayout(run_dir).run_file.is_file():
        run = RunRecord.read(RunLayout(run_dir).run_file, "run immune-train finetune first")
        provenance = {
            "dataset_sha256": run.data_sha256,
            "hyperparameters": _flat_hyperparameters(run.config),
            "trainer_version": run.versions.get("immune-edge"),
            "source": f"unsloth {run.versions.get('unsloth', '?')} on {run.device}",
        }
    request = PublishRequest(
        export_dir=export_dir,
        quant=quant,
        name=name,
        serial=serial or int(time.time()),
        channel=channel,
        group=group,
        task=task,
        base_model=base_model,
        n_ctx=n_ctx,
        system_prompt=SUMMARY_SYSTEM_PROMPT if task == DEFAULT_TASK else None,
        cpu_arch=tuple(arch or DEFAULT_CPU_ARCH),
        min_ram_mb=min_ram_mb,
        provenance=provenance,
        adapter=adapter,
        target=target,
    )
    with transfer_progress(err_console) as progress:
        task_id = progress.add_task(f"uploading {name}", total=None)
        published = publish(settings, request, on_progress=lambda n: progress.advance(task_id, n))
    table = Table(title="published")
    table.add_column("field")
    table.add_column("value")
    for key, value in published.model_dump(mode="json").items():
        table.add_row(key, str(value))
    console.print(table)


def _flat_hyperparameters(config: dict[str, object]) -> dict[str, str | int | float | bool]:
    """The run config as flat scalar key=value pairs, as the manifest's provenance holds them."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in _flat_hyperparameters(value).items()})
        elif isinstance(value, str | int | float | bool):
            flat[key[:64]] = value
        elif isinstance(value, list):
            flat[key[:64]] = ",".join(map(str, value))
    return flat


def register(app: typer.Typer) -> None:
    """Add export, eval and publish to the ``immune-train`` command."""
    app.command("export")(export_command)
    app.command("eval")(eval_command)
    app.command("publish")(publish_command)
