"""A tiny Llama with a SentencePiece tokenizer and a ChatML template, built in seconds with no
download: the base model for CPU fine-tuning tests and ``make demo TRAIN=1``.

Sizes follow what converts to GGUF and quantises to real K-quants (hidden and intermediate sizes
are multiples of 256); the vocabulary must hold the 256 byte-fallback pieces plus every character
of the corpus."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB_SIZE = 384
_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "add_bos_token": True,
    "legacy": False,
}


def build_tiny_llama(directory: Path, corpus: Iterable[str], seed: int = 0) -> Path:
    """Write a randomly initialised Llama and a tokenizer trained on ``corpus`` into ``directory``."""
    import sentencepiece as spm
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    model_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for text in corpus for line in text.splitlines() if line.strip()]),
        model_writer=model_proto,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=0.999,  # rare characters fall back to bytes
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        pad_id=3,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        num_threads=1,
        minloglevel=2,
    )
    vocab_file = directory / "tokenizer.model"
    vocab_file.write_bytes(model_proto.getvalue())
    # transformers builds its fast tokenizer from the SentencePiece model named in this config.
    (directory / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(directory)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory
