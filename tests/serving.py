"""Helpers for tests that drive a real server over loopback: uvicorn in a thread, a free port,
raw HTTP that the official client cannot send (chunked bodies, lone surrogates, huge lengths)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app: Any) -> Iterator[int]:
    """Serve `app` with uvicorn in a thread; yields the port."""
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        uv.should_exit = True
        thread.join(30)


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP response whose body has a Content-Length (the server's errors)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def post_raw(port: int, path: str, body: bytes, headers: dict[str, str] | None = None,
             timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    """POST `body` as is; returns (status, headers, JSON body)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request_head("POST", path, {
            "Content-Type": "application/json", "Content-Length": str(len(body)),
            **(headers or {})}) + body)
        status, head, data = read_response(sock)
    return status, head, json.loads(data)


def open_stream(port: int, body: dict[str, Any], headers: dict[str, str],
                path: str = "/v1/chat/completions") -> socket.socket:
    """Start a streaming request and read until its first event arrives."""
    sock = socket.create_connection((HOST, port), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(request_head("POST", path, {
        "Content-Type": "application/json", "Content-Length": str(len(data)), **headers}) + data)
    received = b""
    while b"data:" not in received:
        chunk = sock.recv(4096)
        assert chunk, f"the stream closed before its first event: {received!r}"
        received += chunk
    return sock


def kill(sock: socket.socket) -> None:
    """Close abruptly (RST), as a killed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
