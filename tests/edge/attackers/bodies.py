"""Attack (c): big bodies before authentication, all at once.

Posts ``--count`` bodies of ``--size`` bytes to ``--path`` concurrently, with the given
``--header`` lines (a wrong bearer token, say), either with ``Content-Length`` or, with
``--chunked``, as ``Transfer-Encoding: chunked`` (64 KiB chunks). Pushes the bodies as
fast as the server takes them, until every request is answered or closed, or
``--seconds`` have passed. Reports each answer's status line and how much was sent.
"""

from __future__ import annotations

import selectors
import socket
import time

from tests.edge.attackers.wire import allow_descriptors, arguments, connect, http_request, report

CHUNK = 64 * 1024


def early_answer(sock: socket.socket) -> str:
    """The status line of an answer already received on ``sock``, or ``""``."""
    try:
        data = sock.recv(4096)
    except OSError:
        return ""
    if not data.startswith(b"HTTP/"):
        return ""
    return data.split(b"\r\n", 1)[0].decode("latin-1").strip()


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--size", type=int, default=4_000_000)
    parser.add_argument("--path", required=True)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--chunked", action="store_true")
    args = parser.parse_args()
    allow_descriptors(args.count)
    headers = dict(line.split(": ", 1) for line in args.header)
    if args.chunked:
        headers["Transfer-Encoding"] = "chunked"
        piece = f"{CHUNK:x}\r\n".encode() + b"a" * CHUNK + b"\r\n"
        pieces = args.size // CHUNK
        body = piece * pieces + b"0\r\n\r\n"
        head = http_request("POST", args.path, port=args.port, headers=headers)
    else:
        headers["Content-Length"] = str(args.size)
        body = b"a" * args.size
        head = http_request("POST", args.path, port=args.port, headers=headers)
    payload = memoryview(head + body)
    selector = selectors.DefaultSelector()
    offsets: dict[socket.socket, int] = {}
    refused = 0
    for _ in range(args.count):
        try:
            sock = connect(args.port, args.source)
        except OSError:
            refused += 1  # a cap on connections: a refusal like any other
            continue
        sock.setblocking(False)
        offsets[sock] = 0
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    statuses: dict[str, int] = {}
    sent_total = 0
    closed = 0
    deadline = time.monotonic() + args.seconds
    while offsets and time.monotonic() < deadline:
        for key, events in selector.select(timeout=0.1):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if events & selectors.EVENT_READ:
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/"):
                    status = data.split(b"\r\n", 1)[0].decode("latin-1").strip()
                    statuses[status] = statuses.get(status, 0) + 1
                else:
                    closed += 1
                selector.unregister(sock)
                del offsets[sock]
                sock.close()
                continue
            if events & selectors.EVENT_WRITE:
                offset = offsets[sock]
                try:
                    sent = sock.send(payload[offset : offset + 1 << 20])
                except OSError:
                    # The server answered and closed while the body was still coming:
                    # its answer may be waiting to be read.
                    status = early_answer(sock)
                    if status:
                        statuses[status] = statuses.get(status, 0) + 1
                    else:
                        closed += 1
                    selector.unregister(sock)
                    del offsets[sock]
                    sock.close()
                    continue
                offsets[sock] = offset + sent
                sent_total += sent
                if offsets[sock] >= len(payload):
                    selector.modify(sock, selectors.EVENT_READ)
    for sock in offsets:
        sock.close()
    report(
        count=args.count,
        mib_sent=round(sent_total / 2**20, 1),
        statuses=statuses,
        closed_without_answer=closed,
        refused_at_connect=refused,
        unanswered_at_end=len(offsets),
    )


if __name__ == "__main__":
    main()
