"""What every attacker needs: a socket bound to its own address, raw HTTP and WebSocket bytes.

Standard library only, and nothing shared with the server: an attacker is an independent
client that writes exactly the bytes it means to. Every attacker is a separate OS
process (``python -m tests.edge.attackers.<name>``) that stops by itself within its
``--seconds`` and its counts, then prints one JSON line: what it did and what it saw.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

#: The WebSocket opcodes an attacker sends or reads.
TEXT = 0x1
CLOSE = 0x8
#: How long one blocking socket operation of an attacker may take before it gives up on it.
IO_TIMEOUT_S = 5.0


def arguments(description: str) -> argparse.ArgumentParser:
    """The options every attacker takes: where the server is, where to attack from, how long."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True, help="the server's port on 127.0.0.1")
    parser.add_argument("--source", default="127.0.0.2", help="the address to attack from")
    parser.add_argument("--seconds", type=float, default=3.0, help="stop after this long")
    return parser


def sources(spec: str) -> list[str]:
    """``127.0.0.2`` or a range ``127.0.0.2-9`` (last octet) → the addresses."""
    if "-" not in spec:
        return [spec]
    first, last = spec.split("-")
    prefix, start = first.rsplit(".", 1)
    return [f"{prefix}.{n}" for n in range(int(start), int(last) + 1)]


def allow_descriptors(count: int) -> None:
    """Raise this process's descriptor limit to hold ``count`` sockets (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, count + 64))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def connect(port: int, source: str, *, timeout: float | None = IO_TIMEOUT_S) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from ``source`` (any free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def http_request(
    method: str,
    target: str,
    *,
    port: int,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
) -> bytes:
    """An HTTP/1.1 request's bytes (``Content-Length`` added when there is a body)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None and not any(n.lower() == "transfer-encoding" for n in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def upgrade_request(port: int, path: str = "/twilio/stream") -> bytes:
    """A WebSocket upgrade request for ``path``."""
    key = base64.b64encode(os.urandom(16)).decode()
    return http_request(
        "GET",
        path,
        port=port,
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": key,
            "Sec-WebSocket-Version": "13",
        },
    )


def ws_frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """One masked client frame (a fixed mask: the server must not care)."""
    mask = b"\x37\xfa\x21\x3d"
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def ws_json(message: Mapping[str, Any]) -> bytes:
    return ws_frame(json.dumps(message, separators=(",", ":")).encode())


class Reader:
    """Reads an HTTP response head, then unmasked server frames, off one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.closed = False

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return False
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return False
        self.buffer += data
        return True

    def head(self) -> tuple[int, str]:
        """(status, the head's text); (0, "") if the server closed or said nothing."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                return 0, ""
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        text = head.decode("latin-1")
        parts = text.split(" ", 2)
        return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), text

    def frames(self, until: float) -> Iterator[tuple[int, bytes]]:
        """Server frames (opcode, payload) until ``until`` (``time.monotonic``) or close."""
        while time.monotonic() < until and not self.closed:
            if len(self.buffer) >= 2:
                first, second = self.buffer[0], self.buffer[1]
                length, offset = second & 0x7F, 2
                if length == 126:
                    length, offset = struct.unpack("!H", self.buffer[2:4])[0], 4
                elif length == 127:
                    length, offset = struct.unpack("!Q", self.buffer[2:10])[0], 10
                if len(self.buffer) >= offset + length:
                    payload = self.buffer[offset : offset + length]
                    self.buffer = self.buffer[offset + length :]
                    yield first & 0x0F, payload
                    continue
            self.sock.settimeout(max(0.01, min(0.2, until - time.monotonic())))
            self._fill()


def report(**figures: Any) -> None:
    """The attacker's one line of output: what it did and what it saw."""
    print(json.dumps(figures), flush=True)
    sys.stdout.flush()
