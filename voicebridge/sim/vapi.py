"""The simulated Vapi: ``POST /call`` and the WebSocket transport, exactly as PROTOCOLS.md §2.

Used by tests, ``voicebridge demo`` and ``voicebridge loadtest``: it paces its
voice in real time, hears the caller by audio energy, gets interrupted, and can
misbehave on request.

Public API::

    sim = SimVapi(api_key=DEFAULT_API_KEY, *, behaviour=None, behaviour_for=None,
                  max_concurrent_calls=None)
    port = await nursery.start(sim.serve)        # serve(*, host="127.0.0.1", port=0)
    sim.base_url      # "http://127.0.0.1:<port>" — what the bridge uses instead of api.vapi.ai
    sim.api_key       # the bearer key POST /call and the upgrade must carry
    sim.behaviour     # settable: the SimVapiBehaviour of calls created from now on
    sim.behaviour_for # settable: (create_order, twilio_call_sid | None) -> SimVapiBehaviour
    sim.max_concurrent_calls, sim.over_limit_answer  # the limit: "400", "blocked", "ended", "batch"
    sim.calls         # Mapping[call id, SimVapiCallRecord], in creation order
    sim.create_attempts  # Sequence[CreateAttempt]: every authorised POST /call, refused ones too
    sim.control_url(call_id)  # the call's monitor.controlUrl (Live Call Control)
    await sim.calls[call_id].wait_ended()
    await sim.calls[call_id].wait_webhooks_delivered()

A ``SimVapiCallRecord`` holds the create body (``metadata``, ``variable_values``,
``client_messages``, ``call_sid``), ``events`` (every JSON message sent, stamped
with ``trio.current_time()``; ``messages("user-interrupted")``), ``turns`` (clip,
bytes sent, ``finished_at``, ``interrupted_at``), caller audio bytes received,
``add_messages``, ``control_messages``, ``unknown_messages``, ``end_call_received_at``,
``faults_injected``, ``ended_reason``, ``ended_at`` and ``close_code``; what Vapi did
on its own (``transfers``, ``said``, ``prompted_replies``, ``muted_bytes``,
``tail_bytes_after_ended``), ``control_posts`` and the ``webhooks`` it posted;
``call_object()`` is the call as Vapi's ``Call`` shows it on messages and webhooks.

``POST /call`` checks ``Authorization: Bearer <api_key>`` (401), validates the body
(400 with a Vapi-style ``{"message": [...], "error", "statusCode"}``; every field of the
SDK's ``calls.create`` is taken) and answers 201 with
``transport.websocketCallUrl = ws://<host>:<port>/<id>/transport`` and
``monitor.controlUrl`` (where ``POST`` takes the socket's
``say`` / ``add-message`` / ``control`` / ``transfer`` / ``end-call``; ``end-call``
also ends a call still queued, its socket not connected). Over the
account's concurrency limit it answers a 400, or a 201 with
``subscriptionLimits.concurrencyBlocked`` for a call that is ended at once (or, in the
batch answer's form, for no call at all).
``create_order`` counts authorised ``POST /call`` requests from 0; the CallSid is read
from ``assistantOverrides.metadata.twilioCallSid`` (or ``variableValues.twilioCallSid``).

On the transport socket (bearer key required on the upgrade too) one call runs under
one nursery: a receiver task (caller audio → ``SpeechDetector``; JSON control
messages), a conversation task (greeting, then one reply per caller turn, each turn
interruptible; requests such as ``say`` wait until it is idle) and one task per
timer (faults, ``end_after_s``, ``maxDurationSeconds``, ``silenceTimeoutSeconds``:
nobody spoke for that long, counted from the end of the last speech of either side,
never while one speaks). Only message types in the
call's ``assistantOverrides.clientMessages`` (else Vapi's default set) are sent; with
an ``assistantOverrides.server.url``, ``status-update`` and ``end-of-call-report`` are
POSTed there in order (``sim.server_messages``). The call ends with ``status-update``
``ended`` and a normal close when the bridge sends ``end-call`` (``customer-ended-call``);
Vapi ends it itself (``ended_reason``, any of Vapi's, after the goodbye or at
``end_after_s``; ``exceeded-max-duration``; ``silence-timed-out``; the no-audio
timeout; after a ``say`` with
``endCallAfterSpoken``; after a built-in transfer) with ``status-update`` ``ended``,
the tail of the last turn (``tail_after_ended_ms``), then a close with 1000, 1005 or
1006 (``close_code``).

A conversation, with the default behaviour::

    assistant: greeting  (speech-update assistant started, audio, stopped, transcript)
    caller speaks        → speech-update user started ... transcript user, user stopped
    assistant: reply_1   (after think_delay_s)
    caller speaks over it → speech-update user started, after reaction_delay_s
                            user-interrupted; the audio stops (tail_after_interrupt_ms)
    ...after end_after_replies replies, the next caller turn gets "goodbye", then
    status-update ended (assistant-ended-call) and close 1000.

Caller transcripts are exact when the caller sent a shipped ``caller_*`` clip
byte for byte (as the bridge must: μ-law passes through untouched); otherwise
they read ``(caller spoke 1.8 s)``.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import enum
import functools
import hmac
import math
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
import orjson
import trio
from wsproto.frame_protocol import CloseReason

from voicebridge.errors import SocketClosed
from voicebridge.sim.audio import (
    CLIP_TEXTS,
    FRAME_BYTES,
    SAMPLE_RATE,
    SpeechDetector,
    SpeechEnded,
    SpeechEvent,
    SpeechStarted,
    load_clip,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
)
from voicebridge.sim.server_messages import (
    SimServerCredential,
    SimToolCall,
    ToolExchange,
    WebhookExchange,
    post_message,
    send_tool_calls,
    server_url,
)
from voicebridge.sim.wire import HttpRequest, HttpResponse, SimWebSocket, serve_http_ws

#: The key ``SimVapi`` expects unless told otherwise.
DEFAULT_API_KEY = "sim-vapi-private-key"
#: Where the bridge puts the Twilio CallSid (PROTOCOLS §2: assistantOverrides.metadata).
CALL_SID_KEY = "twilioCallSid"

#: Vapi's default ``clientMessages`` (PROTOCOLS §2), used when the call asks for none.
DEFAULT_CLIENT_MESSAGES = frozenset(
    {
        "conversation-update",
        "function-call",
        "hang",
        "model-output",
        "speech-update",
        "status-update",
        "transfer-update",
        "transcript",
        "tool-calls",
        "user-interrupted",
        "voice-input",
        "workflow.node.started",
        "assistant.started",
    }
)
#: Top-level keys of Vapi's create-call body; anything else is refused like Vapi
#: does ("property X should not exist") — notably a top-level ``metadata``.
CREATE_CALL_KEYS = frozenset(
    {
        "assistantId",
        "assistant",
        "assistantOverrides",
        "squadId",
        "squad",
        "squadOverrides",
        "workflowId",
        "workflow",
        "workflowOverrides",
        "name",
        "transport",
        "customer",
        "customerId",
        "customers",
        "schedulePlan",
        "phoneNumber",
        "phoneNumberId",
        "assistantVersion",
        "squadVersion",
    }
)
#: Exactly one of these names what runs the call.
ASSISTANT_SOURCE_KEYS = ("assistantId", "assistant", "squadId", "workflowId")
#: Not allowed with the ``vapi.websocket`` transport (it has no telephony).
TELEPHONY_KEYS = ("phoneNumber", "phoneNumberId")
#: The audio format Vapi uses when ``transport.audioFormat`` is omitted.
DEFAULT_AUDIO_FORMAT = ("pcm_s16le", 16000)

#: Listening on these, the socket URL takes its host from the request's Host header.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
#: Vapi's outbound audio chunk sizes in μ-law bytes (≈21-93 ms), from a field capture.
CHUNK_MIN_BYTES = 170
CHUNK_MAX_BYTES = 743
#: Caller speech events queued for the conversation task; they come a few per
#: turn, so 16 only overflows when no conversation runs (silent fault): then dropped.
SPEECH_EVENT_BUFFER = 16
#: A text frame that is not JSON, for the ``malformed_after_s`` fault.
MALFORMED_MESSAGE = '{"type": "transcript", "role": "assistant", "transcript": '

ENDED_CUSTOMER = "customer-ended-call"
ENDED_ASSISTANT = "assistant-ended-call"
ENDED_NO_CUSTOMER_AUDIO = "call.in-progress.error-assistant-did-not-receive-customer-audio"
#: A ``say`` with ``endCallAfterSpoken``.
ENDED_AFTER_SPOKEN = "assistant-ended-call-after-message-spoken"
#: The built-in transfer tool moved the caller on.
ENDED_FORWARDED = "assistant-forwarded-call"
ENDED_MAX_DURATION = "exceeded-max-duration"
#: Nobody spoke for the call's ``silenceTimeoutSeconds``.
ENDED_SILENCE = "silence-timed-out"
#: The account's concurrency limit blocked a call created anyway (``concurrency_blocked``).
ENDED_CONCURRENCY_LIMIT = "call.start.error-subscription-concurrency-limit-reached"
#: Vapi's answer to a create over the concurrency limit, in its 400 form.
OVER_CONCURRENCY_MESSAGE = "Over Concurrency Limit."
#: Vapi's default concurrency limit, reported in ``subscriptionLimits``.
DEFAULT_CONCURRENCY_LIMIT = 10
#: Live Call Control requests queued for a call (``monitor.controlUrl`` and the socket's
#: ``say`` / ``add-message`` / ``control``): a handful per call; past it, 429.
COMMAND_BUFFER = 16
#: Server messages (status-update, end-of-call-report) queued for one call's webhook
#: deliverer: a call sends fewer than ten; past it they are dropped (recorded).
WEBHOOK_BUFFER = 32
#: A ``say`` whose text is no shipped clip's is spoken as this much audio per word.
SAY_MS_PER_WORD = 320
#: The organisation every simulated call belongs to.
SIM_ORG = "sim-org"
#: Sim-only end reasons (nothing is sent; they are for inspection).
ENDED_TRANSPORT_CLOSED = "sim-transport-closed-by-peer"
ENDED_DROPPED = "sim-fault-dropped"
ENDED_UNKNOWN_MESSAGE = "sim-fault-closed-on-unknown-message"
ENDED_SOCKET_REJECTED = "sim-fault-socket-rejected"
#: What Vapi's webhooks say for the sim-only reasons (Vapi's enum has no such values).
WIRE_REASONS: Mapping[str, str] = {
    ENDED_TRANSPORT_CLOSED: ENDED_CUSTOMER,
    ENDED_DROPPED: "call.in-progress.error-vapifault-worker-died",
    ENDED_UNKNOWN_MESSAGE: "call.in-progress.error-vapifault-worker-died",
    ENDED_SOCKET_REJECTED: "call.in-progress.error-vapifault-transport-never-connected",
}

JsonObject = dict[str, Any]


CloseCode = Literal[1000, 1005, 1006]


@attrs.frozen(kw_only=True)
class SimTransfer:
    """The assistant's use of Vapi's built-in ``transferCall`` tool.

    Vapi speaks the tool's message, then announces the transfer on the socket:
    ``status-update`` ``forwarding`` with the destination, and ``transfer-update``.
    With no ``number`` the tool has no destination: Vapi first asks the call's server
    (``transfer-destination-request`` webhook) and transfers where the answer says;
    with no usable answer the conversation goes on.
    """

    #: The tool's destination number; "": none, ask the server.
    number: str = ""
    #: Made instead of reply number ``before_reply`` (0: after the caller's first turn).
    before_reply: int = 0
    #: The tool's message, spoken before the transfer is announced (None: nothing).
    say_clip: str | None = None
    #: Vapi ends the call (``assistant-forwarded-call``) this long after announcing the
    #: transfer; None: it holds the line until the bridge ends the call.
    end_after_s: float | None = None


@attrs.frozen(kw_only=True)
class SimVapiBehaviour:
    """How one simulated call behaves: the assistant's script, its timing, and faults.

    Faults (all off by default) — create: ``refuse_create`` (an HTTP status: 401,
    400 = concurrency limit, 500), ``concurrency_blocked`` (a 201 whose
    ``subscriptionLimits.concurrencyBlocked`` is true; the call then ends at once with
    ``call.start.error-subscription-concurrency-limit-reached``), ``create_delay_s``
    (``math.inf``: never answers), ``control_url_in_answer`` (off: the answer has no
    ``monitor.controlUrl``); socket: ``reject_socket`` (an HTTP status for the
    upgrade), ``upgrade_delay_s`` (the upgrade answered that late), ``drop_after_s``
    (TCP dropped with no close frame), ``ignore_pings_after_s``,
    ``malformed_after_s`` (one non-JSON text frame), ``close_on_unknown_message``
    (close with no status, 1005, as a low-confidence report says Vapi does),
    ``audio_burst`` (every turn's audio at once, unpaced), ``silent`` (the assistant
    sends no audio and no messages; only the final ``status-update`` if the call
    ends politely, e.g. for want of caller audio; a stuck assistant, its silence
    timeout does not run either). Times count from the socket's accept.

    How Vapi ends a call itself (after the goodbye, at ``end_after_s``, at the call's
    ``maxDurationSeconds`` or ``silenceTimeoutSeconds``, for want of caller audio, after
    a ``say`` that ends the call, after a transfer): ``status-update`` ``ended`` with the
    reason (unless ``announce_end`` is off), then ``tail_after_ended_ms`` of the last
    turn's audio, then the close ``close_code`` says.
    """

    greeting_clip: str = "greeting"
    reply_clips: tuple[str, ...] = attrs.field(
        default=("reply_1", "reply_2", "reply_3"), validator=attrs.validators.min_len(1)
    )
    goodbye_clip: str = "goodbye"
    #: After this many replies the next caller turn gets the goodbye, then the
    #: assistant ends the call; None: never (replies cycle).
    end_after_replies: int | None = 2
    #: Pause between the end of the caller's turn and the reply.
    think_delay_s: float = 0.3
    #: Caller speech onset → ``user-interrupted`` (Vapi's stopSpeakingPlan.voiceSeconds).
    reaction_delay_s: float = 0.2
    #: Audio of the cut turn still sent after ``user-interrupted`` (in-flight audio).
    tail_after_interrupt_ms: int = 0
    #: The call ends after this long without caller audio (PROTOCOLS: ~20 s); None: never.
    customer_audio_timeout_s: float | None = 20.0
    #: A created call whose socket is not connected within this long ends by itself
    #: (``unconnected_ended_reason``; a later connect is refused 400); None: it stays
    #: queued, holding a concurrency slot, until the simulator stops. Vapi does not
    #: document what it does (docs/protocols.md), so both are modelled; the default is
    #: the worse for a bridge that leaves such calls behind.
    unconnected_timeout_s: float | None = None
    unconnected_ended_reason: str = "silence-timed-out"
    #: Seed of the call's chunk-size RNG; None: the create order (reproducible runs).
    seed: int | None = None

    refuse_create: int | None = None
    create_delay_s: float = 0.0
    #: The create answer carries ``monitor.controlUrl`` (Vapi's schema makes it optional).
    control_url_in_answer: bool = True
    #: ``end-call`` on ``controlUrl`` ends a call still queued; off: answered 400 "Call is
    #: not in progress.", as every other message to it (Vapi documents neither).
    control_ends_queued: bool = True
    reject_socket: int | None = None
    #: The transport socket's upgrade is answered this long after it arrives (a worker
    #: slow to take the call; ``math.inf``: never). The call stays queued meanwhile: a
    #: peer that gives up first (closes its connection) leaves it so, and an
    #: ``end-call`` on ``controlUrl`` ends it (the held upgrade is then refused 400).
    upgrade_delay_s: float = 0.0
    drop_after_s: float | None = None
    ignore_pings_after_s: float | None = None
    malformed_after_s: float | None = None
    close_on_unknown_message: bool = False
    audio_burst: bool = False
    silent: bool = False
    #: Tool calls the assistant makes, POSTed as ``tool-calls`` webhooks to the call's
    #: ``assistantOverrides.server`` (``sim.server_messages``).
    tool_calls: tuple[SimToolCall, ...] = ()
    #: A built-in transfer the assistant makes (None: never).
    transfer: SimTransfer | None = None

    #: The ``endedReason`` when the assistant ends the call after its goodbye or at
    #: ``end_after_s``: any of Vapi's, failures included (pipeline-error-openai-llm-failed,
    #: call.in-progress.error-vapifault-…, worker-shutdown, …).
    ended_reason: str = ENDED_ASSISTANT
    #: Vapi ends the call this long after the socket's accept, whatever is going on
    #: (a provider failing mid-sentence), with ``ended_reason``; None: never.
    end_after_s: float | None = None
    #: Send ``status-update`` ``ended`` before closing (False: the socket just closes).
    announce_end: bool = True
    #: How the socket closes when Vapi ends the call: 1000; 1005, a close frame without
    #: a status code; 1006, the TCP connection dropped without a close frame.
    close_code: CloseCode = 1000
    #: This much of the end of the last turn's audio is sent after ``status-update``
    #: ``ended`` (the tail of a goodbye), paced, before the close.
    tail_after_ended_ms: int = 0
    concurrency_blocked: bool = False


BehaviourChooser = Callable[[int, str | None], SimVapiBehaviour]


@attrs.frozen(kw_only=True)
class SentMessage:
    """A JSON control message the sim sent, stamped with ``trio.current_time()``."""

    at: float
    message: JsonObject

    @property
    def type(self) -> str:
        return str(self.message["type"])


@attrs.define(kw_only=True)
class TurnRecord:
    """One assistant turn: what was said and how much of it was sent."""

    turn: int
    clip: str
    started_at: float
    total_bytes: int  # μ-law bytes of the clip
    #: μ-law bytes sent, not counting an interrupt's tail.
    #: Invariant: only the turn's player task writes it while the turn runs.
    sent_bytes: int = 0
    #: When the assistant stopped speaking: the end of the clip, or the barge-in that cut
    #: it; the silence timeout counts from this very instant (``speech-update`` stopped
    #: and the transcript follow, later if the socket is slow). None: cut short by the
    #: end of the call.
    finished_at: float | None = None
    interrupted_at: float | None = None  # when user-interrupted was sent

    @property
    def completed(self) -> bool:
        """Whether the whole clip was sent."""
        return self.sent_bytes >= self.total_bytes


@attrs.define(kw_only=True)
class CreateAttempt:
    """One authorised ``POST /call``; ``status`` is None until (unless) it is answered."""

    order: int
    at: float
    body: JsonObject | None
    behaviour: SimVapiBehaviour
    status: int | None = None
    call_id: str | None = None


@attrs.define(kw_only=True, eq=False)
class SimVapiCallRecord:
    """Everything observable about one created call. Times are ``trio.current_time()``."""

    id: str
    order: int
    created_at: float
    create_body: JsonObject
    call_sid: str | None
    behaviour: SimVapiBehaviour
    audio_format: tuple[str, int]
    connected_at: float | None = None
    events: list[SentMessage] = attrs.Factory(list)
    turns: list[TurnRecord] = attrs.Factory(list)
    audio_bytes_sent: int = 0
    caller_audio_bytes: int = 0
    caller_audio_messages: int = 0
    add_messages: list[JsonObject] = attrs.Factory(list)
    control_messages: list[JsonObject] = attrs.Factory(list)  # say, control, transfer
    unknown_messages: list[str] = attrs.Factory(list)
    faults_injected: list[tuple[float, str]] = attrs.Factory(list)
    end_call_received_at: float | None = None
    ended_reason: str | None = None
    ended_at: float | None = None
    close_code: int | None = None  # the WebSocket's final close code
    #: The ``server.credentialId`` credential webhooks are signed with (None: headers only).
    server_credential: SimServerCredential | None = None
    #: Every tool-calls webhook sent and its answer.
    tool_exchanges: list[ToolExchange] = attrs.Factory(list)
    #: Every other webhook (status-update, end-of-call-report, transfer-destination-request)
    #: and its answer, in the order sent.
    webhooks: list[WebhookExchange] = attrs.Factory(list)
    #: Server messages not delivered: the call's webhook queue was full.
    webhooks_dropped: int = 0
    #: Wall-clock ISO 8601 times of the call object (``createdAt``, ``startedAt``, ``endedAt``).
    created_iso: str = attrs.Factory(lambda: _now_iso())
    started_iso: str | None = None
    ended_iso: str | None = None
    #: Ended before any socket connected: by ``unconnected_timeout_s``, or by an
    #: ``end-call`` POSTed to its ``controlUrl``.
    ended_unconnected: bool = False
    #: The concurrency limit blocked the call (``subscriptionLimits.concurrencyBlocked``).
    concurrency_blocked: bool = False
    #: Destinations the assistant transferred to (``status-update`` forwarding sent).
    transfers: list[JsonObject] = attrs.Factory(list)
    #: Texts spoken on request (``say``), in order.
    said: list[str] = attrs.Factory(list)
    #: Replies made to an ``add-message`` (``triggerResponseEnabled``) rather than to speech.
    prompted_replies: int = 0
    #: Requests POSTed to ``monitor.controlUrl`` and accepted, in order.
    control_posts: list[JsonObject] = attrs.Factory(list)
    #: μ-law bytes of assistant audio not sent because the assistant was muted.
    muted_bytes: int = 0
    #: μ-law bytes sent after ``status-update`` ended (the tail of the last turn).
    tail_bytes_after_ended: int = 0
    _ended: trio.Event = attrs.field(factory=trio.Event, init=False, repr=False)
    _webhooks_delivered: trio.Event = attrs.field(factory=trio.Event, init=False, repr=False)
    _webhook_queue: trio.MemorySendChannel[JsonObject] | None = attrs.field(
        default=None, init=False, repr=False
    )

    @property
    def assistant_id(self) -> str | None:
        """The ``assistantId`` the call was created with (None: an inline assistant)."""
        value = self.create_body.get("assistantId")
        return value if isinstance(value, str) else None

    @property
    def overrides(self) -> JsonObject:
        value = self.create_body.get("assistantOverrides")
        return value if isinstance(value, dict) else {}

    @property
    def metadata(self) -> JsonObject:
        value = self.overrides.get("metadata")
        return value if isinstance(value, dict) else {}

    @property
    def variable_values(self) -> JsonObject:
        value = self.overrides.get("variableValues")
        return value if isinstance(value, dict) else {}

    @property
    def client_messages(self) -> frozenset[str]:
        """The message types this call sends (its clientMessages, else Vapi's default)."""
        value = self.overrides.get("clientMessages")
        return frozenset(value) if isinstance(value, list) else DEFAULT_CLIENT_MESSAGES

    def call_object(self) -> JsonObject:
        """The call as Vapi's ``Call`` puts it on messages and webhooks."""
        call: JsonObject = {
            "id": self.id,
            "orgId": SIM_ORG,
            "createdAt": self.created_iso,
            "updatedAt": self.ended_iso or self.started_iso or self.created_iso,
            "type": "vapi.websocketCall",
            "status": self.status,
        }
        for key in ("assistantId", "name"):
            if isinstance(self.create_body.get(key), str):
                call[key] = self.create_body[key]
        call["assistantOverrides"] = self.overrides
        if self.started_iso is not None:
            call["startedAt"] = self.started_iso
        if self.ended_at is not None:
            call["endedAt"] = self.ended_iso
            reason = self.ended_reason or ENDED_TRANSPORT_CLOSED
            call["endedReason"] = WIRE_REASONS.get(reason, reason)
        return call

    @property
    def status(self) -> str:
        """Vapi's ``Call.status``: queued, in-progress, forwarding or ended."""
        if self.ended_at is not None:
            return "ended"
        if self.transfers:
            return "forwarding"
        return "in-progress" if self.connected_at is not None else "queued"

    def messages(self, message_type: str) -> list[SentMessage]:
        """The sent control messages of one ``type``, in order."""
        return [event for event in self.events if event.type == message_type]

    async def wait_ended(self) -> None:
        """Wait until the call has ended and its socket is closed.

        A call whose socket never connects never ends (except by ``reject_socket``,
        ``concurrency_blocked`` and ``unconnected_timeout_s``).
        """
        await self._ended.wait()

    async def wait_webhooks_delivered(self) -> None:
        """Wait until the call has ended and every server message about it (its
        ``end-of-call-report`` last) has been answered. Returns at once for a call
        without a server URL."""
        await self._webhooks_delivered.wait()

    def notify(self, message: JsonObject) -> None:
        """Queue a server message (delivered in order by ``SimVapi``); dropped when the
        call has no server URL, or the queue is full (counted)."""
        if self._webhook_queue is None:
            return
        try:
            self._webhook_queue.send_nowait(message)
        except trio.WouldBlock:
            self.webhooks_dropped += 1
        except trio.ClosedResourceError:
            pass  # the end-of-call report is out: nothing follows it

    def _mark_ended(self, reason: str) -> None:
        first = self.ended_at is None
        if first:
            self.ended_at = trio.current_time()
            self.ended_iso = _now_iso()
        if self.ended_reason is None:
            self.ended_reason = reason
        self._ended.set()
        if first:
            self._report_end()

    def _report_end(self) -> None:
        """The last server messages of the call: ``status-update`` ended, the report."""
        reason = self.ended_reason or ENDED_TRANSPORT_CLOSED
        reason = WIRE_REASONS.get(reason, reason)
        if self._webhook_queue is None:
            self._webhooks_delivered.set()
            return
        self.notify({"type": "status-update", "status": "ended", "endedReason": reason})
        started = self.started_iso or self.created_iso
        transcript = "\n".join(
            f"AI: {CLIP_TEXTS[turn.clip]}" for turn in self.turns if turn.clip in CLIP_TEXTS
        )
        self.notify(
            {
                "type": "end-of-call-report",
                "endedReason": reason,
                "cost": 0.0,
                "artifact": {"transcript": transcript, "messages": []},
                "analysis": {"summary": f"A simulated call of {len(self.turns)} assistant turns."},
                "startedAt": started,
                "endedAt": self.ended_iso,
            }
        )
        self._webhook_queue.close()


class _Hangup(enum.Enum):
    """How the transport goes down when a call ends."""

    POLITE = "status-update ended, then close 1000"
    #: Vapi ended the call: as the behaviour's ``announce_end``, ``tail_after_ended_ms``
    #: and ``close_code`` say.
    ASSISTANT = "status-update ended, the tail of the last turn, then the behaviour's close"
    NO_STATUS = "close frame without a status code (the peer sees 1005)"
    ABORT = "TCP dropped without a close frame"
    GONE = "the peer already closed"


class SimVapi:
    """A fake Vapi account: creates calls over HTTP and runs them over the WebSocket transport."""

    def __init__(
        self,
        api_key: str = DEFAULT_API_KEY,
        *,
        behaviour: SimVapiBehaviour | None = None,
        behaviour_for: BehaviourChooser | None = None,
        max_concurrent_calls: int | None = None,
    ) -> None:
        self._api_key = api_key
        self.behaviour = behaviour if behaviour is not None else SimVapiBehaviour()
        self.behaviour_for = behaviour_for
        #: Vapi refuses calls past this many unended ones (Vapi's default is 10;
        #: None = unlimited, for load tests), as ``over_limit_answer`` says: a 400
        #: "Over Concurrency Limit.", or a 201 whose call is ended at once
        #: (``call.start.error-subscription-concurrency-limit-reached``; its socket only
        #: says so), with ``subscriptionLimits.concurrencyBlocked`` (``blocked``) or
        #: without (``ended``: the schema's single-call answer has no subscriptionLimits);
        #: or ``batch``: a 201 in the batch answer's form, the only one the SDK declares
        #: ``subscriptionLimits`` on (no call: ``results`` empty, the refusal in ``errors``).
        self.max_concurrent_calls = max_concurrent_calls
        self.over_limit_answer: Literal["400", "blocked", "ended", "batch"] = "400"
        self._sessions: dict[str, _CallSession] = {}
        self._server_nursery: trio.Nursery | None = None
        self._calls: dict[str, SimVapiCallRecord] = {}
        self._create_attempts: list[CreateAttempt] = []
        # Attempts dropped by forget_ended(): create_order keeps counting past them.
        self._forgotten_attempts = 0
        #: Close each ``POST /call`` connection after its answer (no keep-alive), so that
        #: a soak's idle server holds no pooled connection whose count would vary.
        self.close_connections = False
        #: Vapi's custom credentials by id (``server.credentialId``), e.g. an HMAC key.
        self.credentials: dict[str, SimServerCredential] = {}
        self._host = "127.0.0.1"
        self._port: int | None = None
        #: The host:port transport socket URLs name when a relay stands in front
        #: (``sim.latency``); None: where this listens.
        self.advertised_authority: str | None = None

    @property
    def api_key(self) -> str:
        return self._api_key

    def forget_ended(self) -> int:
        """Drop the records of ended calls and answered create attempts; returns how many
        calls were dropped. For long runs (a soak): memory then stays flat."""
        ended = [call_id for call_id, call in self._calls.items() if call.ended_at is not None]
        for call_id in ended:
            del self._calls[call_id]
        kept = [attempt for attempt in self._create_attempts if attempt.status is None]
        self._forgotten_attempts += len(self._create_attempts) - len(kept)
        self._create_attempts = kept
        return len(ended)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("SimVapi is not serving yet")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def calls(self) -> Mapping[str, SimVapiCallRecord]:
        return self._calls

    def control_url(self, call_id: str) -> str:
        """The call's ``monitor.controlUrl`` (as the create answer gives it)."""
        return f"{self.base_url}/{call_id}/control"

    @property
    def create_attempts(self) -> Sequence[CreateAttempt]:
        return self._create_attempts

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; ``task_status.started(port)``.

        Each call's nursery lives inside its socket's connection task, so cancelling
        ``serve`` ends every call at once (without a goodbye).
        """
        self._host = host
        async with trio.open_nursery() as server_nursery:
            self._server_nursery = server_nursery
            self._port = await server_nursery.start(
                functools.partial(
                    serve_http_ws, self._handle_http, self._handle_websocket, host=host, port=port
                )
            )
            task_status.started(self._port)

    # --- HTTP: POST /call -------------------------------------------------------

    async def _handle_http(self, request: HttpRequest) -> HttpResponse:
        parts = request.path.strip("/").split("/")
        if request.method == "POST" and len(parts) == 2 and parts[1] == "control":
            return self._control(parts[0], request.body)
        if request.path != "/call" or request.method != "POST":
            message = f"Cannot {request.method} {request.path}"
            return _error(404, message)
        if not self._authorized(request):
            return _error(401)
        try:
            body: Any = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            body = None
        create_body = body if isinstance(body, dict) else None
        order = self._forgotten_attempts + len(self._create_attempts)
        call_sid = _call_sid(create_body) if create_body is not None else None
        behaviour = self.behaviour_for(order, call_sid) if self.behaviour_for else self.behaviour
        attempt = CreateAttempt(
            order=order, at=trio.current_time(), body=create_body, behaviour=behaviour
        )
        self._create_attempts.append(attempt)
        response = await self._create_call(attempt, behaviour, call_sid, self._authority(request))
        attempt.status = response.status
        if self.close_connections:
            response = attrs.evolve(response, headers=(*response.headers, ("connection", "close")))
        return response

    def _authority(self, request: HttpRequest) -> str:
        """host:port for the socket URL: where we listen, or the Host asked for on a wildcard."""
        if self.advertised_authority is not None:
            return self.advertised_authority
        if self._host in WILDCARD_HOSTS and request.headers.get("host"):
            return request.headers["host"]
        return f"{self._host}:{self.port}"

    async def _create_call(
        self,
        attempt: CreateAttempt,
        behaviour: SimVapiBehaviour,
        call_sid: str | None,
        authority: str,
    ) -> HttpResponse:
        await trio.sleep(behaviour.create_delay_s)  # math.inf: never answers
        if behaviour.refuse_create is not None:
            return _error(behaviour.refuse_create)
        if attempt.body is None:
            return _error(400, ["body must be a JSON object"])
        problems = _create_problems(attempt.body)
        if problems:
            return _error(400, problems)
        active = sum(1 for call in self._calls.values() if call.ended_at is None)
        blocked = behaviour.concurrency_blocked
        say_blocked = blocked
        if self.max_concurrent_calls is not None and active >= self.max_concurrent_calls:
            if self.over_limit_answer == "400":
                return _error(400, OVER_CONCURRENCY_MESSAGE)
            if self.over_limit_answer == "batch":
                return _json_response(201, self._batch_refusal(attempt.body))
            blocked, say_blocked = True, self.over_limit_answer == "blocked"
        call_id = str(uuid.uuid4())
        record = SimVapiCallRecord(
            id=call_id,
            order=attempt.order,
            created_at=trio.current_time(),
            create_body=attempt.body,
            call_sid=call_sid,
            behaviour=behaviour,
            audio_format=_audio_format(attempt.body),
            concurrency_blocked=blocked,
        )
        self._calls[call_id] = record
        server = record.overrides.get("server")
        if isinstance(server, dict) and isinstance(server.get("credentialId"), str):
            record.server_credential = self.credentials.get(server["credentialId"])
        if server_url(record.overrides) is not None:
            queue_in, queue_out = trio.open_memory_channel[JsonObject](WEBHOOK_BUFFER)
            record._webhook_queue = queue_in
            assert self._server_nursery is not None
            self._server_nursery.start_soon(self._deliver_webhooks, record, queue_out)
        if behaviour.unconnected_timeout_s is not None:
            assert self._server_nursery is not None
            self._server_nursery.start_soon(
                self._end_unconnected, record, behaviour.unconnected_timeout_s
            )
        attempt.call_id = call_id
        resource = self._call_resource(record, authority)
        if say_blocked:
            resource["subscriptionLimits"] = self._blocked_limits()
        if blocked:
            # Created, and ended at once: the socket, if connected, only says so.
            record._mark_ended(ENDED_CONCURRENCY_LIMIT)
        return _json_response(201, resource)

    async def _end_unconnected(self, record: SimVapiCallRecord, timeout_s: float) -> None:
        """End ``record`` if its socket has not connected ``timeout_s`` after its create."""
        await trio.sleep(timeout_s)
        if record.connected_at is None:
            record.ended_unconnected = True
            record._mark_ended(record.behaviour.unconnected_ended_reason)

    def _blocked_limits(self) -> JsonObject:
        return {
            "concurrencyBlocked": True,
            "concurrencyLimit": self.max_concurrent_calls or DEFAULT_CONCURRENCY_LIMIT,
            "remainingConcurrentCalls": 0,
        }

    def _batch_refusal(self, body: JsonObject) -> JsonObject:
        """``CallBatchResponse`` refusing the one call asked for: no call is created."""
        customer = body.get("customer")
        return {
            "results": [],
            "errors": [
                {
                    "customer": customer if isinstance(customer, dict) else {},
                    "error": OVER_CONCURRENCY_MESSAGE,
                }
            ],
            "subscriptionLimits": self._blocked_limits(),
        }

    async def _deliver_webhooks(
        self, record: SimVapiCallRecord, queue: trio.MemoryReceiveChannel[JsonObject]
    ) -> None:
        """POST the call's server messages one by one, in order, until its report is out."""
        try:
            async for message in queue:
                exchange = await post_message(
                    record.call_object(), record.overrides, record.server_credential, message
                )
                if exchange is not None:
                    record.webhooks.append(exchange)
        finally:
            record._webhooks_delivered.set()

    def _control(self, call_id: str, body: bytes) -> HttpResponse:
        """``POST monitor.controlUrl``: Live Call Control, the socket's messages by HTTP.

        A call still queued (created, its socket not connected) takes ``end-call`` only,
        and ends (``customer-ended-call``), unless ``control_ends_queued`` is off; Vapi
        does not document it either way.
        """
        record = self._calls.get(call_id)
        session = self._sessions.get(call_id)
        if record is None:
            return _error(404, "Call not found.")
        queued = record.connected_at is None and record.ended_at is None
        if session is None and not queued:
            return _error(400, "Call is not in progress.")
        try:
            message: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return _error(400, ["body must be a JSON object with a type"])
        if session is None:
            if message["type"] != "end-call" or not record.behaviour.control_ends_queued:
                return _error(400, "Call is not in progress.")
            record.end_call_received_at = trio.current_time()
            record.ended_unconnected = True
            record._mark_ended(ENDED_CUSTOMER)
        elif not session.control(message):
            return _error(400, [f"unsupported control message {str(message['type'])[:40]!r}"])
        record.control_posts.append(message)
        return HttpResponse(status=200)

    def _call_resource(self, record: SimVapiCallRecord, authority: str) -> JsonObject:
        body = record.create_body
        audio_format, sample_rate = record.audio_format
        resource: JsonObject = {
            "id": record.id,
            "orgId": SIM_ORG,
            "createdAt": record.created_iso,
            "updatedAt": record.created_iso,
            "type": "vapi.websocketCall",
            "status": "queued",
            "transport": {
                "provider": "vapi.websocket",
                "websocketCallUrl": f"ws://{authority}/{record.id}/transport",
                "audioFormat": {
                    "format": audio_format,
                    "container": "raw",
                    "sampleRate": sample_rate,
                },
            },
        }
        for key in ("assistantId", "assistant", "squadId", "workflowId", "name"):
            if key in body:
                resource[key] = body[key]
        resource["assistantOverrides"] = record.overrides
        # The URL is a bearer secret, as the socket URL is: the call id is a random UUID.
        # No listenUrl: Vapi gives one only with monitorPlan.listenEnabled, which the
        # bridge never asks for, and its stream's audio layout is not documented.
        if record.behaviour.control_url_in_answer:
            resource["monitor"] = {"controlUrl": f"http://{authority}/{record.id}/control"}
        return resource

    def _authorized(self, request: HttpRequest) -> bool:
        expected = f"Bearer {self._api_key}".encode()
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, expected)

    # --- WebSocket: /<id>/transport --------------------------------------------

    async def _handle_websocket(self, request: HttpRequest, ws: SimWebSocket) -> None:
        parts = request.path.strip("/").split("/")
        record = self._calls.get(parts[0]) if len(parts) == 2 and parts[1] == "transport" else None
        if record is None:
            await ws.reject(404, _json_body(_error_body(404, "Call not found.")))
            return
        if not self._authorized(request):
            await ws.reject(401, _json_body(_error_body(401)))
            return
        if record.behaviour.upgrade_delay_s > 0:
            with trio.move_on_after(record.behaviour.upgrade_delay_s):
                await ws.wait_abandoned()
                return  # the peer gave up waiting: nothing connected, the call is queued
        if record.connected_at is not None:
            await ws.reject(409, _json_body(_error_body(409, "Transport already connected.")))
            return
        if record.ended_unconnected:
            await ws.reject(400, _json_body(_error_body(400, "Call has ended.")))
            return
        if record.behaviour.reject_socket is not None:
            record.faults_injected.append((trio.current_time(), "reject_socket"))
            record._mark_ended(ENDED_SOCKET_REJECTED)
            await ws.reject(record.behaviour.reject_socket)
            return
        record.connected_at = trio.current_time()  # before any await: one socket per call
        if record.concurrency_blocked:
            await _tell_blocked(record, ws)
            return
        record.started_iso = _now_iso()
        session = _CallSession(record, ws)
        self._sessions[record.id] = session
        try:
            await ws.accept()
            await session.run()
        except SocketClosed:
            pass  # the bridge gave up during the handshake
        finally:
            del self._sessions[record.id]
            # Whatever happened (a bug in the session included), the call is over.
            record._mark_ended(ENDED_TRANSPORT_CLOSED)


