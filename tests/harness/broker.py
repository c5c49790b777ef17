"""A real mosquitto broker on a free loopback port, with a generated config."""

from __future__ import annotations

import getpass
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.harness.net import free_port, wait_for_port
from tests.harness.pki import CertPair, TestCA


def mosquitto_binary() -> str:
    """Path of the mosquitto executable; `make test` installs it with apt when missing."""
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError(
        "mosquitto is not installed: run `make test` (it apt-installs mosquitto) or apt install it"
    )


@dataclass
class TlsMaterial:
    """Certificates of a TLS broker: the CA, and a factory for client certificates."""

    ca: TestCA
    server: CertPair

    def client(self, common_name: str) -> CertPair:
        return self.ca.issue(common_name)


class Mosquitto:
    """One mosquitto process. Use as a context manager."""

    def __init__(
        self,
        workdir: Path,
        tls: TlsMaterial | None = None,
        acl: str | None = None,
        persistent: bool = False,
        extra: str = "",
    ) -> None:
        """``extra``: more config lines (a bridge's ``connection`` section, which must come last)."""
        self.workdir = workdir
        self.extra = extra
        self.persistent = persistent
        self.tls = tls
        self.acl = acl
        self.host = "127.0.0.1"
        self.port = free_port()
        self.log_file = workdir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            # Persistent: sessions and queued messages survive a restart (saved on shutdown).
            f"persistence {'true' if self.persistent else 'false'}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            # Without this, mosquitto started as root switches to user 'mosquitto' and cannot read our files.
            f"user {getpass.getuser()}",
        ]
        if self.tls is None:
            lines.append("allow_anonymous true")
        else:
            lines += [
                f"cafile {self.tls.ca.ca_file}",
                f"certfile {self.tls.server.cert}",
                f"keyfile {self.tls.server.key}",
                "require_certificate true",
                "use_identity_as_username true",
                "allow_anonymous false",
            ]
        if self.acl is not None:
            acl_file = self.workdir / "acl"
            acl_file.write_text(self.acl)
            lines.append(f"acl_file {acl_file}")
        return "\n".join(lines) + "\n" + self.extra

    def start(self) -> Mosquitto:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "mosquitto.conf"
        config.write_text(self._config())
        self._process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_for_port(self.port, alive=lambda: self._process is not None and self._process.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"mosquitto failed to start: {exc}\n{self.log()}") from None
        return self

    @property
    def pid(self) -> int:
        """The running mosquitto's process id (a new one after ``restart``)."""
        assert self._process is not None, "not started"
        return self._process.pid

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process is not None and self._process.stderr is not None:
            self._process.stderr.close()

    def restart(self) -> None:
        """Stop and start on the same port (for outage tests)."""
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
