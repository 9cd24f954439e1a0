"""The call nursery: one phone call bridged from Twilio's media stream to a Vapi assistant.

``Call.run()`` owns every task of a call. After the stream's ``start`` (under a
deadline) and its token check, one nursery runs as siblings:

- *caller → agent* (``_caller_to_agent``): reads Twilio frames; caller audio goes to
  the assistant's outbox (``bridge.outbox``: written at once or queued, bounded; stale
  audio is dropped, never queued without end); mark echoes go to playout; DTMF
  becomes an ``add-message``; ``stop`` ends the call. Its cancel scope is cancelled
  ``media_inactivity_s`` after the last frame (Twilio streams continuously, so silence
  on the socket means the stream is dead).
- *the assistant leg* (``_assistant_leg``): creates the Vapi call, opens its socket,
  then runs *agent → caller* (Vapi frames: audio to playout, barge-in, end; its scope
  is cancelled ``assistant_silence_s`` after the last of them), *the Vapi sender* (the
  outbox's queue to the Vapi socket), *playout* (single writer of assistant audio to
  Twilio) and *keepalive* (ping with a pong deadline).
- *the idle watcher* (``bridge.idle.IdleWatch``): keeps both readers' deadlines, so
  that a message only stores its time; it runs while either reader does.

Whichever side ends first records the outcome (the first one wins) and cancels the
call's *live scope*, in which every task runs (``Phase`` says where a call is). What
is left is the *wind-down*, one bounded step after another under a single time budget
(``_wind_down_budget_s``), each shielded from any cancellation but that budget's end:
the assistant gets ``end-call`` and a close unless it ended itself (a call created
whose socket never opened gets it through Live Call Control, or on a socket opened for
it alone), the outcome is handed to the tracker (the after-stream route reads it), and
Twilio's socket is closed, which makes Twilio request the ``<Connect action>``. A
cancellation from outside (the stream's handler, a stopping server) ends the call the
same way. A failure in any task ends this call only, with one log line; it never
reaches the server.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, assert_never

import trio
from attrs import frozen

from voicebridge.bridge.edge import EdgeBargeIn
from voicebridge.bridge.idle import IdleWatch
from voicebridge.bridge.outbox import DROPPED, WRITTEN, AssistantOutbox
from voicebridge.bridge.outcome import CallRecord, Handover, LegFailure, Outcome
from voicebridge.bridge.playout import Playout
from voicebridge.codec import LegCodec
from voicebridge.config import Config, KeypadConfig
from voicebridge.errors import RemoteProtocolError, SocketClosed
from voicebridge.observability.logs import log_event
from voicebridge.routing import DEFAULT_ROUTE, ROUTE_PARAMETER, decode_decision, joined_decision
from voicebridge.sockets import (
    WRITE_DEADLINE_S,
    MessageSocket,
    PingableSocket,
    SocketWriteTimeout,
)
from voicebridge.twilio import media as tw
from voicebridge.twilio.token import StreamClaims, TokenRejected, issued_at
from voicebridge.vapi import transport as vp
from voicebridge.vapi.client import VapiError, VapiErrorKind, end_call
from voicebridge.vapi.endings import Ending, EndingPolicy, safe_reason

log = logging.getLogger(__name__)

#: Caller audio frames waiting for the Vapi sender (the outbox's queue). A healthy leg
#: drains this at once; 10 frames (200 ms) rides out a scheduling hiccup, and past that
#: the audio is stale (the caller has moved on), so newer frames are dropped and counted.
CALLER_AUDIO_BUFFER_FRAMES = 10
#: Beyond the sum of the wind-down's own bounds (``Call._wind_down_budget_s``): the
#: record, the tracker and Twilio's close frame take microseconds; this covers them.
WIND_DOWN_SLACK_S = 1.0
#: The longest keypad entry: longer ones go to the assistant in pieces this long (an
#: account or card number fits; a key held down, or a tone generator, cannot grow it).
MAX_KEYPAD_ENTRY = 32
#: After Vapi's ``status-update`` ended, how long the assistant's socket is still read
#: for the rest of what it says (audio may follow the message: the end of a goodbye).
#: Vapi closes the socket right after, which ends the wait at once.
TAIL_READ_S = 1.0
#: After the assistant ends the call, how long past its queued audio we wait for
#: Twilio to confirm the goodbye played before closing the stream anyway.
GOODBYE_SLACK_S = 1.0
#: The only format a bidirectional Media Stream carries; audio passes to Vapi as is.
TWILIO_MEDIA_FORMAT = ("audio/x-mulaw", 8000, 1)
#: The only ``start.tracks`` a bidirectional Media Stream announces (the caller's audio).
INBOUND_ONLY = ("inbound",)
#: Custom parameters our TwiML puts on the ``<Stream>``; ``start`` brings them back.
TOKEN_PARAMETER = "token"
CALLER_PARAMETER = "caller"
CALLED_PARAMETER = "called"
#: Only on an outbound call that named its own assistant (``control.assistants``).
ASSISTANT_PARAMETER = "assistant"
#: The close code for Twilio's socket when a call ends (RFC 6455 7.4.1), the one when the
#: server ends it for its shutdown (going away), and the one for a stream refused before
#: ``start`` for sending too much (policy violation).
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
#: One caller frame in this many (one a second) and one assistant audio message in
#: ``ASSISTANT_LATENCY_SAMPLE_EVERY`` have their time inside the bridge measured for the
#: metrics: enough for a histogram, and no clock read on the other frames.
CALLER_LATENCY_SAMPLE_EVERY = 50
ASSISTANT_LATENCY_SAMPLE_EVERY = 10
#: How a connect of the assistant's socket fails with its created call as the create
#: left it: Vapi never answered the upgrade. Such a call is ended through Live Call
#: Control (``Call._end_unconnected``); one whose upgrade Vapi refused is Vapi's to end.
UNANSWERED_CONNECT: frozenset[VapiErrorKind] = frozenset({"timeout", "refused", "dropped"})


class Phase(enum.IntEnum):
    """Where a call is. A call only moves forward through these (it may skip some).

    # Invariant: STARTING: no call task runs; the outcome is unset, or says why the
    #   stream was refused before it began.
    # Invariant: LIVE: the call's tasks run in the live scope; the outcome is unset.
    # Invariant: GOODBYE: the assistant ended the call and its last audio plays, until
    #   ``_goodbye_until`` at the latest; the outcome is decided (or a handover under
    #   way decides it); caller audio no longer goes to the assistant and its
    #   liveness is no longer judged; a drain lets the goodbye finish.
    # Invariant: WINDING_DOWN: the outcome is decided (or is decided by how ``run``
    #   ends) and the live scope is cancelled; what is left runs shielded, each step
    #   within its own bound and all of it before ``_wind_down_until``.
    # Invariant: ENDED: the record was handed over and Twilio's socket closed.
    """

    STARTING = 1
    LIVE = 2
    GOODBYE = 3
    WINDING_DOWN = 4
    ENDED = 5


class AssistantCall(Protocol):
    """A created assistant call; ``id`` goes in the logs."""

    @property
    def id(self) -> str: ...


class AssistantConnector(Protocol):
    """Creates and connects the assistant call; raises ``VapiError`` (classified) on failure.

    Two steps, because they end differently: creating may be cancelled at any point
    (the caller hung up meanwhile; ``Cancelled`` propagates). The connected socket is
    said goodbye to and closed by the call's wind-down, inside the context; the
    context's exit comes after, while the call's live scope is cancelled, and must
    not wait (a close of a socket already closed returns at once). A call created
    whose socket never opened is ended with ``post_control``, or where that has no
    way, with ``end_through_socket``.
    """

    async def create(
        self,
        *,
        call_sid: str,
        caller: str,
        called: str,
        assistant: str = "",
        decision: Mapping[str, Any] | None = None,
    ) -> AssistantCall:
        """``assistant``: the Vapi assistant id of this call; "" for the configured one.
        ``decision``: the route's inline ``assistant`` and ``assistantOverrides``
        (``routing.decode_decision``), if any."""
        ...

    def connect(self, call: AssistantCall) -> AbstractAsyncContextManager[PingableSocket]: ...

    async def post_control(self, call: AssistantCall, message: str) -> bool:
        """Send ``message`` (the JSON text of a socket message) to ``call`` through Live
        Call Control, without its socket: True once accepted; False, and nothing sent,
        when the create answer gave no way to (Vapi's ``monitor.controlUrl``). Raises
        ``VapiError``; bounded by the end deadline. Cancelled: the request is abandoned."""
        ...


async def end_through_socket(
    connector: AssistantConnector, call: AssistantCall, *, end_deadline_s: float
) -> None:
    """Connect ``call``'s socket only to say ``end-call`` on it, and close it.

    How a created call nobody will use is ended when Live Call Control has no way to
    (``AssistantConnector.post_control``): Vapi starts the assistant as the socket
    connects, and ends it at once. The connect is bounded by the connector's own
    deadline, the goodbye by ``end_deadline_s``; the caller bounds the whole and
    shields it. Raises ``VapiError`` when the socket cannot be connected.
    """
    async with connector.connect(call) as socket:
        await end_call(socket, deadline_s=end_deadline_s)


class CallObserver(Protocol):
    """Where a call reports to the metrics (``observability.metrics.BridgeMetrics``)."""

    def call_ended(self, record: CallRecord) -> None:
        """Once per call, with its final record, before the Twilio socket closes."""

    def caller_frame_latency(self, seconds: float) -> None:
        """A sampled caller frame: parsed → written to the assistant."""

    def assistant_audio_latency(self, seconds: float) -> None:
        """A sampled assistant audio message: received → first byte written to Twilio."""


#: How a tracker ends a live call from outside (drain): ``end(outcome, detail)``; it
#: returns how many seconds the call may still take beyond its usual wind-down (a
#: goodbye already under way is let finish).
EndCall = Callable[[Outcome, str], float]


class CallTracker(Protocol):
    """Admission bookkeeping and the outcomes the after-stream route reads."""

    def begin(self, call_sid: str, end: EndCall) -> bool:
        """The stream of ``call_sid`` starts; False: it streamed before, refuse this one."""
        ...

    def finish(self, record: CallRecord) -> None: ...


#: Key presses waiting for call control's DTMF hook. People press a few keys a second
#: and the hook is bounded by a tool deadline; 16 rides out a burst, more are dropped.
DIGIT_BUFFER = 16


class CallControl(Protocol):
    """Call control's view of the live calls of this process (``control.plane``)."""

    def attach(self, call_sid: str, call: Call) -> None:
        """The call's stream started: webhooks about it may now act on it here."""

    def detach(self, call_sid: str, call: Call) -> None:
        """The call ended."""

    async def on_digit(self, call_sid: str, vapi_call_id: str, digit: str) -> str | None:
        """The caller pressed ``digit``; a returned text goes to the assistant as a
        system message. Bounded by call control's own deadline."""


class _AssistantSpeech:
    """Whether the assistant is mid-turn, as its ``speech-update``s say; waitable.

    A handover waits on it, so that a goodbye is never cut off in the middle.
    """

    def __init__(self) -> None:
        self.speaking = False
        self._changed = trio.Event()

    def update(self, speaking: bool) -> None:
        if speaking != self.speaking:
            self.speaking = speaking
            self._changed.set()
            self._changed = trio.Event()

    async def wait_until(self, *, speaking: bool) -> None:
        while self.speaking != speaking:
            await self._changed.wait()


@frozen(kw_only=True)
class CallSettings:
    """What a call needs of the configuration; built only by ``from_config`` (one set
    of defaults: ``config.py``'s). Tests change the ``Config`` and build from it."""

    start_deadline_s: float
    media_inactivity_s: float
    playout_lead_ms: int
    playout_chunk_ms: int
    barge_in_resume_gap_ms: int
    barge_in_on_speech_start: bool
    ping_interval_s: float
    pong_deadline_s: float
    end_deadline_s: float
    #: The Vapi leg's audio format; anything but mulaw/8000 is converted per frame.
    vapi_audio_format: str
    vapi_sample_rate: int
    #: What the assistant is told on a key press; ``{digit}`` is the key.
    dtmf_wording: str
    #: Key presses gathered into entries (``[keypad]``); None: one message per key.
    keypad: KeypadConfig | None
    #: A handover waits this long for the assistant's goodbye to begin …
    goodbye_wait_s: float
    #: … and at most this long in all before it ends the call.
    goodbye_deadline_s: float
    #: The Vapi leg fails when nothing at all (audio or message) came from Vapi this long.
    assistant_silence_s: float
    #: Which of Vapi's ``endedReason`` values are normal ends (``[endings]``).
    endings: EndingPolicy
    #: Where a transfer the assistant starts may go (``[transfer]``): the default
    #: destination (also used when it names none), then the allow-list.
    transfer_default: str
    transfer_allowed: tuple[str, ...]
    #: The stream token's lifetime: its expiry less this is when the webhook issued it.
    stream_token_ttl_s: float
    #: Barge-in at the edge (``[bridge] edge_barge_in``): None, off; else the detector's
    #: mode, the speech run that is an onset, and the assistant's window to confirm.
    edge_barge_in: EdgeBargeIn | None

    @classmethod
    def from_config(cls, config: Config) -> CallSettings:
        return cls(
            start_deadline_s=config.twilio.start_deadline_s,
            media_inactivity_s=config.twilio.media_inactivity_s,
            playout_lead_ms=config.bridge.playout_lead_ms,
            playout_chunk_ms=config.bridge.playout_chunk_ms,
            barge_in_resume_gap_ms=config.bridge.barge_in_resume_gap_ms,
            barge_in_on_speech_start=config.bridge.barge_in_on_speech_start,
            ping_interval_s=config.vapi.ping_interval_s,
            pong_deadline_s=config.vapi.pong_deadline_s,
            end_deadline_s=config.vapi.end_deadline_s,
            assistant_silence_s=config.vapi.assistant_silence_s,
            endings=config.endings.policy(),
            transfer_default=config.transfer.default_destination,
            transfer_allowed=config.transfer.allowed,
            vapi_audio_format=config.vapi.audio_format,
            vapi_sample_rate=config.vapi.sample_rate,
            dtmf_wording=config.control.dtmf_wording,
            keypad=config.keypad if config.keypad.batch else None,
            goodbye_wait_s=config.transfer.goodbye_wait_s,
            goodbye_deadline_s=config.transfer.goodbye_deadline_s,
            stream_token_ttl_s=config.twilio.stream_token_ttl_s,
            edge_barge_in=EdgeBargeIn.from_config(config),
        )


class Call:
    """One call, from the media socket's first frame to its close. Use ``run()`` once."""

    def __init__(
        self,
        twilio: MessageSocket,
        *,
        settings: CallSettings,
        connector: AssistantConnector,
        verify_token: Callable[[str, StreamClaims], None],
        tracker: CallTracker,
        upgrade_signature: str = "unchecked",
        control: CallControl | None = None,
        observer: CallObserver | None = None,
        remote: str = "",
    ) -> None:
        """``remote``: the media socket's peer address, for the logs ("" unknown)."""
        self._twilio = twilio
        self._remote = remote
        self._settings = settings
        self._connector = connector
        self._verify_token = verify_token
        self._tracker = tracker
        self._upgrade_signature = upgrade_signature
        self._control = control
        # Set once by hand_over(); the handover task then ends the call after the goodbye.
        self._handover: Handover | None = None
        self._handover_requested = trio.Event()
        self._assistant_speech = _AssistantSpeech()
        self._digits_in, self._digits_out = trio.open_memory_channel[str](DIGIT_BUFFER)
        self._keypad_in, self._keypad_out = trio.open_memory_channel[str](DIGIT_BUFFER)
        self._observer = observer
        self._stream = tw.MediaStream()
        codec = LegCodec(settings.vapi_audio_format, settings.vapi_sample_rate)
        # None in the default (mulaw/8000) case: caller audio passes through untouched.
        self._codec = None if codec.passthrough else codec
        self._started_at = 0.0
        # How Twilio's socket is closed at the end: code, reason.
        self._twilio_close = (NORMAL_CLOSURE, "call ended")
        self._phase = Phase.STARTING
        # Every task of the call runs in it; cancelled as the wind-down begins (it may
        # be before the tasks start: a drain can end a call as it begins).
        self._live_scope = trio.CancelScope()
        # Cancelled once the assistant has ended the call: the keepalive stops judging.
        self._liveness_scope = trio.CancelScope()
        # When the goodbye's wait ends (set in GOODBYE), and when the wind-down's budget
        # is spent (set as WINDING_DOWN begins).
        self._goodbye_until = math.inf
        self._wind_down_until = math.inf
        self._outcome: Outcome | None = None
        self._detail = ""
        self._leg_failure: LegFailure | None = None
        # Vapi's endedReason once it ended the call (log-safe form); "" before.
        self._ended_reason = ""
        self._call_sid = ""
        # What the stream's start carries, once its token vouched for it: only these
        # values reach Vapi.
        self._claims: StreamClaims | None = None
        # The route that took the call, and its decision; known once the token passed.
        self._route = ""
        self._decision: dict[str, Any] = {}
        # When the voice webhook issued this stream's token (trio time); None: unknown.
        self._webhook_at: float | None = None
        edge = settings.edge_barge_in
        self._edge = edge.listener() if edge is not None else None
        self._vapi_call_id = ""
        self._playout: Playout | None = None
        # While the assistant listens: from its leg's start until it ended the call or
        # its socket closed. Caller audio when nobody listens is not counted as dropped.
        self._outbox: AssistantOutbox | None = None
        self._frames_from_caller = 0
        self._frames_to_assistant = 0
        self._frames_dropped = 0
        self._caller_audio_bytes = 0
        # The sampled caller frame in flight to the assistant, and when it was parsed.
        self._latency_probe: bytes | None = None
        self._latency_probe_at = 0.0

    async def run(self) -> CallRecord:
        """Run the call to its end and return its record. Never raises but ``Cancelled``.

        Cancelled (the media socket's handler was, or the server stops): the call
        ends as ``stream-lost`` unless it had ended already, it is still wound down
        politely within its budget (``_wind_down_budget_s``), and then ``Cancelled``
        propagates.
        """
        self._started_at = trio.current_time()
        # Only a stream that passed the token check is this CallSid's call: a rejected
        # one (a replay, say) must not touch the real call's slot or record.
        begun = False
        try:
            start = await self._wait_start()
            if start is not None and self._accept(start):
                begun = True
                self._advance(Phase.LIVE)  # unless a drain ended the call as it began
                if self._control is not None:
                    self._control.attach(self._call_sid, self)
                log_event(
                    log,
                    logging.INFO,
                    "call-start",
                    f"call {self._call_sid} started",
                    call_sid=self._call_sid,
                    stream_sid=start.stream_sid,
                    caller=start.custom_parameters.get(CALLER_PARAMETER),
                    route=self._route,
                    upgrade_signature=self._upgrade_signature,
                )
                with self._live_scope:
                    async with trio.open_nursery() as call_nursery:
                        idle = IdleWatch(call_nursery)
                        call_nursery.start_soon(self._caller_to_agent, idle)
                        call_nursery.start_soon(self._assistant_leg, idle)
        except* trio.Cancelled:
            self._end(Outcome.STREAM_LOST, "media socket closed by the peer or server")
            raise
        except* Exception as group:
            self._end(Outcome.INTERNAL_ERROR, _describe(group))
            log.error("call %s failed with a bug", self._call_sid or "?", exc_info=group)
        finally:
            with self._wind_down_scope():
                record = self._record()
                if begun:
                    self._tracker.finish(record)
                    if self._control is not None:
                        self._control.detach(self._call_sid, self)
                if self._observer is not None:
                    self._observer.call_ended(record)
                await self._close_twilio()
                self._phase = Phase.ENDED
                _log_call_end(record, began=begun, remote=self._remote)
        return record

    async def _close_twilio(self) -> None:
        """Close Twilio's socket: politely, or at once for a peer refused for what it sent.

        A peer over the pre-start budget is not read for an answer to our close frame
        (a flooder's frames would be read for ``net.ws.CLOSE_REPLY_S``): the close
        frame goes, then the connection, within ``sockets.CLOSE_GRACE_S``.
        """
        code, reason = self._twilio_close
        if self._outcome is Outcome.SHUTDOWN:
            # RFC 6455's "a server going down": Twilio runs the <Connect action> all the
            # same; a client that reads the code knows the call was drained, not failed.
            code, reason = GOING_AWAY, "shutting down"
        if code == POLICY_VIOLATION:
            with trio.move_on_after(0):  # close_scope still grants CLOSE_GRACE_S
                await self._twilio.aclose(code, reason)
            return
        await self._twilio.aclose(code, reason)

    # -- before the call nursery ---------------------------------------------------

    async def _wait_start(self) -> tw.Start | None:
        """Read ``connected`` and ``start`` under the start deadline.

        Within the pre-start budget too (``twilio.media.PRE_START_FRAMES`` and
        ``PRE_START_CHARS``): a peer over it is refused at once (1008), so neither
        time nor traffic lets a stream without a token hold on to the bridge.
        """
        with trio.move_on_after(self._settings.start_deadline_s):
            try:
                while True:
                    event = self._stream.receive(await self._twilio.receive())
                    if isinstance(event, tw.Start):
                        return event
            except SocketClosed:
                self._set_outcome(Outcome.STREAM_LOST, "media socket closed before start")
                return None
            except tw.PreStartLimitExceeded as exc:
                self._set_outcome(Outcome.PROTOCOL_ERROR, f"before start: {exc}")
                self._twilio_close = (POLICY_VIOLATION, "too much before start")
                return None
            except RemoteProtocolError as exc:
                self._set_outcome(Outcome.PROTOCOL_ERROR, f"before start: {exc}")
                return None
        self._set_outcome(
            Outcome.PROTOCOL_ERROR,
            f"no start within {self._settings.start_deadline_s:g} s of the socket opening",
        )
        return None

    def _accept(self, start: tw.Start) -> bool:
        self._call_sid = start.call_sid
        if (start.encoding, start.sample_rate, start.channels) != TWILIO_MEDIA_FORMAT:
            self._set_outcome(
                Outcome.PROTOCOL_ERROR,
                f"unexpected media format {start.encoding}/{start.sample_rate}"
                f"/{start.channels} (want audio/x-mulaw/8000/1)",
            )
            return False
        if start.tracks != INBOUND_ONLY:
            # A bidirectional stream carries the caller alone; other audio is not the caller's.
            self._set_outcome(
                Outcome.PROTOCOL_ERROR,
                f"unexpected tracks {list(start.tracks[:4])!r} (want {list(INBOUND_ONLY)!r})",
            )
            return False
        params = start.custom_parameters
        claims = StreamClaims(
            call_sid=start.call_sid,
            assistant=params.get(ASSISTANT_PARAMETER, ""),
            caller=params.get(CALLER_PARAMETER, ""),
            called=params.get(CALLED_PARAMETER, ""),
            route=params.get(ROUTE_PARAMETER, ""),
            decision=joined_decision(params),
        )
        try:
            self._verify_token(params.get(TOKEN_PARAMETER, ""), claims)
            # Vouched for by the token: only a bridge of another version makes it unreadable.
            self._decision = decode_decision(claims.decision)
        except TokenRejected as exc:
            self._set_outcome(Outcome.TOKEN_REJECTED, f"stream token {exc.reason}")
            return False
        except ValueError as exc:
            self._set_outcome(Outcome.PROTOCOL_ERROR, f"route decision {exc}")
            return False
        # Last, so that only a stream that passed every check claims the CallSid.
        if not self._tracker.begin(start.call_sid, self.end):
            self._set_outcome(
                Outcome.TOKEN_REJECTED, "call streamed already (one stream per call)"
            )
            return False
        self._claims = claims
        self._route = claims.route or DEFAULT_ROUTE
        self._webhook_at = _webhook_time(
            params.get(TOKEN_PARAMETER, ""), self._settings.stream_token_ttl_s
        )
        return True

    # -- caller → agent ------------------------------------------------------------

    async def _caller_to_agent(self, idle: IdleWatch) -> None:
        inactivity_s = self._settings.media_inactivity_s
        with (
            trio.CancelScope() as inactivity_scope,
            idle.watch(inactivity_scope, inactivity_s) as inactivity,
        ):
            try:
                while True:
                    event = self._stream.receive(await self._twilio.receive())
                    inactivity.touch()
                    if isinstance(event, tw.Media):
                        # Nearly every frame: kept off the match (a class pattern costs
                        # more than this test), which takes the rest exhaustively.
                        self._forward_audio(event.payload)
                        if self._edge is not None and self._playout is not None:
                            await self._edge.hear(event.payload, self._playout)
                        continue
                    match event:
                        case tw.Mark():
                            if self._playout is not None:
                                self._playout.mark_played(event.name)
                        case tw.Dtmf():
                            await self._forward_digit(event.digit)
                        case tw.Stop():
                            self._end(Outcome.CALLER_HUNG_UP, "Twilio sent stop")
                            return
                        case tw.Connected() | tw.Start() | tw.Unrecognized():
                            log.debug("call %s: ignoring Twilio event %r", self._call_sid, event)
                        case _:
                            assert_never(event)
            except SocketClosed as exc:
                self._end(Outcome.STREAM_LOST, f"media socket closed without stop ({exc})")
                return
            except RemoteProtocolError as exc:
                self._end(Outcome.PROTOCOL_ERROR, f"Twilio frame: {exc}")
                return
        if inactivity_scope.cancelled_caught:
            self._end(Outcome.STREAM_LOST, f"no frames from Twilio for {inactivity_s:g} s")

    def _forward_audio(self, payload: bytes) -> None:
        self._frames_from_caller += 1
        outbox = self._outbox
        if outbox is None:
            return
        sampled = (
            self._frames_from_caller % CALLER_LATENCY_SAMPLE_EVERY == 0
            and self._observer is not None
        )
        parsed_at = trio.current_time() if sampled else 0.0
        if self._codec is not None:
            payload = self._codec.to_assistant(payload)
        put = outbox.put_audio(payload)
        if put is WRITTEN:  # nearly always, on a live leg
            self._frames_to_assistant += 1
            self._caller_audio_bytes += len(payload)
            if sampled and self._observer is not None:
                self._observer.caller_frame_latency(trio.current_time() - parsed_at)
        elif put is DROPPED:
            self._frames_dropped += 1
        elif sampled:
            # Measured when the sender has written it (``_queued_audio_written``).
            self._latency_probe = payload
            self._latency_probe_at = parsed_at

    def _queued_audio_written(self, payload: bytes) -> None:
        """The outbox's sender handed a queued caller frame whole to the socket."""
        self._frames_to_assistant += 1
        self._caller_audio_bytes += len(payload)
        if payload is self._latency_probe and self._observer is not None:
            self._latency_probe = None
            self._observer.caller_frame_latency(trio.current_time() - self._latency_probe_at)

    async def _forward_digit(self, digit: str) -> None:
        outbox = self._outbox
        if outbox is None:
            log.info("call %s: DTMF %s before the assistant was connected", self._call_sid, digit)
            return
        if self._control is not None:
            try:
                self._digits_in.send_nowait(digit)
            except trio.WouldBlock:
                log.info("call %s: DTMF %s dropped (call control is behind)", self._call_sid, digit)
        if self._settings.keypad is not None:
            try:
                self._keypad_in.send_nowait(digit)
            except trio.WouldBlock:
                log.info("call %s: DTMF %s dropped (keypad entry is behind)", self._call_sid, digit)
            return
        wording = self._settings.dtmf_wording.replace("{digit}", digit)
        # Control messages are never dropped: this may wait behind queued audio, at
        # most until the sender's write deadline fails the leg.
        await outbox.send(vp.add_message(role="user", content=wording))

    async def _keypad_task(self, keypad: KeypadConfig) -> None:
        """Gather key presses into entries, as Vapi's keypadInputPlan does.

        An entry goes to the assistant as one ``add-message`` when the caller presses a
        delimiter (not part of the entry; a delimiter alone is sent as itself), when
        ``keypad.timeout_s`` passes after its last key (0: never; with no delimiters
        either, every key at once), or when it reaches ``MAX_KEYPAD_ENTRY``. Entries,
        like every control message, are never dropped (``AssistantOutbox.send``).
        """
        entry = ""
        while True:
            digit: str | None = None
            if entry and keypad.timeout_s > 0:
                with trio.move_on_after(keypad.timeout_s):
                    digit = await self._keypad_out.receive()
            elif entry or keypad.delimiters or keypad.timeout_s > 0:
                digit = await self._keypad_out.receive()
            else:
                entry = await self._keypad_out.receive()  # no way to end an entry: at once
            if digit is not None and digit not in keypad.delimiters:
                entry += digit
                if len(entry) < MAX_KEYPAD_ENTRY:
                    continue
            elif digit is not None and not entry:
                entry = digit  # a delimiter alone ("press # to continue")
            outbox = self._outbox
            if outbox is not None:
                wording = keypad.wording.replace("{digits}", entry)
                await outbox.send(vp.add_message(role="user", content=wording))
            entry = ""

    # -- the assistant leg ---------------------------------------------------------

    async def _assistant_leg(self, idle: IdleWatch) -> None:
        """Create the assistant call, open its socket, and run the leg until the call ends.

        A call created whose socket never opened is not left to Vapi: cancelled while
        connecting (the call ended meanwhile), or failed with no answer to the upgrade
        (``UNANSWERED_CONNECT``), it is ended by ``_end_unconnected``, a wind-down step.
        """
        claims = self._claims
        assert claims is not None, "the call nursery starts only after _accept"
        try:
            call = await self._connector.create(
                call_sid=claims.call_sid,
                caller=claims.caller,
                called=claims.called,
                assistant=claims.assistant,
                decision=self._decision,
            )
        except VapiError as exc:
            self._leg_failed(exc)
            return
        self._vapi_call_id = call.id
        async with contextlib.AsyncExitStack() as leg_stack:
            try:
                socket = await leg_stack.enter_async_context(self._connector.connect(call))
            except VapiError as exc:
                self._leg_failed(exc)
                if exc.kind in UNANSWERED_CONNECT:
                    with self._wind_down_scope():
                        # Not connected again: that just failed, and a second try would
                        # hold the caller's fallback for the whole end deadline.
                        await self._end_unconnected(call, reconnect=False)
                return
            except trio.Cancelled:
                with self._wind_down_scope():
                    await self._end_unconnected(call, reconnect=True)
                raise
            try:
                await self._run_assistant_leg(socket, idle)
            finally:
                with self._wind_down_scope():
                    await self._close_assistant(socket)

    def _leg_failed(self, exc: VapiError) -> None:
        """End the call for a create or connect that failed: over the limit, or failed."""
        if exc.kind == "limit":
            self._end(
                Outcome.ASSISTANT_OVER_LIMIT,
                f"{exc}; raise the Vapi account's concurrency limit, or lower "
                "server.max_concurrent_calls to it",
            )
        else:
            self._end(Outcome.ASSISTANT_LEG_FAILED, str(exc), leg_failure=exc.kind)

    async def _end_unconnected(self, call: AssistantCall, *, reconnect: bool) -> None:
        """Say ``end-call`` to the assistant call whose socket never opened; one log line.

        Through Live Call Control when the create answer gave a way
        (``AssistantConnector.post_control``); otherwise, or when Vapi refused it there
        (whether Live Call Control ends a call still queued is not documented), with
        ``reconnect``, on a socket connected for that alone (``end_through_socket``);
        without either, the call is Vapi's to end. Bounded by ``end_deadline_s`` in all;
        run shielded, as a step of the wind-down. A failure is logged, never raised: the
        call ends all the same.
        """
        end_deadline_s = self._settings.end_deadline_s
        via = ""
        failures: list[str] = []
        with trio.move_on_after(end_deadline_s) as goodbye_scope:
            try:
                if await self._connector.post_control(call, vp.end_call()):
                    via = "control"
            except VapiError as exc:
                failures.append(f"control URL: {exc}")
            if not via and reconnect:
                try:
                    await end_through_socket(self._connector, call, end_deadline_s=end_deadline_s)
                    via = "socket"
                except VapiError as exc:
                    failures.append(f"socket: {exc}")
        if goodbye_scope.cancelled_caught:
            failures.append(f"not done within {end_deadline_s:g} s")
        if not via and not failures:
            return  # no way to say it: the call is Vapi's to end
        failure = "" if via else "; ".join(failures)
        if failure:
            log_event(
                log,
                logging.WARNING,
                "unconnected-call-end-failed",
                f"call {self._call_sid}: could not end the assistant call whose socket "
                f"never opened ({failure}); Vapi ends it in its own time",
                call_sid=self._call_sid,
                vapi_call_id=call.id,
                detail=failure,
            )
            return
        log_event(
            log,
            logging.INFO,
            "unconnected-call-ended",
            f"call {self._call_sid}: the assistant call was ended before its socket opened "
            + ("(through its control URL)" if via == "control" else "(on a socket opened for it)"),
            call_sid=self._call_sid,
            vapi_call_id=call.id,
            via=via,
        )

    async def _run_assistant_leg(self, socket: PingableSocket, idle: IdleWatch) -> None:
        playout = Playout(
            self._twilio,
            self._stream,
            lead_ms=self._settings.playout_lead_ms,
            chunk_ms=self._settings.playout_chunk_ms,
            resume_gap_ms=self._settings.barge_in_resume_gap_ms,
            call_started_at=self._started_at,
            on_latency=self._observer.assistant_audio_latency if self._observer else None,
            latency_sample_every=ASSISTANT_LATENCY_SAMPLE_EVERY,
        )
        self._playout = playout
        outbox = AssistantOutbox(
            socket,
            buffer=CALLER_AUDIO_BUFFER_FRAMES,
            on_queued_audio_written=self._queued_audio_written,
        )
        async with trio.open_nursery() as leg_nursery:
            leg_nursery.start_soon(self._agent_to_caller, socket, playout, idle)
            leg_nursery.start_soon(self._assistant_sender, outbox)
            leg_nursery.start_soon(self._playout_task, playout)
            leg_nursery.start_soon(self._keepalive, socket)
            leg_nursery.start_soon(self._handover_task, playout)
            if self._settings.keypad is not None:
                leg_nursery.start_soon(self._keypad_task, self._settings.keypad)
            if self._control is not None:
                leg_nursery.start_soon(self._digit_task, self._control)
            self._outbox = outbox

    async def _close_assistant(self, socket: PingableSocket) -> None:
        """Say goodbye to Vapi unless it left first; bounded by the end deadline."""
        self._outbox = None
        if self._outcome in (Outcome.ASSISTANT_ENDED, Outcome.ASSISTANT_LEG_FAILED):
            with trio.move_on_after(self._settings.end_deadline_s):
                await socket.aclose()
        else:
            await end_call(socket, deadline_s=self._settings.end_deadline_s)

    async def _agent_to_caller(
        self, socket: PingableSocket, playout: Playout, idle: IdleWatch
    ) -> None:
        # Vapi's answering pings proves only that its socket is up: a wedged assistant
        # sends nothing at all. Every message counts as activity for the silence deadline.
        silence_s = self._settings.assistant_silence_s
        with (
            trio.CancelScope() as silence_scope,
            idle.watch(silence_scope, silence_s) as silence,
        ):
            try:
                while True:
                    message = await socket.receive()
                    silence.touch()
                    if isinstance(message, bytes):
                        if self._codec is not None:
                            message = self._codec.from_assistant(message)
                        playout.feed(message)
                        continue
                    event = vp.parse_message(message)
                    match event:
                        case vp.UserInterrupted():
                            await playout.barge_in()
                        case vp.SpeechUpdate():
                            await self._on_speech_update(event, playout)
                        case vp.StatusUpdate(status="ended"):
                            outcome, detail = self._judge_ending(event.ended_reason)
                            silence.stop()  # the goodbye has its own bound
                            await self._let_goodbye_play(playout, outcome, detail, socket)
                            self._end(outcome, detail)
                            return
                        case vp.StatusUpdate(status="forwarding"):
                            self._transfer_for_assistant(
                                event.destination, "status-update forwarding"
                            )
                        case vp.TransferUpdate():
                            self._transfer_for_assistant(event.destination, "transfer-update")
                        case vp.Transcript(transcript_type="final"):
                            log.debug(
                                "call %s: %s said %r", self._call_sid, event.role, event.transcript
                            )
                        case (
                            vp.StatusUpdate()
                            | vp.Transcript()
                            | vp.ModelOutput()
                            | vp.VoiceInput()
                            | vp.ToolCalls()
                            | vp.ConversationUpdate()
                            | vp.Hang()  # the assistant is stalling, not hanging up
                            | vp.AssistantStarted()
                            | vp.Unrecognized()
                        ):
                            log.debug("call %s: Vapi %s", self._call_sid, type(event).__name__)
                        case _:
                            assert_never(event)
            except SocketClosed as exc:
                if exc.code == 1000:
                    silence.stop()
                    await self._let_goodbye_play(
                        playout, Outcome.ASSISTANT_ENDED, "Vapi closed the socket"
                    )
                    self._end(Outcome.ASSISTANT_ENDED, "Vapi closed the socket")
                else:
                    self._end(
                        Outcome.ASSISTANT_LEG_FAILED,
                        f"dropped: Vapi socket lost ({exc})",
                        leg_failure="dropped",
                    )
            except RemoteProtocolError as exc:
                self._end(
                    Outcome.ASSISTANT_LEG_FAILED,
                    f"protocol: Vapi message: {exc}",
                    leg_failure="protocol",
                )
        if silence_scope.cancelled_caught:
            self._end(
                Outcome.ASSISTANT_LEG_FAILED,
                f"unresponsive: nothing from Vapi for {silence_s:g} s",
                leg_failure="unresponsive",
            )

    async def _on_speech_update(self, event: vp.SpeechUpdate, playout: Playout) -> None:
        if event.role == "assistant":
            self._assistant_speech.update(event.status == "started")
            if event.status == "started":
                playout.turn_started()
            else:
                playout.end_of_speech()
        elif (
            event.role == "user"
            and event.status == "started"
            # The assistant hearing the caller confirms a turn held at the edge.
            and (self._settings.barge_in_on_speech_start or playout.held)
        ):
            await playout.barge_in()

    def _transfer_for_assistant(self, destination: Mapping[str, Any] | None, how: str) -> None:
        """The assistant transferred the call (Vapi's transfer tool, announced on the socket).

        On this transport Vapi has no phone line: the bridge moves the caller, exactly
        as for call control's transfer tool (the goodbye plays, then ``<Dial>``), to
        the named number if ``[transfer]`` allows it, or the default destination when
        none is named. A number outside the allow-list is refused with one warning and
        the conversation goes on. A repeat (``forwarding`` then ``transfer-update``) is
        the handover already under way.
        """
        requested = vp.destination_number(destination)
        settings = self._settings
        target = requested or settings.transfer_default
        allowed = target and (
            target == settings.transfer_default or target in settings.transfer_allowed
        )
        if not allowed:
            log_event(
                log,
                logging.WARNING,
                "transfer-refused",
                f"call {self._call_sid}: the assistant's transfer ({how}) refused: "
                + ("not an allowed transfer target" if target else "no destination and no default"),
                call_sid=self._call_sid,
                vapi_call_id=self._vapi_call_id or None,
                destination=requested[:40] or None,
            )
            return
        if self._handover is not None and self._handover.transfer_to == target:
            return  # the same transfer, announced twice
        if self.hand_over(
            Handover(
                outcome=Outcome.TRANSFERRED,
                detail=f"transferred to {target} (the assistant's {how})",
                transfer_to=target,
            )
        ):
            log_event(
                log,
                logging.INFO,
                "transfer",
                f"call {self._call_sid}: the assistant transfers the caller to {target}",
                call_sid=self._call_sid,
                vapi_call_id=self._vapi_call_id or None,
                destination=target,
            )

    def _judge_ending(self, reason: str | None) -> tuple[Outcome, str]:
        """The outcome of Vapi's ``status-update`` ended with ``reason`` (``[endings]``)."""
        self._ended_reason = safe_reason(reason)
        ending = self._settings.endings.classify(reason)
        match ending:
            case Ending.NORMAL:
                return Outcome.ASSISTANT_ENDED, self._ended_reason
            case Ending.OVER_LIMIT:
                return (
                    Outcome.ASSISTANT_OVER_LIMIT,
                    f"ended: {self._ended_reason}; raise the Vapi account's concurrency "
                    "limit, or lower server.max_concurrent_calls to it",
                )
            case Ending.FAILURE:
                return Outcome.ASSISTANT_LEG_FAILED, f"ended: {self._ended_reason}"
            case _:
                assert_never(ending)

    async def _let_goodbye_play(
        self,
        playout: Playout,
        outcome: Outcome,
        detail: str,
        socket: PingableSocket | None = None,
    ) -> None:
        """The assistant is done: let the caller hear the rest of what it said.

        From here the call's outcome is decided, however long the goodbye takes (a
        handover under way still wins, see ``_end``); liveness is no longer judged
        (nobody reads the assistant's socket while the goodbye plays, so its pongs
        would go unnoticed); and a drain lets the goodbye finish (``end``). With
        ``socket`` (still open after ``status-update`` ended), what the assistant still
        sends is read for up to ``TAIL_READ_S`` and played: audio may follow the
        message, and a close then, with or without a status code, changes nothing.
        Bounded by that, the audio queued then, and ``GOODBYE_SLACK_S``.
        """
        if not self._advance(Phase.GOODBYE):
            return  # the call is winding down already
        self._outbox = None  # nobody listens any more: caller audio stops here
        if self._handover is None:
            self._set_outcome(outcome, detail)
        self._liveness_scope.cancel(reason="the assistant ended the call")
        now = trio.current_time()
        tail_s = TAIL_READ_S if socket is not None else 0.0
        self._goodbye_until = now + tail_s + playout.queued_ms / 1000 + GOODBYE_SLACK_S
        if socket is not None:
            with trio.move_on_after(TAIL_READ_S):
                await self._read_tail(socket, playout)
            self._goodbye_until = trio.current_time() + playout.queued_ms / 1000 + GOODBYE_SLACK_S
        with trio.move_on_at(self._goodbye_until):
            await playout.wait_drained()

    async def _read_tail(self, socket: PingableSocket, playout: Playout) -> None:
        """Play the audio the assistant sends after ending the call, until it closes."""
        try:
            while True:
                message = await socket.receive()
                if isinstance(message, bytes):
                    if self._codec is not None:
                        message = self._codec.from_assistant(message)
                    playout.feed(message)
        except SocketClosed:
            return

    async def _assistant_sender(self, outbox: AssistantOutbox) -> None:
        try:
            await outbox.run()
        except SocketWriteTimeout:
            self._end(
                Outcome.ASSISTANT_LEG_FAILED,
                "unresponsive: Vapi stopped reading",
                leg_failure="unresponsive",
            )
        except SocketClosed:
            # The reader sees the same close and knows whether it was clean. Caller
            # audio has nowhere to go now; it is not "dropped under backpressure".
            self._outbox = None

    async def _playout_task(self, playout: Playout) -> None:
        try:
            await playout.run()
        except SocketWriteTimeout as exc:
            self._end(Outcome.STREAM_LOST, f"media socket failed while sending ({exc})")
        except SocketClosed as exc:
            # Twilio went away; a write can notice before the reader does.
            self._end(Outcome.STREAM_LOST, f"media socket closed while sending ({exc})")

    async def _keepalive(self, socket: PingableSocket) -> None:
        with self._liveness_scope:
            await self._ping_until_unresponsive(socket)

    async def _ping_until_unresponsive(self, socket: PingableSocket) -> None:
        settings = self._settings
        while True:
            await trio.sleep(settings.ping_interval_s)
            # Shielded so the ping frame is never torn; the pong deadline still bounds it.
            with trio.CancelScope(shield=True):
                with trio.move_on_after(settings.pong_deadline_s) as pong_scope:
                    try:
                        await socket.ping()
                    except SocketClosed:
                        return  # the reader reports how the socket ended
            if pong_scope.cancelled_caught:
                self._end(
                    Outcome.ASSISTANT_LEG_FAILED,
                    f"unresponsive: no pong within {settings.pong_deadline_s:g} s",
                    leg_failure="unresponsive",
                )
                return

    # -- ending --------------------------------------------------------------------

    def _set_outcome(
        self, outcome: Outcome, detail: str, *, leg_failure: LegFailure | None = None
    ) -> None:
        if self._outcome is None:
            self._outcome = outcome
            self._detail = detail
            if outcome is Outcome.ASSISTANT_LEG_FAILED:
                # Vapi's own ending for a failure has no kind of ours: "ended".
                self._leg_failure = leg_failure or "ended"

    def end(self, outcome: Outcome, detail: str) -> float:
        """End the call from outside (e.g. the drain deadline passed); safe at any time.

        A call whose assistant has already ended is left to finish its goodbye (a
        normal end, bounded); returns how many seconds of it are left, 0 otherwise.
        """
        if self._phase is Phase.GOODBYE and outcome is Outcome.SHUTDOWN:
            return max(0.0, self._goodbye_until - trio.current_time())
        self._end(outcome, detail)
        return 0.0

    @property
    def vapi_call_id(self) -> str:
        return self._vapi_call_id

    def hand_over(self, handover: Handover) -> bool:
        """End the call with ``handover`` once the assistant's goodbye has played.

        Safe at any time. False when the call is already ending or being handed over.
        The handover task waits for the assistant to finish its turn (or, for
        ``goodbye_wait_s``, to start one), then for Twilio to confirm the audio played
        (marks), at most ``goodbye_deadline_s`` in all; then the call ends with
        ``handover.outcome``, Vapi gets ``end-call``, and the after-stream TwiML acts.
        """
        if self._handover is not None or self._phase >= Phase.WINDING_DOWN:
            return False
        self._handover = handover
        self._handover_requested.set()
        return True

    async def _handover_task(self, playout: Playout) -> None:
        await self._handover_requested.wait()
        handover = self._handover
        assert handover is not None
        with trio.move_on_after(self._settings.goodbye_deadline_s):
            await self._wait_goodbye(playout)
        self._end(handover.outcome, handover.detail)

    async def _wait_goodbye(self, playout: Playout) -> None:
        """The turn in progress, or one that starts within ``goodbye_wait_s``, plays out."""
        speech = self._assistant_speech
        await speech.wait_until(speaking=False)
        with trio.move_on_after(self._settings.goodbye_wait_s):
            await speech.wait_until(speaking=True)
        await speech.wait_until(speaking=False)
        await playout.wait_drained()

    async def _digit_task(self, control: CallControl) -> None:
        async for digit in self._digits_out:
            answer = await control.on_digit(self._call_sid, self._vapi_call_id, digit)
            outbox = self._outbox
            if answer and outbox is not None:
                await outbox.send(vp.add_message(role="system", content=answer))

    def _end(
        self, outcome: Outcome, detail: str, *, leg_failure: LegFailure | None = None
    ) -> None:
        """Record why the call ends (the first reason wins) and begin its wind-down;
        ``leg_failure`` says how, for ``ASSISTANT_LEG_FAILED``."""
        if self._handover is not None and outcome is Outcome.ASSISTANT_ENDED:
            # The assistant hung up during the handover's goodbye: the handover still wins.
            outcome, detail = self._handover.outcome, self._handover.detail
        self._set_outcome(outcome, detail, leg_failure=leg_failure)
        self._begin_wind_down(f"call ending: {outcome.value}")

    def _advance(self, phase: Phase) -> bool:
        """Move on to ``phase``; False, and no change, when the call is there or past it."""
        if phase <= self._phase:
            return False
        self._phase = phase
        return True

    def _begin_wind_down(self, reason: str) -> None:
        """Cancel the live scope; the wind-down's budget starts now (once per call)."""
        if self._advance(Phase.WINDING_DOWN):
            self._wind_down_until = trio.current_time() + self._wind_down_budget_s()
            self._live_scope.cancel(reason=reason)

    def _wind_down_budget_s(self) -> float:
        """Longest a call may take from its end to the close of Twilio's socket.

        A write to either socket under way as the call ends (never torn: up to
        ``WRITE_DEADLINE_S``), then the goodbye to the assistant and the close of its
        socket (``end_deadline_s`` each), then ``WIND_DOWN_SLACK_S`` for the rest.
        """
        return WRITE_DEADLINE_S + 2 * self._settings.end_deadline_s + WIND_DOWN_SLACK_S

    def _wind_down_scope(self) -> trio.CancelScope:
        """The scope of one step of the wind-down: shielded, ending with the budget.

        Shielded, so that no cancellation but the budget's end cuts a goodbye short.
        The first step begins the wind-down if nothing did before: the call is then
        ending because ``run`` was cancelled or a task failed (``run`` records which).
        """
        self._begin_wind_down("call ending")
        return trio.CancelScope(shield=True, deadline=self._wind_down_until)

    def _record(self) -> CallRecord:
        playout = self._playout
        stats = playout.stats if playout is not None else None
        first_audio_ms = webhook_to_first_audio_ms = None
        if stats is not None and stats.first_audio_at is not None:
            first_audio_ms = (stats.first_audio_at - self._started_at) * 1000
            if self._webhook_at is not None:
                webhook_to_first_audio_ms = (stats.first_audio_at - self._webhook_at) * 1000
        return CallRecord(
            call_sid=self._call_sid,
            stream_sid=self._stream.stream_sid or "",
            vapi_call_id=self._vapi_call_id,
            outcome=self._outcome or Outcome.INTERNAL_ERROR,
            detail=self._detail or "no outcome recorded",
            duration_s=trio.current_time() - self._started_at,
            frames_from_caller=self._frames_from_caller,
            frames_to_assistant=self._frames_to_assistant,
            frames_dropped=self._frames_dropped,
            caller_audio_bytes=self._caller_audio_bytes,
            ended_reason=self._ended_reason,
            leg_failure=self._leg_failure,
            route=self._route,
            assistant_bytes=stats.assistant_bytes if stats else 0,
            media_messages_to_caller=stats.media_messages if stats else 0,
            heard_ms=stats.heard_ms if stats else 0,
            presumed_heard_ms=stats.presumed_heard_ms if stats else 0,
            unknown_marks=stats.unknown_marks if stats else 0,
            early_barge_ins=stats.early_barge_ins if stats else 0,
            early_confirmed=stats.early_confirmed if stats else 0,
            early_resumed=stats.early_resumed if stats else 0,
            webhook_to_first_audio_ms=webhook_to_first_audio_ms,
            first_audio_ms=first_audio_ms,
            barge_ins=tuple(stats.barge_ins) if stats else (),
            transfer_to=(
                self._handover.transfer_to
                if self._handover is not None and self._outcome is Outcome.TRANSFERRED
                else ""
            ),
        )


def _webhook_time(token: str, ttl_s: float) -> float | None:
    """When the voice webhook issued ``token``, as trio time (the box's processes share
    a wall clock); None if not a token, or not a plausible time (a clock stepped)."""
    issued = issued_at(token, ttl_s)
    if issued is None:
        return None
    age_s = time.time() - issued
    if not 0 <= age_s <= ttl_s:
        return None
    return trio.current_time() - age_s


def _describe(group: BaseExceptionGroup[Exception]) -> str:
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return f"{type(first).__name__}: {first}"


def _log_call_end(record: CallRecord, *, began: bool, remote: str) -> None:
    """The call's one ``call-end`` line. A call that began (its token passed) is never
    rate-limited, whatever its level; a stream that never began is a rejection, which a
    peer can repeat at will: rate-limited (see ``observability.logs.RateLimitFilter``)."""
    outcome = record.outcome
    if outcome is Outcome.INTERNAL_ERROR:
        level = logging.ERROR
    elif outcome.caller_gets_fallback:
        level = logging.WARNING
    else:
        level = logging.INFO
    barge_in_ms = max((b.latency_ms for b in record.barge_ins), default=None)
    # Before start there is no CallSid: the peer's address is all that names the stream.
    which = record.call_sid or f"(no start, from {remote or '?'})"
    log_event(
        log,
        level,
        "call-end",
        f"call {which} ended: {outcome.value} ({record.detail}) "
        f"after {record.duration_s:.1f} s; heard {record.heard_ms} ms, "
        f"{len(record.barge_ins)} barge-in(s)",
        call_sid=record.call_sid or None,
        stream_sid=record.stream_sid or None,
        vapi_call_id=record.vapi_call_id or None,
        outcome=outcome.value,
        ended_reason=record.ended_reason or None,
        leg_failure=record.leg_failure,
        route=record.route or None,
        detail=record.detail,
        duration_s=round(record.duration_s, 3),
        frames_from_caller=record.frames_from_caller,
        frames_to_assistant=record.frames_to_assistant,
        frames_dropped=record.frames_dropped,
        media_to_caller=record.media_messages_to_caller,
        heard_ms=record.heard_ms,
        first_audio_ms=round(record.first_audio_ms, 1) if record.first_audio_ms else None,
        webhook_to_first_audio_ms=(
            round(record.webhook_to_first_audio_ms, 1)
            if record.webhook_to_first_audio_ms is not None else None
        ),
        barge_ins=len(record.barge_ins),
        barge_in_max_ms=round(barge_in_ms, 2) if barge_in_ms is not None else None,
        rate_limited=not began,
        remote=remote or None,
    )
