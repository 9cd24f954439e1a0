"""The load generator: many simulated calls, each a Twilio caller and a Vapi assistant.

One process plays both peers of every call against one bridge. For each call the
*caller* posts the signed voice webhook, opens the Media Stream the TwiML names,
streams a 20 ms μ-law frame every 20 ms for the whole call, plays what the bridge
sends through a model of Twilio's playback buffer (marks are echoed when the audio
before them has played; ``clear`` echoes the pending ones at once), hangs up with
``stop`` and fetches the ``<Connect action>``. The *assistant* answers ``POST /call``
and the transport socket, speaks about half the time in 20–90 ms chunks paced at
real time, and now and then is talked over: ``user-interrupted``, then one more
chunk of the cut turn (the in-flight tail a real assistant sends), which the
bridge must never let through.

Every caller frame and every assistant chunk starts with a *marker*: two zero bytes
and a three-byte sequence number (zero never occurs in μ-law silence or in the
digits). The other peer finds the markers in what it receives and, both peers
living in this process on one clock, gets each one's time through the bridge. A
message is timed at its arrival in the kernel (``loadtest.wire.StampedSocket``), not
when this loop reads it: busy with every other call, the loop would otherwise add
its own wait to what the bridge is measured to add.

Lean on purpose (``loadtest.wire`` over ``voicebridge.net``'s transports): writes
go straight into the kernel without yielding; one ticker task paces every call's
frames, chunks and mark echoes (no task per call per frame); one reader task per
socket. The ticker's slip is measured: a generator that cannot keep its own time
does not produce valid figures.

With a TLS context (``voicebridge loadtest --vapi-tls``) the simulated Vapi's
transport sockets are ``wss://``: on its one port, a connection whose first byte
starts a TLS handshake is served over TLS (``net.transport.TlsSocketTransport``,
encrypting and decrypting in memory, still no task per message), and any other is
plain HTTP; ``POST /call`` may come either way, but a plain WebSocket upgrade is
refused, so every Vapi leg of the run is TLS. Completed and failed handshakes are
counted.
"""

from __future__ import annotations

import binascii
import functools
import hmac
import random
import socket
import ssl
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from array import array
from collections import Counter, deque
from collections.abc import Callable, Sequence

import orjson
import trio
from attrs import frozen

from voicebridge.errors import SocketClosed
from voicebridge.loadtest.report import LATE_AFTER_MS
from voicebridge.loadtest.wire import (
    OP_BINARY,
    OP_TEXT,
    LeanWebSocket,
    RequestHead,
    StampedSocket,
    WebSocketClosed,
    WireError,
    accept_websocket,
    connect_websocket,
    http_request,
    parse_request_head,
    read_body,
    read_head,
    respond,
)
from voicebridge.net.connect import accept_tls, serve_tcp, starts_with_tls
from voicebridge.net.transport import SocketTransport, TlsHandshakeError, Transport
from voicebridge.sim.latency import LatencyModel
from voicebridge.twilio.signature import sign

#: μ-law: 8 bytes a millisecond; a 20 ms frame is 160 bytes.
BYTES_PER_S = 8000
FRAME_BYTES = 160
FRAME_S = 0.020
#: Assistant chunks are 20–90 ms of audio (Vapi's own are 170–743 bytes).
CHUNK_MIN_BYTES = 160
CHUNK_MAX_BYTES = 720
#: The pacing tick: every due frame, chunk and mark echo goes out on the next tick.
TICK_S = 0.002
#: The marker at the start of each frame and chunk, silent: it is made of μ-law's two
#: codes of silence alone (0xFF, 0x7F; both decode to 0), so WebRTC's detector never
#: hears speech in the load generator's frames and the bridge's barge-in at the edge
#: can be measured. The lead, three 0x7F, cannot occur elsewhere: the filler is 0xFF,
#: and the sequence number follows in 24 bits, each as a pair that holds one 0x7F
#: (1: 0x7F 0xFF; 0: 0xFF 0x7F), so no three 0x7F in a row; then a trailer of two
#: 0xFF. A marker cut short at a clear, followed by silence or by the next marker,
#: has a pair that is neither or no trailer where one is due, and reads as no marker.
MARKER_LEAD = b"\x7f\x7f\x7f"
_MARKER_TRAILER = b"\xff\xff"
_MARKER_BIT_PAIRS = {"1": b"\x7f\xff", "0": b"\xff\x7f"}
#: Each byte of the sequence number as its 16 marker bytes, and back.
_MARKER_BYTE_CODES = [
    b"".join(_MARKER_BIT_PAIRS[bit] for bit in format(value, "08b")) for value in range(256)
]
_MARKER_BYTE_VALUES = {code: value for value, code in enumerate(_MARKER_BYTE_CODES)}
_MARKER_BYTE_LEN = 16
MARKER_BYTES = len(MARKER_LEAD) + 3 * _MARKER_BYTE_LEN + len(_MARKER_TRAILER)
#: Largest sequence number plus one.
MARKER_LIMIT = 1 << 24
#: μ-law silence, the filler around the markers.
SILENCE = 0xFF
#: Frames sent in the last moments before ``stop`` may be cut off by the hang-up
#: itself; they are not expected to arrive.
END_GRACE_S = 0.3
#: Bounds on one call's setup steps and on its end (webhook, socket, action).
SETUP_DEADLINE_S = 15.0
END_DEADLINE_S = 15.0
#: The close code of a stream the bridge ended because it is shutting down (RFC 6455
#: "going away"): the call was drained, not failed.
GOING_AWAY = 1001
#: A churn call shorter than this (it would start in the last moments of the run) is
#: not placed.
MIN_CALL_S = 1.0
#: The voice webhook, the media socket and the action are on these paths of the TwiML.
VOICE_PATH = "/twilio/voice"
ACCOUNT_SID = "AC" + "d" * 32


