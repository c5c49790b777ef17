"""The real trainer recipe, one command (``make train-real``): SmolLM2-135M-Instruct from its GGUF ->
LoRA on the requests Slips' alert-summary module sends (``prepare --prompt-profile alert-summary-v2``,
final and reduction requests, answers composed offline to obey its output rules) -> GGUF export ->
evaluation against the base model on held-out incidents *through the profile's prompts* with the
client's max_tokens -> signed publish to a local daemon with the n_ctx the longest request needs ->
a Slips-style client asks it for a final summary and a reduction over the Ollama API.

Each step runs the ``immune-train`` CLI as a user would; the wall time and peak RSS of each step
(the process and its children) are measured, and everything lands in OUT/results.json and a
Markdown table (OUT/results.md) for docs/benchmarks.md.

Why these choices (see docs/benchmarks.md for the figures):
- answers: offline composition, not ``distill``: a teacher good enough to be worth asking (GPT-4o
  class) is not reachable from the machines this runs on, and the dataset's own teacher parts hold
  what the contract needs (activity, conclusion, risk level); ``distill`` is the way when one is;
- budget: ``--max-tokens 1536`` per conversation. A client request is trained on whole or not at
  all (never cut: the model must learn the request Slips sends), so the budget decides which
  requests are kept: at 1536 about 83 % of them (median 1,070 tokens), at ~20 s of forward and
  backward pass per record on 2 CPU cores;
- mix: ``--reduction-share`` of the records are reduction requests, the rest finals, so the model
  learns both request kinds; one epoch over ``--train-records`` records, ``--records-per-step`` per
  optimizer step;
- ``--prompt-profile none`` is the earlier recipe (raw incident text, ``--answer-part`` of the
  teacher's Markdown), kept for the adapter recipe (``make train-adapter``) and for comparison."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIPS = ROOT.parent / "shared" / "datasets" / "slips"

TRAIN_TOML = """
base_model = "{base}"
train_file = "data/train-subset.jsonl"
output_dir = "run"
max_seq_length = {max_tokens}
seed = 3407

[lora]
r = 16
alpha = 32
target_modules = {targets}

[training]
epochs = 1
learning_rate = {lr}
lr_scheduler = "cosine"
warmup_ratio = 0.05
batch_size = 1
gradient_accumulation = {per_step}
logging_steps = 5
save_steps = 20
gradient_checkpointing = false
"""


@dataclass
class StepResult:
    step: str
    wall_s: float
    peak_rss_mb: float
    command: str


def measured(name: str, command: list[str], log: Path) -> StepResult:
    """Run ``command``, sampling the RSS of it and its children every 0.5 s; stop on failure."""
    started = time.monotonic()
    with log.open("a") as sink:
        sink.write(f"\n$ {' '.join(command)}\n")
        sink.flush()
        process = subprocess.Popen(command, stdout=sink, stderr=sink, cwd=ROOT)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            watched = psutil.Process(process.pid)
            while not done.is_set():
                try:
                    rss = watched.memory_info().rss + sum(
                        child.memory_info().rss for child in watched.children(recursive=True)
                    )
                    peak = max(peak, rss)
                except psutil.Error:
                    pass
                done.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        done.set()
        sampler.join()
    if code != 0:
        raise SystemExit(f"step {name} failed (exit {code}); see {log}")
    result = StepResult(name, time.monotonic() - started, peak / 2**20, " ".join(command))
    print(f"{name}: {result.wall_s:.0f} s, peak RSS {result.peak_rss_mb:.0f} MiB", flush=True)
    return result


def train_subset(data: Path, count: int, reduction_share: float) -> int:
    """``count`` training records as train-subset.jsonl: the first ones in prepare's order; with a
    client profile, final requests of as many incidents as possible plus ``reduction_share`` of
    reduction requests, shuffled with a fixed seed so that each optimizer step mixes both kinds."""
    lines = (data / "train.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    if not any(r.get("meta", {}).get("profile") for r in records):
        chosen = lines[:count]
    else:
        reductions = [
            line for line, r in zip(lines, records, strict=True) if r["meta"]["request"] == "reduction"
        ]
        finals = [line for line, r in zip(lines, records, strict=True) if r["meta"]["request"] == "final"]
        wanted = round(count * reduction_share)
        chosen = finals[: count - min(wanted, len(reductions))] + reductions[:wanted]
        random.Random(3407).shuffle(chosen)  # noqa: S311 - a reproducible mix, not a secret
    (data / "train-subset.jsonl").write_text("\n".join(chosen) + "\n")
    return len(chosen)


def client_requests(data: Path) -> list[dict[str, object]]:
    """Held-out requests as a Slips-style client sends them over Ollama's API: a final summary and a
    reduction of the client profile (or the earlier fixed prompt when the data has no profile)."""
    records = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines() if line]
    wanted = [
        next((r for r in records if r.get("meta", {}).get("label") == "final"), None),
        next((r for r in records if r.get("meta", {}).get("request") == "reduction"), None),
    ]
    chosen = [r for r in wanted if r is not None]
    if not chosen:
        from tests.harness.slips_prompts import incident_texts, summary_messages

        return [{"messages": summary_messages(incident_texts(1)[0]), "max_tokens": 220, "meta": {}}]
    return [
        {"messages": r["messages"][:-1], "max_tokens": int(r["meta"]["max_tokens"]), "meta": r["meta"]}
        for r in chosen
    ]


#: The champion/challenger gate the recipe publishes through (metric: allowed margin below the base).
GATE = {"names_source_ip": 0.0, "rouge_l": 0.0}


def publish_and_ask(
    out: Path, export: Path, run: Path, data: Path, gate: dict[str, float] | None = None
) -> dict[str, object]:
    """Publish the q4_k_m to a daemon on a local broker (its n_ctx derived from the evaluated client
    profile when there is one) through ``gate`` (default GATE; ``{}``: none); ask it what Slips asks
    (Ollama provider) and check the answers against the profile's contract."""
    from shared.signing import generate_key, write_private_key
    from shared.signing.keyring import Keyring, Role, Thresholds, TrustedKey
    from tests.harness.artifact_server import ArtifactServer
    from tests.harness.broker import Mosquitto
    from tests.harness.edge import (
        FLEET,
        HOST_ARCH,
        FleetObserver,
        ServingOptions,
        running_daemon,
        write_edge_config,
    )
    from tests.harness.training import immune_train, write_publish_config
    from trainer.prompts import get_profile
    from trainer.prompts.contract import AnswerContext, contract_scores

    keys = {role: generate_key() for role in (Role.ROOT, Role.TRAINER, Role.OPERATOR)}
    keyring = Keyring(
        version=1,
        keys=[
            TrustedKey(keyid=key.keyid, role=role, public_key=key.public_b64, name=f"{role.value}-1")
            for role, key in keys.items()
        ],
        thresholds=Thresholds(),
    )
    keyring_file = out / "keyring.json"
    keyring_file.write_bytes(keyring.to_json())
    trainer_key = out / "trainer.key"
    write_private_key(keys[Role.TRAINER], trainer_key)
    with Mosquitto(out / "broker") as broker, ArtifactServer(out / "artifacts") as server:
        config = write_publish_config(
            out / "publish.toml", FLEET, [trainer_key], keyring_file, broker.host, broker.port,
            server.root, server.base_url, gate=GATE if gate is None else gate,
        )  # fmt: skip
        serving = ServingOptions(trial_s=5.0, request_timeout_s=600.0)
        device = write_edge_config(out / "device", broker, keyring, serving=serving)
        observer = FleetObserver(broker)
        with running_daemon(device):
            immune_train(
                "publish", export, "--config", config, "--name", "slips/smollm2-135m-slips:q4_k_m",
                "--quant", "q4_k_m", "--arch", HOST_ARCH, "--run-dir", run,
                "--base-model", "SmolLM2-135M-Instruct",
            )  # fmt: skip
            end = observer.wait_terminal(1, timeout=600)[-1]
            if end["state"] != "committed":
                raise SystemExit(f"the daemon did not commit the model: {end}")
            replies = []
            for request in client_requests(data):
                body = {
                    "model": "slips",
                    "messages": request["messages"],
                    "stream": False,
                    "options": {"temperature": 0.2, "num_predict": request["max_tokens"]},
                }
                reply = httpx.post(f"{serving.base_url}/api/chat", json=body, timeout=600)
                answer = reply.json()
                meta = request["meta"]
                if reply.status_code == 200 and meta:
                    text = answer["message"]["content"]
                    kind = meta["request"]
                    context = AnswerContext(meta["source_ip"], answer.get("done_reason") == "stop")
                    answer["contract"] = contract_scores(
                        text, get_profile(meta["profile"]).checks(kind), context
                    )
                replies.append(
                    {"request": meta.get("label", "fixed"), "status": reply.status_code, "reply": answer}
                )
            return {"deployment": end, "replies": replies}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "train-real-out")
    parser.add_argument("--train-records", type=int, default=304)
    parser.add_argument("--max-tokens", type=int, default=768)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument(
        "--records-per-step",
        type=int,
        default=8,
        help="records per optimizer step (gradient accumulation): fewer, more steps for the same compute",
    )
    parser.add_argument("--task-records", type=int, default=30)
    parser.add_argument("--ppl-records", type=int, default=30)
    parser.add_argument(
        "--prompt-profile",
        default="alert-summary-v2",
        help="train on this client's requests with contract answers; 'none': the raw incident "
        "with --answer-part of the teacher's answer (the earlier recipe)",
    )
    parser.add_argument("--reduction-share", type=float, default=0.25, help="of the training records")
    parser.add_argument("--answer-part", default="behavior_analysis")
    parser.add_argument("--imatrix", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--skip-publish", action="store_true")
    parser.add_argument(
        "--lora-targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="the projections LoRA adapts (comma-separated)",
    )
    parser.add_argument("--quants", default="q8_0,q4_k_m", help="the merged files to export and score")
    parser.add_argument(
        "--adapter-base",
        default="q4_k_m",
        help="the type the base is requantized to for the adapter (what devices hold); 'none': no adapter",
    )
    args = parser.parse_args()
    if not SHARED_SLIPS.is_dir():
        raise SystemExit(f"the real Slips datasets are not at {SHARED_SLIPS}")
    from tests.harness.models import smollm2_gguf

    base = smollm2_gguf()
    out: Path = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out / "steps.log"
    cli = [sys.executable, "-m", "trainer.cli"]
    data, run = out / "data", out / "run"
    profiled = args.prompt_profile != "none"
    if profiled:
        data_options = ["--prompt-profile", args.prompt_profile]
    else:
        data_options = ["--answer-parts", f"slips-summary={args.answer_part}"]
    export = run / "gguf"
    steps = [
        measured(
            "prepare",
            [
                *cli,
                "prepare",
                f"slips-summary={SHARED_SLIPS / 'summarization_dataset_v3.json.gz'}",
                *([f"slips-risk={SHARED_SLIPS / 'risk_dataset.json.gz'}"] if profiled else []),
                "--tokenizer",
                str(base),
                "--output",
                str(data),
                "--max-tokens",
                str(args.max_tokens),
                "--eval-fraction",
                "0.1",
                *data_options,
            ],
            log,
        ),
    ]
    used = train_subset(data, args.train_records, args.reduction_share)
    targets = json.dumps(args.lora_targets.split(","))
    (out / "train.toml").write_text(
        TRAIN_TOML.format(
            base=base, max_tokens=args.max_tokens, lr=args.lr, targets=targets, per_step=args.records_per_step
        )
    )
    steps.append(measured("finetune", [*cli, "finetune", "--config", str(out / "train.toml")], log))
    export_command = [*cli, "export", str(run), "--quant", args.quants]
    if args.imatrix:
        export_command.append("--imatrix")
    if args.adapter_base != "none":
        export_command += ["--adapter", "--adapter-base", args.adapter_base]
    steps.append(measured("export", export_command, log))
    threads = str(os.cpu_count() or 2)
    steps.append(
        measured(
            "eval",
            [
                *cli,
                "eval",
                str(export),
                "--data",
                str(data / "eval.jsonl"),
                "--quant",
                args.quants,
                "--ppl-records",
                str(args.ppl_records),
                "--ppl-ctx",
                str(args.max_tokens),
                "--task-records",
                str(args.task_records),
                "--threads",
                threads,
                "--baseline",
                str(base),
                "--baseline-label",
                "base",
            ],
            log,
        ),
    )
    results = {
        "train_records": used,
        "stats": json.loads((data / "stats.json").read_text()),
        "run": json.loads((run / "run.json").read_text()),
        "export": json.loads((export / "export.json").read_text()),
        "eval": json.loads((export / "eval.json").read_text()),
        "steps": [asdict(s) for s in steps],
    }
    write_results(out, results)  # before publishing: a refused challenger keeps its figures
    if not args.skip_publish:
        started = time.monotonic()
        try:
            results["served"] = publish_and_ask(out, export, run, data)
        except AssertionError as refused:  # immune_train's failure, e.g. the gate's refusal
            results["served"] = {"refused": str(refused)[-2000:]}
        results["steps"].append(  # type: ignore[attr-defined]
            asdict(StepResult("publish+serve", time.monotonic() - started, 0.0, "immune-train publish"))
        )
        write_results(out, results)
    print((out / "results.md").read_text())


def write_results(out: Path, results: dict[str, object]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))


