"""The media socket's edge, end to end: the real server on loopback, peers that misbehave.

Charter: the real server (``tests.harness.running_bridge``) on 127.0.0.1:0 against
the simulated Vapi, real sockets, real time, a ``trio.fail_after`` guard on every
test. A peer that claims to prove the event loop is not held runs in a separate OS
process bound to 127.0.0.2 (a flooder in the server's own loop would stall with it
and prove nothing); peers that only send a fixed sequence run in-process, also from
127.0.0.2, so that the address the server logs is the peer's own.
"""

from __future__ import annotations

import json
import logging
import sys

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request

from tests.harness import running_bridge
from tests.test_e2e import SHORT_SCRIPT, assert_served
from voicebridge.bridge.outcome import Outcome
from voicebridge.observability.logs import record_fields
from voicebridge.sim.caller import CallReport, place_call
from voicebridge.twilio.media import PRE_START_FRAMES

#: Where the misbehaving peers connect from (the server listens on 127.0.0.1).
PEER_HOST = "127.0.0.2"
#: The ticker in the server's process: it wakes this often, and no wake-up may come
#: later than ``MAX_GAP_S`` after the previous one while the flood runs.
TICK_S = 0.010
MAX_GAP_S = 0.050
#: The flooder gives up after this long if the server never cuts it off.
FLOOD_LIMIT_S = 6.0

#: The flooder: upgrades /twilio/stream without a token and, in the same segment and
#: after it, sends ``{"event":"x"}`` frames as fast as the kernel takes them. It
#: prints its own address, then whether the server cut it off and how much it sent.
FLOODER = r"""
import json, os, socket, sys, time
port, limit_s = int(sys.argv[1]), float(sys.argv[2])
sock = socket.socket()
sock.bind(("127.0.0.2", 0))
sock.connect(("127.0.0.1", port))
sock.settimeout(limit_s)
print(json.dumps({"local": "%s:%d" % sock.getsockname()}), flush=True)
head = (
    "GET /twilio/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: " + "dGhlIHNhbXBsZSBub25jZQ==" + "\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
).encode()
payload, mask = b'{"event":"x"}', os.urandom(4)
frame = bytes([0x81, 0x80 | len(payload)]) + mask + bytes(
    b ^ mask[i % 4] for i, b in enumerate(payload))
chunk = frame * (65536 // len(frame))
sent, cut_off, why, start = 0, False, "", time.monotonic()
try:
    sock.sendall(head + chunk)
    sent += len(chunk)
    while time.monotonic() - start < limit_s:
        sock.sendall(chunk)
        sent += len(chunk)
except TimeoutError:
    why = "the server stopped reading but kept the connection"
except OSError as exc:
    cut_off, why = True, type(exc).__name__
print(json.dumps({"cut_off": cut_off, "why": why, "frames": sent // len(frame),
                  "after_s": round(time.monotonic() - start, 3)}), flush=True)
"""


class Ticker:
    """A task in the server's process that notes how late each of its wake-ups is."""

    def __init__(self) -> None:
        self.largest_gap_s = 0.0

    def restart(self) -> None:
        self.largest_gap_s = 0.0

    async def run(self) -> None:
        last = trio.current_time()
        while True:
            await trio.sleep(TICK_S)
            now = trio.current_time()
            self.largest_gap_s = max(self.largest_gap_s, now - last)
            last = now


def peer_lines(caplog: pytest.LogCaptureFixture, local: str) -> list[logging.LogRecord]:
    """The bridge's log records that name ``local`` as the peer."""
    return [
        r
        for r in caplog.records
        if r.name.startswith("voicebridge") and record_fields(r).get("REMOTE") == local
    ]


