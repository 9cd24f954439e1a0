"""Tests of the sans-I/O Media Streams protocol, fed frames shaped as Twilio sends them.

Plain synchronous tests: no sockets, no clock. Frames follow docs/protocols.md section 1
(string sequence numbers, numeric sampleRate/channels).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from voicebridge.errors import LocalProtocolError, RemoteProtocolError
from voicebridge.twilio.media import (
    MAX_FRAME_CHARS,
    PRE_START_CHARS,
    PRE_START_FRAMES,
    Connected,
    Dtmf,
    Mark,
    Media,
    MediaStream,
    PreStartLimitExceeded,
    Start,
    Stop,
    Unrecognized,
)

ACCOUNT = "AC0123456789abcdef0123456789abcdef"
CALL = "CAfedcba9876543210fedcba9876543210"
STREAM = "MZ00112233445566778899aabbccddeeff"
AUDIO = bytes(range(160))

CONNECTED = '{"event":"connected","protocol":"Call","version":"1.0.0"}'


def start_frame(**start_overrides: Any) -> str:
    start: dict[str, Any] = {
        "accountSid": ACCOUNT,
        "streamSid": STREAM,
        "callSid": CALL,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"token": "v1.abc", "caller": "+15551234567"},
    }
    start.update(start_overrides)
    return json.dumps(
        {"event": "start", "sequenceNumber": "1", "start": start, "streamSid": STREAM}
    )


DEFAULT_PAYLOAD = base64.b64encode(AUDIO).decode()


def media_frame(
    seq: Any = "4",
    chunk: Any = "2",
    timestamp: Any = "5",
    payload: Any = DEFAULT_PAYLOAD,
    **top: Any,
) -> str:
    frame: dict[str, Any] = {
        "event": "media",
        "sequenceNumber": seq,
        "streamSid": STREAM,
        "media": {
            "track": "inbound",
            "chunk": chunk,
            "timestamp": timestamp,
            "payload": payload,
        },
    }
    frame.update(top)
    return json.dumps(frame)


DTMF = json.dumps(
    {
        "event": "dtmf",
        "streamSid": STREAM,
        "sequenceNumber": "5",
        "dtmf": {"track": "inbound_track", "digit": "1"},
    }
)
MARK = json.dumps(
    {"event": "mark", "streamSid": STREAM, "sequenceNumber": "6", "mark": {"name": "turn-1:3"}}
)
STOP = json.dumps(
    {
        "event": "stop",
        "streamSid": STREAM,
        "sequenceNumber": "7",
        "stop": {"accountSid": ACCOUNT, "callSid": CALL},
    }
)


def started() -> MediaStream:
    stream = MediaStream()
    stream.receive(CONNECTED)
    stream.receive(start_frame())
    return stream


# ------------------------------------------------------------------ inbound events


def test_a_whole_stream_parses_into_events() -> None:
    stream = MediaStream()
    assert (stream.stream_sid, stream.call_sid, stream.started, stream.stopped) == (
        None,
        None,
        False,
        False,
    )

    assert stream.receive(CONNECTED) == Connected(protocol="Call", version="1.0.0")
    assert not stream.started

    start = stream.receive(start_frame())
    assert start == Start(
        sequence_number=1,
        stream_sid=STREAM,
        account_sid=ACCOUNT,
        call_sid=CALL,
        tracks=("inbound",),
        encoding="audio/x-mulaw",
        sample_rate=8000,
        channels=1,
        custom_parameters={"token": "v1.abc", "caller": "+15551234567"},
    )
    assert (stream.stream_sid, stream.call_sid, stream.started) == (STREAM, CALL, True)

    assert stream.receive(media_frame()) == Media(
        sequence_number=4, chunk=2, timestamp_ms=5, track="inbound", payload=AUDIO
    )
    assert stream.receive(DTMF) == Dtmf(sequence_number=5, digit="1", track="inbound_track")
    assert stream.receive(MARK) == Mark(sequence_number=6, name="turn-1:3")
    assert stream.receive(STOP) == Stop(sequence_number=7, account_sid=ACCOUNT, call_sid=CALL)
    assert stream.stopped and stream.started


def test_custom_parameters_are_a_read_only_copy() -> None:
    start = MediaStream().receive(start_frame())
    assert isinstance(start, Start)
    with pytest.raises(TypeError):
        start.custom_parameters["token"] = "forged"  # type: ignore[index]
    assert dict(start.custom_parameters) == {"token": "v1.abc", "caller": "+15551234567"}


def test_connected_is_optional() -> None:
    stream = MediaStream()
    assert isinstance(stream.receive(start_frame()), Start)
    assert isinstance(stream.receive(media_frame()), Media)


def test_missing_custom_parameters_mean_none() -> None:
    frame = orjson.loads(start_frame())
    del frame["start"]["customParameters"]
    start = MediaStream().receive(orjson.dumps(frame).decode())
    assert isinstance(start, Start) and dict(start.custom_parameters) == {}


def test_start_accepts_the_stream_sid_at_either_level() -> None:
    for path in (("streamSid",), ("start", "streamSid")):
        stream = MediaStream()
        start = stream.receive(mutate(start_frame(), path))
        assert isinstance(start, Start) and start.stream_sid == STREAM
        assert stream.stream_sid == STREAM


def test_counters_may_be_json_integers_too() -> None:
    event = started().receive(media_frame(seq=4, chunk=0, timestamp=123456))
    assert event == Media(
        sequence_number=4, chunk=0, timestamp_ms=123456, track="inbound", payload=AUDIO
    )


def test_unknown_fields_are_ignored() -> None:
    frame = orjson.loads(media_frame())
    frame["extra"] = {"anything": [1, 2]}
    frame["media"]["newField"] = None
    assert isinstance(started().receive(orjson.dumps(frame).decode()), Media)


def test_an_empty_payload_decodes_to_no_bytes() -> None:
    event = started().receive(media_frame(payload=""))
    assert isinstance(event, Media) and event.payload == b""


def test_unknown_events_are_reported_not_fatal() -> None:
    stream = MediaStream()
    assert stream.receive('{"event":"hello-from-the-future","x":1}') == Unrecognized(
        event="hello-from-the-future"
    )
    stream.receive(start_frame())
    assert stream.receive('{"event":"novel","streamSid":"whatever"}') == Unrecognized(event="novel")
    assert isinstance(stream.receive(media_frame()), Media)


# ------------------------------------------------------------ the pre-start budget


def test_unknown_events_before_start_are_tolerated_within_the_budget() -> None:
    stream = MediaStream()
    stream.receive(CONNECTED)
    for _ in range(PRE_START_FRAMES - 2):  # all but connected and start
        assert stream.receive('{"event":"x"}') == Unrecognized(event="x")
    assert isinstance(stream.receive(start_frame()), Start)
    # After start the budget no longer applies.
    for _ in range(2 * PRE_START_FRAMES):
        assert stream.receive('{"event":"x"}') == Unrecognized(event="x")
    assert isinstance(stream.receive(media_frame()), Media)


def test_one_frame_over_the_budget_before_start_is_refused_even_a_start() -> None:
    stream = MediaStream()
    for _ in range(PRE_START_FRAMES):
        stream.receive('{"event":"x"}')
    with pytest.raises(PreStartLimitExceeded, match=f"more than {PRE_START_FRAMES} frames"):
        stream.receive(start_frame())
    assert not stream.started


def test_characters_over_the_budget_before_start_are_refused_unparsed() -> None:
    stream = MediaStream()
    big = '{"event":"x","pad":"' + "p" * (MAX_FRAME_CHARS - 100) + '"}'
    sent = 0
    while sent + len(big) <= PRE_START_CHARS:
        stream.receive(big)
        sent += len(big)
    # Not JSON at all: refused for the budget, before any parsing.
    with pytest.raises(PreStartLimitExceeded, match=f"more than {PRE_START_CHARS} characters"):
        stream.receive("{" * len(big))


def test_the_budget_counts_frames_that_are_rejected_too() -> None:
    # A refusal is a RemoteProtocolError like any other malformed frame.
    assert issubclass(PreStartLimitExceeded, RemoteProtocolError)
    stream = MediaStream()
    for _ in range(PRE_START_FRAMES):
        with pytest.raises(RemoteProtocolError, match="not JSON"):
            stream.receive("not json")
    with pytest.raises(PreStartLimitExceeded):
        stream.receive(CONNECTED)


# --------------------------------------------------------------- malformed frames


def rejects(stream: MediaStream, frame: str | bytes, *words: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        stream.receive(frame)
    message = str(info.value)
    assert "\n" not in message and len(message) < 200, message
    for word in words:
        assert word in message, message


def test_binary_frames_are_rejected() -> None:
    rejects(started(), media_frame().encode(), "binary")


def test_oversized_frames_are_rejected() -> None:
    padding = "x" * MAX_FRAME_CHARS
    rejects(started(), media_frame(padding=padding), "exceeds")


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        ("not json", ("not JSON",)),
        ("", ("not JSON",)),
        ("[1,2]", ("not a JSON object",)),
        ('"media"', ("not a JSON object",)),
        ("{}", ("no 'event'",)),
        ('{"event":5}', ("'event' is not a string",)),
    ],
)
def test_frames_that_are_not_events_are_rejected(frame: str, words: tuple[str, ...]) -> None:
    rejects(started(), frame, *words)


def test_events_before_start_are_rejected() -> None:
    for frame in (media_frame(), DTMF, MARK, STOP):
        rejects(MediaStream(), frame, "before 'start'")


def test_second_start_and_late_connected_are_rejected() -> None:
    rejects(started(), start_frame(), "second 'start'")
    rejects(started(), CONNECTED, "after 'start'")
    stream = MediaStream()
    stream.receive(CONNECTED)
    rejects(stream, CONNECTED, "second 'connected'")


def test_anything_after_stop_is_rejected() -> None:
    for frame in (media_frame(), DTMF, MARK, STOP, start_frame(), CONNECTED, '{"event":"new"}'):
        stream = started()
        stream.receive(STOP)
        rejects(stream, frame, "after 'stop'")


def test_another_streams_frames_are_rejected() -> None:
    rejects(started(), media_frame(streamSid="MZother"), "MZother", "not this stream")
    frame = orjson.loads(DTMF)
    del frame["streamSid"]
    rejects(started(), orjson.dumps(frame).decode(), "dtmf.streamSid is missing")


@pytest.mark.parametrize(
    "bad", ["-1", "1.5", "", " 1", "+1", "0x1f", "\u0661", "1" * 19, -1, 1.0, True, None, [1], {}]
)
def test_counters_must_be_non_negative_integers(bad: Any) -> None:
    rejects(started(), media_frame(seq=bad), "media.sequenceNumber")
    rejects(started(), media_frame(chunk=bad), "media.chunk")
    rejects(started(), media_frame(timestamp=bad), "media.timestamp")


@pytest.mark.parametrize(
    "bad", ["AA", "A A=", "AAAA\n", "!!!!", "AA==AA==", "AA=A", "ÄÄÄÄ", 123, None, []]
)
def test_payload_must_be_strict_base64(bad: Any) -> None:
    rejects(started(), media_frame(payload=bad), "media.payload")


def mutate(frame: str, path: tuple[str, ...], value: Any = ...) -> str:
    """``frame`` with the field at ``path`` set to ``value`` (removed when omitted)."""
    message = orjson.loads(frame)
    target = message
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return orjson.dumps(message).decode()


@pytest.mark.parametrize(
    ("path", "value", "words"),
    [
        (("media",), ..., "media is missing"),
        (("media",), "x", "media is not an object"),
        (("media", "track"), ..., "media.track is missing"),
        (("media", "track"), 1, "media.track is not a string"),
        (("sequenceNumber",), ..., "media.sequenceNumber is missing"),
        (("media", "payload"), ..., "media.payload is missing"),
    ],
)
def test_media_fields_are_checked(path: tuple[str, ...], value: Any, words: str) -> None:
    rejects(started(), mutate(media_frame(), path, value), words)


@pytest.mark.parametrize(
    ("path", "value", "words"),
    [
        (("start",), ..., "start is missing"),
        (("start", "callSid"), ..., "start.callSid is missing"),
        (("start", "callSid"), "", "start.callSid is empty"),
        (("start", "accountSid"), 7, "start.accountSid is not a string"),
        (("start", "tracks"), "inbound", "start.tracks is not a list"),
        (("start", "tracks"), [1], "start.tracks[]"),
        (("start", "mediaFormat"), ..., "start.mediaFormat is missing"),
        (("start", "mediaFormat", "sampleRate"), 8000.0, "sampleRate"),
        (("start", "mediaFormat", "channels"), ..., "channels is missing"),
        (("start", "mediaFormat", "encoding"), None, "encoding is missing"),
        (("start", "customParameters"), [], "customParameters is not an object"),
        (("start", "customParameters", "token"), 5, "customParameters['token']"),
        (("start", "streamSid"), "MZdifferent", "differs"),
        (("sequenceNumber",), "one", "start.sequenceNumber"),
    ],
)
def test_start_fields_are_checked(path: tuple[str, ...], value: Any, words: str) -> None:
    rejects(MediaStream(), mutate(start_frame(), path, value), words)
    # The failed start left the stream waiting: a good start still works.
    stream = MediaStream()
    with pytest.raises(RemoteProtocolError):
        stream.receive(mutate(start_frame(), path, value))
    assert not stream.started
    assert isinstance(stream.receive(start_frame()), Start)


def test_start_needs_a_stream_sid() -> None:
    frame = mutate(mutate(start_frame(), ("streamSid",)), ("start", "streamSid"))
    rejects(MediaStream(), frame, "streamSid is missing")


def test_connected_fields_are_checked() -> None:
    rejects(MediaStream(), '{"event":"connected","version":"1.0.0"}', "connected.protocol")


@pytest.mark.parametrize(
    ("frame", "path", "value", "words"),
    [
        (DTMF, ("dtmf", "digit"), "", "dtmf.digit is empty"),
        (DTMF, ("dtmf", "digit"), ..., "dtmf.digit is missing"),
        (DTMF, ("dtmf",), ..., "dtmf is missing"),
        (DTMF, ("sequenceNumber",), "-5", "dtmf.sequenceNumber"),
        (MARK, ("mark", "name"), ..., "mark.name is missing"),
        (MARK, ("mark",), 1, "mark is not an object"),
        (STOP, ("stop", "callSid"), ..., "stop.callSid is missing"),
        (STOP, ("stop",), ..., "stop is missing"),
    ],
)
def test_other_event_fields_are_checked(
    frame: str, path: tuple[str, ...], value: Any, words: str
) -> None:
    stream = started()
    rejects(stream, mutate(frame, path, value), words)
    assert not stream.stopped


# ------------------------------------------------------------------ outbound frames


def test_send_media_is_exactly_twilios_media_message() -> None:
    frame = started().send_media(AUDIO)
    assert orjson.loads(frame) == {
        "event": "media",
        "streamSid": STREAM,
        "media": {"payload": base64.b64encode(AUDIO).decode()},
    }
    assert list(orjson.loads(frame)) == ["event", "streamSid", "media"]


def test_send_mark_is_exactly_twilios_mark_message() -> None:
    frame = started().send_mark('turn "7"/é')
    assert frame == (
        '{"event":"mark","streamSid":"' + STREAM + '","mark":{"name":"turn \\"7\\"/é"}}'
    )
    assert orjson.loads(frame) == {
        "event": "mark",
        "streamSid": STREAM,
        "mark": {"name": 'turn "7"/é'},
    }


def test_send_clear_is_exactly_twilios_clear_message() -> None:
    assert started().send_clear() == '{"event":"clear","streamSid":"' + STREAM + '"}'


def test_a_stream_sid_needing_escapes_is_encoded() -> None:
    stream = MediaStream()
    stream.receive(mutate(start_frame(streamSid='MZ"\\'), ("streamSid",), 'MZ"\\'))
    assert orjson.loads(stream.send_clear()) == {"event": "clear", "streamSid": 'MZ"\\'}


def test_sending_before_start_or_after_stop_is_our_error() -> None:
    fresh = MediaStream()
    fresh.receive(CONNECTED)
    done = started()
    done.receive(STOP)
    for stream, words in ((fresh, "before 'start'"), (done, "after 'stop'")):
        with pytest.raises(LocalProtocolError, match=words):
            stream.send_media(AUDIO)
        with pytest.raises(LocalProtocolError, match=words):
            stream.send_mark("m")
        with pytest.raises(LocalProtocolError, match=words):
            stream.send_clear()


def test_empty_payload_or_mark_name_is_our_error() -> None:
    with pytest.raises(LocalProtocolError, match="empty media payload"):
        started().send_media(b"")
    with pytest.raises(LocalProtocolError, match="empty mark name"):
        started().send_mark("")


def test_a_mark_name_that_is_not_valid_text_is_our_error() -> None:
    with pytest.raises(LocalProtocolError):
        started().send_mark("\ud800")


# ------------------------------------------------------------------ properties


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=12,
    )


def assert_event_or_protocol_error(stream: MediaStream, frame: str | bytes) -> None:
    try:
        event = stream.receive(frame)
    except RemoteProtocolError:
        return
    assert isinstance(event, Connected | Start | Media | Dtmf | Mark | Stop | Unrecognized)


@given(st.text(max_size=200) | st.binary(max_size=50))
def test_arbitrary_frames_give_an_event_or_a_protocol_error(frame: str | bytes) -> None:
    assert_event_or_protocol_error(MediaStream(), frame)
    assert_event_or_protocol_error(started(), frame)


@given(
    st.sampled_from([CONNECTED, start_frame(), media_frame(), DTMF, MARK, STOP]),
    st.lists(st.text(max_size=12), min_size=1, max_size=3),
    json_values(),
)
def test_mangled_real_frames_give_an_event_or_a_protocol_error(
    frame: str, path: list[str], value: Any
) -> None:
    message = orjson.loads(frame)
    target = message
    for key in path[:-1]:
        child = target.get(key) if isinstance(target, dict) else None
        if not isinstance(child, dict):
            break
        target = child
    target[path[-1]] = value
    text = json.dumps(message)  # not orjson: it cannot encode integers past 64 bits
    assert_event_or_protocol_error(MediaStream(), text)
    assert_event_or_protocol_error(started(), text)
