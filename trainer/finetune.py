"""``immune-train finetune``: LoRA/QLoRA supervised fine-tuning with Unsloth and TRL.

The loss covers the assistant's answer only (TRL's prompt/completion format), rendered with the base
model's own chat template. Everything needed to reproduce the run is written to ``run.json``."""

from __future__ import annotations

import json
import logging
import platform
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from shared.reasons import Reason
from trainer.base_model import describe, resolve_base
from trainer.config import TrainConfig
from trainer.dataset.captured import refuse_captured_answers
from trainer.dataset.records import ChatRecord, file_sha256, read_records
from trainer.errors import TrainerError
from trainer.layout import RunLayout
from trainer.records import RunRecord

log = logging.getLogger(__name__)

_VERSIONED = (
    "immune-edge",
    "unsloth",
    "unsloth_zoo",
    "torch",
    "transformers",
    "trl",
    "peft",
    "llama-cpp-python",
)


@dataclass(frozen=True)
class FinetuneResult:
    adapter_dir: Path
    run_file: Path
    metrics: dict[str, float]


def package_versions() -> dict[str, str]:
    """Versions of everything that shapes the result, for the run record."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def to_prompt_completion(records: list[ChatRecord]) -> list[dict[str, Any]]:
    """TRL's conversational prompt/completion rows: loss is computed on the completion only."""
    return [{"prompt": record.prompt, "completion": [record.messages[-1].model_dump()]} for record in records]


def _load_split(path: Path | None, what: str) -> list[ChatRecord]:
    if path is None:
        return []
    records = list(read_records(path))
    if not records and what == "train":
        raise TrainerError(Reason.EMPTY_DATASET, f"{path}: the training set is empty")
    refuse_captured_answers(records, path)
    return records


def _has_checkpoint(directory: Path) -> bool:
    return any(directory.glob("checkpoint-*")) if directory.is_dir() else False


def keep_sentencepiece_model(base_dir: Path, adapter_dir: Path) -> None:
    """Copy the base's ``tokenizer.model`` beside the adapter when saving the (fast) tokenizer did not:
    the export finds the tokenizer there, and without it llama.cpp's converter rebuilds a SentencePiece
    vocabulary from tokenizer.json with placeholder scores, which merges tokens differently."""
    source, target = base_dir / "tokenizer.model", adapter_dir / "tokenizer.model"
    if source.is_file() and not target.exists():
        shutil.copyfile(source, target)


def finetune(config: TrainConfig, resume: bool = False) -> FinetuneResult:
    """Train a LoRA adapter on ``config.train_file``; with ``resume``, continue from the newest checkpoint."""
    train_records = _load_split(config.train_file, "train")
    eval_records = _load_split(config.eval_file, "eval")
    layout = RunLayout(config.output_dir)
    if resume and not _has_checkpoint(layout.checkpoints_dir):
        raise TrainerError(Reason.NO_CHECKPOINT, f"{layout.checkpoints_dir}: no checkpoint to resume from")

    import torch  # heavy imports only once the inputs are known to be good
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # Unsloth patches trl and transformers as it loads; imported here, after trl's classes are bound and
    # before the base is resolved: the order every recorded run used.
    from unsloth import FastLanguageModel

    samples = [[*r.prompt, r.messages[-1].model_dump()] for r in (eval_records or train_records)[:64]]
    base = resolve_base(config.base_model, samples)
    on_gpu = torch.cuda.is_available()
    load_in_4bit = config.load_in_4bit and on_gpu
    if config.load_in_4bit and not on_gpu:
        log.warning("no GPU: training in 16-bit instead of QLoRA (4-bit merge is not supported on CPU)")
    model, tokenizer = _lora_model(FastLanguageModel, config, base.load_path, load_in_4bit)
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(to_prompt_completion(train_records)),
        eval_dataset=Dataset.from_list(to_prompt_completion(eval_records)) if eval_records else None,
        args=SFTConfig(**_sft_arguments(config, layout.checkpoints_dir, bool(eval_records), on_gpu)),
    )
    # The held-out loss before the first step, so the run record shows what training changed.
    before = float(trainer.evaluate()["eval_loss"]) if eval_records and not resume else None
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    metrics = {key: float(value) for key, value in result.metrics.items() if isinstance(value, int | float)}
    if before is not None:
        metrics["eval_loss_before"] = before
    if eval_records:
        metrics.update({key: float(v) for key, v in trainer.evaluate().items() if isinstance(v, int | float)})

    adapter_dir = layout.adapter_dir
    model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    keep_sentencepiece_model(Path(base.load_path), adapter_dir)
    data_files = [config.train_file] + ([config.eval_file] if config.eval_file else [])
    run = RunRecord(
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        config=json.loads(config.model_dump_json()),
        seed=config.seed,
        data_sha256=file_sha256(*data_files),
        records={"train": len(train_records), "eval": len(eval_records)},
        device=torch.cuda.get_device_name(0) if on_gpu else f"cpu ({platform.machine()})",
        load_in_4bit=load_in_4bit,
        versions=package_versions(),
        metrics=metrics,
        resumed=resume,
        base=describe(base),
    )
    run.write(layout.run_file)
    log.info("adapter saved to %s (train loss %.4f)", adapter_dir, metrics.get("train_loss", float("nan")))
    return FinetuneResult(adapter_dir, layout.run_file, metrics)


def _lora_model(loader: Any, config: TrainConfig, load_path: str, load_in_4bit: bool) -> tuple[Any, Any]:
    """The base model loaded by ``loader`` (Unsloth's FastLanguageModel) with the configured LoRA layers
    added, and its tokenizer (which must carry a chat template: the training rows are rendered with it)."""
    try:
        model, tokenizer = loader.from_pretrained(
            model_name=load_path,
            max_seq_length=config.max_seq_length,
            load_in_4bit=load_in_4bit,
            dtype=None,
            local_files_only=True,
        )
    except (OSError, ValueError) as exc:
        raise TrainerError(
            Reason.BAD_BASE_MODEL, f"cannot load base model {config.base_model}: {exc}"
        ) from exc
    if not getattr(tokenizer, "chat_template", None):
        raise TrainerError(
            Reason.MISSING_CHAT_TEMPLATE, f"{config.base_model}: the tokenizer has no chat template"
        )
    lora = config.lora
    model = loader.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_gradient_checkpointing="unsloth" if config.training.gradient_checkpointing else False,
        random_state=config.seed,
    )
    return model, tokenizer


def _sft_arguments(config: TrainConfig, checkpoints: Path, evaluating: bool, on_gpu: bool) -> dict[str, Any]:
    """TRL's SFTConfig arguments for the run: the loss on the completion only, checkpoints in
    ``checkpoints``."""
    training = config.training
    return dict(
        output_dir=str(checkpoints),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_ratio,  # a float below 1 is a ratio of all steps
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation,
        weight_decay=training.weight_decay,
        logging_steps=training.logging_steps,
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=training.save_steps if evaluating else None,
        seed=config.seed,
        data_seed=config.seed,
        max_length=config.max_seq_length,
        completion_only_loss=True,
        report_to="none",
        use_cpu=not on_gpu,
        dataset_num_proc=1,
        disable_tqdm=False,
    )
