"""Where a fine-tune's base model comes from: a local Hugging Face folder, a Hub id already in the
local cache, or a GGUF file.

A GGUF base is dequantized by transformers into an HF folder once (cached under the file's sha256),
with its tokenizer and chat template. Nothing trains on it before two checks pass:
- the tokenizer transformers rebuilt from the GGUF must split text into the same ids as llama.cpp
  does (for Gemma-3 it does not: its rebuilt tokenizer cuts words into pieces and drops BOS, which is
  why the model "degenerates" in transformers although its weights convert correctly);
- the converted model's perplexity on sample conversations must match llama-cpp-python's on the
  source GGUF, over the very same token ids (the weights)."""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import BaseModel, ConfigDict

from shared.artifacts import sha256_file
from shared.errors import ArtifactError
from shared.gguf import read_gguf_header
from shared.reasons import Reason
from trainer.errors import TrainerError
from trainer.nll import llama_nll, token_nll
from trainer.tokenizer_fidelity import FidelityReport, compare_tokenizers, gguf_reference, hf_reference
from trainer.toolchain import DEFAULT_CACHE

log = logging.getLogger(__name__)

#: GGUF architectures whose conversion back to transformers has been checked against llama.cpp.
#: Others may load in transformers but have not been shown to give the same model.
CONVERTIBLE_ARCHITECTURES = frozenset({"llama", "qwen2", "gemma3"})

#: Largest relative perplexity gap between the converted model and llama-cpp-python on the GGUF.
#: Dequantized weights in float32 against llama.cpp's quantized kernels differ by a few percent at
#: most; a wrong conversion is off by orders of magnitude.
PARITY_TOLERANCE = 0.10
PARITY_TOKENS = 384
PARITY_SAMPLES = 4
#: Part of the cache key: a fix to the conversion makes older converted copies unused.
CONVERSION_VERSION = 3
_RECORD = "immune-base.json"


class ParityCheck(BaseModel):
    """The converted model against llama-cpp-python on the same GGUF and the same tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    perplexity_converted: float
    perplexity_llama_cpp: float
    samples: int
    tokens: int

    @property
    def gap(self) -> float:
        return self.perplexity_converted / self.perplexity_llama_cpp - 1.0


class ConvertedBase(BaseModel):
    """``immune-base.json`` in a converted folder: where it came from and how it was checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    sha256: str
    architecture: str
    tokenizer: FidelityReport
    parity: ParityCheck


@dataclass(frozen=True)
class BaseSource:
    """A resolved base model: what transformers/Unsloth load, and the GGUF it came from (if any)."""

    spec: str
    load_path: str
    gguf: Path | None = None
    converted: ConvertedBase | None = None


