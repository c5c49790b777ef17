"""Carrying the base model's tokenizer into an exported GGUF.

The merged model Unsloth converts carries a re-saved tokenizer, and llama.cpp's converter can read
it back as something else: a GGUF base's tokenizer, rebuilt by transformers, came back from
SmolLM2's byte-level BPE as a SentencePiece vocabulary with EOS moved (llama.cpp could not load it);
a SentencePiece base re-saved without ``tokenizer.model`` came back with placeholder scores that
merge differently. A LoRA changes no token, so the base's own ``tokenizer.*`` metadata (the base GGUF,
or the base folder converted vocabulary-only) replaces the export's, and the tokenizer-fidelity
check then proves the result."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from shared.reasons import Reason
from trainer.errors import TrainerError

log = logging.getLogger(__name__)

TOKENIZER_PREFIX = "tokenizer."


def _token_count(reader: object) -> int:
    field = reader.fields.get("tokenizer.ggml.tokens")  # type: ignore[attr-defined]
    return len(field.data) if field is not None else 0


def transplant_tokenizer(base: Path, target: Path) -> None:
    """Rewrite ``target`` with every ``tokenizer.*`` key of ``base`` in place of its own (tensors and
    other metadata unchanged). Refused when the vocabularies differ in size."""
    import gguf

    source = gguf.GGUFReader(str(base))
    reader = gguf.GGUFReader(str(target))
    if _token_count(source) != _token_count(reader):
        raise TrainerError(
            Reason.TOKENIZER_MISMATCH,
            f"{target.name} has {_token_count(reader)} tokens, its base {base.name} {_token_count(source)}: "
            "the export is not a fine-tune of that base",
        )
    fields = [f for f in reader.fields.values() if not f.name.startswith(TOKENIZER_PREFIX)]
    fields += [f for f in source.fields.values() if f.name.startswith(TOKENIZER_PREFIX)]
    _rewrite(reader, target, fields, {})
    log.info("%s: tokenizer metadata taken from the base %s", target.name, base.name)


def stamp_string(target: Path, key: str, value: str) -> None:
    """Rewrite ``target`` with the string metadata ``key`` set to ``value`` (all else unchanged)."""
    import gguf

    reader = gguf.GGUFReader(str(target))
    _rewrite(reader, target, [f for f in reader.fields.values() if f.name != key], {key: value})


def _rewrite(reader: Any, target: Path, fields: list[Any], strings: dict[str, str]) -> None:
    """Write ``fields`` (GGUFReader fields, from any file), then ``strings``, and ``reader``'s tensors
    to ``target``, through a staging file so the original is replaced only when complete."""
    import gguf

    staging = target.with_name(target.name + ".partial")
    writer = gguf.GGUFWriter(str(staging), reader.fields["general.architecture"].contents())
    for field in fields:
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for key, value in strings.items():
        writer.add_string(key, value)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    staging.replace(target)  # a reader's mapping of the old file stays valid (Linux keeps its inode)
