"""In-memory Twilio and Vapi peers for call-nursery tests on trio's autojump clock.

They speak the real wire formats (JSON text frames shaped as PROTOCOLS.md shows)
over ``memory_socket_pair`` ends, so the call code under test is the real code;
only the sockets are in memory, which lets virtual time be exact.
"""

from __future__ import annotations

import base64
import json
import math
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from voicebridge.bridge.outcome import CallRecord
from voicebridge.errors import SocketClosed
from voicebridge.sockets import MemorySocket, PingableSocket, memory_socket_pair
from voicebridge.twilio.token import StreamClaims
from voicebridge.vapi.client import VapiError

STREAM_SID = "MZ" + "0" * 32
CALL_SID = "CA" + "1" * 32
ACCOUNT_SID = "AC" + "2" * 32
GOOD_TOKEN = "good-token"


def connected_frame() -> str:
    return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def start_frame(token: str = GOOD_TOKEN) -> str:
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": STREAM_SID,
            "start": {
                "accountSid": ACCOUNT_SID,
                "streamSid": STREAM_SID,
                "callSid": CALL_SID,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": {
                    "token": token,
                    "caller": "+15550100001",
                    "called": "+15550100002",
                },
            },
        }
    )


def media_frame(seq: int, payload: bytes = b"\xff" * 160) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(seq),
            "streamSid": STREAM_SID,
            "media": {
                "track": "inbound",
                "chunk": str(seq - 1),
                "timestamp": str((seq - 2) * 20),
                "payload": base64.b64encode(payload).decode(),
            },
        }
    )


def stop_frame(seq: int) -> str:
    return json.dumps(
        {
            "event": "stop",
            "sequenceNumber": str(seq),
            "streamSid": STREAM_SID,
            "stop": {"accountSid": ACCOUNT_SID, "callSid": CALL_SID},
        }
    )


def verify_token(token: str, claims: StreamClaims) -> None:
    from voicebridge.twilio.token import TokenRejected

    if token != GOOD_TOKEN:
        raise TokenRejected("bad-signature")


@attrs.define
class Received:
    at: float
    message: dict[str, Any]


class FakeTwilio:
    """Twilio's side of a media stream: streams caller frames, models the playout buffer.

    Media we receive plays at real (virtual) time; a mark is echoed when the audio
    before it has played, or at once when nothing is queued; ``clear`` empties the
    buffer and echoes the pending marks at once. Everything received is kept with
    its arrival time; ``heard`` lists (start, end, turn-agnostic bytes) of playback.
    """

    def __init__(self, socket: MemorySocket) -> None:
        self.socket = socket
        self.received: list[Received] = []
        self.play_until = 0.0
        self.pending_marks: deque[tuple[float, str]] = deque()
        self.heard_bytes = 0
        self.closed_at: float | None = None
        #: The close code the bridge closed the stream with.
        self.close_code: int | None = None
        #: False: marks are played past but never echoed (a Twilio whose echoes stop).
        self.echoes = True
        self._seq = 1
        self._mark_wakeup = trio.Event()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def stream_media(self, *, seconds: float | None = None) -> None:
        """Send a 20 ms media frame every 20 ms (virtual), from now on."""
        start = trio.current_time()
        n = 0
        while seconds is None or n * 0.02 < seconds:
            await trio.sleep_until(start + n * 0.02)
            try:
                await self.socket.send(media_frame(self.next_seq()))
            except SocketClosed:
                return
            n += 1

    async def read(self) -> None:
        """Receive until the bridge closes the socket; echo marks as Twilio would."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._echo_marks)
            try:
                while True:
                    text = await self.socket.receive()
                    assert isinstance(text, str), "Twilio only accepts text frames"
                    message = json.loads(text)
                    now = trio.current_time()
                    self.received.append(Received(now, message))
                    self._handle(message, now)
            except SocketClosed as exc:
                self.closed_at = trio.current_time()
                self.close_code = exc.code
            nursery.cancel_scope.cancel()

    def _handle(self, message: dict[str, Any], now: float) -> None:
        event = message["event"]
        assert message["streamSid"] == STREAM_SID
        if event == "media":
            assert set(message) == {"event", "streamSid", "media"}
            payload = base64.b64decode(message["media"]["payload"])
            assert len(payload) % 160 == 0, "whole 20 ms frames only"
            self.play_until = max(self.play_until, now) + len(payload) / 8000
            self.heard_bytes += len(payload)
        elif event == "mark":
            self.pending_marks.append((max(self.play_until, now), message["mark"]["name"]))
            self._mark_wakeup.set()
        elif event == "clear":
            assert set(message) == {"event", "streamSid"}
            self.play_until = now
            self.pending_marks = deque((now, name) for _, name in self.pending_marks)
            self._mark_wakeup.set()

    async def _echo_marks(self) -> None:
        while True:
            while not self.pending_marks:
                self._mark_wakeup = trio.Event()
                await self._mark_wakeup.wait()
            due, name = self.pending_marks[0]
            await trio.sleep_until(due)
            if self.pending_marks and self.pending_marks[0][1] == name:
                self.pending_marks.popleft()
                if not self.echoes:
                    continue
                mark = {
                    "event": "mark",
                    "sequenceNumber": str(self.next_seq()),
                    "streamSid": STREAM_SID,
                    "mark": {"name": name},
                }
                try:
                    await self.socket.send(json.dumps(mark))
                except SocketClosed:
                    return

    def events(self, kind: str) -> list[Received]:
        return [r for r in self.received if r.message["event"] == kind]


@attrs.frozen
class MemoryCall:
    id: str


class MemoryConnector:
    """An ``AssistantConnector`` whose Vapi is a memory socket the test drives."""

    def __init__(
        self,
        *,
        fail: VapiError | None = None,
        create_delay_s: float = 0.0,
        buffer: float = math.inf,
    ) -> None:
        self.fail = fail
        self.create_delay_s = create_delay_s
        #: Messages in flight each way on the Vapi socket: a small buffer pushes back
        #: on the bridge as TCP does when Vapi stops reading.
        self.buffer = buffer
        self.peer: MemorySocket | None = None
        self.opened = trio.Event()
        #: Assistant calls asked for (each would be a Vapi ``POST /call``).
        self.created = 0

    async def create(
        self,
        *,
        call_sid: str,
        caller: str,
        called: str,
        assistant: str = "",
        decision: Mapping[str, Any] | None = None,
    ) -> MemoryCall:
        self.created += 1
        await trio.sleep(self.create_delay_s)
        if self.fail is not None:
            raise self.fail
        return MemoryCall("vapi-call-1")

    @asynccontextmanager
    async def connect(self, call: MemoryCall) -> AsyncIterator[PingableSocket]:
        ours, theirs = memory_socket_pair(self.buffer)
        self.peer = theirs
        self.opened.set()
        try:
            yield ours
        finally:
            await ours.aclose()

    async def post_control(self, call: MemoryCall, message: str) -> bool:
        return False  # a memory call has no Live Call Control: its socket is all


class Tracker:
    def __init__(self) -> None:
        self.begun: list[str] = []
        self.finished: list[CallRecord] = []

    def begin(self, call_sid: str, end: object) -> bool:
        self.begun.append(call_sid)
        return True

    def finish(self, record: CallRecord) -> None:
        self.finished.append(record)


class FakeVapi:
    """Vapi's side of the transport socket, driven by the test; records what it got."""

    def __init__(self, socket: MemorySocket) -> None:
        self.socket = socket
        self.text: list[tuple[float, dict[str, Any]]] = []
        self.audio_frames = 0
        self.closed_at: float | None = None

    async def read(self) -> None:
        try:
            while True:
                message = await self.socket.receive()
                if isinstance(message, bytes):
                    self.audio_frames += 1
                else:
                    self.text.append((trio.current_time(), json.loads(message)))
        except SocketClosed:
            self.closed_at = trio.current_time()

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.socket.send(json.dumps(message))

    async def speak(self, ms: int, *, chunk_ms: int = 40, paced: bool = True) -> None:
        """Send ``ms`` of assistant audio in chunks (paced at real time unless told not)."""
        start = trio.current_time()
        sent = 0
        while sent < ms:
            if paced:
                await trio.sleep_until(start + sent / 1000)
            size = min(chunk_ms, ms - sent)
            await self.socket.send(b"\x55" * (size * 8))
            sent += size
