"""`immune-edge serve` in a subprocess, for the API tests."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.harness.net import free_port


@dataclass
class Server:
    base: str
    socket: Path
    process: subprocess.Popen[bytes]

    def uds(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://localhost", timeout=120
        )


@contextmanager
def serving(model: Path, socket: Path, *options: str, token: str | None = None) -> Iterator[Server]:
    """`immune-edge serve` in a subprocess, ready to answer (``token``: the one it requires on TCP)."""
    port = free_port()
    command = [sys.executable, "-m", "edge.cli", "serve", "--model", str(model), "--port", str(port)]
    command += ["--socket", str(socket), "--threads", "1", *options]
    if token is not None:
        token_file = socket.with_name(f"{socket.name}.token")
        token_file.write_text(token)
        command += ["--token-file", str(token_file)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/ready", headers=headers, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()  # its stderr can only be read to the end once it is gone
            _, stderr = process.communicate()
            raise RuntimeError(f"serve did not start: {stderr.decode()}")
        time.sleep(0.2)
    try:
        yield Server(base, socket, process)
    finally:
        process.terminate()
        process.wait(timeout=30)