#: A message handler: (call, payload, arrival time).
_Handler = Callable[["_Call", bytes, float], None]


def marker(seq: int) -> bytes:
    """The ``MARKER_BYTES`` marker bytes of sequence number ``seq`` (< ``MARKER_LIMIT``)."""
    codes = _MARKER_BYTE_CODES
    number = codes[seq >> 16 & 0xFF] + codes[seq >> 8 & 0xFF] + codes[seq & 0xFF]
    return MARKER_LEAD + number + _MARKER_TRAILER


def read_marker(data: bytes, position: int) -> int:
    """The sequence number of the marker at ``position`` (which holds the lead).

    -1 where what follows the lead is not a whole sequence number: a marker the bridge
    cut short at a clear, with silence or the next turn's marker right behind it.
    """
    seq = 0
    start = position + len(MARKER_LEAD)
    end = start + 3 * _MARKER_BYTE_LEN
    if data[end : end + len(_MARKER_TRAILER)] != _MARKER_TRAILER:
        return -1
    for offset in range(start, end, _MARKER_BYTE_LEN):
        value = _MARKER_BYTE_VALUES.get(data[offset : offset + _MARKER_BYTE_LEN])
        if value is None:
            return -1
        seq = seq << 8 | value
    return seq


def _lead_begun(data: bytes) -> int:
    """How many bytes at the end of ``data`` may begin a marker's lead."""
    for length in range(len(MARKER_LEAD) - 1, 0, -1):
        if data.endswith(MARKER_LEAD[:length]):
            return length
    return 0


class Playback:
    """A playback buffer, and the markers in the audio that plays through it.

    Audio plays from when it arrives or when the buffer runs dry, whichever is later,
    at ``BYTES_PER_S``. The caller keeps one for Twilio's buffer (what the bridge sends,
    as it arrives) and one for the ideal wire (``ideal_wire_heard``): when the
    caller would have heard each chunk through a relay that costs nothing.
    """

    __slots__ = ("carry", "end")

    def __init__(self) -> None:
        #: When the buffer runs dry.
        self.end = 0.0
        #: The end of the audio so far that may begin a marker whose rest is to come.
        self.carry = b""

    def play(self, length: int, now: float) -> float:
        """Queue ``length`` bytes arriving at ``now``; when the first of them plays."""
        start = self.end if self.end > now else now
        self.end = start + length / BYTES_PER_S
        return start

    def clear(self, now: float) -> None:
        """Empty the buffer at ``now``: what was queued and not yet played is never heard."""
        self.end = now

    def hear(self, audio: bytes, now: float) -> list[tuple[int, float]]:
        """Play ``audio``, arriving at ``now``: (sequence number, when its first byte plays)
        of every whole marker it completes.

        A marker begun in earlier audio (the carry) started playing before this audio
        did: its first byte plays when the earlier audio ends, less the bytes of the
        marker already queued. A marker is heard when it starts, as a chunk is.
        """
        before = self.end
        start = self.play(len(audio), now)
        carried = len(self.carry)
        data = self.carry + audio if carried else audio
        heard: list[tuple[int, float]] = []
        position = data.find(MARKER_LEAD)
        consumed = 0
        while position >= 0:
            if position + MARKER_BYTES > len(data):
                break
            seq = read_marker(data, position)
            if seq < 0:  # not a whole marker: the next may start inside it
                position = data.find(MARKER_LEAD, position + 1)
                continue
            consumed = position + MARKER_BYTES
            offset = position - carried
            heard.append((seq, (start if offset >= 0 else before) + offset / BYTES_PER_S))
            position = data.find(MARKER_LEAD, consumed)
        if position >= 0:
            self.carry = data[position:]
        elif (begun := _lead_begun(data)) and len(data) - begun >= consumed:
            self.carry = data[-begun:]
        else:
            self.carry = b""
        return heard


def ideal_wire_heard(
    wire: Playback, position: int, size: int, sent_at: float, *, whole_frames: bool
) -> float:
    """When the caller would hear the marker of a chunk over the ideal wire, which costs
    nothing but obeys the protocol: the chunk is ``size`` bytes, sent at ``sent_at``,
    ``position`` bytes into its turn; ``wire`` is the ideal wire's playback buffer.

    A relay's ideal wire (``whole_frames`` false) delivers the chunk as it is. A
    bridge's must send Twilio whole 160-byte frames (docs/protocols.md), so its ideal
    wire delivers each frame of the turn's audio the moment the assistant has sent its
    last byte: the rest of the frame the previous chunk left open, and every frame this
    chunk completes. The marker at the chunk's start is in the first of them (a chunk
    is at least a frame long). A turn starts on a frame's boundary.
    """
    if not whole_frames:
        return wire.play(size, sent_at)
    delivered = position - position % FRAME_BYTES
    complete = position + size - (position + size) % FRAME_BYTES
    start = wire.play(complete - delivered, sent_at)
    return start + (position - delivered) / BYTES_PER_S


_FILL = bytes([SILENCE]) * CHUNK_MAX_BYTES


@frozen(kw_only=True)
class Traffic:
    """What the simulated calls do."""

    calls: int
    #: Seconds all calls are up together (the measurement window is within it).
    duration_s: float
    #: Calls start evenly spread over this many seconds.
    ramp_s: float
    #: An assistant turn lasts 1.5–4 s; the assistant is then quiet for 1.5–4 s.
    turn_s: tuple[float, float] = (1.5, 4.0)
    gap_s: tuple[float, float] = (1.5, 4.0)
    #: The share of assistant turns the caller talks over.
    barge_in_share: float = 0.3
    seed: int = 1
    #: Churn: new calls a second (a Poisson arrival process) on top of ``calls``, from the
    #: start of the run to its end, each lasting a uniform draw from ``churn_call_s``
    #: (cut at the end of the run).
    churn_per_s: float = 0.0
    churn_call_s: tuple[float, float] = (10.0, 40.0)


