"""Slow clients, run as their own OS process: ``python -m tests.net.slow_clients …``.

Each connection is bound to one of the ``--sources`` addresses, sends the head of a
voice webhook POST announcing a 60 kB body (under the route's 64 KiB limit, so
nothing refuses it early), then dribbles one byte of it every ``--every`` seconds,
for ``--seconds``. A connection the server ends is replaced, at most
``--reconnects`` a second in all (0: never), as an attacker keeping its slots would.
Prints ``{"ready": <open connections>}`` once the first round is open, and the
totals as JSON at the end. Plain blocking sockets: nothing here shares the server's
event loop.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import time

HEAD = (
    b"POST /twilio/voice HTTP/1.1\r\nHost: bridge\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 60000\r\n\r\n"
)


def _open(port: int, source: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((source, 0))
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))
        sock.sendall(HEAD)
        sock.setblocking(False)
    except OSError:
        sock.close()
        return None
    return sock


def _alive(sock: socket.socket) -> bool:
    """False once the server has answered (a refusal) or closed the connection."""
    try:
        sock.recv(4096)
    except BlockingIOError:
        pass  # nothing from the server: still held
    except OSError:
        return False
    else:
        return False  # an answer (the refusal) or the end
    try:
        sock.send(b"a")
    except BlockingIOError:
        pass
    except OSError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sources", required=True, help="comma-separated addresses")
    parser.add_argument("--per-source", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--every", type=float, default=0.5)
    parser.add_argument("--reconnects", type=float, default=0.0)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    sources = args.sources.split(",")
    wanted = {source: args.per_source for source in sources}
    conns: list[tuple[socket.socket, str]] = []
    opened = failed = ended = 0
    for source in sources:
        for _ in range(args.per_source):
            sock = _open(args.port, source)
            if sock is None:
                failed += 1
            else:
                opened += 1
                conns.append((sock, source))
    print(json.dumps({"ready": len(conns)}), flush=True)

    stop_at = time.monotonic() + args.seconds
    peak = 0
    while time.monotonic() < stop_at:
        time.sleep(args.every)
        kept: list[tuple[socket.socket, str]] = []
        for sock, source in conns:
            if _alive(sock):
                kept.append((sock, source))
            else:
                ended += 1
                sock.close()
        conns = kept
        peak = max(peak, len(conns))
        budget = int(args.reconnects * args.every)
        for source in sources:
            have = sum(1 for _, s in conns if s == source)
            for _ in range(min(wanted[source] - have, budget)):
                sock = _open(args.port, source)
                budget -= 1
                if sock is None:
                    failed += 1
                else:
                    opened += 1
                    conns.append((sock, source))
    for sock, _ in conns:
        sock.close()
    print(json.dumps({"opened": opened, "failed": failed, "ended": ended, "peak": peak}))


if __name__ == "__main__":
    main()
