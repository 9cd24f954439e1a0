"""Sans-I/O protocol of one bidirectional Twilio Media Stream: text frames in, events out.

Like h11 and wsproto, this module does no I/O, reads no clock and logs nothing:
``MediaStream.receive`` turns one WebSocket text frame from Twilio into one frozen
event, and ``send_media`` / ``send_mark`` / ``send_clear`` return the exact text
frame to write. A malformed or out-of-order frame from Twilio raises
``RemoteProtocolError``; sending in a state that does not allow it (before ``start``,
after ``stop``) raises ``LocalProtocolError``. The wire format is documented in
``docs/protocols.md``, section 1.

Inbound ``media`` frames arrive about 50 times a second per call, so their path is
kept short: one ``orjson.loads``, a few dict lookups and one strict base64 decode.
"""

from __future__ import annotations

import binascii
import types
from collections.abc import Mapping
from typing import Any, TypeAlias

import orjson
from attrs import field, frozen

from voicebridge.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_FRAME_CHARS",
    "PRE_START_CHARS",
    "PRE_START_FRAMES",
    "Connected",
    "Dtmf",
    "InboundEvent",
    "Mark",
    "Media",
    "MediaStream",
    "PreStartLimitExceeded",
    "Start",
    "Stop",
    "Unrecognized",
]

#: Longest text frame accepted from Twilio, in characters. Twilio's largest frame is
#: ``start``, whose size is dominated by ``customParameters`` (our own TwiML parameters,
#: each under 500 characters, a handful per call); a 20 ms ``media`` frame is about 350
#: characters. 64 KiB leaves ample room for larger media chunks (their size is not
#: documented) while bounding the parse work a broken or hostile peer can cause per frame.
MAX_FRAME_CHARS = 64 * 1024

#: Frames accepted before ``start``, ``start`` itself included. Twilio sends two
#: (``connected``, ``start``); the rest leaves room for events it may add before
#: ``start`` (tolerated as ``Unrecognized``), while a peer without a token cannot
#: make the bridge parse frames without end.
PRE_START_FRAMES = 16
#: Characters accepted before ``start``, ``start`` included: room for a ``start`` of
#: the largest frame size and as much again, far above Twilio's (a few hundred).
PRE_START_CHARS = 2 * MAX_FRAME_CHARS

#: Sequence numbers, chunk numbers and timestamps above this are not plausible (a 10-hour
#: call is 3.6e7 ms) and would only cost big-integer arithmetic; reject them.
_MAX_COUNTER = 10**18 - 1
_MAX_COUNTER_DIGITS = 18

#: Longest excerpt of a bad value quoted in an error message (errors become log lines).
_MAX_SHOWN_CHARS = 40


@frozen(kw_only=True)
class Connected:
    """Twilio opened the stream (``connected``); optional, and always before ``start``."""

    protocol: str
    version: str


def _read_only_copy(value: Mapping[str, str]) -> Mapping[str, str]:
    return types.MappingProxyType(dict(value))


@frozen(kw_only=True)
class Start:
    """The stream started (``start``): its ids, media format and our TwiML ``<Parameter>``s."""

    sequence_number: int
    stream_sid: str
    account_sid: str
    call_sid: str
    tracks: tuple[str, ...]
    #: As Twilio names it, e.g. ``audio/x-mulaw``.
    encoding: str
    sample_rate: int
    channels: int
    #: ``start.customParameters``: the ``<Parameter>`` children of our ``<Stream>``, read-only.
    custom_parameters: Mapping[str, str] = field(converter=_read_only_copy, hash=False)


@frozen(kw_only=True)
class Media:
    """A chunk of the caller's audio (``media``)."""

    sequence_number: int
    chunk: int
    #: Milliseconds since the stream started; use it, not the chunk size, to measure time.
    timestamp_ms: int
    track: str
    #: The audio itself, base64-decoded (μ-law 8 kHz mono for a bidirectional stream).
    payload: bytes


@frozen(kw_only=True)
class Dtmf:
    """The caller pressed a key (``dtmf``)."""

    sequence_number: int
    digit: str
    track: str


@frozen(kw_only=True)
class Mark:
    """Twilio echoed a mark we sent (``mark``): the audio before it played, or was cleared."""

    sequence_number: int
    name: str


@frozen(kw_only=True)
class Stop:
    """The stream stopped or the call ended (``stop``); nothing may follow it."""

    sequence_number: int
    account_sid: str
    call_sid: str


