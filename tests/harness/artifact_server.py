"""A real HTTP artifact server on loopback: serves a directory with Range support, and can be told
to fail, stall, truncate, throttle, corrupt or overflow specific files."""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_CHUNK = 64 * 1024

FaultKind = Literal["fail", "stall", "truncate", "slow", "overflow", "corrupt"]


@dataclass
class Fault:
    """Misbehaviour for the next ``times`` requests of one file.

    fail: answer ``status``; stall: send ``after_bytes`` then hang ``delay_s`` (until the
    server stops); truncate: send ``after_bytes`` then drop the connection; slow: send at
    ``rate_bps``; overflow: no Content-Length and bytes past the end without stopping;
    corrupt: flip one byte at offset ``after_bytes``.
    """

    kind: FaultKind
    times: int = 1
    status: int = 503
    after_bytes: int = 0
    delay_s: float = 60.0
    rate_bps: int = 256 * 1024


@dataclass(frozen=True)
class RequestRecord:
    method: str
    name: str
    range: str | None
    status: int


@dataclass
class _State:
    root: Path
    faults: dict[str, deque[Fault]] = field(default_factory=dict)
    requests: list[RequestRecord] = field(default_factory=list)
    bytes_sent: dict[str, int] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_fault(self, name: str) -> Fault | None:
        with self.lock:
            queue = self.faults.get(name)
            if not queue:
                return None
            fault = queue[0]
            fault.times -= 1
            if fault.times <= 0:
                queue.popleft()
            return fault


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean; requests are recorded in state.requests

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _record(self, name: str, status: int) -> None:
        with self.server.state.lock:
            self.server.state.requests.append(
                RequestRecord(self.command, name, self.headers.get("Range"), status)
            )

    def _error(self, name: str, status: int) -> None:
        self._record(name, status)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, body: bool) -> None:
        name = self.path.split("?", 1)[0].lstrip("/")
        state = self.server.state
        path = state.root / name
        inside = all(part and not part.startswith(".") for part in name.split("/"))
        if not inside or not path.is_file():  # sub-folders yes, hidden files and '..' never
            self._error(name, HTTPStatus.NOT_FOUND)
            return
        fault = state.take_fault(name)
        if fault is not None and fault.kind == "fail":
            self._error(name, fault.status)
            return
        data = path.read_bytes()
        size = len(data)
        start, end = 0, size - 1
        status = HTTPStatus.OK
        header = self.headers.get("Range")
        if header:
            match = _RANGE.fullmatch(header.strip())
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    start = int(match.group(1))
                    end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                else:  # suffix range: the last N bytes
                    start = max(size - int(match.group(2)), 0)
                if start >= size or start > end:
                    self._record(name, HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = HTTPStatus.PARTIAL_CONTENT
        payload = data[start : end + 1]
        if fault is not None and fault.kind == "corrupt" and fault.after_bytes < len(payload):
            flipped = payload[fault.after_bytes] ^ 0xFF
            payload = payload[: fault.after_bytes] + bytes([flipped]) + payload[fault.after_bytes + 1 :]
        self._record(name, status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{size:x}-{int(path.stat().st_mtime_ns):x}"')
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if fault is not None and fault.kind == "overflow":
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self._send_body(payload, fault)

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        state = self.server.state
        with state.lock:
            name = self.path.lstrip("/")
            state.bytes_sent[name] = state.bytes_sent.get(name, 0) + len(data)

    def _send_body(self, payload: bytes, fault: Fault | None) -> None:
        stopping = self.server.state.stopping
        try:
            if fault is not None and fault.kind in ("stall", "truncate"):
                self._write(payload[: fault.after_bytes])
                self.wfile.flush()
                if fault.kind == "stall":
                    stopping.wait(fault.delay_s)
                self.close_connection = True
                return
            if fault is not None and fault.kind == "slow":
                for offset in range(0, len(payload), 4096):
                    if stopping.is_set():
                        return
                    self._write(payload[offset : offset + 4096])
                    time.sleep(4096 / fault.rate_bps)
                return
            for offset in range(0, len(payload), _CHUNK):
                self._write(payload[offset : offset + _CHUNK])
            if fault is not None and fault.kind == "overflow":
                filler = b"\0" * _CHUNK
                while not stopping.is_set():  # the endless-data attack: only the client can stop it
                    self._write(filler)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State


class ArtifactServer:
    """Serve ``root`` on 127.0.0.1 over HTTP/1.1 in a background thread."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = _State(root)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="artifact-server", daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def add(self, name: str, data: bytes) -> str:
        """Publish bytes as ``name``; returns its URL (replacing, never writing through, an old one)."""
        staging = self.root / f".{name}.new"
        staging.write_bytes(data)
        staging.replace(self.root / name)
        return self.url(name)

    def add_file(self, source: Path, name: str | None = None) -> str:
        """Publish a file by hard link (or copy across file systems); returns its URL. Nothing is
        ever written through an existing name: it may be a link to another test's source file."""
        target = self.root / (name or source.name)
        if target.exists() and target.samefile(source):
            return self.url(target.name)
        staging = target.with_name(f".{target.name}.new")
        staging.unlink(missing_ok=True)
        try:
            staging.hardlink_to(source)
        except OSError:
            staging.write_bytes(source.read_bytes())
        staging.replace(target)
        return self.url(target.name)

    def inject(self, name: str, fault: Fault) -> None:
        """Queue a fault for the next request(s) of ``name``."""
        with self._server.state.lock:
            self._server.state.faults.setdefault(name, deque()).append(fault)

    def bytes_sent(self, name: str) -> int:
        """Body bytes written for ``name`` so far, over all requests."""
        with self._server.state.lock:
            return self._server.state.bytes_sent.get(name, 0)

    @property
    def requests(self) -> list[RequestRecord]:
        with self._server.state.lock:
            return list(self._server.state.requests)

    def start(self) -> ArtifactServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.state.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ArtifactServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