def is_gguf(spec: str) -> bool:
    return spec.lower().endswith(".gguf")


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF; TrainerError when the file is missing or not a GGUF."""
    if not path.is_file():
        raise TrainerError(Reason.MISSING_BASE_MODEL, f"{path}: no such GGUF file")
    try:
        return read_gguf_header(path, allowed_architectures=None).architecture
    except ArtifactError as exc:
        raise TrainerError(Reason.BAD_BASE_MODEL, f"{path}: {exc}") from exc


def check_convertible(path: Path) -> str:
    """The architecture of ``path``, or TrainerError when its conversion back is not supported."""
    architecture = gguf_architecture(path)
    if architecture not in CONVERTIBLE_ARCHITECTURES:
        raise TrainerError(
            Reason.UNSUPPORTED_ARCHITECTURE,
            f"{path.name}: architecture {architecture!r} cannot be trained from a GGUF here "
            f"(supported: {', '.join(sorted(CONVERTIBLE_ARCHITECTURES))}); use its Hugging Face folder",
        )
    return architecture


@functools.lru_cache(maxsize=4)
def _rebuilt_tokenizer(path: Path, size: int, mtime_ns: int) -> Any:
    """transformers' rebuild of a GGUF's tokenizer, once per file version in a process: it walks the
    whole vocabulary in Python (about a minute for Gemma-3's 262k tokens)."""
    from transformers import AutoTokenizer

    del size, mtime_ns  # part of the cache key only: a file replaced in place is read again
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as exc:
        raise TrainerError(Reason.BAD_TOKENIZER, f"cannot read the tokenizer of {path}: {exc}") from exc


def load_gguf_tokenizer(path: Path) -> Any:
    """The tokenizer (with its chat template) stored in a GGUF, rebuilt by transformers and checked
    against llama.cpp's on fixed probes (check_rebuilt_tokenizer)."""
    check_convertible(path)
    stat = path.stat()
    # A copy: callers change the tokenizer (special tokens, pre-tokenizer below), the cache keeps it as read.
    tokenizer = copy.deepcopy(_rebuilt_tokenizer(path.resolve(), stat.st_size, stat.st_mtime_ns))
    # transformers does not carry the file's special tokens over (SmolLM2's EOS came back as
    # <|im_start|>): take them from the GGUF, where llama.cpp reads them.
    metadata = tokenizer_metadata(path)
    for role, token_id in metadata.special_ids.items():
        setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    # Nor the pre-tokenizer that llama.cpp's pre-type implies (SmolLM2 splits digits one by one;
    # without it, "  449" tokenizes differently in 138 of 200 real Slips prompts).
    pre_tokenizer = _PRE_TOKENIZERS.get(metadata.pre or "")
    if pre_tokenizer is not None:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizer()
    check_rebuilt_tokenizer(path, tokenizer, ())
    return tokenizer


def _digits_then_byte_level() -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


#: ``tokenizer.ggml.pre`` -> the transformers pre-tokenizer it stands for, where transformers' GGUF
#: loader leaves it out. Every other pre-type must pass the comparison with llama.cpp as rebuilt.
_PRE_TOKENIZERS = {"smollm": _digits_then_byte_level}


@dataclass(frozen=True)
class TokenizerMetadata:
    """What llama.cpp reads from a GGUF that transformers' rebuilt tokenizer may lack."""

    special_ids: dict[str, int]
    pre: str | None


def tokenizer_metadata(path: Path) -> TokenizerMetadata:
    """Special token ids (``bos``/``eos``/``pad``) and the pre-tokenizer type a GGUF declares."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    found: dict[str, int] = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            found[role] = int(field.contents())
    pre = fields.get("tokenizer.ggml.pre")
    return TokenizerMetadata(found, str(pre.contents()) if pre is not None else None)


def check_rebuilt_tokenizer(path: Path, tokenizer: Any, samples: Sequence[str]) -> FidelityReport:
    """``tokenizer`` (rebuilt from ``path``) must split ``samples`` and the probes exactly as
    llama.cpp splits them with the same file; TrainerError('tokenizer-mismatch') otherwise."""
    reference = gguf_reference(path)
    try:
        return compare_tokenizers(
            hf_reference(tokenizer, f"rebuilt by transformers from {path.name}"), reference, samples
        )
    except TrainerError as exc:
        raise TrainerError(
            exc.reason,
            f"{path.name} cannot be trained from its GGUF: transformers rebuilds a tokenizer that "
            f"differs from llama.cpp's for this file, so training would see other tokens than the "
            f"device serves ({exc}); use the model's Hugging Face folder instead",
        ) from None
    finally:
        reference.close()


def resolve_base(
    spec: str, samples: Sequence[list[dict[str, str]]], cache_dir: Path | None = None
) -> BaseSource:
    """``spec`` as something Unsloth can load. A GGUF is converted (once), its rebuilt tokenizer
    compared with llama.cpp's on all ``samples`` (conversations, rendered with the model's own chat
    template) and its perplexity on the first few."""
    if not is_gguf(spec):
        return BaseSource(spec=spec, load_path=spec)
    path = Path(spec).expanduser().resolve()
    architecture = check_convertible(path)
    _, digest = sha256_file(path)
    target = (cache_dir or DEFAULT_CACHE / "bases") / f"{digest[:24]}-v{CONVERSION_VERSION}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):  # two runs converting the same base: the second waits and reuses
        return _converted(spec, path, architecture, digest, target, samples)


def _converted(
    spec: str,
    path: Path,
    architecture: str,
    digest: str,
    target: Path,
    samples: Sequence[list[dict[str, str]]],
) -> BaseSource:
    """The converted copy of ``path`` in ``target``, made first when it is not there."""
    record_file = target / _RECORD
    if record_file.is_file():
        converted = ConvertedBase.model_validate_json(record_file.read_bytes())
        log.info("base %s: using the converted copy in %s", path.name, target)
        return BaseSource(spec=spec, load_path=str(target), gguf=path, converted=converted)
    if not samples:
        raise TrainerError(Reason.EMPTY_DATASET, "no sample conversations to check the converted base with")
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        staging = Path(scratch) / "model"
        converted = _convert(path, architecture, samples, staging)
        converted = converted.model_copy(update={"sha256": digest})
        (staging / _RECORD).write_text(converted.model_dump_json(indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # whole or not at all
    log.info(
        "base %s converted to %s (perplexity %.3f vs llama.cpp %.3f)",
        path.name, target, converted.parity.perplexity_converted, converted.parity.perplexity_llama_cpp,
    )  # fmt: skip
    return BaseSource(spec=spec, load_path=str(target), gguf=path, converted=converted)


def _convert(
    path: Path, architecture: str, samples: Sequence[list[dict[str, str]]], target: Path
) -> ConvertedBase:
    """Tokenizer check, dequantization, special tokens, parity check; save into ``target``."""
    tokenizer = load_gguf_tokenizer(path)
    texts = [tokenizer.apply_chat_template(list(c), tokenize=False) for c in samples]
    fidelity = check_rebuilt_tokenizer(path, tokenizer, texts)
    model = _dequantize(path)
    for role, token_id in tokenizer_metadata(path).special_ids.items():
        setattr(model.config, f"{role}_token_id", token_id)
        if model.generation_config is not None:
            setattr(model.generation_config, f"{role}_token_id", token_id)
    parity = parity_check(model, path, texts[:PARITY_SAMPLES])
    require_parity(parity, path, architecture)
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return ConvertedBase(
        source=str(path), sha256="", architecture=architecture, tokenizer=fidelity, parity=parity
    )


def require_parity(parity: ParityCheck, path: Path, architecture: str) -> None:
    """TrainerError('broken-conversion') when the converted weights do not behave like the GGUF's."""
    if abs(math.log1p(parity.gap)) > math.log1p(PARITY_TOLERANCE):
        raise TrainerError(
            Reason.BROKEN_CONVERSION,
            f"{path.name} ({architecture}): converted to transformers, the model's perplexity is "
            f"{parity.perplexity_converted:.3g} where llama-cpp-python gets "
            f"{parity.perplexity_llama_cpp:.3g} on the same {parity.tokens} tokens "
            f"({parity.gap:+.0%}); refusing to train on weights that differ from the GGUF",
        )


