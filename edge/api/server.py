"""Serving the API with uvicorn on loopback TCP and/or a Unix domain socket."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from pathlib import Path

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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


def serve_api(app: FastAPI, sockets: list[socket.socket]) -> None:
    """Run uvicorn on pre-bound sockets until SIGTERM/SIGINT."""
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    asyncio.run(server.serve(sockets=sockets))
