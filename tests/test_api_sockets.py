"""Where the API listens: the Unix socket's mode and group, and what is refused at its path."""

from __future__ import annotations

import grp
import os
import socket
import stat
from pathlib import Path

import pytest

from edge.api.server import bind_sockets
from edge.config import ApiSettings
from shared.config import ConfigError
from tests.harness.net import free_port


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def test_socket_mode_and_group_are_applied(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name if os.getuid() else "daemon"  # root may give any group
    path = tmp_path / "run" / "api.sock"
    sockets = bind_sockets(ApiSettings(host="", socket=path, socket_mode=0o660, socket_group=group))
    try:
        info = path.stat()
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == grp.getgrnam(group).gr_gid
    finally:
        _close(sockets)


def test_unknown_group_is_refused_and_nothing_stays_bound(tmp_path: Path) -> None:
    port = free_port()
    settings = ApiSettings(port=port, socket=tmp_path / "api.sock", socket_group="no-such-group-xyz")
    with pytest.raises(ConfigError, match="api.socket_group: no group named 'no-such-group-xyz'"):
        bind_sockets(settings)
    _close(bind_sockets(ApiSettings(port=port, socket=None)))  # the TCP port was released


def test_a_regular_file_at_the_socket_path_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        bind_sockets(ApiSettings(host="", socket=path))
    assert path.read_text() == "not a socket"


def test_a_stale_socket_from_a_previous_run_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays behind, as after a crash
    sockets = bind_sockets(ApiSettings(host="", socket=path))
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sockets[0].listen()
        client.connect(str(path))  # the new socket is the one listening there
        client.close()
    finally:
        _close(sockets)


def test_tcp_connections_send_small_writes_at_once() -> None:
    """The listener is a TCP socket by protocol number with TCP_NODELAY set, so asyncio (and Linux,
    which copies the option to accepted connections) turns Nagle's algorithm off. With it on, every
    response written in two parts (headers, then body) on a kept-alive connection waited ~40 ms for
    the client's delayed ACK: that was most of the time to first token through the API."""
    sockets = bind_sockets(ApiSettings(host="127.0.0.1", port=free_port(), socket=None))
    try:
        (tcp,) = sockets
        assert tcp.proto == socket.IPPROTO_TCP
        assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        _close(sockets)