async def _tell_blocked(record: SimVapiCallRecord, ws: SimWebSocket) -> None:
    """A socket opened for a call the concurrency limit blocked: it only hears the end."""
    with contextlib.suppress(SocketClosed):
        await ws.accept()
        if "status-update" in record.client_messages:
            ended = _status_update(record, "ended") | {"endedReason": ENDED_CONCURRENCY_LIMIT}
            await _send_json(record, ws, ended)
    await ws.aclose(1000)
    record.close_code = ws.close_code


async def _send_json(record: SimVapiCallRecord, ws: SimWebSocket, message: JsonObject) -> None:
    """Send one JSON control message; recorded once sent, stamped when it was handed over
    (a slow socket delays the peer's copy, not the moment the sim decided to send it)."""
    at = trio.current_time()
    await ws.send(orjson.dumps(message).decode())
    record.events.append(SentMessage(at=at, message=message))


def _status_update(record: SimVapiCallRecord, status: str) -> JsonObject:
    return {"type": "status-update", "status": status, "call": record.call_object()}


@attrs.frozen
class _Prompt:
    """An ``add-message`` asking for a response: the assistant replies as to a caller turn."""


@attrs.frozen
class _Transfer:
    """A ``transfer`` request: announced as the built-in tool announces a transfer."""

    destination: JsonObject


