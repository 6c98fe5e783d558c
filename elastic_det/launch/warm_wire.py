"""The warm start's wire between client and server: length-prefixed JSON, with the client's stdio
descriptors (``SCM_RIGHTS``) in the first packet; one status line back."""

from __future__ import annotations

import socket
import struct
import time

SOCKET_ENV = "ELASTIC_DET_WARM_START"  # the server's socket path, set by the supervisor
SERVER_PID_ENV = "ELASTIC_DET_WARM_START_PID"  # the server's PID: a client stops waiting when it is gone
_HEADER = struct.Struct("!I")


def send(conn: socket.socket, payload: bytes, fds: list[int]) -> None:
    data = _HEADER.pack(len(payload)) + payload
    sent = socket.send_fds(conn, [data], fds)
    if sent < len(data):
        conn.sendall(data[sent:])


def receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < _HEADER.size:
        more = conn.recv(1 << 16)
        if not more:
            raise OSError("connection closed in the header")
        data += more
    (length,) = _HEADER.unpack_from(data)
    while len(data) < _HEADER.size + length:
        more = conn.recv(1 << 16)
        if not more:
            raise OSError("connection closed in the request")
        data += more
    return data[_HEADER.size:_HEADER.size + length], list(fds)


def read_line(conn: socket.socket, deadline: float) -> str:
    conn.settimeout(max(0.1, deadline - time.monotonic()))
    buffer = b""
    while b"\n" not in buffer:
        chunk = conn.recv(64)
        if not chunk:
            raise OSError("the server closed the connection")
        buffer += chunk
    return buffer.split(b"\n", 1)[0].decode()
