"""The call nursery: one phone call bridged from Twilio's media stream to a Vapi assistant.

``Call.run()`` owns every task of a call. After the stream's ``start`` (under a
deadline) and its token check, one nursery runs as siblings:

- *caller → agent* (``_caller_to_agent``): reads Twilio frames; caller audio goes to
  the Vapi sender through a bounded channel (stale audio is dropped, never queued
  without end); mark echoes go to playout; DTMF becomes an ``add-message``; ``stop``
  ends the call. Its cancel scope carries the media-inactivity deadline, pushed
  forward by every frame: Twilio streams continuously, so silence on the socket
  means the stream is dead.
- *the assistant leg* (``_assistant_leg``): creates the Vapi call, opens its socket,
  then runs *agent → caller* (Vapi frames: audio to playout, barge-in, end),
  *the Vapi sender* (single writer of the Vapi socket), *playout* (single writer of
  assistant audio to Twilio) and *keepalive* (ping with a pong deadline).

Whichever side ends first records the outcome and cancels the call's task
scopes with a reason (``_EndSignal``); the first outcome wins. On the way out,
shielded and bounded: the Vapi leg gets ``end-call`` and a close unless it
ended itself, the outcome is handed to the
tracker (the after-stream route reads it), and then the Twilio socket is closed,
which makes Twilio request the ``<Connect action>``. A failure in any task ends this
call only, with one log line; it never reaches the server.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any, Protocol, assert_never

import trio
from attrs import Factory, frozen

from voicebridge.bridge.edge import EdgeBargeIn
from voicebridge.bridge.outcome import CallRecord, Handover, Outcome
from voicebridge.bridge.playout import Playout
from voicebridge.codec import LegCodec
from voicebridge.config import Config, KeypadConfig
from voicebridge.errors import RemoteProtocolError, SocketClosed
from voicebridge.observability.logs import log_event
from voicebridge.sockets import (
    WRITE_DEADLINE_S,
    DirectSocket,
    MessageSocket,
    PingableSocket,
    SocketWriteTimeout,
)
from voicebridge.twilio import media as tw
from voicebridge.twilio.token import StreamClaims, TokenRejected, issued_at
from voicebridge.vapi import transport as vp
from voicebridge.vapi.client import VapiError, end_call
from voicebridge.vapi.endings import Ending, EndingPolicy, safe_reason

log = logging.getLogger(__name__)

#: Caller audio frames waiting for the Vapi sender. A healthy leg drains this at once;
#: 10 frames (200 ms) rides out a scheduling hiccup, and past that the audio is stale
#: (the caller has moved on), so newer frames are dropped and counted instead.
CALLER_AUDIO_BUFFER_FRAMES = 10
#: Nothing at all from Vapi for this long (no audio, no message; pings may still be
#: answered) means the assistant is wedged: the leg fails and the caller gets the
#: fallback rather than dead air. Vapi itself ends a call after its
#: ``silenceTimeoutSeconds`` (30 s by default) with a ``status-update``, so a working
#: assistant never comes near 45 s of nothing. The default of ``vapi.silence_deadline_s``.
ASSISTANT_SILENCE_S = 45.0
#: A call's wind-down is shielded from outside cancellation; each step has its own
#: bound, and past their sum plus this slack a backstop cancels whatever is left.
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
#: The close code for Twilio's socket when a call ends (RFC 6455 7.4.1), and the one
#: for a stream refused before ``start`` for sending too much (policy violation).
NORMAL_CLOSURE = 1000
POLICY_VIOLATION = 1008
#: One caller frame in this many (one a second) and one assistant audio message in
#: ``ASSISTANT_LATENCY_SAMPLE_EVERY`` have their time inside the bridge measured for the
#: metrics: enough for a histogram, and no clock read on the other frames.
CALLER_LATENCY_SAMPLE_EVERY = 50
ASSISTANT_LATENCY_SAMPLE_EVERY = 10


class _FlushMark:
    """In the Vapi sender's inbox: finish the frame the Twilio reader began writing."""