@frozen(kw_only=True)
class BridgeTarget:
    """Where the calls go: a voicebridge (webhook → TwiML → stream) or a bare relay."""

    host: str
    port: int
    #: The URL Twilio believes it calls (signatures cover it); None for a relay.
    public_url: str | None
    auth_token: str = ""
    #: Reach it over TLS (``https://``, ``wss://``), e.g. through a TLS-terminating proxy.
    tls: ssl.SSLContext | None = None
    #: A relay reference: the caller's socket goes to ``ws://host:port/<call id>/transport``
    #: and is relayed as is to the assistant; no webhooks, no marks from a bridge.
    relay: bool = False


def _reached_at(target: BridgeTarget, url: str) -> tuple[str, int]:
    """Where a URL of the bridge's TwiML is requested: the target for the public URL's
    host; another host's URL (a box's own ``server.box_url`` behind a balancer) at that
    host, as Twilio does."""
    parts = urllib.parse.urlsplit(url)
    public = urllib.parse.urlsplit(target.public_url or "")
    if not parts.hostname or parts.netloc == public.netloc:
        return target.host, target.port
    return parts.hostname, parts.port or (443 if parts.scheme in ("https", "wss") else 80)


@frozen(kw_only=True)
class CallFigures:
    """What the calls measured, pooled (milliseconds)."""

    caller_latency_ms: Sequence[float]
    #: Assistant → caller, two ways (see ``LoadGenerator``): at the caller's playback, and
    #: at the frame's arrival at the caller.
    assistant_latency_at_playback_ms: Sequence[float]
    assistant_latency_at_arrival_ms: Sequence[float]
    barge_in_ms: Sequence[float]
    first_audio_ms: Sequence[float]
    heard_after_clear_ms: float
    dropped_caller_frames: int
    dropped_assistant_chunks: int
    late_caller_frames: int
    late_assistant_chunks: int
    failures: Counter[str]
    tick_slip_ms: Sequence[float]
    #: The voice webhook's answer times, every call placed (admitted or refused).
    webhook_ms: Sequence[float]
    #: Calls answered with the overflow message (the bridge full, draining or shedding).
    refused_calls: int
    #: Calls the bridge ended because it was shutting down (drained; not failed).
    drained_calls: int
    #: The caller's figures (see ``LoadGenerator``): webhook → first word heard, and
    #: speech onset → playback silent.
    time_to_first_word_ms: Sequence[float] = ()
    speech_to_silence_ms: Sequence[float] = ()


class _Call:
    """One simulated call: both peers' state. Touched only by this process's tasks."""

    __slots__ = (
        "active",
        "assistant_bytes_sent",
        "awaiting_clear",
        "barge_at",
        "call_sid",
        "caller",
        "chunk_bytes",
        "chunk_seen",
        "chunk_sent_at",
        "chunk_turn",
        "chunk_wire_heard",
        "cleared_turns",
        "close_code",
        "closed_at",
        "drained",
        "end_at",
        "ended",
        "failure",
        "first_audio_at",
        "frame_received",
        "frame_sent_at",
        "index",
        "interrupted_turns",
        "marks",
        "media_sequence",
        "next_chunk_at",
        "next_frame_at",
        "next_turn_at",
        "playback",
        "refused",
        "rng",
        "speaking",
        "start_at",
        "stopped_at",
        "stream_sid",
        "stream_started_at",
        "turn",
        "turn_bytes",
        "turn_position",
        "turn_started_at",
        "vapi",
        "vapi_call_id",
        "vapi_connected",
        "webhook_at",
        "wire",
    )

    def __init__(self, index: int, start_at: float, end_at: float, seed: int) -> None:
        self.index = index
        self.call_sid = "CA" + uuid.uuid4().hex
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self.vapi_call_id = str(uuid.uuid4())
        self.rng = random.Random(seed)
        self.start_at = start_at
        self.end_at = end_at
        self.active = False
        self.ended = False
        self.failure: str | None = None
        # The voice webhook was answered with the overflow message; no stream.
        self.refused = False
        # The bridge ended the stream for its shutdown, and the action said so.
        self.drained = False
        # When the voice webhook was sent (None: not yet), and how the stream was closed.
        self.webhook_at: float | None = None
        self.close_code: int | None = None
        self.closed_at: float | None = None
        self.caller: LeanWebSocket | None = None
        self.vapi: LeanWebSocket | None = None
        self.vapi_connected = trio.Event()
        # caller → agent
        self.media_sequence = 0
        self.next_frame_at = 0.0
        self.frame_sent_at = array("d")
        self.frame_received = bytearray()
        self.stream_started_at = 0.0
        self.stopped_at: float | None = None
        # agent → caller
        self.speaking = False
        self.turn = 0
        self.turn_started_at = 0.0
        self.turn_bytes = 0
        self.turn_position = 0
        self.next_chunk_at = 0.0
        self.next_turn_at = 0.0
        self.barge_at: float | None = None
        self.chunk_sent_at = array("d")
        self.chunk_turn = array("i")
        self.chunk_bytes = array("i")
        self.chunk_seen = bytearray()
        # When the caller would hear each chunk's marker over the ideal wire.
        self.chunk_wire_heard = array("d")
        self.assistant_bytes_sent = 0
        # Every turn the caller talked over (its queued audio may rightly never play).
        self.interrupted_turns: set[int] = set()
        # (turn, when) of each barge-in whose clear has not reached the caller yet, oldest
        # first: the bridge handles barge-ins in order, one clear each, so a clear is the
        # oldest one's, however late (a bridge seconds behind may get a second barge-in
        # signal before it has sent the first clear).
        self.awaiting_clear: deque[tuple[int, float]] = deque()
        # Turns the caller talked over and whose clear reached the caller.
        self.cleared_turns: set[int] = set()
        # Twilio's playback model, and the marks due.
        self.playback = Playback()
        self.marks: deque[tuple[float, str]] = deque()
        # The ideal wire's (``ideal_wire_heard``), emptied at a barge-in.
        self.wire = Playback()
        self.first_audio_at: float | None = None

    def fail(self, reason: str) -> None:
        if self.failure is None and not self.ended:
            self.failure = reason


