"""The Pi wheelhouse check on small wheelhouses made here: what passes, and every way one is refused (a
missing wheel, a wheel for another machine or Python, x86_64 libraries under an aarch64 tag, a changed byte,
an unlisted wheel, edited pins, a device that is not the target). The real wheelhouse is built and installed
in tests/test_arm64.py."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fleet.pi.index import INDEX_FILE, REQUIREMENTS_FILE, WheelhouseIndex, wheel_entries, write_index
from fleet.pi.target import PI5
from fleet.pi.wheelcheck import check_wheelhouse

EM_AARCH64, EM_X86_64 = 183, 62


def _elf(machine: int) -> bytes:
    # ELF64, little endian, e_type ET_DYN, then e_machine at offset 18.
    return (
        b"\x7fELF\x02\x01\x01"
        + bytes(9)
        + (3).to_bytes(2, "little")
        + machine.to_bytes(2, "little")
        + bytes(44)
    )


def _wheel(folder: Path, name: str, version: str, tag: str, requires: tuple[str, ...] = (),
           library: int | None = None) -> Path:  # fmt: skip
    path = folder / f"{name}-{version}-{tag}.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata)
        archive.writestr(f"{name}/__init__.py", "")
        if library is not None:
            archive.writestr(f"{name}/lib/lib{name}.so", _elf(library))
    return path


def _index(folder: Path, requirement: str = "immune-edge[edge]==0.1.0") -> WheelhouseIndex:
    index = WheelhouseIndex(target="pi5", machine="aarch64", python="3.11", requirement=requirement,
                            llama_cmake_args=[], wheels=wheel_entries(folder))  # fmt: skip
    write_index(folder, index)
    return index


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    """immune-edge[edge] -> llama-cpp-python (aarch64 library) -> numpy (manylinux aarch64, cp311)."""
    _wheel(tmp_path, "immune_edge", "0.1.0", "py3-none-any",
           ("pydantic>=2", 'llama-cpp-python==0.3.36; extra == "edge"', 'pywin32; sys_platform == "win32"',
            'x86only; platform_machine == "x86_64"'))  # fmt: skip
    _wheel(tmp_path, "pydantic", "2.9.0", "py3-none-any")
    _wheel(tmp_path, "llama_cpp_python", "0.3.36", "py3-none-linux_aarch64", ("numpy>=1.20",), EM_AARCH64)
    _wheel(tmp_path, "numpy", "2.1.0", "cp311-cp311-manylinux_2_17_aarch64.manylinux2014_aarch64",
           library=EM_AARCH64)  # fmt: skip
    _index(tmp_path)
    return tmp_path


def test_a_complete_aarch64_wheelhouse_passes(wheelhouse: Path) -> None:
    assert check_wheelhouse(wheelhouse, PI5, machine="aarch64", python=(3, 11)) == []
    requirements = (wheelhouse / REQUIREMENTS_FILE).read_text()
    assert "immune-edge[edge]==0.1.0 --hash=sha256:" in requirements and "numpy==2.1.0 --hash" in requirements


def test_a_missing_wheel_is_named_with_what_needs_it(wheelhouse: Path) -> None:
    (wheelhouse / "numpy-2.1.0-cp311-cp311-manylinux_2_17_aarch64.manylinux2014_aarch64.whl").unlink()
    _index(wheelhouse)
    problems = check_wheelhouse(wheelhouse, PI5)
    assert problems == [
        "no wheel for numpy>=1.20 (needed by llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl)"
    ]


def test_a_wheel_for_another_machine_or_python_is_refused(tmp_path: Path) -> None:
    _wheel(tmp_path, "immune_edge", "0.1.0", "py3-none-any", ("pydantic>=2", "numpy"))
    _wheel(tmp_path, "numpy", "2.1.0", "cp311-cp311-manylinux_2_17_x86_64", library=EM_X86_64)
    _wheel(tmp_path, "pydantic", "2.9.0", "cp312-cp312-manylinux_2_17_aarch64")
    _index(tmp_path, "immune-edge==0.1.0")
    assert check_wheelhouse(tmp_path, PI5) == [
        "numpy-2.1.0-cp311-cp311-manylinux_2_17_x86_64.whl cannot install on pi5 (linux_aarch64, cp311): "
        "its tags are cp311-cp311-manylinux_2_17_x86_64",
        "numpy-2.1.0-cp311-cp311-manylinux_2_17_x86_64.whl: numpy/lib/libnumpy.so (ELF machine 62, the "
        "target's is 183)",
        "pydantic-2.9.0-cp312-cp312-manylinux_2_17_aarch64.whl cannot install on pi5 (linux_aarch64, cp311): "
        "its tags are cp312-cp312-manylinux_2_17_aarch64",
    ]


def test_x86_64_libraries_under_an_aarch64_tag_are_caught(wheelhouse: Path) -> None:
    # The trap of cross-compiling: pip tags the wheel after the build machine, and a hand retag can lie.
    (wheelhouse / "llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl").unlink()
    _wheel(wheelhouse, "llama_cpp_python", "0.3.36", "py3-none-linux_aarch64", ("numpy>=1.20",), EM_X86_64)
    _index(wheelhouse)
    assert check_wheelhouse(wheelhouse, PI5) == [
        "llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl: llama_cpp_python/lib/libllama_cpp_python.so "
        "(ELF machine 62, the target's is 183)"
    ]


def test_changed_unlisted_and_unpinned_files_are_refused(wheelhouse: Path) -> None:
    wheel = wheelhouse / "pydantic-2.9.0-py3-none-any.whl"
    wheel.write_bytes(wheel.read_bytes() + b"\0")
    _wheel(wheelhouse, "extra_pkg", "1.0", "py3-none-any")
    (wheelhouse / REQUIREMENTS_FILE).write_text("immune-edge[edge]==0.1.0\n")
    problems = check_wheelhouse(wheelhouse, PI5)
    assert f"pydantic-2.9.0-py3-none-any.whl differs from {INDEX_FILE} (size or sha256)" in problems
    assert f"extra_pkg-1.0-py3-none-any.whl is not listed in {INDEX_FILE}" in problems
    assert f"{REQUIREMENTS_FILE} is missing or does not pin exactly the wheels in {INDEX_FILE}" in problems


def test_a_device_that_is_not_the_target_is_refused_before_the_files_are_read(wheelhouse: Path) -> None:
    assert check_wheelhouse(wheelhouse, PI5, machine="x86_64") == [
        "the wheelhouse is for aarch64 but the device is x86_64"
    ]
    assert check_wheelhouse(wheelhouse, PI5, python=(3, 13)) == [
        "the wheelhouse is for Python 3.11 but the device has 3.13"
    ]
    (wheelhouse / INDEX_FILE).write_text('{"target": "pi5"}')
    assert "is not a wheelhouse index" in check_wheelhouse(wheelhouse, PI5)[0]
    (wheelhouse / INDEX_FILE).unlink()
    assert "missing: build the wheelhouse with `make pi-wheels`" in check_wheelhouse(wheelhouse, PI5)[0]


def test_the_cli_lists_every_problem_and_exits_1(wheelhouse: Path) -> None:
    fleet = [str(Path(sys.executable).parent / "immune-fleet"), "pi", "check-wheels", str(wheelhouse)]
    ok = subprocess.run([*fleet, "--machine", "aarch64", "--python", "3.11"], capture_output=True, text=True)
    assert ok.returncode == 0 and "installs on pi5" in ok.stdout, ok.stderr
    (wheelhouse / "pydantic-2.9.0-py3-none-any.whl").unlink()
    (wheelhouse / "numpy-2.1.0-cp311-cp311-manylinux_2_17_aarch64.manylinux2014_aarch64.whl").unlink()
    refused = subprocess.run(fleet, capture_output=True, text=True)
    assert refused.returncode == 1
    assert "REJECTED (wheelhouse)" in refused.stderr
    assert "pydantic-2.9.0-py3-none-any.whl is listed in wheelhouse.json but missing" in refused.stderr
    assert "numpy-2.1.0-cp311-cp311-manylinux_2_17_aarch64" in refused.stderr
