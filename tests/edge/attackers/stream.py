"""Attacks (d), (e), (f) and (h): a client shaped like Twilio, replaying and altering.

Reads a plan (JSON) on stdin: a captured, validly signed voice webhook (``path``,
``form``, ``signature``) to post ``posts`` times; then, for the answers that carry a
``<Stream>`` (``stream``: ``each`` distinct answer, ``first`` one, or ``none``), opens
the media stream as Twilio would (``connected``, ``start`` with the TwiML's parameters,
20 ms of silence every 20 ms for ``hold_s``, ``stop``), all at once. The plan may alter
the ``start``: ``parameters`` changes its ``customParameters``, ``start_call_sid``
replaces its ``callSid``; ``coalesce`` sends the upgrade request and the first frames
(``connected``, ``start``, one frame of media) in one write, so they reach the server in
one segment.
Prints what it saw: each answer's status, how many distinct answers there were, and per
stream the upgrade's status, the media messages the server sent back, and who closed.
"""

from __future__ import annotations

import base64
import json
import secrets
import sys
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import urlencode, urlsplit

from tests.edge.attackers.wire import (
    CLOSE,
    IO_TIMEOUT_S,
    Reader,
    arguments,
    connect,
    http_request,
    report,
    upgrade_request,
    ws_frame,
    ws_json,
)

#: Twilio's frame: 20 ms of μ-law silence.
SILENCE = base64.b64encode(b"\xff" * 160).decode()
FRAME_S = 0.020


def post_webhook(port: int, source: str, plan: dict[str, Any]) -> tuple[int, str]:
    body = urlencode(plan["form"]).encode()
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": plan["signature"],
        "Connection": "close",
    }
    sock = connect(port, source)
    try:
        sock.sendall(http_request("POST", plan["path"], port=port, headers=headers, body=body))
        reader = Reader(sock)
        status, head = reader.head()
        length = next(
            (int(line.split(":", 1)[1]) for line in head.split("\r\n")
             if line.lower().startswith("content-length:")),
            None,
        )
        while (length is None or len(reader.buffer) < length) and not reader.closed:
            if not reader._fill():
                break
        return status, reader.buffer.decode(errors="replace")
    finally:
        sock.close()


def stream_of(twiml: str) -> tuple[str, dict[str, str]] | None:
    """The ``<Stream>``'s path and its parameters, if the answer has one."""
    try:
        root = ET.fromstring(twiml)
    except ET.ParseError:
        return None
    stream = root.find(".//Stream")
    if stream is None:
        return None
    parameters = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    return urlsplit(stream.get("url", "")).path, parameters


def run_stream(
    port: int, source: str, path: str, parameters: dict[str, str], plan: dict[str, Any]
) -> dict[str, Any]:
    call_sid = plan.get("start_call_sid", plan["form"]["CallSid"])
    stream_sid = "MZ" + secrets.token_hex(16)
    parameters = {**parameters, **plan.get("parameters", {})}
    connected = ws_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
    start = ws_json({
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": stream_sid,
        "start": {
            "accountSid": plan["form"]["AccountSid"],
            "streamSid": stream_sid,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "customParameters": parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    })
    sequence = 2

    def media(chunk: int) -> bytes:
        return ws_json({
            "event": "media",
            "sequenceNumber": str(chunk + 1),
            "streamSid": stream_sid,
            "media": {"track": "inbound", "chunk": str(chunk), "timestamp": str(chunk * 20),
                      "payload": SILENCE},
        })

    sock = connect(port, source)
    reader = Reader(sock)
    first = connected + start + media(1) if plan.get("coalesce") else b""
    sock.sendall(upgrade_request(port, path) + first)
    status, _ = reader.head()
    result: dict[str, Any] = {"status": status, "media_received": 0, "closed_by": None}
    if status != 101:
        sock.close()
        return result
    chunk = 1
    if not first:
        sock.sendall(connected + start)
        sequence = 2
    started = time.monotonic()
    until = started + plan.get("hold_s", 1.5)
    try:
        while time.monotonic() < until and not reader.closed:
            chunk += 1
            sequence = chunk + 1
            sock.settimeout(IO_TIMEOUT_S)
            sock.sendall(media(chunk))
            for opcode, payload in reader.frames(time.monotonic() + FRAME_S):
                if opcode == CLOSE:
                    result["closed_by"] = "server"
                    result["close_code"] = int.from_bytes(payload[:2], "big") if payload else None
                    break
                if b'"media"' in payload:
                    result["media_received"] += 1
            if result["closed_by"]:
                break
        if reader.closed and result["closed_by"] is None:
            result["closed_by"] = "server"
        if result["closed_by"] is None:
            stop = {"event": "stop", "sequenceNumber": str(sequence + 1), "streamSid": stream_sid,
                    "stop": {"accountSid": plan["form"]["AccountSid"], "callSid": call_sid}}
            sock.settimeout(IO_TIMEOUT_S)
            sock.sendall(ws_json(stop) + ws_frame(b"\x03\xe8", CLOSE))
            result["closed_by"] = "client"
    except OSError:
        result["closed_by"] = "server"
    finally:
        sock.close()
    return result


def main() -> None:
    args = arguments(__doc__ or "").parse_args()
    plan = json.load(sys.stdin)
    deadline = time.monotonic() + args.seconds
    answers = []
    for _ in range(plan.get("posts", 1)):
        if time.monotonic() > deadline:
            break
        answers.append(post_webhook(args.port, args.source, plan))
    distinct = list(dict.fromkeys(twiml for _, twiml in answers))
    streams = [s for s in (stream_of(twiml) for twiml in distinct) if s is not None]
    mode = plan.get("stream", "none")
    chosen = streams if mode == "each" else streams[:1] if mode == "first" else []
    results: list[dict[str, Any]] = [{} for _ in chosen]

    def one(index: int, path: str, parameters: dict[str, str]) -> None:
        results[index] = run_stream(args.port, args.source, path, parameters, plan)

    threads = [
        threading.Thread(target=one, args=(i, path, parameters), daemon=True)
        for i, (path, parameters) in enumerate(chosen)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic()))
    report(
        statuses=[status for status, _ in answers],
        connects=sum(1 for _, twiml in answers if "<Connect" in twiml),
        distinct_answers=len(distinct),
        streams=results,
    )


if __name__ == "__main__":
    main()
