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
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
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
        user_defined_symbols=list(CHATML_TOKENS),
        # llama.cpp's SentencePiece tokenizer neither normalizes text nor merges digit runs the way
        # sentencepiece's BPE does; without these, the two disagree on IPs and repeated spaces.
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
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
    # As real instruct models ship it: the ChatML markers listed as special in tokenizer_config.json,
    # which is where llama.cpp's converter looks, so the GGUF marks them as control tokens and
    # llama.cpp parses them out of the text as transformers does.
    # No space prefix, on either side: transformers adds one only at the start of a text, llama.cpp
    # after every special token too, so with one they would disagree after each ChatML marker.
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["added_tokens_decoder"] = {
        str(tokenizer.convert_tokens_to_ids(token)): {"content": token, "special": True}
        for token in CHATML_TOKENS
    }
    config["add_prefix_space"] = False
    config_file.write_text(json.dumps(config))
    tokenizer_file = directory / "tokenizer.json"
    fast = json.loads(tokenizer_file.read_text())
    fast["pre_tokenizer"]["prepend_scheme"] = "never"
    tokenizer_file.write_text(json.dumps(fast))

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