def markdown(results: dict[str, object]) -> str:
    """The tables docs/benchmarks.md records."""
    lines = ["| step | wall | peak RSS |", "|---|---|---|"]
    for step in results["steps"]:  # type: ignore[attr-defined]
        rss = f"{step['peak_rss_mb']:.0f} MiB" if step["peak_rss_mb"] else "-"
        lines.append(f"| {step['step']} | {step['wall_s'] / 60:.1f} min | {rss} |")
    evaluation = results["eval"]
    comparison = evaluation["comparison"]  # type: ignore[index]
    lines += [
        "",
        "| metric | base | " + " | ".join(comparison["quants"]) + " |",
        "|---|---|" + "---|" * len(comparison["quants"]),
    ]
    metrics = next(iter(comparison["quants"].values()))
    for metric in metrics:
        cells = []
        for quant_metrics in comparison["quants"].values():
            row = quant_metrics[metric]
            cells.append(
                f"{row['challenger']:.3f} ({row['diff']:+.3f} ± {row['stderr']:.3f}, {row['verdict']})"
            )
        lines.append(f"| {metric} | {metrics[metric]['baseline']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "| file | perplexity | vs F16 | without imatrix |", "|---|---|---|---|"]
    for quant, scores in evaluation["quants"].items():  # type: ignore[index]
        without = scores.get("perplexity_without_imatrix")
        lines.append(
            f"| {quant} | {scores['perplexity']:.3f} | {scores['perplexity_rise_vs_f16']:+.2%} | "
            + (
                f"{without:.3f} ({without / evaluation['quants']['f16']['perplexity'] - 1:+.2%})"
                if without
                else "-"
            )
            + " |"
        )
    if adapter := evaluation.get("adapter"):  # type: ignore[union-attr]
        lines += [
            "",
            f"| metric | merged f16 | adapter on {adapter['base_file']} | diff ± stderr | verdict |",
            "|---|---|---|---|---|",
        ]
        for metric, row in adapter["vs_f16"].items():
            lines.append(
                f"| {metric} | {row['baseline']:.3f} | {row['challenger']:.3f} | "
                f"{row['diff']:+.3f} ± {row['stderr']:.3f} | {row['verdict']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
