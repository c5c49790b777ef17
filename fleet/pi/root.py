"""An emulated Debian 12 arm64 root on an x86_64 machine: the Pi 5's userland, run through qemu-user.

The base root is built once with debootstrap and kept under the user's cache folder (a few minutes to build,
about 400 MB); every user gets a fresh copy of it (``copy_root``), so no check ever sees what an earlier one
installed. ``Chroot`` mounts what programs inside need (/proc, /dev, the host's DNS and CA bundle) for the
length of a ``with`` block. Everything here needs root privileges and Debian's qemu-user-static,
binfmt-support and debootstrap."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fleet.pi.target import PI5, Target

log = logging.getLogger(__name__)

DEBIAN_MIRROR = "http://deb.debian.org/debian"
#: What a Raspberry Pi OS Lite image has that the device needs: Python with venv, CA certificates, systemd
#: (the unit is enabled by the edge role) and python3-apt (Ansible's apt module).
DEVICE_PACKAGES = ("python3", "python3-venv", "python3-apt", "ca-certificates", "systemd", "libsystemd0")
#: Only for building the wheels that have no aarch64 wheel on PyPI (systemd-python's C extension).
BUILD_PACKAGES = ("gcc", "python3-dev", "libsystemd-dev", "pkg-config")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
ROOT_CA_BUNDLE = "/etc/ssl/certs/host-ca-bundle.crt"


class EmulationError(RuntimeError):
    """The arm64 root cannot be built or entered here; the message says which tool or step is missing."""


def cache_dir() -> Path:
    """~/.cache/immune-edge (or $XDG_CACHE_HOME/immune-edge): roots and wheels reused across runs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "immune-edge"


def _require_tools() -> None:
    missing = [tool for tool in ("debootstrap", "chroot", "update-binfmts") if shutil.which(tool) is None]
    if missing:
        raise EmulationError(
            f"missing {', '.join(missing)}: apt-get install qemu-user-static binfmt-support debootstrap"
        )
    if os.geteuid() != 0:
        raise EmulationError("building and entering an arm64 root needs root (debootstrap, chroot, mount)")


def ensure_emulation(target: Target = PI5) -> None:
    """Make the kernel run the target's binaries through qemu (binfmt_misc), or say why it cannot."""
    _require_tools()
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=False)
    entry = BINFMT / f"qemu-{target.machine}"
    if not entry.exists():
        subprocess.run(["update-binfmts", "--enable", f"qemu-{target.machine}"], check=False)
    if not entry.exists() or "enabled" not in entry.read_text():
        raise EmulationError(
            f"the kernel does not run {target.machine} binaries: binfmt_misc has no enabled {entry.name} "
            "(install qemu-user-static and binfmt-support; a container needs binfmt_misc mounted)"
        )


def _key(target: Target, packages: Sequence[str]) -> str:
    text = f"{target.debian_arch}:{target.debian_suite}:{','.join(sorted(packages))}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def base_root(target: Target = PI5, *, extra: Sequence[str] = (), cache: Path | None = None) -> Path:
    """The cached root with the device's packages (and ``extra``, apt-installed into a copy of the plain
    root: faster than a second debootstrap), built on first use."""
    ensure_emulation(target)
    packages = (*DEVICE_PACKAGES, *extra)
    roots = (cache or cache_dir()) / "roots"
    done = roots / f"{target.debian_suite}-{target.debian_arch}-{_key(target, packages)}"
    if (done / ".complete").exists():
        return done
    plain = base_root(target, cache=cache) if extra else None
    roots.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=roots))
    log.info("building a Debian %s %s root in %s (a few minutes, once)", target.debian_suite,
             target.debian_arch, done)  # fmt: skip
    try:
        if plain is None:
            _debootstrap(target, packages, building)
        else:
            copy_root(plain, building)
            with Chroot(building) as chroot:
                chroot.run(["apt-get", "update", "-q"])
                chroot.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *extra])
                chroot.run(["apt-get", "clean"])
    except (EmulationError, subprocess.CalledProcessError):
        shutil.rmtree(building, ignore_errors=True)
        raise
    (building / ".complete").write_text(" ".join(packages) + "\n")
    shutil.rmtree(done, ignore_errors=True)
    building.rename(done)
    return done


def _debootstrap(target: Target, packages: Sequence[str], into: Path) -> None:
    result = subprocess.run(
        ["debootstrap", f"--arch={target.debian_arch}", "--variant=minbase",
         f"--include={','.join(packages)}", target.debian_suite, str(into), DEBIAN_MIRROR],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise EmulationError(f"debootstrap failed: {(result.stdout + result.stderr)[-2000:]}")


def copy_root(source: Path, dest: Path) -> Path:
    """A private copy of a cached root (hard state such as device files and owners kept)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--reflink=auto", f"{source}/.", str(dest)], check=True)
    (dest / ".complete").unlink(missing_ok=True)
    return dest


#: The /etc/hosts every Debian system has, without which "localhost" does not resolve.
HOSTS = "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"


class Chroot:
    """A root with /proc, /dev and /sys mounted, the host's DNS and CA bundle copied in (and an /etc/hosts
    when it has none); ``run`` executes a command inside it. Use as a context manager: the mounts go when
    the block ends."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._mounted: list[Path] = []

    def __enter__(self) -> Chroot:
        for source, kind in (("/proc", "proc"), ("/sys", "sysfs"), ("/dev", "bind"), ("/dev/pts", "bind")):
            point = self.root / source.lstrip("/")
            point.mkdir(parents=True, exist_ok=True)
            if os.path.ismount(point):  # an enclosing Chroot of this root mounted it and unmounts it
                continue
            argv = (
                ["mount", "--bind", source, str(point)]
                if kind == "bind"
                else ["mount", "-t", kind, kind, str(point)]
            )
            if subprocess.run(argv, capture_output=True, check=False).returncode != 0:
                self.__exit__()  # nothing stays mounted when entering fails
                raise EmulationError(f"cannot mount {source} on {point}")
            self._mounted.append(point)
        shutil.copyfile("/etc/resolv.conf", self.root / "etc/resolv.conf")
        hosts = self.root / "etc/hosts"
        if not hosts.exists():  # debootstrap's minbase writes none; Raspberry Pi OS ships one
            hosts.write_text(HOSTS)
        if HOST_CA_BUNDLE.exists():
            # Some networks intercept TLS with their own CA; pip inside trusts what the host trusts.
            shutil.copyfile(HOST_CA_BUNDLE, self.root / ROOT_CA_BUNDLE.lstrip("/"))
        return self

    def __exit__(self, *exc: object) -> None:
        for point in reversed(self._mounted):
            subprocess.run(["umount", "--lazy", str(point)], check=False)
        self._mounted.clear()

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PIP_CERT": ROOT_CA_BUNDLE,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "DEBIAN_FRONTEND": "noninteractive",
        }
        return {**env, **(extra or {})}

    def run(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the root; a failure raises EmulationError carrying its output."""
        result = subprocess.run(
            ["chroot", str(self.root), *argv], env=self.env(env), capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise EmulationError(
                f"{' '.join(argv)} failed in {self.root} ({result.returncode}): "
                f"{(result.stdout + result.stderr)[-3000:]}"
            )
        return result
