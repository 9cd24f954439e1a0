"""Property tests of the Twilio Media Streams parser: any sequence of frames, any state.

``MediaStream.receive`` faces the network. Whatever Twilio (or anyone who reaches the
socket) sends, in whatever order, the only outcomes are an event or
``RemoteProtocolError``; a rejected frame leaves the state as it was; the state
machine's invariants hold after every frame; and what we encode for the stream is
always a frame Twilio accepts (or ``LocalProtocolError`` once it has stopped).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import event as note_event
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.strategies import json_values as strategy_json_values
from voicebridge.errors import LocalProtocolError, RemoteProtocolError
from voicebridge.twilio.media import (
    Connected,
    InboundEvent,
    MediaStream,
    Start,
    Stop,
    Unrecognized,
)

STREAM_SID = "MZ" + "1" * 32
OTHER_SID = "MZ" + "2" * 32

json_values = strategy_json_values(max_leaves=8)
#: Sequence numbers, chunks, timestamps: mostly digit strings (as Twilio sends them).
counters = st.integers(min_value=0, max_value=9).flatmap(
    lambda pick: (
        st.integers(min_value=0, max_value=10**6).map(str)
        if pick < 7
        else st.integers(min_value=-5, max_value=10**20) | st.text(max_size=6)
    )
)
sids = st.sampled_from([STREAM_SID] * 6 + [OTHER_SID, ""])


def _frame(event: str, sid: str, seq: object, body: dict[str, Any] | None) -> dict[str, Any]:
    frame: dict[str, Any] = {"event": event, "sequenceNumber": seq, "streamSid": sid}
    if body is not None:
        frame[event] = body
    return frame


@st.composite
def wellformed_frames(draw: st.DrawFn) -> dict[str, Any]:
    """A frame of each kind Twilio sends, its fields mostly right."""
    kind = draw(st.sampled_from(["connected", "start", "media", "mark", "dtmf", "stop", "other"]))
    sid, seq = draw(sids), draw(counters)
    if kind == "connected":
        return {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    if kind == "start":
        parameters = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3))
        return _frame(
            "start",
            sid,
            seq,
            {
                "accountSid": "AC" + "3" * 32,
                "streamSid": sid,
                "callSid": draw(st.sampled_from(["CA" + "4" * 32, ""])),
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": parameters,
            },
        )
    if kind == "media":
        payload = draw(st.sampled_from(["/w==", "//8=", "", "not base64!", "/" * 4 * 40]))
        return _frame(
            "media",
            sid,
            seq,
            {
                "track": "inbound",
                "chunk": draw(counters),
                "timestamp": draw(counters),
                "payload": payload,
            },
        )
    if kind == "mark":
        return _frame("mark", sid, seq, {"name": draw(st.text(max_size=10))})
    if kind == "dtmf":
        return _frame(
            "dtmf", sid, seq, {"track": "inbound_track", "digit": draw(st.text(max_size=2))}
        )
    if kind == "stop":
        return _frame("stop", sid, seq, {"accountSid": "AC" + "3" * 32, "callSid": "CA" + "4" * 32})
    return _frame(draw(st.text(max_size=10)), sid, seq, None)


@st.composite
def mangled(draw: st.DrawFn, frame: dict[str, Any]) -> dict[str, Any]:
    """``frame`` with at most one field (top level or in its body) replaced or removed."""
    choice = draw(st.integers(min_value=0, max_value=5))
    if choice < 3:
        return frame
    target = frame
    body = frame.get(str(frame.get("event")))
    if isinstance(body, dict) and draw(st.booleans()):
        target = body
    if not target:
        return frame
    key = draw(st.sampled_from(sorted(target)))
    if choice == 1:
        del target[key]
    else:
        target[key] = draw(json_values)
    return frame


@st.composite
def frames(draw: st.DrawFn) -> str | bytes:
    """What may arrive on the socket: mostly frames shaped like Twilio's, some garbage."""
    kind = draw(st.integers(min_value=0, max_value=9))
    if kind == 0:
        return draw(st.binary(max_size=20))
    if kind == 1:
        return draw(st.text(max_size=40))
    frame = draw(mangled(draw(wellformed_frames())))
    return json.dumps(frame)  # not orjson: it cannot encode integers past 64 bits


def _state(stream: MediaStream) -> tuple[object, ...]:
    return (stream.started, stream.stopped, stream.stream_sid, stream.call_sid)


def _check_outbound(stream: MediaStream) -> None:
    """What we would send now is a frame Twilio accepts, or LocalProtocolError."""
    encoders = [
        lambda: stream.send_media(b"\xff" * 160),
        lambda: stream.send_mark("1.1"),
        stream.send_clear,
    ]
    for encode in encoders:
        if not stream.started or stream.stopped:
            try:
                encode()
            except LocalProtocolError:
                continue
            raise AssertionError("encoded a frame outside the started stream")
        message = json.loads(encode())
        assert message["streamSid"] == stream.stream_sid
        assert message["event"] in ("media", "mark", "clear")
        expected = {"event", "streamSid"} | (
            {message["event"]} if message["event"] != "clear" else set()
        )
        assert set(message) == expected


#: The opening Twilio always sends, so that most runs reach the started state.
OPENING = [
    json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
    json.dumps(
        _frame(
            "start",
            STREAM_SID,
            "1",
            {
                "accountSid": "AC" + "3" * 32,
                "streamSid": STREAM_SID,
                "callSid": "CA" + "4" * 32,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": {"token": "t"},
            },
        )
    ),
]


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.lists(frames(), max_size=12))
def test_any_sequence_of_frames_gives_events_or_protocol_errors(
    opened: bool, rest: list[str | bytes]
) -> None:
    sequence = [*OPENING, *rest] if opened else rest
    stream = MediaStream()
    started: Start | None = None
    stopped = False
    for frame in sequence:
        before = _state(stream)
        try:
            event: InboundEvent = stream.receive(frame)
        except RemoteProtocolError as exc:
            assert str(exc), "a reason for the log line"
            assert _state(stream) == before, "a rejected frame changes nothing"
            continue
        assert not stopped, "nothing is accepted after stop"
        note_event(type(event).__name__)
        if isinstance(event, Start):
            assert started is None, "one start per stream"
            started = event
        elif isinstance(event, Stop):
            stopped = True
        elif isinstance(event, Connected):
            assert started is None
        else:
            assert started is not None or isinstance(event, Unrecognized)
        # Invariants: stream_sid is set iff start was accepted, and never changes.
        assert stream.started == (started is not None)
        assert stream.stream_sid == (started.stream_sid if started else None)
        assert stream.stopped == stopped
        _check_outbound(stream)
