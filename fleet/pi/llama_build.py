"""llama-cpp-python cross-compiled on x86_64 for the Pi 5 with Debian's aarch64 toolchain.

PyPI has only llama-cpp-python's source, so without this every Pi compiles llama.cpp itself (a compiler and
cmake on each device, many minutes per upgrade). The cross compiler runs at native speed; compiling under
emulation would be many times slower. The wheel is cached under ~/.cache/immune-edge/wheels by version and
build flags, so it is built once per release."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fleet.pi.root import EmulationError, cache_dir
from fleet.pi.target import PI5, Target

log = logging.getLogger(__name__)

LLAMA_DIST = "llama-cpp-python"
#: The release pinned by the `edge` extra in pyproject.toml.
LLAMA_VERSION = "0.3.36"

_TOOLCHAIN = """\
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR {machine})
set(CMAKE_C_COMPILER {prefix}-gcc)
set(CMAKE_CXX_COMPILER {prefix}-g++)
set(CMAKE_FIND_ROOT_PATH /usr/{prefix})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
"""


def cmake_args(target: Target) -> list[str]:
    """The CMake flags of a device build of llama.cpp (the cross toolchain file comes on top).

    GGML_NATIVE=OFF: the build machine's CPU says nothing about the Pi's. GGML_CPU_ARM_ARCH: see
    Target.llama_arm_arch (dotprod and fp16 on, i8mm and SVE off). GGML_OPENMP=OFF: ggml's own thread
    pool instead of libgomp, which Raspberry Pi OS Lite does not ship and the wheel would not bundle.
    """
    return [
        "-DGGML_NATIVE=OFF",
        f"-DGGML_CPU_ARM_ARCH={target.llama_arm_arch}",
        "-DGGML_OPENMP=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
    ]


def _flags_key(target: Target) -> str:
    return hashlib.sha256(" ".join(cmake_args(target)).encode()).hexdigest()[:10]


def cached_wheel_dir(target: Target = PI5, version: str = LLAMA_VERSION, cache: Path | None = None) -> Path:
    return (
        (cache or cache_dir()) / "wheels" / f"llama-cpp-python-{version}-{target.name}-{_flags_key(target)}"
    )


def _require_cross_compiler(target: Target) -> None:
    missing = [
        t
        for t in (f"{target.cross_prefix}-gcc", f"{target.cross_prefix}-g++", "cmake")
        if not shutil.which(t)
    ]
    if missing:
        raise EmulationError(
            f"missing {', '.join(missing)}: apt-get install "
            f"gcc-{target.cross_prefix} g++-{target.cross_prefix} cmake"
        )


def build_llama_wheel(target: Target = PI5, version: str = LLAMA_VERSION, cache: Path | None = None) -> Path:
    """The cached device wheel of llama-cpp-python, cross-compiled on first use (15-20 minutes on 2 cores)."""
    done = cached_wheel_dir(target, version, cache)
    found = sorted(done.glob("llama_cpp_python-*.whl"))
    if found:
        return found[0]
    _require_cross_compiler(target)
    with tempfile.TemporaryDirectory(prefix="llama-cross-") as scratch:
        work = Path(scratch)
        toolchain = work / "toolchain.cmake"
        toolchain.write_text(_TOOLCHAIN.format(machine=target.machine, prefix=target.cross_prefix))
        log.info("cross-compiling %s %s for %s (%s): 15-20 minutes on 2 cores, once", LLAMA_DIST, version,
                 target.name, target.llama_arm_arch)  # fmt: skip
        flags = [f"-DCMAKE_TOOLCHAIN_FILE={toolchain}", *cmake_args(target)]
        env = {**os.environ, "CMAKE_ARGS": " ".join(flags)}
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary", LLAMA_DIST,
             "-w", str(work / "out"), f"{LLAMA_DIST}=={version}"],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise EmulationError(
                f"cross-compiling {LLAMA_DIST} failed: {(result.stdout + result.stderr)[-3000:]}"
            )
        (built,) = (work / "out").glob("*.whl")
        # pip names the wheel after the machine it ran on; its libraries are the target's.
        retag = subprocess.run(
            [sys.executable, "-m", "wheel", "tags", "--platform-tag", target.platform_tag, "--remove",
             str(built)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if retag.returncode != 0:
            raise EmulationError(f"retagging {built.name} failed: {retag.stderr[-2000:]}")
        (tagged,) = (work / "out").glob("*.whl")
        done.mkdir(parents=True, exist_ok=True)
        final = done / tagged.name
        shutil.copyfile(tagged, final.with_suffix(".part"))
        final.with_suffix(".part").rename(final)
    return final
