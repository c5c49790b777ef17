"""The llama.cpp tree Unsloth's GGUF exporter needs, prepared offline from the llama-cpp-python
source distribution (the same llama.cpp the edge runtime is built from).

Unsloth accepts a folder that looks like a llama.cpp checkout, holds ``convert_hf_to_gguf.py`` with
``gguf-py/`` beside it, and has an executable ``llama-quantize``. The sdist ships all of it except
the binary; we add a small one that quantises through llama-cpp-python's own C API, so nothing is
compiled or downloaded at export time."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from filelock import FileLock

from shared.reasons import Reason
from trainer.errors import TrainerError

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("IMMUNE_TRAIN_CACHE", Path.home() / ".cache" / "immune-train"))
_REQUIRED = ("convert_hf_to_gguf.py", "gguf-py", "src", "ggml", "common")
#: llama.cpp's own binaries the importance-matrix path needs (the Python quantizer cannot take one).
NATIVE_TOOLS = ("llama-imatrix", "llama-quantize")
_QUANTIZE_SCRIPT = '''#!{python}
"""llama-quantize for immune-train: quantise a GGUF through llama-cpp-python's C API.
Usage: llama-quantize [--allow-requantize] INPUT OUTPUT TYPE [NTHREADS]"""
import sys

USAGE = "usage: llama-quantize [--allow-requantize] INPUT OUTPUT TYPE [NTHREADS]"


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    allow = "--allow-requantize" in argv
    args = [a for a in argv if not a.startswith("--")]
    if len(args) < 3:
        print(USAGE, file=sys.stderr)
        return 1
    import ctypes

    import llama_cpp

    source, target, kind = args[0], args[1], args[2].upper()
    ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + kind, None)
    if ftype is None:
        print(f"llama-quantize: unknown type {{kind}}", file=sys.stderr)
        return 1
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = allow
    if len(args) > 3:
        params.nthread = int(args[3])
    status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    if status != 0:
        print(f"llama-quantize: failed with status {{status}}", file=sys.stderr)
        return 1
    print(f"llama-quantize: wrote {{target}} ({{kind}})")
    return 0


sys.exit(main(sys.argv[1:]))
'''


@dataclass(frozen=True)
class Toolchain:
    """A prepared llama.cpp folder and the environment that keeps Unsloth offline."""

    root: Path

    @property
    def quantize(self) -> Path:
        return self.root / "llama-quantize"

    @property
    def build_dir(self) -> Path:
        """Where ``build_native`` puts llama.cpp's own binaries (built on demand, kept)."""
        return self.root / "build-immune"

    def native(self, name: str) -> Path:
        """The path of one of llama.cpp's own tools (``llama-imatrix``, ``llama-quantize``)."""
        return self.build_dir / "bin" / name

    def build_native(self, tools: tuple[str, ...] = NATIVE_TOOLS, jobs: int | None = None) -> None:
        """Compile llama.cpp's own ``tools`` from this tree with cmake, once (a few minutes on 2 cores).

        Built for the common x86-64-v3/armv8 level rather than -march=native, as the edge wheel is:
        some virtual machines advertise AMX and llama.cpp's AMX kernel then faults."""
        with FileLock(f"{self.build_dir}.lock"):  # one build at a time in this tree
            if not all(os.access(self.native(tool), os.X_OK) for tool in tools):
                self._build(tools, jobs)

    def _build(self, tools: tuple[str, ...], jobs: int | None) -> None:
        if shutil.which("cmake") is None:
            raise TrainerError(Reason.TOOLCHAIN, "cmake is not installed (apt-get install cmake)")
        log.info("building %s from %s (once)", ", ".join(tools), self.root)
        configure = [
            "cmake", "-S", str(self.root), "-B", str(self.build_dir), "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF",
        ]  # fmt: skip
        build = ["cmake", "--build", str(self.build_dir), "-j", str(jobs or os.cpu_count() or 2)]
        for tool in tools:
            build += ["--target", tool]
        for command in (configure, build):
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise TrainerError(
                    Reason.TOOLCHAIN, f"{' '.join(command[:3])} failed: {result.stderr.strip()[-400:]}"
                )

    def environment(self) -> dict[str, str]:
        """Variables that point Unsloth at this tree and forbid any download or install."""
        return {
            "UNSLOTH_LLAMA_CPP_PATH": str(self.root),
            "UNSLOTH_AUTO_INSTALL": "0",
            "UNSLOTH_LLAMA_CPP_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }

    def run_script(self, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one of the tree's Python scripts (``convert_hf_to_gguf.py``...) offline, output captured."""
        return subprocess.run(
            [sys.executable, str(self.root / script), *args],
            capture_output=True,
            text=True,
            env={**os.environ, **self.environment()},
            check=False,
        )

    def activate(self) -> None:
        """Apply ``environment()`` to this process (Unsloth reads it at export time)."""
        os.environ.update(self.environment())

    def check(self) -> None:
        """Raise TrainerError naming what is missing from the tree."""
        missing = [name for name in _REQUIRED if not (self.root / name).exists()]
        if missing:
            raise TrainerError(
                Reason.TOOLCHAIN, f"{self.root} is not a usable llama.cpp tree: missing {', '.join(missing)}"
            )
        if not os.access(self.quantize, os.X_OK):
            raise TrainerError(Reason.TOOLCHAIN, f"{self.quantize} is missing or not executable")
        result = subprocess.run(
            [str(self.quantize), "--help"], capture_output=True, text=True, timeout=10, check=False
        )
        if result.returncode != 0:
            raise TrainerError(
                Reason.TOOLCHAIN, f"{self.quantize} --help failed: {result.stderr.strip()[:200]}"
            )


def llama_cpp_python_version() -> str:
    """The installed llama-cpp-python version: the exporter must match the runtime's llama.cpp."""
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError as exc:
        raise TrainerError(
            Reason.TOOLCHAIN, "llama-cpp-python is not installed (pip install 'immune-edge[edge]')"
        ) from exc


def prepare_toolchain(cache_dir: Path = DEFAULT_CACHE, sdist: Path | None = None) -> Toolchain:
    """Return the cached llama.cpp tree for the installed llama-cpp-python, preparing it first if needed.

    ``sdist`` is a llama-cpp-python source archive; without it pip fetches the matching one from the
    package index (or its own cache), which is the only network access and happens once."""
    version = llama_cpp_python_version()
    toolchain = Toolchain(cache_dir / f"llama.cpp-{version}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{toolchain.root}.lock"):  # another run preparing the same tree: wait for it
        if not toolchain.root.is_dir():
            _prepare_tree(toolchain, cache_dir, version, sdist)
    toolchain.check()
    return toolchain


def _prepare_tree(toolchain: Toolchain, cache_dir: Path, version: str, sdist: Path | None) -> None:
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        archive = sdist or _download_sdist(version, Path(scratch))
        staging = Path(scratch) / "tree"
        _extract_vendor_tree(archive, staging)
        script = staging / "llama-quantize"
        script.write_text(_QUANTIZE_SCRIPT.format(python=sys.executable))
        script.chmod(0o755)
        Toolchain(staging).check()
        staging.rename(toolchain.root)  # appears whole or not at all
    log.info("prepared llama.cpp tree %s", toolchain.root)


def _download_sdist(version: str, directory: Path) -> Path:
    log.info("fetching the llama-cpp-python %s source distribution", version)
    result = subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={version}", "-d", str(directory),
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    archives = sorted(directory.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise TrainerError(
            Reason.TOOLCHAIN,
            f"could not fetch the llama-cpp-python {version} sdist: {result.stderr.strip()[-300:]}",
        )
    return archives[0]


def _extract_vendor_tree(archive: Path, target: Path) -> None:
    """Extract only ``*/vendor/llama.cpp/`` from the sdist into ``target``."""
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) > 3 and parts[1:3] == ("vendor", "llama.cpp"):
                member.name = str(Path(*parts[3:]))
                members.append(member)
        if not members:
            raise TrainerError(Reason.TOOLCHAIN, f"{archive} holds no vendor/llama.cpp tree")
        target.mkdir(parents=True)
        tar.extractall(target, members=members, filter="data")
    shutil.rmtree(target / ".git", ignore_errors=True)