@attrs.frozen
class _Say:
    """Speak ``text`` (``say``, or ``control`` say-first-message), then maybe end the call."""

    text: str
    end_call: bool = False


#: What the conversation task waits for: the caller's speech, or a request to act on.
_Command = _Prompt | _Say | _Transfer
_InboxItem = SpeechEvent | _Command


class _CallSession:
    """One connected call: its nursery, its tasks, and how it ends."""

    def __init__(self, record: SimVapiCallRecord, ws: SimWebSocket) -> None:
        self._record = record
        self._behaviour = record.behaviour
        self._ws = ws
        self._codec = _Codec(*record.audio_format)
        seed = self._behaviour.seed if self._behaviour.seed is not None else record.order
        self._rng = random.Random(seed)
        self._client_messages = record.client_messages
        # Caller speech (from the receiver) and requests (socket, controlUrl), in order.
        self._inbox_in, self._inbox_out = trio.open_memory_channel[_InboxItem](
            SPEECH_EVENT_BUFFER + COMMAND_BUFFER
        )
        # Requests that arrived while the assistant was busy: acted on once it is idle.
        self._pending: collections.deque[_Command] = collections.deque()
        self._turn = -1
        self._ending: tuple[str, _Hangup] | None = None  # first reason wins
        self._call_scope = trio.CancelScope()
        # Set by control mute-assistant / mute-customer: the assistant's audio is not
        # sent / the caller's audio is not heard. Invariant: written only by ``control``.
        self._assistant_muted = False
        self._customer_muted = False
        #: The end of the last turn's audio, held back to be sent after ``ended``.
        self._tail = b""
        self._silence = _SilenceClock(_seconds(record.overrides.get("silenceTimeoutSeconds")))

    async def run(self) -> None:
        """Run the call until it ends, then take the transport down as the ending says."""
        with self._call_scope:
            async with trio.open_nursery() as call_nursery:
                call_nursery.start_soon(self._guard, self._receive_from_caller)
                if not self._behaviour.silent:
                    await self._guard(self._send_status, "in-progress")
                    call_nursery.start_soon(self._guard, self._converse)
                self._start_timers(call_nursery)
        await self._hang_up()

    def _finish(self, reason: str, hangup: _Hangup) -> None:
        if self._ending is None:
            self._ending = (reason, hangup)
        self._call_scope.cancel(reason=f"call ended: {reason}")

    async def _guard(self, task: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run one call task; a closed transport ends the call instead of crashing it."""
        try:
            await task(*args)
        except* SocketClosed:
            self._record.close_code = self._record.close_code or self._ws.close_code
            self._finish(ENDED_TRANSPORT_CLOSED, _Hangup.GONE)

    async def _hang_up(self) -> None:
        reason, hangup = self._ending or (ENDED_TRANSPORT_CLOSED, _Hangup.GONE)
        record = self._record
        record.ended_reason = reason
        if hangup is _Hangup.ASSISTANT:
            await self._end_as_assistant(reason)
        elif hangup is _Hangup.POLITE:
            with contextlib.suppress(SocketClosed):  # the peer left first: nothing to tell
                await self._send_ended(reason)
            await self._ws.aclose(1000)
        elif hangup is _Hangup.NO_STATUS:
            await self._ws.aclose(CloseReason.NO_STATUS_RCVD)
        elif hangup is _Hangup.ABORT:
            await self._ws.abort()
        else:
            await self._ws.aclose(1000)
        record.close_code = record.close_code or self._ws.close_code

    async def _end_as_assistant(self, reason: str) -> None:
        """``status-update`` ended, the held-back tail (paced), then the behaviour's close."""
        behaviour = self._behaviour
        with contextlib.suppress(SocketClosed):  # the peer left first: nothing to tell
            if behaviour.announce_end:
                await self._send_ended(reason)
            start = trio.current_time()
            for offset in range(0, len(self._tail), CHUNK_MAX_BYTES):
                await trio.sleep_until(start + offset / SAMPLE_RATE)
                chunk = self._tail[offset : offset + CHUNK_MAX_BYTES]
                await self._send_audio(chunk)
                self._record.tail_bytes_after_ended += len(chunk)
        if behaviour.close_code == 1006:
            await self._ws.abort()
        elif behaviour.close_code == 1005:
            await self._ws.aclose(CloseReason.NO_STATUS_RCVD)
        else:
            await self._ws.aclose(1000)

    async def _send_ended(self, reason: str) -> None:
        await self._send_message(_status_update(self._record, "ended") | {"endedReason": reason})

    async def _send_status(self, status: str) -> None:
        await self._send_message(_status_update(self._record, status))
        if status != "ended":  # the record's end sends its own, with the report
            self._record.notify({"type": "status-update", "status": status})

    # --- the caller side ---------------------------------------------------------

    async def _receive_from_caller(self) -> None:
        """Caller audio feeds the speech detector; text frames are control messages."""
        detector = SpeechDetector()
        timeout = self._behaviour.customer_audio_timeout_s
        deadline = trio.current_time() + (math.inf if timeout is None else timeout)
        while True:
            with trio.move_on_at(deadline):
                message = await self._ws.receive()
                if isinstance(message, str):
                    self._on_control_message(message)
                    continue
                self._record.caller_audio_bytes += len(message)
                self._record.caller_audio_messages += 1
                if timeout is not None:
                    deadline = trio.current_time() + timeout
                if self._customer_muted:
                    continue
                for event in detector.feed(self._codec.to_ulaw(message)):
                    if isinstance(event, SpeechStarted):
                        self._silence.started(_Speaker.CALLER)
                    else:
                        self._silence.stopped(_Speaker.CALLER, at=trio.current_time())
                    with contextlib.suppress(trio.WouldBlock):  # nobody listens (silent): drop
                        self._inbox_in.send_nowait(event)
                continue
            self._finish(ENDED_NO_CUSTOMER_AUDIO, _Hangup.ASSISTANT)
            return

    def _on_control_message(self, text: str) -> None:
        try:
            message: Any = orjson.loads(text)
        except orjson.JSONDecodeError:
            message = None
        if isinstance(message, dict) and self.control(message):
            kind = message.get("type")
            if kind == "add-message":
                self._record.add_messages.append(message)
            elif kind in ("say", "control", "transfer"):
                self._record.control_messages.append(message)
            return
        self._record.unknown_messages.append(text)
        if self._behaviour.close_on_unknown_message:
            self._finish(ENDED_UNKNOWN_MESSAGE, _Hangup.NO_STATUS)

    def control(self, message: JsonObject) -> bool:
        """Act on one message the bridge sent on the socket or POSTed to ``controlUrl``.

        ``end-call`` ends the call; ``add-message`` (``triggerResponseEnabled``, Vapi's
        default) makes the assistant reply; ``say`` speaks its ``content`` (then ends the
        call with ``endCallAfterSpoken``); ``control`` mutes or unmutes either side or
        says the first message again; ``transfer`` to a number is announced as the
        built-in tool announces it. Replies and says wait until the assistant is idle.
        False: not a message Vapi takes (left to the caller to record).
        """
        kind = message.get("type")
        if kind == "end-call":
            self._record.end_call_received_at = trio.current_time()
            self._finish(ENDED_CUSTOMER, _Hangup.POLITE)
        elif kind == "add-message" and _is_add_message(message):
            if message.get("triggerResponseEnabled", True) is not False:
                self._queue(_Prompt())
        elif kind == "say" and isinstance(message.get("content"), str):
            self._queue(_Say(message["content"], message.get("endCallAfterSpoken") is True))
        elif kind == "control" and message.get("control") in CONTROLS:
            self._on_control(str(message["control"]))
        elif kind == "transfer" and isinstance(message.get("destination"), dict):
            self._queue(_Transfer(message["destination"]))
        else:
            return False
        return True

    def _on_control(self, action: str) -> None:
        if action == "mute-assistant":
            self._assistant_muted = True
        elif action == "unmute-assistant":
            self._assistant_muted = False
        elif action == "mute-customer":
            self._customer_muted = True
        elif action == "unmute-customer":
            self._customer_muted = False
        else:  # say-first-message
            self._queue(_Say(CLIP_TEXTS[self._behaviour.greeting_clip]))

    def _queue(self, command: _Command) -> None:
        with contextlib.suppress(trio.WouldBlock):  # a flood of requests: the rest dropped
            self._inbox_in.send_nowait(command)

    async def _next_speech(self, wanted: type[SpeechEvent]) -> SpeechEvent:
        """The next caller speech event of type ``wanted`` (others are stale: skipped).

        Requests arriving meanwhile are kept for the next time the assistant is idle.
        """
        while True:
            item = await self._inbox_out.receive()
            if isinstance(item, wanted):
                return item
            if isinstance(item, _Prompt | _Say | _Transfer):
                self._pending.append(item)

    async def _wait_idle(self) -> bool:
        """Idle: act on requests until the caller starts speaking (True) or a prompt
        asks for a reply (False). A ``say`` that ends the call never returns."""
        while True:
            while self._pending:
                command = self._pending.popleft()
                if isinstance(command, _Prompt):
                    return False
                if isinstance(command, _Transfer):
                    await self._announce_transfer(command.destination)
                elif await self._say(command):
                    return True
            item = await self._inbox_out.receive()
            if isinstance(item, SpeechStarted):
                return True
            if isinstance(item, _Prompt | _Say | _Transfer):
                self._pending.append(item)

    async def _say(self, command: _Say) -> bool:
        """Speak a requested text; whether the caller started speaking meanwhile."""
        self._record.said.append(command.text)
        caller_speaking = await self._speak_turn(*_say_audio(command.text))
        if command.end_call:
            self._finish(ENDED_AFTER_SPOKEN, _Hangup.ASSISTANT)
            await trio.sleep_forever()
        return caller_speaking

    async def _hold(self) -> None:
        """The assistant says nothing of its own any more (no replies), but still
        listens and speaks what it is asked to."""
        while True:
            if await self._wait_idle():
                await self._announce_caller_started()
                await self._finish_caller_turn()

    async def _announce_caller_started(self) -> None:
        await self._send_message(
            {"type": "speech-update", "status": "started", "role": "user", "turn": self._turn}
        )

    async def _finish_caller_turn(self) -> None:
        ended = await self._next_speech(SpeechEnded)
        assert isinstance(ended, SpeechEnded)
        await self._send_message(
            {
                "type": "transcript",
                "role": "user",
                "transcriptType": "final",
                "transcript": _recognise(ended),
            }
        )
        await self._send_message(
            {"type": "speech-update", "status": "stopped", "role": "user", "turn": self._turn}
        )

    # --- the assistant side --------------------------------------------------------

    async def _converse(self) -> None:
        """Greeting, then one reply per caller turn (or prompt); goodbye and hang up at the end."""
        behaviour = self._behaviour
        caller_speaking = await self._speak_turn(behaviour.greeting_clip)
        replies = 0
        while True:
            if not caller_speaking:
                caller_speaking = await self._wait_idle()
                if caller_speaking:
                    await self._announce_caller_started()
            if caller_speaking:
                await self._finish_caller_turn()
                caller_speaking = False
                with trio.move_on_after(behaviour.think_delay_s):
                    await self._next_speech(SpeechStarted)
                    caller_speaking = True
                if caller_speaking:  # the caller went on talking: keep listening
                    await self._announce_caller_started()
                    continue
            else:
                self._record.prompted_replies += 1
                await trio.sleep(behaviour.think_delay_s)
            if await self._call_tools(replies):
                await self._hold()  # the bridge ends the call
            transfer = behaviour.transfer
            due = transfer is not None and transfer.before_reply == replies
            if due and transfer is not None and await self._transfer(transfer):
                await self._hold()  # the bridge moves the caller on
            if behaviour.end_after_replies is not None and replies >= behaviour.end_after_replies:
                tail_bytes = behaviour.tail_after_ended_ms * SAMPLE_RATE // 1000
                await self._speak_turn(behaviour.goodbye_clip, hold_back=tail_bytes)
                self._finish(behaviour.ended_reason, _Hangup.ASSISTANT)
                return
            clip = behaviour.reply_clips[replies % len(behaviour.reply_clips)]
            replies += 1
            caller_speaking = await self._speak_turn(clip)

    async def _call_tools(self, replies: int) -> bool:
        """Make the tool calls due before reply ``replies``; True when one holds the line."""
        hold = False
        for index, tool in enumerate(self._behaviour.tool_calls):
            if tool.before_reply != replies:
                continue
            record = self._record
            record.tool_exchanges += await send_tool_calls(
                record.call_object(), record.overrides, record.server_credential, tool, index
            )
            if tool.say_after is not None:
                await self._speak_turn(tool.say_after)
            hold = hold or tool.hold
        return hold

    async def _transfer(self, transfer: SimTransfer) -> bool:
        """The built-in transfer tool; True when the transfer was announced."""
        if transfer.say_clip is not None:
            await self._speak_turn(transfer.say_clip)
        destination: JsonObject | None = None
        if transfer.number:
            destination = {"type": "number", "number": transfer.number}
        else:
            destination = await self._ask_destination()
        if destination is None:
            return False
        await self._announce_transfer(destination)
        if transfer.end_after_s is not None:
            await trio.sleep(transfer.end_after_s)
            self._finish(ENDED_FORWARDED, _Hangup.ASSISTANT)
        return True

    async def _ask_destination(self) -> JsonObject | None:
        """``transfer-destination-request``: where the call's server says to transfer."""
        record = self._record
        exchange = await post_message(
            record.call_object(),
            record.overrides,
            record.server_credential,
            {"type": "transfer-destination-request"},
        )
        if exchange is None:
            return None
        record.webhooks.append(exchange)
        answer = exchange.answer
        destination = answer.get("destination") if isinstance(answer, dict) else None
        return destination if isinstance(destination, dict) else None

    async def _announce_transfer(self, destination: JsonObject) -> None:
        """``status-update`` forwarding and ``transfer-update``, as Vapi announces a transfer."""
        record = self._record
        record.transfers.append(destination)
        await self._send_message(
            _status_update(record, "forwarding") | {"destination": destination}
        )
        record.notify({"type": "status-update", "status": "forwarding", "destination": destination})
        await self._send_message(
            {"type": "transfer-update", "destination": destination, "call": record.call_object()}
        )

    async def _speak_turn(
        self, clip: str, audio: bytes | None = None, *, hold_back: int = 0
    ) -> bool:
        """Speak one clip (or ``audio`` standing for the text ``clip``), interruptible;
        returns whether the caller started speaking meanwhile. The last ``hold_back``
        bytes are kept for after the call's end (``_tail``)."""
        self._turn += 1
        if audio is None:
            audio = load_clip(clip)
        spoken = audio[: len(audio) - min(hold_back, len(audio))]
        turn = TurnRecord(
            turn=self._turn, clip=clip, started_at=trio.current_time(), total_bytes=len(spoken)
        )
        self._record.turns.append(turn)
        # The turn and the silence clock agree on when it started (the announcement may
        # wait for a slow socket, and a silence deadline must not fall in that wait).
        self._silence.started(_Speaker.ASSISTANT)
        await self._send_message(
            {"type": "speech-update", "status": "started", "role": "assistant", "turn": self._turn}
        )
        caller_speaking = False
        async with trio.open_nursery() as turn_nursery:
            turn_nursery.start_soon(self._play, spoken, turn, turn_nursery.cancel_scope)
            await self._next_speech(SpeechStarted)
            caller_speaking = True
            with trio.CancelScope(shield=True):  # the turn may end meanwhile: still announce
                await self._announce_caller_started()
            await trio.sleep(self._behaviour.reaction_delay_s)
            turn_nursery.cancel_scope.cancel(reason="caller barged in")
        # One instant for the record and the silence clock: the announcements below may
        # wait for a slow socket, and the silence counts from the end of the speech.
        turn.finished_at = trio.current_time()
        self._silence.stopped(_Speaker.ASSISTANT, at=turn.finished_at)
        if not turn.completed:
            turn.interrupted_at = trio.current_time()
            await self._send_message(
                {"type": "user-interrupted", "turnId": f"{self._record.id}-{self._turn}"}
            )
            tail_bytes = self._behaviour.tail_after_interrupt_ms * SAMPLE_RATE // 1000
            tail = spoken[turn.sent_bytes : turn.sent_bytes + tail_bytes]
            for start in range(0, len(tail), CHUNK_MAX_BYTES):
                await self._send_audio(tail[start : start + CHUNK_MAX_BYTES])
        else:
            self._tail = audio[len(spoken) :]
        await self._send_message(
            {"type": "speech-update", "status": "stopped", "role": "assistant", "turn": self._turn}
        )
        text = CLIP_TEXTS.get(clip, clip)
        await self._send_message(
            {
                "type": "transcript",
                "role": "assistant",
                "transcriptType": "final",
                "transcript": _spoken_words(text, turn),
            }
        )
        return caller_speaking

    async def _play(self, audio: bytes, turn: TurnRecord, turn_scope: trio.CancelScope) -> None:
        """Send the clip paced at real time in random chunks, then end the turn.

        Chunk k goes out when the audio before it has had time to play
        (``sleep_until`` from the turn's start: no drift); the turn ends when the
        last sample would have finished playing.
        """
        start = trio.current_time()
        while not turn.completed:
            if not self._behaviour.audio_burst:
                await trio.sleep_until(start + turn.sent_bytes / SAMPLE_RATE)
            size = self._rng.randint(CHUNK_MIN_BYTES, CHUNK_MAX_BYTES)
            chunk = audio[turn.sent_bytes : turn.sent_bytes + size]
            await self._send_audio(chunk)
            turn.sent_bytes += len(chunk)
        if not self._behaviour.audio_burst:
            await trio.sleep_until(start + len(audio) / SAMPLE_RATE)
        turn_scope.cancel(reason="turn finished")

    # --- timers and faults ----------------------------------------------------------

    def _start_timers(self, call_nursery: trio.Nursery) -> None:
        behaviour = self._behaviour
        if behaviour.end_after_s is not None:
            call_nursery.start_soon(self._end_after, behaviour.end_after_s, behaviour.ended_reason)
        max_duration = _seconds(self._record.overrides.get("maxDurationSeconds"))
        if max_duration is not None:
            call_nursery.start_soon(self._end_after, max_duration, ENDED_MAX_DURATION)
        if self._silence.timeout_s is not None and not behaviour.silent:
            call_nursery.start_soon(self._end_on_silence)
        if behaviour.drop_after_s is not None:
            call_nursery.start_soon(self._drop_after, behaviour.drop_after_s)
        if behaviour.ignore_pings_after_s is not None:
            call_nursery.start_soon(self._ignore_pings_after, behaviour.ignore_pings_after_s)
        if behaviour.malformed_after_s is not None:
            call_nursery.start_soon(
                self._guard, self._send_malformed_after, behaviour.malformed_after_s
            )

    def _fault(self, name: str) -> None:
        self._record.faults_injected.append((trio.current_time(), name))

    async def _sleep_from_start(self, delay_s: float) -> None:
        assert self._record.connected_at is not None
        await trio.sleep_until(self._record.connected_at + delay_s)

    async def _end_after(self, delay_s: float, reason: str) -> None:
        await self._sleep_from_start(delay_s)
        self._finish(reason, _Hangup.ASSISTANT)

    async def _end_on_silence(self) -> None:
        with self._silence.scope:
            await trio.sleep_forever()
        self._finish(ENDED_SILENCE, _Hangup.ASSISTANT)

    async def _drop_after(self, delay_s: float) -> None:
        await self._sleep_from_start(delay_s)
        self._fault("drop")
        self._finish(ENDED_DROPPED, _Hangup.ABORT)

    async def _ignore_pings_after(self, delay_s: float) -> None:
        await self._sleep_from_start(delay_s)
        self._fault("ignore_pings")
        self._ws.answers_pings = False

    async def _send_malformed_after(self, delay_s: float) -> None:
        await self._sleep_from_start(delay_s)
        self._fault("malformed")
        await self._ws.send(MALFORMED_MESSAGE)

    # --- sending ----------------------------------------------------------------

    async def _send_message(self, message: JsonObject) -> None:
        """Send one bare JSON control message if the call subscribed to its type."""
        if message["type"] not in self._client_messages:
            return
        await _send_json(self._record, self._ws, message)

    async def _send_audio(self, ulaw: bytes) -> None:
        if self._assistant_muted:
            self._record.muted_bytes += len(ulaw)
            return
        data = self._codec.from_ulaw(ulaw)
        await self._ws.send(data)
        self._record.audio_bytes_sent += len(data)


class _Speaker(enum.Enum):
    CALLER = "caller"
    ASSISTANT = "assistant"


class _SilenceClock:
    """Vapi's ``silenceTimeoutSeconds``: the call ends once nobody has spoken for so long.

    Invariant: ``scope.deadline`` is infinite while ``_speaking`` is not empty, else the
    end of the last speech (or the clock's creation) plus ``timeout_s``.
    """

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self._speaking: set[_Speaker] = set()
        self.scope = trio.CancelScope(deadline=self._quiet_deadline(trio.current_time()))

    def _quiet_deadline(self, since: float) -> float:
        return math.inf if self.timeout_s is None else since + self.timeout_s

    def started(self, speaker: _Speaker) -> None:
        self._speaking.add(speaker)
        self.scope.deadline = math.inf

    def stopped(self, speaker: _Speaker, *, at: float) -> None:
        """``speaker`` stopped speaking at ``at``: the quiet is counted from then."""
        self._speaking.discard(speaker)
        if not self._speaking:
            self.scope.deadline = self._quiet_deadline(at)


def _seconds(value: Any) -> float | None:
    """A number of seconds from the create body (None: absent or not a number)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class _Codec:
    """The call's wire audio format ↔ the sim's μ-law 8 kHz."""

    def __init__(self, audio_format: str, sample_rate: int) -> None:
        self._pcm = audio_format == "pcm_s16le"
        self._upsample = self._pcm and sample_rate == 16000

    def from_ulaw(self, ulaw: bytes) -> bytes:
        if not self._pcm:
            return ulaw  # mulaw/8000: byte for byte, as Twilio's payload
        pcm = ulaw_to_pcm16(ulaw)
        if not self._upsample:
            return pcm
        # 8 → 16 kHz by sample repetition: crude, but the sim only needs it audible.
        return b"".join(pcm[i : i + 2] * 2 for i in range(0, len(pcm), 2))

    def to_ulaw(self, data: bytes) -> bytes:
        if not self._pcm:
            return data
        pcm = data[: len(data) - len(data) % 2]
        if self._upsample:
            pcm = b"".join(pcm[i : i + 2] for i in range(0, len(pcm) - 3, 4))  # 16 → 8 kHz
        return pcm16_to_ulaw(pcm)


def _call_sid(body: JsonObject) -> str | None:
    overrides = body.get("assistantOverrides")
    if not isinstance(overrides, dict):
        return None
    for section in ("metadata", "variableValues"):
        values = overrides.get(section)
        if isinstance(values, dict) and isinstance(values.get(CALL_SID_KEY), str):
            return str(values[CALL_SID_KEY])
    return None


def _audio_format(body: JsonObject) -> tuple[str, int]:
    """The validated body's audio format (defaults to Vapi's when omitted)."""
    transport = body["transport"]
    audio = transport.get("audioFormat")
    if not isinstance(audio, dict):
        return DEFAULT_AUDIO_FORMAT
    return str(audio.get("format")), int(audio.get("sampleRate", 8000))


def _create_problems(body: JsonObject) -> list[str]:
    """Validation errors of a create-call body, Vapi style (empty when valid)."""
    problems = [f"property {key} should not exist" for key in body if key not in CREATE_CALL_KEYS]
    sources = [key for key in ASSISTANT_SOURCE_KEYS if body.get(key) is not None]
    if len(sources) != 1:
        problems.append(f"exactly one of {', '.join(ASSISTANT_SOURCE_KEYS)} must be given")
    if "assistantId" in body and not isinstance(body["assistantId"], str):
        problems.append("assistantId must be a string")
    if "assistant" in body and not isinstance(body["assistant"], dict):
        problems.append("assistant must be an object")
    problems += [
        f"{key} is not allowed with the vapi.websocket transport"
        for key in TELEPHONY_KEYS
        if key in body
    ]
    problems += _overrides_problems(body.get("assistantOverrides", {}))
    problems += _transport_problems(body.get("transport"))
    return problems


def _overrides_problems(overrides: Any) -> list[str]:
    if not isinstance(overrides, dict):
        return ["assistantOverrides must be an object"]
    problems = [
        f"assistantOverrides.{key} must be an object"
        for key in ("metadata", "variableValues")
        if key in overrides and not isinstance(overrides[key], dict)
    ]
    client_messages = overrides.get("clientMessages", [])
    if not isinstance(client_messages, list) or not all(
        isinstance(item, str) for item in client_messages
    ):
        problems.append("assistantOverrides.clientMessages must be an array of strings")
    return problems


def _transport_problems(transport: Any) -> list[str]:
    if not isinstance(transport, dict) or transport.get("provider") != "vapi.websocket":
        return ['transport.provider must be "vapi.websocket"']
    audio = transport.get("audioFormat")
    if audio is None:
        return []
    if not isinstance(audio, dict):
        return ["transport.audioFormat must be an object"]
    problems = []
    audio_format, rate = audio.get("format"), audio.get("sampleRate")
    if audio.get("container", "raw") != "raw":
        problems.append('transport.audioFormat.container must be "raw"')
    if audio_format == "mulaw":
        if rate != 8000:
            problems.append("transport.audioFormat.sampleRate must be 8000 for mulaw")
    elif audio_format == "pcm_s16le":
        if rate not in (8000, 16000):
            problems.append("transport.audioFormat.sampleRate must be 8000 or 16000")
    else:
        problems.append('transport.audioFormat.format must be "mulaw" or "pcm_s16le"')
    return problems


#: The ``control`` actions Vapi takes (PROTOCOLS section 2).
CONTROLS = frozenset(
    {"mute-assistant", "unmute-assistant", "mute-customer", "unmute-customer", "say-first-message"}
)


def _say_audio(text: str) -> tuple[str, bytes | None]:
    """What to speak for ``text``: the shipped clip with those words (its name, None),
    or (``text``, stand-in audio): the greeting's voice, ``SAY_MS_PER_WORD`` per word."""
    for name, words in CLIP_TEXTS.items():
        if words == text:
            return name, None
    voice = load_clip("greeting")
    size = max(1, len(text.split())) * SAY_MS_PER_WORD * SAMPLE_RATE // 1000
    return text, (voice * (size // len(voice) + 1))[:size]


def _is_add_message(message: JsonObject) -> bool:
    body = message.get("message")
    return (
        isinstance(body, dict)
        and isinstance(body.get("role"), str)
        and isinstance(body.get("content"), str)
    )


_ERROR_NAMES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_DEFAULT_ERROR_MESSAGES: dict[int, str | list[str]] = {
    400: "Over Concurrency Limit.",
    401: "Invalid Key. Hot tip, you may be using the private key instead of the public key, "
    "or vice versa.",
    500: "Internal server error",
}


def _error_body(status: int, message: str | list[str] | None = None) -> JsonObject:
    """A NestJS-style error body, as Vapi's API answers."""
    if message is None:
        message = _DEFAULT_ERROR_MESSAGES.get(status, _ERROR_NAMES.get(status, "Error"))
    return {"message": message, "error": _ERROR_NAMES.get(status, "Error"), "statusCode": status}


def _error(status: int, message: str | list[str] | None = None) -> HttpResponse:
    return _json_response(status, _error_body(status, message))


def _json_body(value: JsonObject) -> bytes:
    return orjson.dumps(value)


def _json_response(status: int, value: JsonObject) -> HttpResponse:
    return HttpResponse(
        status=status,
        headers=(("content-type", "application/json; charset=utf-8"),),
        body=_json_body(value),
    )


def _recognise(ended: SpeechEnded) -> str:
    """The words of the shipped caller clip inside the utterance, else its duration."""
    for name, text in CLIP_TEXTS.items():
        if not name.startswith("caller_"):
            continue
        clip = load_clip(name)
        middle = len(clip) // 2
        probe = clip[middle : middle + 2 * FRAME_BYTES]
        if probe and probe in ended.audio:
            return text
    return f"(caller spoke {ended.duration_ms / 1000:.1f} s)"


def _spoken_words(text: str, turn: TurnRecord) -> str:
    """The part of ``text`` spoken before an interrupt, pro rata by audio sent."""
    if turn.completed:
        return text
    words = text.split()
    return " ".join(words[: round(len(words) * turn.sent_bytes / max(1, turn.total_bytes))])


def _now_iso() -> str:
    """The wall-clock time as Vapi writes it (ISO 8601, UTC, milliseconds)."""
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
