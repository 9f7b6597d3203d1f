"""HTTP/1.1 over a bare socket, for tests that must send what no client library would (bad framing,
half-sent heads, oversized bodies) and read exactly what the server answers."""

from __future__ import annotations

import socket


def request(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def response(sock: socket.socket) -> tuple[int | None, bytes]:
    """(status, body) of one response; (None, b"") when the server closed without answering."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return (None, b"") if not data else (int(data.split()[1]), b"")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split()[1]), body


def exchange(port: int, data: bytes, *, timeout: float = 15.0) -> tuple[int | None, bytes]:
    """Send ``data`` on a new loopback connection and read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return response(sock)
