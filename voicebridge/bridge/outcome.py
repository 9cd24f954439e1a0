"""How a call ended, and the figures recorded about it."""

from __future__ import annotations

import enum
from typing import Literal

from attrs import frozen

#: How an assistant leg failed (``Outcome.ASSISTANT_LEG_FAILED``): one of Vapi's error
#: kinds when creating or connecting the call (``vapi.client.VapiError``; ``limit`` is
#: ``ASSISTANT_OVER_LIMIT`` instead), ``dropped``/``unresponsive``/``protocol`` mid-call,
#: or ``ended`` when Vapi ended the call for a failure.
LegFailure = Literal[
    "auth", "rejected", "server", "timeout", "refused", "dropped", "unresponsive", "protocol",
    "ended",
]


class Outcome(enum.Enum):
    """Why a call's AI leg ended; the value is what ``OUTCOME=`` carries in the journal."""

    #: Twilio sent ``stop``: the caller hung up (or the call was ended elsewhere).
    CALLER_HUNG_UP = "caller-hung-up"
    #: The assistant ended the call (``status-update`` ended, or its socket closed cleanly).
    ASSISTANT_ENDED = "assistant-ended"
    #: The Vapi leg failed: create refused or timed out, socket refused, dropped,
    #: unresponsive, or Vapi ended the call for a failure (``CallRecord.ended_reason``).
    ASSISTANT_LEG_FAILED = "assistant-leg-failed"
    #: Vapi refused the call for the account's concurrency limit (a 400, or a call it
    #: created blocked and ended): the caller hears the overflow message.
    ASSISTANT_OVER_LIMIT = "assistant-over-limit"
    #: The Twilio media socket went away without ``stop``, or went silent past the deadline.
    STREAM_LOST = "stream-lost"
    #: Twilio's side sent something malformed or out of order, or no ``start`` in time.
    PROTOCOL_ERROR = "protocol-error"
    #: The stream's token was missing, forged, expired, for another call, or reused.
    TOKEN_REJECTED = "token-rejected"
    #: Call control moved the caller to a ``<Dial>`` (``CallRecord.transfer_to``).
    TRANSFERRED = "transferred"
    #: Call control ended the call (the end-call tool, or Vapi's phone-call-control hang-up).
    ENDED_BY_CONTROL = "ended-by-control"
    #: The daemon was shutting down and the call outlived the drain deadline.
    SHUTDOWN = "shutdown"
    #: A bug in voicebridge; the log line carries the traceback.
    INTERNAL_ERROR = "internal-error"

    @property
    def caller_gets_fallback(self) -> bool:
        """Whether the after-stream TwiML plays the fallback rather than hanging up."""
        return self not in (
            Outcome.CALLER_HUNG_UP,
            Outcome.ASSISTANT_ENDED,
            Outcome.TRANSFERRED,
            Outcome.ENDED_BY_CONTROL,
        )


@frozen(kw_only=True)
class Handover:
    """How call control asks a live call to end once the assistant's goodbye has played."""

    outcome: Outcome
    detail: str
    #: The number (or SIP URI) to ``<Dial>`` when ``outcome`` is ``TRANSFERRED``.
    transfer_to: str = ""


@frozen(kw_only=True)
class BargeIn:
    """One barge-in: when, how fast the assistant was silenced, and what the caller heard."""

    #: Seconds since the call started that the interruption signal arrived.
    at_s: float
    #: Signal received from Vapi → ``clear`` sent to Twilio.
    latency_ms: float
    #: How much of the interrupted turn Twilio confirmed played before the clear.
    heard_of_turn_ms: int
    #: Audio of the interrupted turn that was sent but discarded by the clear.
    discarded_ms: int


@frozen(kw_only=True)
class CallRecord:
    """Everything the call-end log line and the after-stream route need to know."""

    call_sid: str
    stream_sid: str
    vapi_call_id: str
    outcome: Outcome
    #: One line saying why, e.g. ``create:auth: 401 Unauthorized``.
    detail: str
    duration_s: float
    #: Caller audio frames received from Twilio / forwarded to Vapi / dropped as stale.
    frames_from_caller: int
    frames_to_assistant: int
    frames_dropped: int
    #: Assistant audio: bytes received from Vapi, media messages sent to Twilio.
    assistant_bytes: int
    media_messages_to_caller: int
    #: Milliseconds of assistant audio Twilio confirmed played (mark echoes).
    heard_ms: int
    #: Time from the stream's start to the first assistant audio sent to Twilio.
    first_audio_ms: float | None
    barge_ins: tuple[BargeIn, ...]
    #: Where call control transferred the caller (``Outcome.TRANSFERRED``); else "".
    transfer_to: str = ""
    #: Caller audio bytes written to the assistant (after any format conversion).
    caller_audio_bytes: int = 0
    #: Vapi's ``endedReason`` when Vapi ended the call (``status-update`` ended); else "".
    ended_reason: str = ""
    #: How the assistant leg failed, for ``Outcome.ASSISTANT_LEG_FAILED``; else None.
    leg_failure: LegFailure | None = None
    #: The route that took the call (``routing``); "" for a stream that never began.
    route: str = ""
    #: Of ``heard_ms``, what was presumed heard by the clock (mark echoes overdue).
    presumed_heard_ms: int = 0
    #: Mark echoes from Twilio naming no mark the bridge sent (ignored).
    unknown_marks: int = 0
    #: The voice webhook answered (its stream token issued) → the first assistant audio
    #: sent to Twilio: the bridge's view of the caller's time to first word, which is
    #: one network trip longer. None: no audio, or no token time.
    webhook_to_first_audio_ms: float | None = None
    #: Barge-ins at the edge (``[bridge] edge_barge_in``): heard, then confirmed by the
    #: assistant (turn dropped) or resumed unconfirmed.
    early_barge_ins: int = 0
    early_confirmed: int = 0
    early_resumed: int = 0
