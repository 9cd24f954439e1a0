"""An attacker in its own OS process: large request bodies the server must not buffer.

Run as ``python -m tests.control.body_flood PORT SECONDS`` (test_body_flood.py does).
Its connections come from 127.0.0.2. Until ``SECONDS`` are up, ``WORKERS`` threads
each post, one after the other:

- to ``/twilio/voice``: a chunked body of ``BODY_BYTES`` (no length declared, so only
  a limit held while streaming stops it), unsigned;
- to ``/vapi/webhook``: ``BODY_BYTES`` declared and sent with a wrong bearer token
  (the header alone decides; the body must not be read).

Each post sends as much of the body as the server takes and then reads the answer.
The last line printed is a JSON summary: how many posts per route and how each ended
(an HTTP status, ``reset`` when the server closed while the body was still being
sent, or ``error:…``), and how many body bytes its sockets accepted (most never reach
the server: they sit in the kernel's buffers until the server closes the connection).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections import Counter
from typing import Final

#: Source address of every connection (the server sees a peer that is not 127.0.0.1).
SOURCE: Final = "127.0.0.2"
#: What each post tries to send: as much as the measured attack on an unfixed server.
BODY_BYTES: Final = 4 * 1024 * 1024
#: Connections at once.
WORKERS: Final = 6
#: One send of body data.
PIECE: Final = 64 * 1024
#: A post whose answer has not come by then counts as ``error:timeout``.
POST_TIMEOUT_S: Final = 10.0


def _post(port: int, head: bytes, chunked: bool) -> tuple[str, int]:
    """One post: how it ended, and how many body bytes were sent before it did."""
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(POST_TIMEOUT_S)
        sock.bind((SOURCE, 0))
        sock.connect(("127.0.0.1", port))
        try:
            sock.sendall(head)
            piece = b"x" * PIECE
            framed = b"%x\r\n" % PIECE + piece + b"\r\n" if chunked else piece
            while sent < BODY_BYTES:
                sock.sendall(framed)
                sent += PIECE
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending: read it
        except OSError as exc:
            return f"error:{type(exc).__name__}", sent
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except ConnectionResetError:
            pass
        except OSError as exc:
            return f"error:{type(exc).__name__}", sent
    if not answer.startswith(b"HTTP/1.1 "):
        return "reset", sent
    return answer.split(b" ", 2)[1].decode(), sent


def _worker(
    port: int, until: float, index: int, outcomes: Counter[str], lock: threading.Lock
) -> None:
    voice = (
        b"POST /twilio/voice HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    vapi = (
        b"POST /vapi/webhook HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer not-the-secret\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % BODY_BYTES
    )
    turn = index
    while time.monotonic() < until:
        route, head, chunked = ("voice", voice, True) if turn % 2 else ("vapi", vapi, False)
        turn += 1
        ended, sent = _post(port, head, chunked)
        with lock:
            outcomes[f"{route} {ended}"] += 1
            outcomes[f"{route} bytes-sent"] += sent


def main(argv: list[str]) -> int:
    port, seconds = int(argv[1]), float(argv[2])
    until = time.monotonic() + seconds
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    threads = [
        threading.Thread(target=_worker, args=(port, until, i, outcomes, lock))
        for i in range(WORKERS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(dict(outcomes)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
