"""What the Raspberry Pi 5 is, as far as building for it goes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A device platform: its CPU, its Python and how llama.cpp is compiled for it."""

    name: str
    machine: str  # `uname -m` and the wheel platform suffix
    elf_machine: int  # e_machine of its shared libraries (EM_AARCH64 = 183)
    debian_arch: str
    debian_suite: str
    python: tuple[int, int]
    #: -march for llama.cpp's CPU backend. Cortex-A76 has dotprod and fp16 (ARMv8.2-A) but neither i8mm nor
    #: SVE; without +dotprod llama.cpp silently builds none of its repacked ARM kernels, and +i8mm or +sve
    #: would build code the Pi's core faults on.
    llama_arm_arch: str
    cross_prefix: str  # Debian's cross toolchain (g++-aarch64-linux-gnu)

    @property
    def python_tag(self) -> str:
        return f"cp{self.python[0]}{self.python[1]}"

    @property
    def platform_tag(self) -> str:
        return f"linux_{self.machine}"


PI5 = Target(
    name="pi5",
    machine="aarch64",
    elf_machine=183,
    debian_arch="arm64",
    debian_suite="bookworm",  # Raspberry Pi OS 12 is Debian 12 based
    python=(3, 11),
    llama_arm_arch="armv8.2-a+dotprod+fp16",
    cross_prefix="aarch64-linux-gnu",
)
