"""Device targets: which quantization runs fastest on the device a model is published for.

On a Raspberry Pi 5 prompt processing dominates Slips' requests (about 3,000 tokens in, at most 220 out), and
its speed depends less on bits per weight than on whether llama.cpp *repacks* a tensor at load into the
layout its fast ARM kernels (built with dotprod) read: Q4_0, Q8_0 and IQ4_NL are repacked, and in recent
releases Q4_K/Q5_K/Q6_K too; Q4_1, Q5_0 and Q5_1 are not. K-quants also fall back to Q5_0/Q5_1 for tensors
whose rows are not a multiple of 256 wide (SmolLM2-135M: 576; Qwen2.5-0.5B: 896), so a ``q4_k_m`` file of a
small model can hold mostly unrepacked tensors. What a file really holds is read from it (its tensor types),
not assumed from its name.

The cost model is a reasoned estimate, since only a Pi can measure it: prompt time is proportional to the
weights processed, with repacked tensors about ``repack_speedup`` times cheaper (published Pi 5 figures:
1.9x for Q5_K to 2.6x for Q6_K); decode time is proportional to the bytes read per token. Candidates are
ranked by prompt cost, then decode cost."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.manifest import Quantization, TargetCost
from shared.reasons import Reason
from trainer.errors import TrainerError

#: Storage bits per weight of each GGUF tensor type (block scales included).
BITS_PER_WEIGHT: dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K": 5.5, "Q5_0": 5.5,
    "Q5_1": 6.0, "Q4_K": 4.5, "Q4_0": 4.5, "Q4_1": 5.0, "IQ4_NL": 4.5, "Q3_K": 3.4375, "Q2_K": 2.625,
}  # fmt: skip


@dataclass(frozen=True)
class DeviceTarget:
    """A device class and what its llama.cpp build does with each tensor type."""

    name: str
    #: What ``export --target`` writes, and ``publish --target`` chooses among.
    candidates: tuple[Quantization, ...]
    #: Tensor types repacked at load for this CPU's fast kernels.
    repacked: frozenset[str]
    repack_speedup: float


PI5 = DeviceTarget(
    name="pi5",
    candidates=(
        Quantization.Q4_0,
        Quantization.Q4_K_M,
        Quantization.Q5_K_M,
        Quantization.Q6_K,
        Quantization.Q8_0,
    ),
    repacked=frozenset({"Q4_0", "Q8_0", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K"}),
    repack_speedup=2.0,
)
TARGETS = {target.name: target for target in (PI5,)}


def get_target(name: str) -> DeviceTarget:
    """The target called ``name``; TrainerError naming the known ones otherwise."""
    if name not in TARGETS:
        raise TrainerError(Reason.BAD_TARGET, f"unknown device target {name!r} (known: {', '.join(TARGETS)})")
    return TARGETS[name]


def tensor_elements(path: Path) -> dict[str, int]:
    """Weights per tensor type in a GGUF (F32 norms and biases included)."""
    from gguf import GGUFReader

    counts: Counter[str] = Counter()
    for tensor in GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] += int(tensor.n_elements)
    return dict(counts)


def target_cost(elements: Mapping[str, int], target: DeviceTarget) -> TargetCost:
    """The cost model above; F32 tensors (norms, small) count as unrepacked full-width weights."""
    total = sum(elements.values())
    if total == 0:
        raise TrainerError(Reason.EMPTY_GGUF, "the file holds no tensors")
    fast = sum(n for kind, n in elements.items() if kind in target.repacked)
    prompt = (total - fast + fast / target.repack_speedup) / total
    decode = sum(n * BITS_PER_WEIGHT.get(kind, 16.0) for kind, n in elements.items()) / (16.0 * total)
    return TargetCost(prompt=round(prompt, 4), decode=round(decode, 4), repacked=round(fast / total, 4))


def rank_for_target(costs: Mapping[Quantization, TargetCost]) -> list[Quantization]:
    """Fastest first: by prompt cost, then by decode cost."""
    return sorted(costs, key=lambda quant: (costs[quant].prompt, costs[quant].decode))
