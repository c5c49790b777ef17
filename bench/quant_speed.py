"""Prompt and decode speed of each quantization of the real SmolLM2-135M, next to the Pi 5 cost model.

The bundled Q4_1 GGUF is dequantized to F16 once, then quantized by llama.cpp to every Pi 5 candidate plus
two types the Pi does not repack (Q4_1, Q5_0). Each file is loaded with llama-cpp-python and timed on one
Slips-sized prompt batch (``--prompt-tokens``) and on single-token decodes (``--decode-tokens``), median of
``--rounds``. Printed: tokens/s and the ratio to Q8_0 measured in the same run, and the cost model's
predicted prompt/decode cost for the Pi 5 (trainer.targets), from the tensor types each file really holds.
This machine is x86_64: llama.cpp repacks Q4_0 (and IQ4_NL) for AVX2 here too, so the prompt ranking is
comparable in kind, not in size; the Pi's own figures need a Pi.
Run: .venv/bin/python -m bench.quant_speed
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.manifest import Quantization
from tests.harness.models import smollm2_gguf
from trainer.quantize import quantize
from trainer.targets import PI5, target_cost, tensor_elements

REFERENCE = Quantization.Q8_0
UNREPACKED = (Quantization.Q4_1, Quantization.Q5_0)


def _speeds(
    path: Path, prompt_tokens: int, decode_tokens: int, rounds: int, threads: int
) -> tuple[float, float]:
    from llama_cpp import Llama

    llm: Any = Llama(model_path=str(path), n_ctx=prompt_tokens + decode_tokens + 8, n_batch=prompt_tokens,
                     n_threads=threads, n_threads_batch=threads, verbose=False)  # fmt: skip
    text = b"Slips flagged 10.0.0.5: horizontal port scan to 443/TCP on 120 hosts, threat level high. " * 64
    tokens = llm.tokenize(text)[:prompt_tokens]
    prompt, decode = [], []
    for _ in range(rounds):
        llm.reset()
        started = time.perf_counter()
        llm.eval(tokens)
        prompt.append(len(tokens) / (time.perf_counter() - started))
        started = time.perf_counter()
        for token in tokens[:decode_tokens]:
            llm.eval([token])
        decode.append(decode_tokens / (time.perf_counter() - started))
    llm.close()
    return statistics.median(prompt), statistics.median(decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    quants = [*PI5.candidates, *UNREPACKED]
    with tempfile.TemporaryDirectory(prefix="quant-speed-") as scratch:
        folder = Path(scratch)
        f16 = quantize(smollm2_gguf(), folder / "smollm2.f16.gguf", Quantization.F16, requantize=True)
        rows = {}
        for quant in quants:
            path = quantize(f16, folder / f"smollm2.{quant.value}.gguf", quant)
            cost = target_cost(tensor_elements(path), PI5)
            speeds = _speeds(path, args.prompt_tokens, args.decode_tokens, args.rounds, args.threads)
            rows[quant] = (path.stat().st_size, cost, *speeds)
    base_prompt, base_decode = rows[REFERENCE][2], rows[REFERENCE][3]
    print(f"SmolLM2-135M, {args.prompt_tokens}-token prompt, {args.decode_tokens} decodes, "
          f"{args.threads} threads, median of {args.rounds}; ratios vs {REFERENCE.value}")  # fmt: skip
    header = (
        "type",
        "MiB",
        "prompt tok/s",
        "x q8_0",
        "decode tok/s",
        "x q8_0",
        "pi5 repacked",
        "pi5 prompt",
        "pi5 decode",
    )
    print(" | ".join(header))
    for quant, (size, cost, prompt, decode) in rows.items():
        print(" | ".join((quant.value, f"{size / 2**20:.1f}", f"{prompt:.0f}", f"{prompt / base_prompt:.2f}",
                          f"{decode:.0f}", f"{decode / base_decode:.2f}", f"{cost.repacked:.2f}",
                          f"{cost.prompt:.2f}", f"{cost.decode:.2f}")))  # fmt: skip


if __name__ == "__main__":
    main()
