"""Driving ``immune-train`` end to end on the tiny model, as a user would: one CLI call per step.
Shared by the trainer tests and ``make demo TRAIN=1``."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.harness.slips_fixture import corpus_of, write_slips_fixture
from tests.harness.tiny_llama import build_tiny_llama
from trainer.dataset.slips import RISK_INSTRUCTION, SUMMARY_SYSTEM_PROMPT

TINY_TRAIN_TOML = """
base_model = "{base}"
train_file = "data/train.jsonl"
eval_file = "data/eval.jsonl"
output_dir = "run"
max_seq_length = {max_tokens}
load_in_4bit = true   # QLoRA on a GPU; the trainer falls back to 16-bit on CPU
seed = 11

[lora]
r = 8
alpha = 16

[training]
max_steps = {steps}
learning_rate = {lr}
warmup_ratio = 0.0
batch_size = 2
gradient_accumulation = 1
logging_steps = 1
save_steps = {save_steps}
gradient_checkpointing = false
"""


def immune_train(
    *args: str | Path, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``immune-train`` in a child process (as installed in this venv); output is captured."""
    result = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"immune-train {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
        )
    return result


@dataclass(frozen=True)
class TinyRun:
    """Where each step of a tiny training run left its results."""

    root: Path
    summary_data: Path
    risk_data: Path
    base: Path
    max_tokens: int = 1024

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def gguf_dir(self) -> Path:
        return self.run_dir / "gguf"

    @property
    def config(self) -> Path:
        return self.root / "train.toml"

    def write_config(self, steps: int, save_steps: int, lr: float = 1e-2) -> Path:
        self.config.write_text(
            TINY_TRAIN_TOML.format(
                base=self.base, max_tokens=self.max_tokens, steps=steps, save_steps=save_steps, lr=lr
            )
        )
        return self.config


def tiny_run(root: Path, slips: tuple[Path, Path] | None = None, incidents: int = 24) -> TinyRun:
    """Slips-format data (a fixture unless given) and a tiny Llama whose tokenizer was trained on it."""
    summary, risk = slips or write_slips_fixture(root / "slips", incidents=incidents)
    corpus = [SUMMARY_SYSTEM_PROMPT, RISK_INSTRUCTION, *corpus_of(summary, risk)[:400]]
    base = build_tiny_llama(root / "base", corpus)
    return TinyRun(root, summary, risk, base)


PUBLISH_TOML = """
fleet = "{fleet}"
trainer_keys = [{keys}]
keyring_file = "{keyring}"

[mqtt]
host = "{host}"
port = {port}

[store]
directory = "{store}"
base_url = "{base_url}"
"""


def write_publish_config(
    path: Path,
    fleet: str,
    keys: list[Path],
    keyring: Path,
    host: str,
    port: int,
    store: Path,
    base_url: str,
    gate: dict[str, float] | None = None,
    extra: str = "",
) -> Path:
    """A ``publish.toml`` for a loopback broker and a directory artifact store (and a champion/
    challenger gate with these margins, and ``extra`` sections)."""
    quoted = ", ".join(f'"{key}"' for key in keys)
    text = PUBLISH_TOML.format(
        fleet=fleet, keys=quoted, keyring=keyring, host=host, port=port, store=store, base_url=base_url
    )
    if gate:
        text += "\n[gate]\nmargins = { " + ", ".join(f"{k} = {v}" for k, v in gate.items()) + " }\n"
    path.write_text(text + extra)
    return path


def train_tiny(run: TinyRun, steps: int = 60, quants: str = "q8_0,q4_k_m") -> None:
    """prepare -> finetune -> export -> eval, each through the CLI."""
    immune_train(
        "prepare", f"slips-summary={run.summary_data}", f"slips-risk={run.risk_data}",
        "--tokenizer", run.base, "--output", run.data,
        "--max-tokens", run.max_tokens, "--eval-fraction", "0.25",
    )  # fmt: skip
    immune_train("finetune", "--config", run.write_config(steps=steps, save_steps=max(1, steps // 2)))
    immune_train("export", run.run_dir, "--quant", quants)
    immune_train(
        "eval", run.gguf_dir, "--data", run.data / "eval.jsonl", "--quant", quants,
        "--max-ppl-rise", "0.5", "--ppl-records", "8", "--ppl-ctx", str(run.max_tokens),
        "--task-records", "4", "--threads", "1",
    )  # fmt: skip