class LoadGenerator:
    """Runs ``traffic`` against one target; ``figures()`` pools what the calls measured.

    ``serve_assistant`` (the simulated Vapi) must be started before ``run``; its
    ``base_url`` is what the bridge under test uses for Vapi. With ``tls`` (a server
    context) the transport sockets it hands out are ``wss://`` (see the module
    docstring).

    With ``latency`` the peers take the model's own times (Vapi's create, Twilio's
    stream set-up); the network's legs and the assistant's reaction are added to the
    caller's two figures by arithmetic, so that the bridge-added latencies measured
    on loopback stay the bridge's own (``sim.latency.LatencyModel``).

    The added latency of each direction, per frame or chunk sent inside ``window``:

    - caller → assistant: from the caller's send of a frame to the assistant's receipt
      of it. The simulated Vapi has no playback buffer to model (what the assistant
      does with the audio is its own matter), so arrival is all there is.
    - assistant → caller *at playback*: when the caller hears a chunk's marker start
      to play through Twilio's buffer, less when it would have heard it over a perfect
      wire (each chunk delivered the moment the assistant sends it, into the same
      buffer model, emptied when the assistant signals a barge-in). Audio the bridge
      holds while Twilio still has audio to play costs the caller nothing, and is not
      counted; audio that reaches an empty buffer late is, by its lateness, and so is
      the delay it pushes onto the audio behind it.
    - assistant → caller *at arrival*: from the assistant's send of a chunk to the
      caller's receipt of the frame that completes its marker. This one also counts
      waits the caller never hears.
    """

    def __init__(
        self,
        traffic: Traffic,
        *,
        api_key: str,
        tls: ssl.SSLContext | None = None,
        latency: LatencyModel | None = None,
    ) -> None:
        self.traffic = traffic
        self.latency = latency
        self._first_word = array("d")
        self._speech_to_silence = array("d")
        self._first_word_extra_ms = latency.first_word_network_ms() if latency else 0.0
        self._silence_extra_ms = latency.speech_to_silence_extra_ms() if latency else 0.0
        self.api_key = api_key
        self._tls = tls
        #: TLS handshakes the simulated Vapi completed, and why others failed.
        self.tls_handshakes = 0
        self.tls_handshake_failures: Counter[str] = Counter()
        self._calls: list[_Call] = []
        self._by_sid: dict[str, _Call] = {}
        self._by_vapi_id: dict[str, _Call] = {}
        self._live: list[_Call] = []
        self._port: int | None = None
        self._relay = False
        self._clock = time.perf_counter
        self._caller_latency = array("d")
        self._assistant_at_playback = array("d")
        self._assistant_at_arrival = array("d")
        self._barge_in_ms = array("d")
        self._first_audio = array("d")
        self._heard_after_clear_ms = 0.0
        self._late_caller = 0
        self._late_assistant = 0
        self._tick_slip = array("d")
        self._webhook_ms = array("d")
        self._failures: Counter[str] = Counter()
        #: Samples count only when sent inside this window (perf_counter times).
        self.window = (0.0, float("inf"))

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("the simulated assistant is not serving yet")
        return f"http://127.0.0.1:{self._port}"

    @property
    def tls(self) -> bool:
        """Whether the transport sockets are ``wss://``."""
        return self._tls is not None

    # -- the simulated Vapi --------------------------------------------------------

    async def serve_assistant(
        self, *, port: int = 0, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve ``POST /call`` and the transport sockets on 127.0.0.1 until cancelled."""
        async with trio.open_nursery() as server_nursery:
            self._port = await server_nursery.start(
                functools.partial(serve_tcp, self._assistant_connection, port=port)
            )
            task_status.started(self._port)

    async def _assistant_connection(self, accepted: socket.socket) -> None:
        with StampedSocket.adopt(accepted) as sock:
            await self._serve_assistant_connection(sock)

    async def _serve_assistant_connection(self, sock: socket.socket) -> None:
        context = self._tls
        transport: Transport
        secure = context is not None and await starts_with_tls(sock)
        if context is not None and secure:
            try:
                transport = await accept_tls(sock, context)
            except TlsHandshakeError as exc:
                self.tls_handshake_failures[str(exc)] += 1
                return
            self.tls_handshakes += 1
        else:
            transport = SocketTransport(sock)
        try:
            await self._assistant_request(transport, secure=secure)
        except (WireError, SocketClosed):
            pass
        finally:
            await transport.aclose()

    async def _assistant_request(self, transport: Transport, *, secure: bool) -> None:
        buffer = bytearray()
        request = parse_request_head(await read_head(transport, buffer))
        if request.method == "POST" and request.path == "/call":
            length = int(request.headers.get("content-length", 0))
            body = await read_body(transport, buffer, length)
            await self._create_call(transport, request, body)
        elif request.headers.get("upgrade", "").lower() == "websocket":
            if self._tls is not None and not secure:
                await respond(transport, 400, b'{"message":"wss:// only: this is TLS"}')
                return
            await self._assistant_socket(transport, request, buffer)
        else:
            await respond(transport, 404, b'{"message":"not found"}')

    def _authorized(self, request: RequestHead) -> bool:
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, f"Bearer {self.api_key}".encode())

    async def _create_call(self, transport: Transport, request: RequestHead, body: bytes) -> None:
        if not self._authorized(request):
            await respond(transport, 401, b'{"message":"Invalid Key."}')
            return
        document = orjson.loads(body)
        call_sid = document.get("assistantOverrides", {}).get("metadata", {}).get("twilioCallSid")
        call = self._by_sid.get(call_sid) if isinstance(call_sid, str) else None
        if call is None:
            await respond(transport, 400, b'{"message":"unknown twilioCallSid"}')
            return
        if self.latency is not None:
            await trio.sleep(self.latency.vapi_create_ms / 1000)
        answer = {
            "id": call.vapi_call_id,
            "status": "queued",
            "transport": {
                "provider": "vapi.websocket",
                "websocketCallUrl": f"{'wss' if self._tls else 'ws'}://127.0.0.1:{self._port}"
                f"/{call.vapi_call_id}/transport",
            },
        }
        await respond(transport, 201, orjson.dumps(answer))

    async def _assistant_socket(
        self, transport: Transport, request: RequestHead, buffer: bytearray
    ) -> None:
        parts = request.path.strip("/").split("/")
        call = self._by_vapi_id.get(parts[0]) if len(parts) == 2 else None
        if call is None or call.vapi is not None or not self._authorized(request):
            await respond(transport, 404, b'{"message":"Call not found."}')
            return
        ws = await accept_websocket(transport, request, buffer)
        call.vapi = ws
        async with trio.open_nursery() as socket_nursery:
            socket_nursery.start_soon(ws.run_flusher)
            now = self._clock()
            self._start_turn(call, now)  # the greeting
            call.vapi_connected.set()
            await self._read_assistant_socket(call, ws)
            socket_nursery.cancel_scope.cancel(reason="assistant socket closed")

    async def _read_assistant_socket(self, call: _Call, ws: LeanWebSocket) -> None:
        try:
            await self._dispatch(call, ws, self._assistant_text, self._caller_audio)
        except WireError:  # WebSocketClosed included: the call is over
            pass
        finally:
            call.speaking = False
            ws.close()  # the transport is closed with the connection

    def _assistant_text(self, call: _Call, payload: bytes, now: float) -> None:
        if self._relay:
            if payload.startswith(b'{"event":"media"'):
                media = orjson.loads(payload)["media"]
                self._caller_audio(call, binascii.a2b_base64(media["payload"]), now)
            elif payload.startswith(b'{"event":"stop"') and call.vapi is not None:
                call.vapi.close(1000)  # what a bridge does on the caller's stop
            return  # mark echoes travel back through the relay: nothing to do
        message = orjson.loads(payload)
        if message.get("type") == "end-call" and call.vapi is not None:
            call.vapi.send_text('{"type":"status-update","status":"ended",'
                                '"endedReason":"customer-ended-call"}')
            call.vapi.close(1000)

    def _caller_audio(self, call: _Call, audio: bytes, now: float) -> None:
        if not audio.startswith(MARKER_LEAD) or len(audio) < MARKER_BYTES:
            return
        seq = read_marker(audio, 0)
        if not 0 <= seq < len(call.frame_sent_at):
            return
        received = call.frame_received
        received[seq] = 1
        sent_at = call.frame_sent_at[seq]
        if self.window[0] <= sent_at <= self.window[1]:
            latency_ms = (now - sent_at) * 1000
            self._caller_latency.append(latency_ms)
            if latency_ms > LATE_AFTER_MS:
                self._late_caller += 1

    # -- the assistant's voice -----------------------------------------------------

    def _start_turn(self, call: _Call, now: float) -> None:
        traffic = self.traffic
        rng = call.rng
        call.turn += 1
        call.speaking = True
        call.turn_started_at = now
        call.turn_position = 0
        length_s = rng.uniform(*traffic.turn_s)
        call.turn_bytes = int(length_s * BYTES_PER_S)
        call.next_chunk_at = now
        call.barge_at = None
        if not self._relay and rng.random() < traffic.barge_in_share:
            call.barge_at = now + length_s * rng.uniform(0.3, 0.8)
        self._assistant_message(
            call, f'{{"type":"speech-update","status":"started","role":"assistant",'
            f'"turn":{call.turn}}}'
        )

    def _assistant_message(self, call: _Call, text: str) -> None:
        if call.vapi is not None and not call.vapi.closed:
            call.vapi.send_text(text)

    def _send_chunk(self, call: _Call, size: int) -> None:
        vapi = call.vapi
        if vapi is None or vapi.closed:
            return
        seq = len(call.chunk_sent_at)
        chunk = marker(seq) + _FILL[: size - MARKER_BYTES]
        call.chunk_turn.append(call.turn)
        call.chunk_bytes.append(size)
        call.chunk_seen.append(0)
        sent_at = self._clock()
        call.chunk_sent_at.append(sent_at)
        call.chunk_wire_heard.append(
            ideal_wire_heard(
                call.wire, call.turn_position, size, sent_at, whole_frames=not self._relay
            )
        )
        vapi.send_binary(chunk)
        call.assistant_bytes_sent += size
        if self._relay:  # a bridge marks its media itself; through a relay the assistant does
            vapi.send_text(
                f'{{"event":"mark","streamSid":"{call.stream_sid}","mark":{{"name":"c{seq}"}}}}'
            )

    def _speak(self, call: _Call, now: float) -> None:
        """Send what is due of the current turn, the barge-in, or start the next turn."""
        if not call.speaking:
            if now >= call.next_turn_at and call.vapi is not None:
                self._start_turn(call, now)
            else:
                return
        if call.barge_at is not None and now >= call.barge_at:
            self._barge_in(call, now)
            return
        rng = call.rng
        while call.next_chunk_at <= now:
            left = call.turn_bytes - call.turn_position
            if left < CHUNK_MIN_BYTES:
                self._end_turn(call, now)
                return
            size = min(left, rng.randint(CHUNK_MIN_BYTES, CHUNK_MAX_BYTES))
            self._send_chunk(call, size)
            call.turn_position += size
            call.next_chunk_at = call.turn_started_at + call.turn_position / BYTES_PER_S

    def _end_turn(self, call: _Call, now: float) -> None:
        call.speaking = False
        call.next_turn_at = now + call.rng.uniform(*self.traffic.gap_s)
        self._assistant_message(
            call, f'{{"type":"speech-update","status":"stopped","role":"assistant",'
            f'"turn":{call.turn}}}'
        )

    def _barge_in(self, call: _Call, now: float) -> None:
        self._assistant_message(
            call, f'{{"type":"speech-update","status":"started","role":"user","turn":{call.turn}}}'
        )
        self._assistant_message(
            call, f'{{"type":"user-interrupted","turnId":"{call.vapi_call_id}-{call.turn}"}}'
        )
        call.interrupted_turns.add(call.turn)
        interrupted_at = self._clock()
        call.awaiting_clear.append((call.turn, interrupted_at))
        call.wire.clear(interrupted_at)
        # The in-flight tail of the cut turn: it must never reach the caller.
        self._send_chunk(call, call.rng.randint(CHUNK_MIN_BYTES, CHUNK_MAX_BYTES))
        self._end_turn(call, now)

    # -- the simulated Twilio caller ------------------------------------------------

    async def _place_call(self, call: _Call, target: BridgeTarget) -> None:
        """One call, as Twilio places it: the voice webhook, the stream, and once the
        stream is over (whoever ended it) the ``<Connect action>``."""
        await trio.sleep_until(self._to_trio(call.start_at))
        try:
            with trio.fail_after(SETUP_DEADLINE_S):
                if target.relay:
                    path = f"/{call.vapi_call_id}/transport"
                    ws = await connect_websocket(
                        target.host, target.port, path,
                        {"authorization": f"Bearer {self.api_key}"},
                    )
                    action_url = None
                else:
                    opened = await self._open_stream(call, target)
                    if opened is None:
                        call.refused = True
                        return
                    ws, action_url = opened
            call.caller = ws
            self._stream(call)
            async with trio.open_nursery() as socket_nursery:
                socket_nursery.start_soon(ws.run_flusher)
                await self._read_caller_socket(call, ws)
                socket_nursery.cancel_scope.cancel(reason="media socket closed")
            call.closed_at = self._clock()
            if action_url is not None:
                with trio.fail_after(END_DEADLINE_S):
                    await self._after_stream(call, target, action_url)
            elif call.stopped_at is None:
                call.fail("media socket closed before the caller hung up")
            if call.first_audio_at is None and call.failure is None and not call.drained:
                call.fail("no assistant audio reached the caller")
        except trio.TooSlowError:
            call.fail("timed out" + (" in setup" if call.caller is None else " at the end"))
        except (WireError, OSError, TlsHandshakeError) as exc:
            call.fail(type(exc).__name__ + ": " + str(exc)[:60])
        finally:
            call.active = False
            call.ended = True
            if call.caller is not None:
                await call.caller.aclose()

    async def _open_stream(
        self, call: _Call, target: BridgeTarget
    ) -> tuple[LeanWebSocket, str] | None:
        """The voice webhook, then the stream its TwiML names; None: the overflow message."""
        assert target.public_url is not None
        form = {
            "AccountSid": ACCOUNT_SID, "ApiVersion": "2010-04-01", "CallSid": call.call_sid,
            "CallStatus": "ringing", "Direction": "inbound",
            "From": f"+1555{call.index:07d}", "To": "+15550000000",
        }
        url = target.public_url + VOICE_PATH
        call.webhook_at = self._clock()
        result = await http_request(
            target.host, target.port, "POST", VOICE_PATH,
            body=urllib.parse.urlencode(form).encode(),
            headers={
                "content-type": "application/x-www-form-urlencoded",
                "x-twilio-signature": sign(url, form, target.auth_token),
            },
            tls=target.tls,
        )
        if result.status != 200:
            raise WireError(f"voice webhook answered {result.status}")
        self._webhook_ms.append((self._clock() - call.webhook_at) * 1000)
        document = ET.fromstring(result.body)
        connect = document.find("Connect")
        stream = connect.find("Stream") if connect is not None else None
        if connect is None or stream is None:
            return None  # what Twilio does with it is the caller's matter, not the bridge's
        stream_url = stream.get("url", "")
        parameters = {
            p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")
        }
        path = urllib.parse.urlsplit(stream_url).path
        if self.latency is not None:
            await trio.sleep(self.latency.twilio_stream_setup_ms / 1000)
        ws = await connect_websocket(
            *_reached_at(target, stream_url), path,
            {"x-twilio-signature": sign(stream_url, {}, target.auth_token)},
            tls=target.tls,
        )
        ws.send_text(orjson.dumps(
            {"event": "connected", "protocol": "Call", "version": "1.0.0"}).decode())
        ws.send_text(orjson.dumps({
            "event": "start", "sequenceNumber": "1", "streamSid": call.stream_sid,
            "start": {
                "streamSid": call.stream_sid, "accountSid": ACCOUNT_SID,
                "callSid": call.call_sid, "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": parameters,
            },
        }).decode())
        call.media_sequence = 1
        return ws, connect.get("action", "")

    def _stream(self, call: _Call) -> None:
        now = self._clock()
        call.stream_started_at = now
        call.next_frame_at = now
        call.playback.clear(now)
        call.active = True
        self._live.append(call)

    async def _read_caller_socket(self, call: _Call, ws: LeanWebSocket) -> None:
        # Through a bridge the caller gets only JSON; through a relay, raw audio too.
        try:
            await self._dispatch(call, ws, self._bridge_text, self._heard)
        except WebSocketClosed as exc:
            call.close_code = exc.code

    async def _dispatch(
        self, call: _Call, ws: LeanWebSocket, on_text: _Handler, on_binary: _Handler
    ) -> None:
        """Hand every message read from ``ws`` to its handler, stamped with its arrival
        in the kernel (``StampedSocket``), not with when this loop got round to it."""
        clock = self._clock
        while True:
            batch = await ws.receive_batch()
            now = ws.arrived_at(clock())
            for opcode, payload in batch:
                if opcode == OP_TEXT:
                    on_text(call, payload, now)
                elif opcode == OP_BINARY:
                    on_binary(call, payload, now)

    def _bridge_text(self, call: _Call, payload: bytes, now: float) -> None:
        message = orjson.loads(payload)
        event = message.get("event")
        if event == "media":
            self._heard(call, binascii.a2b_base64(message["media"]["payload"]), now)
        elif event == "mark":
            name = message["mark"]["name"]
            if call.playback.end <= now:
                self._echo_mark(call, name)
            else:
                call.marks.append((call.playback.end, name))
        elif event == "clear":
            while call.marks:
                self._echo_mark(call, call.marks.popleft()[1])
            call.playback.clear(now)
            if call.awaiting_clear:
                turn, interrupted_at = call.awaiting_clear.popleft()
                barge_in_ms = (now - interrupted_at) * 1000
                self._barge_in_ms.append(barge_in_ms)
                self._speech_to_silence.append(barge_in_ms + self._silence_extra_ms)
                call.cleared_turns.add(turn)

    def _heard(self, call: _Call, audio: bytes, now: float) -> None:
        """Assistant audio reached the caller: play it, and time every marker in it."""
        if call.first_audio_at is None:
            call.first_audio_at = now
            self._first_audio.append((now - call.stream_started_at) * 1000)
            if call.webhook_at is not None:
                self._first_word.append(
                    (now - call.webhook_at) * 1000 + self._first_word_extra_ms
                )
        for seq, heard_at in call.playback.hear(audio, now):
            if seq >= len(call.chunk_sent_at) or call.chunk_seen[seq]:
                continue
            call.chunk_seen[seq] = 1
            if call.chunk_turn[seq] in call.cleared_turns:
                self._heard_after_clear_ms += call.chunk_bytes[seq] / 8
                continue
            sent_at = call.chunk_sent_at[seq]
            if self.window[0] <= sent_at <= self.window[1]:
                self._assistant_at_playback.append(
                    (heard_at - call.chunk_wire_heard[seq]) * 1000
                )
                arrival_ms = (now - sent_at) * 1000
                self._assistant_at_arrival.append(arrival_ms)
                if arrival_ms > LATE_AFTER_MS:
                    self._late_assistant += 1

    def _echo_mark(self, call: _Call, name: str) -> None:
        caller = call.caller
        if caller is None or caller.closed:
            return
        call.media_sequence += 1
        caller.send_text(
            f'{{"event":"mark","sequenceNumber":"{call.media_sequence}",'
            f'"streamSid":"{call.stream_sid}","mark":{{"name":{orjson.dumps(name).decode()}}}}}'
        )

    def _send_frame(self, call: _Call, caller: LeanWebSocket) -> None:
        seq = len(call.frame_sent_at)
        call.media_sequence += 1
        payload = binascii.b2a_base64(marker(seq) + _FILL[: FRAME_BYTES - MARKER_BYTES],
                                      newline=False).decode("ascii")
        call.frame_received.append(0)
        call.frame_sent_at.append(self._clock())
        caller.send_text(
            f'{{"event":"media","sequenceNumber":"{call.media_sequence}","media":'
            f'{{"track":"inbound","chunk":"{seq + 1}","timestamp":"{seq * 20}",'
            f'"payload":"{payload}"}},"streamSid":"{call.stream_sid}"}}'
        )

    def _hang_up(self, call: _Call, caller: LeanWebSocket, now: float) -> None:
        call.stopped_at = now
        call.media_sequence += 1
        caller.send_text(
            f'{{"event":"stop","sequenceNumber":"{call.media_sequence}",'
            f'"streamSid":"{call.stream_sid}","stop":{{"accountSid":"{ACCOUNT_SID}",'
            f'"callSid":"{call.call_sid}"}}}}'
        )

    async def _after_stream(self, call: _Call, target: BridgeTarget, action_url: str) -> None:
        """The ``<Connect action>``, as Twilio requests it once the stream is over, judged.

        After the caller's hang-up the bridge must answer ``<Hangup/>``. A stream the
        bridge ended itself is a drained call when it closed it as going away (its
        shutdown: the caller hears what the action says), and a failure otherwise (this
        generator's assistant never ends a call).
        """
        form = {"AccountSid": ACCOUNT_SID, "CallSid": call.call_sid, "CallStatus": "in-progress",
                "StreamSid": call.stream_sid}
        path = urllib.parse.urlsplit(action_url).path
        result = await http_request(
            *_reached_at(target, action_url), "POST", path,
            body=urllib.parse.urlencode(form).encode(),
            headers={
                "content-type": "application/x-www-form-urlencoded",
                "x-twilio-signature": sign(action_url, form, target.auth_token),
            },
            tls=target.tls,
        )
        if result.status != 200:
            call.fail(f"after the stream: HTTP {result.status}")
        elif call.stopped_at is not None:
            if b"<Hangup" not in result.body:
                call.fail("after the stream: fallback, not a hang-up")
        elif call.close_code == GOING_AWAY:
            call.drained = True
        else:
            call.fail(f"the bridge ended the stream (close {call.close_code}) before the hang-up")

    # -- pacing --------------------------------------------------------------------

    def _to_trio(self, perf_time: float) -> float:
        return perf_time + self._trio_offset

    async def _tick(self, until: float) -> None:
        """Every ``TICK_S``: send each live call's due frames, chunks, echoes and hang-ups."""
        clock = self._clock
        next_tick = clock()
        while True:
            next_tick += TICK_S
            await trio.sleep_until(self._to_trio(next_tick))
            now = clock()
            self._tick_slip.append((now - next_tick) * 1000)
            live = self._live
            finished = False
            for call in live:
                if not call.active:
                    finished = True
                    continue
                caller = call.caller
                if caller is None or caller.closed:
                    continue
                if call.stopped_at is None:
                    if now >= call.end_at:
                        self._hang_up(call, caller, now)
                    else:
                        while call.next_frame_at <= now:
                            self._send_frame(call, caller)
                            call.next_frame_at += FRAME_S
                marks = call.marks
                while marks and marks[0][0] <= now:
                    self._echo_mark(call, marks.popleft()[1])
                if call.vapi is not None and call.stopped_at is None:
                    self._speak(call, now)
            if finished:
                self._live = [call for call in live if call.active]
            if now > until and not self._live:
                return

    # -- the run -------------------------------------------------------------------

    async def run(self, target: BridgeTarget, *, started_at: float) -> None:
        """Place every call (ramped from ``started_at``, a perf_counter time) and wait for all."""
        traffic = self.traffic
        self._relay = target.relay
        self._trio_offset = trio.current_time() - time.perf_counter()
        end_at = started_at + traffic.ramp_s + traffic.duration_s
        times = [
            (started_at + traffic.ramp_s * index / max(1, traffic.calls), end_at)
            for index in range(traffic.calls)
        ]
        times += churn_schedule(traffic, started_at, end_at)
        for index, (start_at, call_end_at) in enumerate(times):
            call = _Call(index, start_at, call_end_at, traffic.seed * 1_000_003 + index)
            self._calls.append(call)
            self._by_sid[call.call_sid] = call
            self._by_vapi_id[call.vapi_call_id] = call
        async with trio.open_nursery() as calls_nursery:
            calls_nursery.start_soon(self._tick, end_at)
            for call in self._calls:
                calls_nursery.start_soon(self._place_call, call, target)

    def figures(self) -> CallFigures:
        """Pool what the calls measured (after ``run``)."""
        dropped_caller = dropped_assistant = 0
        failures: Counter[str] = Counter()
        refused = drained = 0
        for call in self._calls:
            if call.failure is not None:
                failures[call.failure] += 1
                continue
            refused += call.refused
            drained += call.drained
            if call.refused or call.drained:
                continue  # nothing was due to arrive after the end the bridge chose
            dropped_caller += _missing_frames(call)
            dropped_assistant += _missing_chunks(call)
        slip = list(self._tick_slip)
        return CallFigures(
            caller_latency_ms=list(self._caller_latency),
            assistant_latency_at_playback_ms=list(self._assistant_at_playback),
            assistant_latency_at_arrival_ms=list(self._assistant_at_arrival),
            barge_in_ms=list(self._barge_in_ms),
            first_audio_ms=list(self._first_audio),
            heard_after_clear_ms=self._heard_after_clear_ms,
            dropped_caller_frames=dropped_caller,
            dropped_assistant_chunks=dropped_assistant,
            late_caller_frames=self._late_caller,
            late_assistant_chunks=self._late_assistant,
            failures=failures,
            tick_slip_ms=slip,
            webhook_ms=list(self._webhook_ms),
            refused_calls=refused,
            drained_calls=drained,
            time_to_first_word_ms=list(self._first_word),
            speech_to_silence_ms=list(self._speech_to_silence),
        )

    @property
    def calls_placed(self) -> int:
        return len(self._calls)

    def streams(self) -> list[CallSpan]:
        """When each call that streamed was set up, streamed and ended (after ``run``)."""
        return [
            CallSpan(
                setup_at=call.webhook_at if call.webhook_at is not None
                else call.stream_started_at,
                streaming_from=call.stream_started_at,
                ended_at=call.stopped_at or call.closed_at or call.end_at,
            )
            for call in self._calls
            if call.stream_started_at and not call.refused
        ]


@frozen
class CallSpan:
    """One call that streamed (perf_counter times): its webhook, its stream, its end."""

    setup_at: float
    streaming_from: float
    ended_at: float


def churn_schedule(traffic: Traffic, started_at: float, end_at: float) -> list[tuple[float, float]]:
    """(start, end) of the churn calls: Poisson arrivals at ``churn_per_s`` from
    ``started_at`` to ``end_at``, each lasting a uniform draw from ``churn_call_s``, cut
    at ``end_at``; calls left shorter than ``MIN_CALL_S`` are not placed. Seeded."""
    if traffic.churn_per_s <= 0:
        return []
    rng = random.Random(traffic.seed * 7_919 + 1)
    schedule = []
    at = started_at + rng.expovariate(traffic.churn_per_s)
    while at < end_at - MIN_CALL_S:
        schedule.append((at, min(end_at, at + rng.uniform(*traffic.churn_call_s))))
        at += rng.expovariate(traffic.churn_per_s)
    return schedule


def _missing_frames(call: _Call) -> int:
    """Caller frames that should have reached the assistant and did not.

    Expected: from the first frame the assistant received (earlier ones were sent
    before its leg was up, and are discarded by design) to the last one sent well
    before the hang-up.
    """
    received = call.frame_received
    first = received.find(1)
    if first < 0 or call.stopped_at is None:
        return 0
    cutoff = call.stopped_at - END_GRACE_S
    last = first
    sent_at = call.frame_sent_at
    for seq in range(len(sent_at) - 1, first - 1, -1):
        if sent_at[seq] <= cutoff:
            last = seq
            break
    return received.count(0, first, last + 1)


def _missing_chunks(call: _Call) -> int:
    """Assistant chunks of turns nobody interrupted that never reached the caller."""
    interrupted = call.interrupted_turns
    cutoff = (call.stopped_at or float("inf")) - END_GRACE_S
    missing = 0
    for seq, seen in enumerate(call.chunk_seen):
        if seen or call.chunk_turn[seq] in interrupted:
            continue
        if call.chunk_sent_at[seq] <= cutoff:
            missing += 1
    return missing
