"""Attack (f): a flood of requests the server must reject, to flood its log.

For ``--seconds`` (at most ``--count`` requests), alternates two rejections on new
connections: a voice webhook with a forged ``X-Twilio-Signature`` (403), and a media
stream whose ``start`` carries no valid token (the stream is refused). Reports how
many of each the server refused.
"""

from __future__ import annotations

import secrets
import time

from tests.edge.attackers.wire import (
    Reader,
    arguments,
    connect,
    http_request,
    report,
    upgrade_request,
    ws_json,
)


def forged_webhook(port: int, source: str) -> int:
    body = f"CallSid=CA{secrets.token_hex(16)}&AccountSid=AC{'0' * 32}".encode()
    sock = connect(port, source)
    try:
        sock.sendall(http_request(
            "POST", "/twilio/voice", port=port, body=body,
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "X-Twilio-Signature": "forged", "Connection": "close"},
        ))
        status, _ = Reader(sock).head()
        return status
    finally:
        sock.close()


def tokenless_stream(port: int, source: str) -> bool:
    """True if the server refused the stream (closed it) after ``start``."""
    sock = connect(port, source)
    try:
        sock.sendall(upgrade_request(port))
        reader = Reader(sock)
        status, _ = reader.head()
        if status != 101:
            return True
        call_sid = "CA" + secrets.token_hex(16)
        start = {"accountSid": "AC" + "0" * 32, "streamSid": "MZ" + secrets.token_hex(16),
                 "callSid": call_sid, "tracks": ["inbound"], "customParameters": {},
                 "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
        sock.sendall(ws_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
                     + ws_json({"event": "start", "sequenceNumber": "1",
                                "streamSid": start["streamSid"], "start": start}))
        for opcode, _ in reader.frames(time.monotonic() + 2.0):
            if opcode == 0x8:
                return True
        return reader.closed
    finally:
        sock.close()


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--count", type=int, default=3000)
    args = parser.parse_args()
    deadline = time.monotonic() + args.seconds
    webhooks: dict[str, int] = {}
    streams_refused = streams = 0
    made = 0
    dropped = 0
    while made < args.count and time.monotonic() < deadline:
        try:
            if made % 2 == 0:
                status = str(forged_webhook(args.port, args.source))
                webhooks[status] = webhooks.get(status, 0) + 1
            else:
                streams += 1
                streams_refused += tokenless_stream(args.port, args.source)
        except OSError:
            dropped += 1  # refused at connect, or cut: a refusal that logs nothing
        made += 1
    report(requests=made, webhooks=webhooks, streams=streams, streams_refused=streams_refused,
           dropped=dropped, per_second=round(made / args.seconds))


if __name__ == "__main__":
    main()