def _dequantize(path: Path) -> Any:
    """The GGUF's weights as a float32 transformers model."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise TrainerError(Reason.BAD_BASE_MODEL, f"transformers cannot load {path.name}: {exc}") from exc
    # The weights are plain float32 tensors now; without this, transformers refuses to save the model
    # ("quantized with GGUF and not serializable") and later loaders would look for a GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval()


def parity_check(model: Any, gguf: Path, texts: Sequence[str]) -> ParityCheck:
    """Perplexity of the transformers ``model`` and of llama-cpp-python on ``gguf`` over the same
    token ids (tokenized by llama.cpp, cut to PARITY_TOKENS)."""
    import torch
    from llama_cpp import Llama

    llama = Llama(model_path=str(gguf), n_ctx=PARITY_TOKENS, logits_all=True, verbose=False)
    nll_converted = nll_llama = 0.0
    tokens_seen = 0
    try:
        for text in texts:
            tokens = llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)[:PARITY_TOKENS]
            if len(tokens) < 2:
                continue
            nll_llama += float(llama_nll(llama, tokens).sum())
            with torch.no_grad():
                logits = model(torch.tensor([tokens])).logits[0, :-1].float().numpy()
            nll_converted += float(token_nll(logits, tokens[1:]).sum())
            tokens_seen += len(tokens) - 1
    finally:
        llama.close()
    if tokens_seen == 0:
        raise TrainerError(
            Reason.EMPTY_DATASET, "the sample conversations gave no tokens to check the base on"
        )
    return ParityCheck(
        perplexity_converted=math.exp(nll_converted / tokens_seen),
        perplexity_llama_cpp=math.exp(nll_llama / tokens_seen),
        samples=len(texts),
        tokens=tokens_seen,
    )


def describe(source: BaseSource) -> dict[str, Any]:
    """What run.json records about the base."""
    if source.converted is None:
        return {"spec": source.spec}
    return {
        "spec": source.spec,
        "converted_to": source.load_path,
        **json.loads(source.converted.model_dump_json()),
    }


def load_tokenizer(name_or_path: str) -> Any:
    """The base model's tokenizer, from a GGUF file, a local folder or the local Hugging Face cache
    (never downloaded)."""
    from transformers import AutoTokenizer

    if is_gguf(name_or_path):
        return load_gguf_tokenizer(Path(name_or_path))
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TrainerError(
            Reason.BAD_TOKENIZER, f"cannot load a tokenizer from {name_or_path}: {exc}"
        ) from exc
