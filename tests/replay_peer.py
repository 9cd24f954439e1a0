"""A replayer in its own OS process: posts one captured, validly signed voice webhook again
and again from 127.0.0.2, and streams with whatever answer it got, as an attacker would.

Run by ``tests/test_admission_e2e.py``; not a test module. Arguments: one JSON object with
``port``, ``path`` (the webhook's path and query), ``form``, ``signature``, ``call_sid``.
Protocol with the parent, one line each way:

- after its first post it prints ``posted``;
- it then posts every ``REPLAY_INTERVAL_S`` until stdin says ``ended``; the first time
  the webhook is refused (the genuine stream has begun) it streams with the last answer
  it was given;
- on ``ended`` it posts once more, streams once more, and prints every result as JSON.

Blocking sockets and no trio on purpose: nothing here shares the bridge's event loop.
"""

from __future__ import annotations

import json
import select
import socket
import sys
from typing import Any
from xml.etree import ElementTree

import httpx
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    RejectConnection,
    Request,
    TextMessage,
)

#: The attacker's own address: another peer than the genuine Twilio (127.0.0.1).
ADDRESS = "127.0.0.2"
#: 50 replays a second: far more than any Twilio retry, few enough for a shared machine.
REPLAY_INTERVAL_S = 0.02
#: A refused stream is closed at once; a served one would stream audio for seconds.
STREAM_WAIT_S = 3.0


def post(http: httpx.Client, url: str, form: dict[str, str], signature: str) -> dict[str, Any]:
    response = http.post(url, data=form, headers={"X-Twilio-Signature": signature})
    return {"status": response.status_code, "body": response.text}


def stream(port: int, twiml: str, call_sid: str) -> dict[str, Any]:
    """Open ``/twilio/stream`` and send ``connected`` and ``start`` with the parameters of
    ``twiml``; how the bridge answered: accepted, messages before its close, close code."""
    element = ElementTree.fromstring(twiml).find("Connect/Stream")
    assert element is not None, twiml
    parameters = {p.get("name"): p.get("value") for p in element.iter("Parameter")}
    stream_sid = "MZ" + "7" * 32
    start = {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": stream_sid,
        "start": {
            "accountSid": "AC" + "0" * 32,
            "streamSid": stream_sid,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": parameters,
        },
    }
    connected = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    result: dict[str, Any] = {"accepted": False, "messages": 0, "close": None}
    ws = WSConnection(ConnectionType.CLIENT)
    with socket.create_connection(
        ("127.0.0.1", port), timeout=STREAM_WAIT_S, source_address=(ADDRESS, 0)
    ) as sock:
        sock.sendall(ws.send(Request(host=f"127.0.0.1:{port}", target="/twilio/stream")))
        try:
            while result["close"] is None:
                data = sock.recv(65536)
                if not data:
                    result["close"] = "eof"
                    break
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        result["accepted"] = True
                        sock.sendall(
                            ws.send(TextMessage(json.dumps(connected)))
                            + ws.send(TextMessage(json.dumps(start)))
                        )
                    elif isinstance(event, Message):
                        result["messages"] += 1
                    elif isinstance(event, CloseConnection):
                        result["close"] = event.code
                        sock.sendall(ws.send(event.response()))
                    elif isinstance(event, RejectConnection):
                        result["close"] = f"rejected {event.status_code}"
        except TimeoutError:
            result["close"] = "still open"
    return result


def main() -> None:
    args = json.loads(sys.argv[1])
    url = f"http://127.0.0.1:{args['port']}{args['path']}"
    replays: list[dict[str, Any]] = []
    streams: list[dict[str, Any]] = []
    last_answer = ""
    transport = httpx.HTTPTransport(local_address=ADDRESS)
    with httpx.Client(transport=transport, timeout=5.0) as http:

        def replay() -> int:
            nonlocal last_answer
            result = post(http, url, args["form"], args["signature"])
            replays.append(result)
            if result["status"] == 200 and "<Connect" in result["body"]:
                last_answer = result["body"]
            return int(result["status"])

        replay()
        print("posted", flush=True)
        while not select.select([sys.stdin], [], [], REPLAY_INTERVAL_S)[0]:
            if replay() == 403 and not streams:
                streams.append(stream(args["port"], last_answer, args["call_sid"]))
        assert sys.stdin.readline().strip() == "ended"
        replay()
        streams.append(stream(args["port"], last_answer, args["call_sid"]))
    print(json.dumps({"replays": replays, "streams": streams}), flush=True)


if __name__ == "__main__":
    main()