@frozen(kw_only=True)
class Unrecognized:
    """An event this module does not know; Twilio adds events, so it is not an error."""

    event: str


InboundEvent: TypeAlias = Connected | Start | Media | Dtmf | Mark | Stop | Unrecognized


class PreStartLimitExceeded(RemoteProtocolError):
    """More than ``PRE_START_FRAMES`` frames, or ``PRE_START_CHARS`` characters, came
    before ``start``: a peer wasting the bridge's time, not Twilio."""


def _show(value: object) -> str:
    """A short, single-line rendering of a bad value for an error message."""
    text = repr(value)
    if len(text) > _MAX_SHOWN_CHARS:
        return text[: _MAX_SHOWN_CHARS - 1] + "…"
    return text


def _counter(value: object, where: str) -> int:
    """A non-negative integer sent as a digit string (documented) or a JSON integer."""
    if type(value) is str:
        if value.isascii() and value.isdigit() and len(value) <= _MAX_COUNTER_DIGITS:
            return int(value)
    elif type(value) is int and 0 <= value <= _MAX_COUNTER:
        return value
    if value is None:
        raise RemoteProtocolError(f"{where} is missing")
    raise RemoteProtocolError(f"{where} is not a non-negative integer: {_show(value)}")


def _text(value: object, where: str) -> str:
    if type(value) is str:
        return value
    if value is None:
        raise RemoteProtocolError(f"{where} is missing")
    raise RemoteProtocolError(f"{where} is not a string: {_show(value)}")


def _nonempty_text(value: object, where: str) -> str:
    text = _text(value, where)
    if not text:
        raise RemoteProtocolError(f"{where} is empty")
    return text


def _object(value: object, where: str) -> dict[str, Any]:
    if type(value) is dict:
        return value
    if value is None:
        raise RemoteProtocolError(f"{where} is missing")
    raise RemoteProtocolError(f"{where} is not an object: {_show(value)}")


