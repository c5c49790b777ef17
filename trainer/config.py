"""``train.toml``: everything a fine-tuning run depends on, validated before any model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.config import load_config

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSettings(_Section):
    r: Annotated[int, Field(ge=1, le=1024)] = 16
    alpha: Annotated[int, Field(ge=1, le=4096)] = 16
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    use_rslora: bool = False
    target_modules: Annotated[list[str], Field(min_length=1)] = DEFAULT_TARGET_MODULES


class TrainingSettings(_Section):
    epochs: Annotated[float, Field(gt=0)] = 3.0
    #: When set, stops after this many optimizer steps (overrides epochs).
    max_steps: Annotated[int, Field(ge=1)] | None = None
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 2e-5
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0, lt=1.0)] = 0.03
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 2
    gradient_accumulation: Annotated[int, Field(ge=1, le=1024)] = 4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    logging_steps: Annotated[int, Field(ge=1)] = 10
    save_steps: Annotated[int, Field(ge=1)] = 100
    save_total_limit: Annotated[int, Field(ge=1)] = 3
    gradient_checkpointing: bool = True


class TrainConfig(_Section):
    """A fine-tuning run: base model, data, LoRA and optimiser settings, and where results go."""

    #: A local model folder, a Hub id already in the local cache (runs never download), or a GGUF
    #: file (dequantized and checked against llama.cpp first; see trainer.base_model).
    base_model: Annotated[str, Field(min_length=1)]
    train_file: Path
    eval_file: Path | None = None
    output_dir: Path
    max_seq_length: Annotated[int, Field(ge=64, le=131072)] = 4096
    #: QLoRA. Ignored on CPU, where merging LoRA into a 4-bit base is not supported.
    load_in_4bit: bool = True
    seed: int = 3407
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()


def load_train_config(path: Path) -> TrainConfig:
    """Read and validate ``train.toml``; relative paths are relative to the file."""
    config = load_config(path, TrainConfig)
    base = path.resolve().parent  # absolute: later stages read run.json from anywhere
    updates: dict[str, object] = {
        "train_file": base / config.train_file,
        "output_dir": base / config.output_dir,
        "eval_file": base / config.eval_file if config.eval_file else None,
    }
    if (base / config.base_model).exists():
        updates["base_model"] = str(base / config.base_model)
    return config.model_copy(update=updates)
