"""Serving the API with uvicorn on loopback TCP and/or a Unix domain socket."""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import socket
import stat
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from edge.config import ApiSettings
from shared.config import ConfigError
from shared.reasons import Reason

log = logging.getLogger(__name__)


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Protocol given by number: asyncio turns Nagle's algorithm off only on sockets that say they are
    # TCP. TCP_NODELAY on the listener as well (Linux copies it to accepted connections). With Nagle
    # on, a response written in two parts waited ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def bind_unix(path: Path, mode: int = 0o660, group: int | None = None) -> socket.socket:
    """Bind a Unix socket with the given file mode (and group, so e.g. only Slips' group may connect)."""
    if path.is_socket():
        path.unlink()  # a stale socket from a previous run
    elif path.exists():
        raise FileExistsError(f"{path} exists and is not a socket")
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # never world-accessible, even for an instant
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    path.chmod(mode)
    if group is not None:
        os.chown(path, -1, group)
    log.info("listening on unix:%s (mode %s)", path, stat.filemode(mode | stat.S_IFSOCK))
    return sock


def bind_sockets(api: ApiSettings) -> list[socket.socket]:
    """Bind what ``api`` asks for (before anything else starts, so a busy port fails fast)."""
    sockets = []
    try:
        if api.host and api.port:
            sockets.append(bind_tcp(api.host, api.port))
        if api.socket is not None:
            group = grp.getgrnam(api.socket_group).gr_gid if api.socket_group else None
            sockets.append(bind_unix(api.socket, api.socket_mode, group))
    except (KeyError, OSError) as exc:
        for sock in sockets:  # nothing stays bound behind a refusal
            sock.close()
        if isinstance(exc, KeyError):
            raise ConfigError(
                Reason.CONFIG_INVALID, f"api.socket_group: no group named {api.socket_group!r}"
            ) from None
        raise ConfigError(Reason.CONFIG_INVALID, f"api: cannot listen: {exc}") from None
    if not sockets:
        raise ConfigError(Reason.CONFIG_INVALID, "api: nothing to listen on (set host and port, or socket)")
    return sockets


def _server(app: FastAPI) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
    return uvicorn.Server(config)


class ApiServerThread:
    """uvicorn in a thread of the daemon, which keeps the main thread for its control loop."""

    def __init__(self, app: FastAPI, sockets: list[socket.socket]) -> None:
        self._server = _server(app)
        self._sockets = sockets
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=self._sockets))

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