class MediaStream:
    """The state of one Media Stream, seen from our side (the WebSocket server).

    States: *waiting* (optionally after ``connected``) → *started* (after ``start``) →
    *stopped* (after ``stop``). Only ``connected`` (at most once) and unrecognized
    events may precede ``start``, within ``PRE_START_FRAMES`` frames and
    ``PRE_START_CHARS`` characters (``start`` included); nothing at all may follow
    ``stop``. Every frame after ``start`` must carry the started stream's ``streamSid``.

    Invariant: ``stream_sid`` is set if and only if ``start`` was received.

    Unknown fields are ignored everywhere (Twilio adds fields). Sequence numbers are
    parsed but not checked for order. Not thread-safe; one instance per socket.
    """

    __slots__ = (
        "_call_sid",
        "_connected",
        "_pre_start_chars",
        "_pre_start_frames",
        "_stopped",
        "_stream_sid",
        "_stream_sid_json",
    )

    def __init__(self) -> None:
        # What came before start, counted against PRE_START_FRAMES / PRE_START_CHARS.
        self._pre_start_frames = 0
        self._pre_start_chars = 0
        self._connected = False
        self._stopped = False
        self._stream_sid: str | None = None
        self._call_sid: str | None = None
        # The streamSid already encoded as a JSON string, spliced into outbound frames.
        self._stream_sid_json = ""

    @property
    def stream_sid(self) -> str | None:
        """The ``streamSid`` from ``start``; ``None`` before it."""
        return self._stream_sid

    @property
    def call_sid(self) -> str | None:
        """The ``callSid`` from ``start``; ``None`` before it."""
        return self._call_sid

    @property
    def started(self) -> bool:
        """``start`` was received (stays true after ``stop``)."""
        return self._stream_sid is not None

    @property
    def stopped(self) -> bool:
        """``stop`` was received; the stream accepts and sends nothing more."""
        return self._stopped

    # ----------------------------------------------------------------- inbound

    def receive(self, frame: str | bytes) -> InboundEvent:
        """Parse one WebSocket frame from Twilio and advance the state.

        Raises ``RemoteProtocolError``, with a one-line reason, when the frame is
        binary, too long, not a JSON object, a known event with missing or ill-typed
        fields, out of order, or for another stream. The state is unchanged then
        (but a frame before ``start`` counts against the pre-start budget).
        ``PreStartLimitExceeded`` (a ``RemoteProtocolError``) when the frame goes over
        that budget; it is refused unparsed.
        """
        if self._stream_sid is None:
            self._count_pre_start(frame)
        if not isinstance(frame, str):
            raise RemoteProtocolError(f"binary frame of {len(frame)} bytes (Twilio sends text)")
        if len(frame) > MAX_FRAME_CHARS:
            raise RemoteProtocolError(
                f"frame of {len(frame)} characters exceeds the limit of {MAX_FRAME_CHARS}"
            )
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            raise RemoteProtocolError(f"frame is not JSON: {exc}") from None
        if type(message) is not dict:
            raise RemoteProtocolError(f"frame is not a JSON object: {_show(frame)}")
        event = message.get("event")
        # Most frames are media: test for it first and keep its path short.
        if event == "media":
            return self._receive_media(message)
        if type(event) is not str:
            if event is None:
                raise RemoteProtocolError("frame has no 'event'")
            raise RemoteProtocolError(f"'event' is not a string: {_show(event)}")
        if self._stopped:
            raise RemoteProtocolError(f"{event!r} event after 'stop'")
        if event == "mark":
            self._check_stream(message, event)
            body = _object(message.get("mark"), "mark")
            return Mark(
                sequence_number=_counter(message.get("sequenceNumber"), "mark.sequenceNumber"),
                name=_text(body.get("name"), "mark.name"),
            )
        if event == "dtmf":
            self._check_stream(message, event)
            body = _object(message.get("dtmf"), "dtmf")
            return Dtmf(
                sequence_number=_counter(message.get("sequenceNumber"), "dtmf.sequenceNumber"),
                digit=_nonempty_text(body.get("digit"), "dtmf.digit"),
                track=_text(body.get("track"), "dtmf.track"),
            )
        if event == "stop":
            self._check_stream(message, event)
            body = _object(message.get("stop"), "stop")
            stop = Stop(
                sequence_number=_counter(message.get("sequenceNumber"), "stop.sequenceNumber"),
                account_sid=_text(body.get("accountSid"), "stop.accountSid"),
                call_sid=_text(body.get("callSid"), "stop.callSid"),
            )
            self._stopped = True
            return stop
        if event == "start":
            return self._receive_start(message)
        if event == "connected":
            return self._receive_connected(message)
        # Twilio may add events at any time; they must not fail the call. They are
        # tolerated before 'start' too (a new pre-start event would otherwise fail
        # every call), within the pre-start budget counted above.
        return Unrecognized(event=event)

    def _count_pre_start(self, frame: str | bytes) -> None:
        self._pre_start_frames += 1
        self._pre_start_chars += len(frame)
        if self._pre_start_frames > PRE_START_FRAMES:
            raise PreStartLimitExceeded(f"more than {PRE_START_FRAMES} frames before 'start'")
        if self._pre_start_chars > PRE_START_CHARS:
            raise PreStartLimitExceeded(f"more than {PRE_START_CHARS} characters before 'start'")

    def _receive_media(self, message: dict[str, Any]) -> Media:
        if self._stopped:
            raise RemoteProtocolError("'media' event after 'stop'")
        self._check_stream(message, "media")
        body = message.get("media")
        if type(body) is not dict:
            body = _object(body, "media")
        payload = body.get("payload")
        if type(payload) is not str:
            payload = _text(payload, "media.payload")
        try:
            audio = binascii.a2b_base64(payload, strict_mode=True)
        except ValueError as exc:  # binascii.Error, or non-ASCII text
            raise RemoteProtocolError(f"media.payload is not base64: {exc}") from None
        return Media(
            sequence_number=_counter(message.get("sequenceNumber"), "media.sequenceNumber"),
            chunk=_counter(body.get("chunk"), "media.chunk"),
            timestamp_ms=_counter(body.get("timestamp"), "media.timestamp"),
            track=_text(body.get("track"), "media.track"),
            payload=audio,
        )

    def _receive_connected(self, message: dict[str, Any]) -> Connected:
        if self._stream_sid is not None:
            raise RemoteProtocolError("'connected' event after 'start'")
        if self._connected:
            raise RemoteProtocolError("second 'connected' event")
        connected = Connected(
            protocol=_text(message.get("protocol"), "connected.protocol"),
            version=_text(message.get("version"), "connected.version"),
        )
        self._connected = True
        return connected

    def _receive_start(self, message: dict[str, Any]) -> Start:
        if self._stream_sid is not None:
            raise RemoteProtocolError("second 'start' event")
        body = _object(message.get("start"), "start")
        # Twilio sends the streamSid both at the top level and inside 'start'; accept
        # either, and insist they agree when both are there.
        outer_sid = message.get("streamSid")
        inner_sid = body.get("streamSid")
        if outer_sid is None and inner_sid is None:
            raise RemoteProtocolError("start.streamSid is missing")
        if outer_sid is not None and inner_sid is not None and outer_sid != inner_sid:
            raise RemoteProtocolError(
                f"streamSid {_show(outer_sid)} differs from start.streamSid {_show(inner_sid)}"
            )
        stream_sid = _nonempty_text(inner_sid if inner_sid is not None else outer_sid, "streamSid")
        tracks = body.get("tracks")
        if type(tracks) is not list:
            if tracks is None:
                raise RemoteProtocolError("start.tracks is missing")
            raise RemoteProtocolError(f"start.tracks is not a list: {_show(tracks)}")
        for track in tracks:
            _text(track, "start.tracks[]")
        media_format = _object(body.get("mediaFormat"), "start.mediaFormat")
        custom = body.get("customParameters")
        if custom is None:
            custom = {}
        custom = _object(custom, "start.customParameters")
        for name, value in custom.items():
            _text(value, f"start.customParameters[{_show(name)}]")
        start = Start(
            sequence_number=_counter(message.get("sequenceNumber"), "start.sequenceNumber"),
            stream_sid=stream_sid,
            account_sid=_text(body.get("accountSid"), "start.accountSid"),
            call_sid=_nonempty_text(body.get("callSid"), "start.callSid"),
            tracks=tuple(tracks),
            encoding=_text(media_format.get("encoding"), "start.mediaFormat.encoding"),
            sample_rate=_counter(media_format.get("sampleRate"), "start.mediaFormat.sampleRate"),
            channels=_counter(media_format.get("channels"), "start.mediaFormat.channels"),
            custom_parameters=custom,
        )
        self._stream_sid = stream_sid
        self._call_sid = start.call_sid
        self._stream_sid_json = orjson.dumps(stream_sid).decode()
        return start

    def _check_stream(self, message: dict[str, Any], event: str) -> None:
        if self._stream_sid is None:
            raise RemoteProtocolError(f"{event!r} event before 'start'")
        stream_sid = message.get("streamSid")
        if stream_sid != self._stream_sid:
            if stream_sid is None:
                raise RemoteProtocolError(f"{event}.streamSid is missing")
            raise RemoteProtocolError(
                f"{event}.streamSid {_show(stream_sid)} is not this stream's "
                f"{_show(self._stream_sid)}"
            )

    # ---------------------------------------------------------------- outbound

    def send_media(self, payload: bytes) -> str:
        """The text frame that plays ``payload`` (raw μ-law 8 kHz) after what is queued.

        Raises ``LocalProtocolError`` before ``start``, after ``stop``, or if
        ``payload`` is empty.
        """
        self._check_can_send("media")
        if not payload:
            raise LocalProtocolError("empty media payload")
        encoded = binascii.b2a_base64(payload, newline=False).decode("ascii")
        return (
            f'{{"event":"media","streamSid":{self._stream_sid_json},'
            f'"media":{{"payload":"{encoded}"}}}}'
        )

    def send_mark(self, name: str) -> str:
        """The text frame of a mark Twilio echoes once the audio sent before it has played.

        After a ``clear`` Twilio echoes every pending mark at once: an echo after a
        clear means *discarded*, not played. Raises ``LocalProtocolError`` before
        ``start``, after ``stop``, or if ``name`` is empty.
        """
        self._check_can_send("mark")
        if not name:
            raise LocalProtocolError("empty mark name")
        try:
            name_json = orjson.dumps(name).decode()
        except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate
            raise LocalProtocolError(f"mark name cannot be encoded: {exc}") from None
        return (
            f'{{"event":"mark","streamSid":{self._stream_sid_json},"mark":{{"name":{name_json}}}}}'
        )

    def send_clear(self) -> str:
        """The text frame that empties Twilio's playback buffer (pending marks are echoed).

        Raises ``LocalProtocolError`` before ``start`` or after ``stop``.
        """
        self._check_can_send("clear")
        return f'{{"event":"clear","streamSid":{self._stream_sid_json}}}'

    def _check_can_send(self, event: str) -> None:
        if self._stream_sid is None:
            raise LocalProtocolError(f"cannot send {event!r} before 'start'")
        if self._stopped:
            raise LocalProtocolError(f"cannot send {event!r} after 'stop'")