_FLUSH = _FlushMark()
#: What the Vapi sender's inbox carries: caller audio, control messages, ``_FLUSH``.
_Outgoing = bytes | str | _FlushMark


class AssistantCall(Protocol):
    """A created assistant call; ``id`` goes in the logs."""

    @property
    def id(self) -> str: ...


class AssistantConnector(Protocol):
    """Creates and connects the assistant call; raises ``VapiError`` (classified) on failure.

    Two steps, because they end differently: creating may be cancelled at any point
    (the caller hung up meanwhile), while the connected socket's context must
    outlive the call's tasks, so that its reader still runs while we say goodbye.
    """

    async def create(
        self, *, call_sid: str, caller: str, called: str, assistant: str = ""
    ) -> AssistantCall:
        """``assistant``: the Vapi assistant id of this call; "" for the configured one."""
        ...

    def connect(self, call: AssistantCall) -> AbstractAsyncContextManager[PingableSocket]: ...


class _EndSignal:
    """The cancel scopes of a call's tasks, all cancelled when the call ends.

    A scope opened after the end starts cancelled. The call nursery's own scope is
    not among them: the Vapi socket's context (and its reader task) lives outside
    these scopes, so the goodbye to Vapi can still read Vapi's answer.
    """

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self.reason: str | None = None

    @contextmanager
    def scope(self) -> Iterator[trio.CancelScope]:
        with trio.CancelScope() as scope:
            if self.reason is not None:
                scope.cancel(reason=self.reason)
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)

    def fire(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            for scope in self._scopes:
                scope.cancel(reason=reason)


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
    vapi_audio_format: str = "mulaw"
    vapi_sample_rate: int = 8000
    #: What the assistant is told on a key press; ``{digit}`` is the key.
    dtmf_wording: str = "(The caller pressed {digit}.)"
    #: Key presses gathered into entries (``[keypad]``); None: one message per key.
    keypad: KeypadConfig | None = None
    #: A handover waits this long for the assistant's goodbye to begin …
    goodbye_wait_s: float = 2.0
    #: … and at most this long in all before it ends the call.
    goodbye_deadline_s: float = 15.0
    #: The Vapi leg fails when nothing at all (audio or message) came from Vapi this long.
    assistant_silence_s: float = ASSISTANT_SILENCE_S
    #: Which of Vapi's ``endedReason`` values are normal ends (``[endings]``).
    endings: EndingPolicy = Factory(EndingPolicy)
    #: Where a transfer the assistant starts may go (``[transfer]``): the default
    #: destination (also used when it names none), then the allow-list.
    transfer_default: str = ""
    transfer_allowed: tuple[str, ...] = ()
    #: The stream token's lifetime: its expiry less this is when the webhook issued it.
    stream_token_ttl_s: float = 60.0
    #: Barge-in at the edge (``[bridge] edge_barge_in``): None, off; else the detector's
    #: mode, the speech run that is an onset, and the assistant's window to confirm.
    edge_barge_in: EdgeBargeIn | None = None

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
        self._ending = _EndSignal()
        # Cancelled once the assistant has ended the call: the keepalive stops judging.
        self._liveness_scope = trio.CancelScope()
        # When the goodbye's wait ends, once the assistant has ended the call; None before.
        # Invariant: set at most once, and only after the outcome is decided.
        self._goodbye_until: float | None = None
        # The shielded scope the call's tasks run in, once they run (see _end_if_cancelled).
        self._call_scope: trio.CancelScope | None = None
        self._outcome: Outcome | None = None
        self._detail = ""
        # Vapi's endedReason once it ended the call (log-safe form); "" before.
        self._ended_reason = ""
        self._call_sid = ""
        # What the stream's start carries, once its token vouched for it: only these
        # values reach Vapi.
        self._claims: StreamClaims | None = None
        # When the voice webhook issued this stream's token (trio time); None: unknown.
        self._webhook_at: float | None = None
        edge = settings.edge_barge_in
        self._edge = edge.listener() if edge is not None else None
        self._vapi_call_id = ""
        self._playout: Playout | None = None
        # The Vapi sender's inbox; None until the assistant leg is up (caller audio
        # before that has nowhere to go and is not counted as dropped).
        self._to_assistant: trio.MemorySendChannel[_Outgoing] | None = None
        # The Vapi socket, when the Twilio reader may write caller audio to it directly;
        # it does so only while nothing is queued for the sender (_queued == 0), so the
        # order of what reaches Vapi never changes.
        self._direct: DirectSocket | None = None
        self._queued = 0
        self._frames_from_caller = 0
        self._frames_to_assistant = 0
        self._frames_dropped = 0
        self._caller_audio_bytes = 0
        # The sampled caller frame in flight to the assistant, and when it was parsed.
        self._latency_probe: bytes | None = None
        self._latency_probe_at = 0.0

    async def run(self) -> CallRecord:
        """Run the call to its end and return its record. Never raises but ``Cancelled``.

        If the surrounding scope is cancelled (the media socket was dropped, or the
        server stops), the call is still wound down politely, shielded and bounded,
        and then ``Cancelled`` propagates.
        """
        self._started_at = trio.current_time()
        # Only a stream that passed the token check is this CallSid's call: a rejected
        # one (a replay, say) must not touch the real call's slot or record.
        begun = False
        try:
            start = await self._wait_start()
            if start is not None and self._accept(start):
                begun = True
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
                    upgrade_signature=self._upgrade_signature,
                )
                # The call runs shielded and ends only through _end(): a cancellation
                # from outside becomes an end like any other (see _end_if_cancelled).
                async with trio.open_nursery() as watch_nursery:
                    watch_nursery.start_soon(self._end_if_cancelled, watch_nursery.cancel_scope)
                    with trio.CancelScope(shield=True) as call_scope:
                        self._call_scope = call_scope
                        async with trio.open_nursery() as call_nursery:
                            call_nursery.start_soon(self._caller_to_agent)
                            call_nursery.start_soon(self._assistant_leg)
                    watch_nursery.cancel_scope.cancel(reason="call over")
        except* trio.Cancelled:
            self._set_outcome(Outcome.STREAM_LOST, "media socket closed by the peer or server")
            raise
        except* Exception as group:
            self._set_outcome(Outcome.INTERNAL_ERROR, _describe(group))
            log.error("call %s failed with a bug", self._call_sid or "?", exc_info=group)
        finally:
            with trio.CancelScope(shield=True):
                record = self._record()
                if begun:
                    self._tracker.finish(record)
                    if self._control is not None:
                        self._control.detach(self._call_sid, self)
                if self._observer is not None:
                    self._observer.call_ended(record)
                await self._close_twilio()
                _log_call_end(record, began=begun, remote=self._remote)
        return record

    async def _close_twilio(self) -> None:
        """Close Twilio's socket: politely, or at once for a peer refused for what it sent.

        A peer over the pre-start budget is not read for an answer to our close frame
        (a flooder's frames would be read for ``net.ws.CLOSE_REPLY_S``): the close
        frame goes, then the connection, within ``sockets.CLOSE_GRACE_S``.
        """
        code, reason = self._twilio_close
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
        )
        try:
            self._verify_token(params.get(TOKEN_PARAMETER, ""), claims)
        except TokenRejected as exc:
            self._set_outcome(Outcome.TOKEN_REJECTED, f"stream token {exc.reason}")
            return False
        # Last, so that only a stream that passed every check claims the CallSid.
        if not self._tracker.begin(start.call_sid, self.end):
            self._set_outcome(
                Outcome.TOKEN_REJECTED, "call streamed already (one stream per call)"
            )
            return False
        self._claims = claims
        self._webhook_at = _webhook_time(
            params.get(TOKEN_PARAMETER, ""), self._settings.stream_token_ttl_s
        )
        return True

    # -- caller → agent ------------------------------------------------------------

    async def _caller_to_agent(self) -> None:
        with self._ending.scope():
            await self._read_caller()

    async def _read_caller(self) -> None:
        inactivity_s = self._settings.media_inactivity_s
        with trio.CancelScope() as inactivity_scope:
            inactivity_scope.deadline = trio.current_time() + inactivity_s
            try:
                while True:
                    event = self._stream.receive(await self._twilio.receive())
                    inactivity_scope.deadline = trio.current_time() + inactivity_s
                    if isinstance(event, tw.Media):
                        self._forward_audio(event.payload)
                        if self._edge is not None and self._playout is not None:
                            await self._edge.hear(event.payload, self._playout)
                    elif isinstance(event, tw.Mark):
                        if self._playout is not None:
                            self._playout.mark_played(event.name)
                    elif isinstance(event, tw.Dtmf):
                        await self._forward_digit(event.digit)
                    elif isinstance(event, tw.Stop):
                        self._end(Outcome.CALLER_HUNG_UP, "Twilio sent stop")
                        return
                    else:
                        log.debug("call %s: ignoring Twilio event %r", self._call_sid, event)
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
        inbox = self._to_assistant
        if inbox is None:
            return
        sampled = (
            self._frames_from_caller % CALLER_LATENCY_SAMPLE_EVERY == 0
            and self._observer is not None
        )
        parsed_at = trio.current_time() if sampled else 0.0
        if self._codec is not None:
            payload = self._codec.to_assistant(payload)
        direct = self._direct
        if direct is not None and self._queued == 0 and direct.send_nowait(payload):
            # Written from here, no hop to the sender task (nearly always, on a live leg).
            self._count_to_assistant(payload)
            if direct.needs_flush:
                # The kernel took part of the frame: the sender finishes it, and
                # everything after queues behind that.
                self._queued += 1
                inbox.send_nowait(_FLUSH)
            if sampled and self._observer is not None:
                self._observer.caller_frame_latency(trio.current_time() - parsed_at)
            return
        try:
            inbox.send_nowait(payload)
        except trio.WouldBlock:
            self._frames_dropped += 1
            return
        self._queued += 1
        if sampled:
            self._latency_probe = payload
            self._latency_probe_at = parsed_at

    def _count_to_assistant(self, payload: bytes) -> None:
        self._frames_to_assistant += 1
        self._caller_audio_bytes += len(payload)

    async def _queue_to_assistant(
        self, inbox: trio.MemorySendChannel[_Outgoing], message: str
    ) -> None:
        """Queue a control message for the sender; waits for room, never drops it."""
        self._queued += 1
        try:
            await inbox.send(message)
        except BaseException:
            self._queued -= 1
            raise

    async def _forward_digit(self, digit: str) -> None:
        inbox = self._to_assistant
        if inbox is None:
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
        await self._queue_to_assistant(inbox, vp.add_message(role="user", content=wording))

    async def _keypad_task(self, keypad: KeypadConfig) -> None:
        """Gather key presses into entries, as Vapi's keypadInputPlan does.

        An entry goes to the assistant as one ``add-message`` when the caller presses a
        delimiter (not part of the entry; a delimiter alone is sent as itself), when
        ``keypad.timeout_s`` passes after its last key (0: never; with no delimiters
        either, every key at once), or when it reaches ``MAX_KEYPAD_ENTRY``. Entries,
        like every control message, are never dropped (see ``_queue_to_assistant``).
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
            inbox = self._to_assistant
            if inbox is not None:
                wording = keypad.wording.replace("{digits}", entry)
                await self._queue_to_assistant(
                    inbox, vp.add_message(role="user", content=wording)
                )
            entry = ""

    # -- the assistant leg ---------------------------------------------------------

    async def _assistant_leg(self) -> None:
        claims = self._claims
        assert claims is not None, "the call nursery starts only after _accept"
        try:
            with self._ending.scope() as create_scope:
                call = await self._connector.create(
                    call_sid=claims.call_sid,
                    caller=claims.caller,
                    called=claims.called,
                    assistant=claims.assistant,
                )
            if create_scope.cancelled_caught:
                return  # the call ended while the assistant call was being created
            self._vapi_call_id = call.id
            async with self._connector.connect(call) as socket:
                try:
                    with self._ending.scope():
                        await self._run_assistant_leg(socket)
                finally:
                    with trio.CancelScope(shield=True):
                        await self._close_assistant(socket)
        except VapiError as exc:
            if exc.kind == "limit":
                self._end(
                    Outcome.ASSISTANT_OVER_LIMIT,
                    f"{exc}; raise the Vapi account's concurrency limit, or lower "
                    "server.max_concurrent_calls to it",
                )
            else:
                self._end(Outcome.ASSISTANT_LEG_FAILED, str(exc))

    async def _run_assistant_leg(self, socket: PingableSocket) -> None:
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
        inbox, outbox = trio.open_memory_channel[_Outgoing](CALLER_AUDIO_BUFFER_FRAMES)
        async with trio.open_nursery() as leg_nursery:
            leg_nursery.start_soon(self._agent_to_caller, socket, playout)
            leg_nursery.start_soon(self._assistant_sender, socket, outbox)
            leg_nursery.start_soon(self._playout_task, playout)
            leg_nursery.start_soon(self._keepalive, socket)
            leg_nursery.start_soon(self._handover_task, playout)
            if self._settings.keypad is not None:
                leg_nursery.start_soon(self._keypad_task, self._settings.keypad)
            if self._control is not None:
                leg_nursery.start_soon(self._digit_task, self._control)
            self._direct = socket if isinstance(socket, DirectSocket) else None
            self._to_assistant = inbox

    async def _close_assistant(self, socket: PingableSocket) -> None:
        """Say goodbye to Vapi unless it left first; bounded by the end deadline."""
        self._to_assistant = None
        if self._outcome in (Outcome.ASSISTANT_ENDED, Outcome.ASSISTANT_LEG_FAILED):
            with trio.move_on_after(self._settings.end_deadline_s):
                await socket.aclose()
        else:
            await end_call(socket, deadline_s=self._settings.end_deadline_s)

    async def _agent_to_caller(self, socket: PingableSocket, playout: Playout) -> None:
        # Vapi's answering pings proves only that its socket is up: a wedged assistant
        # sends nothing at all. The scope's deadline is pushed forward by every message.
        silence_s = self._settings.assistant_silence_s
        with trio.CancelScope() as silence_scope:
            silence_scope.deadline = trio.current_time() + silence_s
            try:
                while True:
                    message = await socket.receive()
                    silence_scope.deadline = trio.current_time() + silence_s
                    if isinstance(message, bytes):
                        if self._codec is not None:
                            message = self._codec.from_assistant(message)
                        playout.feed(message)
                        continue
                    event = vp.parse_message(message)
                    if isinstance(event, vp.UserInterrupted):
                        await playout.barge_in()
                    elif isinstance(event, vp.SpeechUpdate):
                        await self._on_speech_update(event, playout)
                    elif isinstance(event, vp.StatusUpdate) and event.status == "ended":
                        outcome, detail = self._judge_ending(event.ended_reason)
                        silence_scope.deadline = math.inf  # the goodbye wait has its own bound
                        await self._let_goodbye_play(playout, outcome, detail, socket)
                        self._end(outcome, detail)
                        return
                    elif isinstance(event, vp.StatusUpdate) and event.status == "forwarding":
                        self._transfer_for_assistant(event.destination, "status-update forwarding")
                    elif isinstance(event, vp.TransferUpdate):
                        self._transfer_for_assistant(event.destination, "transfer-update")
                    elif isinstance(event, vp.Transcript) and event.transcript_type == "final":
                        log.debug(
                            "call %s: %s said %r", self._call_sid, event.role, event.transcript
                        )
                    else:
                        # hang (the assistant is stalling, not hanging up), model output, …
                        log.debug("call %s: Vapi %s", self._call_sid, type(event).__name__)
            except SocketClosed as exc:
                if exc.code == 1000:
                    silence_scope.deadline = math.inf
                    await self._let_goodbye_play(
                        playout, Outcome.ASSISTANT_ENDED, "Vapi closed the socket"
                    )
                    self._end(Outcome.ASSISTANT_ENDED, "Vapi closed the socket")
                else:
                    self._end(Outcome.ASSISTANT_LEG_FAILED, f"dropped: Vapi socket lost ({exc})")
            except RemoteProtocolError as exc:
                self._end(Outcome.ASSISTANT_LEG_FAILED, f"protocol: Vapi message: {exc}")
        if silence_scope.cancelled_caught:
            self._end(
                Outcome.ASSISTANT_LEG_FAILED,
                f"unresponsive: nothing from Vapi for {silence_s:g} s",
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
        self._to_assistant = None  # nobody listens any more: caller audio stops here
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

    async def _assistant_sender(
        self, socket: PingableSocket, outbox: trio.MemoryReceiveChannel[_Outgoing]
    ) -> None:
        try:
            async for message in outbox:
                try:
                    if isinstance(message, _FlushMark):
                        assert self._direct is not None
                        await self._direct.flush()
                        continue
                    await socket.send(message)
                finally:
                    self._queued -= 1
                if isinstance(message, bytes):
                    self._count_to_assistant(message)
                    if message is self._latency_probe and self._observer is not None:
                        self._latency_probe = None
                        self._observer.caller_frame_latency(
                            trio.current_time() - self._latency_probe_at
                        )
        except SocketWriteTimeout:
            self._end(Outcome.ASSISTANT_LEG_FAILED, "unresponsive: Vapi stopped reading")
        except SocketClosed:
            # The reader sees the same close and knows whether it was clean. Caller
            # audio has nowhere to go now; it is not "dropped under backpressure".
            self._to_assistant = None

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
                )
                return

    # -- ending --------------------------------------------------------------------

    def _set_outcome(self, outcome: Outcome, detail: str) -> None:
        if self._outcome is None:
            self._outcome = outcome
            self._detail = detail

    def end(self, outcome: Outcome, detail: str) -> float:
        """End the call from outside (e.g. the drain deadline passed); safe at any time.

        A call whose assistant has already ended is left to finish its goodbye (a
        normal end, bounded); returns how many seconds of it are left, 0 otherwise.
        """
        if self._goodbye_until is not None and outcome is Outcome.SHUTDOWN:
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
        if self._handover is not None or self._ending.reason is not None:
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
            inbox = self._to_assistant
            if answer and inbox is not None:
                await self._queue_to_assistant(
                    inbox, vp.add_message(role="system", content=answer)
                )

    def _end(self, outcome: Outcome, detail: str) -> None:
        """Record why the call ends (the first reason wins) and cancel the call's tasks."""
        if self._handover is not None and outcome is Outcome.ASSISTANT_ENDED:
            # The assistant hung up during the handover's goodbye: the handover still wins.
            outcome, detail = self._handover.outcome, self._handover.detail
        self._set_outcome(outcome, detail)
        self._ending.fire(f"call ending: {outcome.value}")
        if self._call_scope is not None:
            # The (shielded) wind-down has its own bounds; this backstop keeps a bug in
            # one of them from holding a stopping server for ever.
            backstop = trio.current_time() + self._wind_down_bound_s()
            self._call_scope.deadline = min(self._call_scope.deadline, backstop)

    def _wind_down_bound_s(self) -> float:
        """Longest a call may take to wind down once it ends, plus ``WIND_DOWN_SLACK_S``.

        A write to Twilio stuck until its deadline, then the Vapi goodbye and the
        close of its socket, each bounded by the end deadline.
        """
        return WRITE_DEADLINE_S + 2 * self._settings.end_deadline_s + WIND_DOWN_SLACK_S

    async def _end_if_cancelled(self, own_scope: trio.CancelScope) -> None:
        """Turn a cancellation from outside into the end of the call.

        A stopping server cancels its handlers (as quart-trio did on every closed
        socket, Twilio's close right after ``stop`` included). Were the call's tasks
        cancelled with them, the Vapi socket's reader would be too, and the goodbye to
        Vapi would wait out its deadline for an answer that nobody reads, holding back
        the record the ``<Connect action>`` asks for. So the call runs shielded, and
        this task, outside the shield, ends it instead.
        """
        try:
            await trio.sleep_forever()
        finally:
            if not own_scope.cancel_called:  # not "call over": the cancellation is outside
                self._end(Outcome.STREAM_LOST, "media socket closed by the peer or server")

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
