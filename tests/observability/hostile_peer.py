"""A hostile media-stream client, run as its own OS process.

``python -m tests.observability.hostile_peer --target=HOST:PORT --call-sid=TEXT``

It connects from ``--source`` (127.0.0.2: not the witnesses' address) to the bridge,
upgrades ``/twilio/stream`` and sends ``connected`` and a well-formed ``start`` whose
``callSid`` is ``--call-sid`` (any text: a newline, an escape sequence) and whose
token is bad, then reads until the bridge closes the socket. ``--count N`` does it N
times, one connection after the other, as fast as the bridge answers. It prints one
JSON line: how many streams it opened and how many the bridge closed.

Plain blocking sockets and wsproto: this process shares nothing with the bridge but
loopback, so whatever it does cannot stall the bridge's event loop from inside.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request, TextMessage

#: Guards every socket operation: a bridge that stops answering fails the run.
SOCKET_TIMEOUT_S = 10.0
_READ = 65536


def _start_messages(call_sid: str) -> list[str]:
    stream_sid = "MZ" + "0" * 32
    start = {
        "accountSid": "AC" + "0" * 32,
        "streamSid": stream_sid,
        "callSid": call_sid,
        "tracks": ["inbound"],
        "customParameters": {"token": "v1.not-a-token"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    return [
        json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
        json.dumps(
            {"event": "start", "sequenceNumber": "1", "streamSid": stream_sid, "start": start}
        ),
    ]


def one_stream(host: str, port: int, source: str, call_sid: str) -> bool:
    """Send one forged start; True when the bridge closed the stream (as it must)."""
    with socket.create_connection(
        (host, port), timeout=SOCKET_TIMEOUT_S, source_address=(source, 0)
    ) as sock:
        ws = WSConnection(ConnectionType.CLIENT)
        sock.sendall(ws.send(Request(host=f"{host}:{port}", target="/twilio/stream")))
        accepted = False
        while not accepted:
            data = sock.recv(_READ)
            if not data:
                return False
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, RejectConnection):
                    return False
                accepted = accepted or isinstance(event, AcceptConnection)
        # One write, as Twilio's own segments usually carry them.
        sock.sendall(b"".join(ws.send(TextMessage(data=t)) for t in _start_messages(call_sid)))
        while True:
            data = sock.recv(_READ)
            if not data:
                return True
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, CloseConnection):
                    sock.sendall(ws.send(event.response()))
                    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the bridge")
    parser.add_argument("--source", default="127.0.0.2", help="address to connect from")
    parser.add_argument("--call-sid", required=True)
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    closed = sum(one_stream(host, int(port), args.source, args.call_sid) for _ in range(args.count))
    print(json.dumps({"opened": args.count, "closed": closed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