async def test_a_flood_before_start_from_another_process_is_cut_off_while_a_call_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge")
    ticker = Ticker()
    reports: list[CallReport] = []
    witness_done = trio.Event()
    with trio.fail_after(40):
        async with running_bridge() as bridge, trio.open_nursery() as nursery:
            nursery.start_soon(ticker.run)

            async def witness() -> None:
                reports.append(await place_call(bridge.caller, SHORT_SCRIPT))
                witness_done.set()

            nursery.start_soon(witness)
            await trio.sleep(0.5)  # the witness call is streaming by now
            ticker.restart()
            flood = await trio.run_process(
                [sys.executable, "-c", FLOODER, str(bridge.listening.port), str(FLOOD_LIMIT_S)],
                capture_stdout=True,
                capture_stderr=True,
            )
            flood_gap_s = ticker.largest_gap_s
            await witness_done.wait()
            nursery.cancel_scope.cancel(reason="the witness call is over")
    hello, result = (json.loads(line) for line in flood.stdout.decode().splitlines())
    print(f"flooder: {result}; the ticker's largest gap: {flood_gap_s * 1000:.1f} ms")
    assert result["cut_off"], result
    assert result["frames"] > PRE_START_FRAMES, result
    # By the budget, not by the start deadline (nor by the flooder giving up).
    assert result["after_s"] < bridge.config.twilio.start_deadline_s, result
    assert flood_gap_s <= MAX_GAP_S, f"the event loop stalled {flood_gap_s * 1000:.1f} ms"
    [report] = reports
    assert_served(report, bridge)
    # One line says why the flooder was refused, with its address.
    [line] = peer_lines(caplog, hello["local"])
    fields = record_fields(line)
    assert fields["EVENT"] == "call-end"
    assert fields["OUTCOME"] == Outcome.PROTOCOL_ERROR.value
    assert fields["DETAIL"] == f"before start: more than {PRE_START_FRAMES} frames before 'start'"
    assert "CALL_SID" not in fields and "VAPI_CALL_ID" not in fields
    assert len(bridge.vapi.calls) == 1, "only the witness made a Vapi call"


def peer_address(sock: trio.socket.SocketType) -> str:
    """Our end's address as the server logs the peer: ``host:port``."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


async def connect_from_peer_host(port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((PEER_HOST, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


def masked_text_frame(text: str, mask: bytes = b"\x0f\x1e\x2d\x3c") -> bytes:
    data = text.encode()
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    return bytes([0x81, 0x80 | len(data)]) + mask + masked


async def test_frames_sent_in_the_segment_of_the_upgrade_reach_the_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge")
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(Request(host="127.0.0.1", target="/twilio/stream"))
    # One over the budget, all in the upgrade's own segment and nothing after: the
    # server can refuse the stream only if it reads them.
    frames = b"".join(masked_text_frame('{"event":"x"}') for _ in range(PRE_START_FRAMES + 1))
    events: list[object] = []
    with trio.fail_after(10):
        async with running_bridge() as bridge:
            stream = await connect_from_peer_host(bridge.listening.port)
            local = peer_address(stream.socket)
            t0 = trio.current_time()
            await stream.send_all(request + frames)
            while not any(isinstance(e, CloseConnection) for e in events):
                data = await stream.receive_some()
                assert data, "the server closed without a close frame"
                client.receive_data(data)
                events.extend(client.events())
            refused_after_s = trio.current_time() - t0
            await stream.aclose()
    assert isinstance(events[0], AcceptConnection)
    [close] = [e for e in events if isinstance(e, CloseConnection)]
    assert close.code == 1008
    # At once, not at the start deadline (twilio.start_deadline_s, 5 s).
    assert refused_after_s < bridge.config.twilio.start_deadline_s
    [line] = peer_lines(caplog, local)
    assert f"more than {PRE_START_FRAMES} frames" in str(record_fields(line)["DETAIL"])


async def test_a_bad_upgrade_is_answered_400_and_logged_with_the_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge")
    with trio.fail_after(10):
        async with running_bridge() as bridge:
            stream = await connect_from_peer_host(bridge.listening.port)
            local = peer_address(stream.socket)
            await stream.send_all(b"GET /twilio/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            while data := await stream.receive_some():
                answer += data
            await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 400 ")
    [line] = peer_lines(caplog, local)
    assert record_fields(line)["EVENT"] == "stream-refused"
    assert local in line.getMessage()
