"""The simulated Twilio side of one phone call: webhook, Media Stream, playout buffer, action.

``place_call`` drives our server exactly as Twilio Programmable Voice would for one
inbound call (docs/protocols.md §1): it POSTs the signed voice webhook, follows the
``<Connect><Stream>`` answer by opening the Media Stream WebSocket, streams the
caller's microphone at real time (20 ms μ-law frames, silence while the caller is
quiet) while a script makes the caller speak, wait, press digits and hang up (or
misbehave, for fault tests: flood, drop the connection, stop reading), plays
what the bridge sends through a model of Twilio's playback buffer (mark echo and
``clear`` semantics included), checks every frame the bridge sends the way Twilio
does, and finally fetches the ``<Connect action>`` URL. Everything it observed comes
back as a frozen ``CallReport``.

What the caller *hears* is modelled on a timeline ("the wall") that starts when the
stream starts: audio the bridge sends is queued behind what is already queued and
played at 8 bytes per millisecond; a ``clear`` cuts the queue at the current
instant. The wall is cut into 20 ms frames on a fixed grid from stream start, and a
frame counts as *assistant speech* when ``audio.is_speech`` says so. On that:

- a **heard turn** is a maximal run of speech frames in which no gap of non-speech
  frames reaches ``TURN_GAP_MS``; a ``clear`` ends the current turn (``interrupted``).
  Its ``heard_ms`` runs from the start of its first speech frame to the end of its
  last one (pauses inside the turn included), so it has 20 ms resolution;
- the **current turn** is the turn being heard now: it has begun and no gap of
  ``TURN_GAP_MS`` (nor a clear) has ended it yet.

Time is ``trio.current_time()`` throughout; the microphone is paced with
``trio.sleep_until`` from the stream's start, so it never drifts. The caller always
uses real sockets (httpx for HTTP, trio-websocket for the stream).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import functools
import math
import secrets
import ssl
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeAlias
from urllib.parse import urlencode, urljoin, urlsplit

import attrs
import httpx
import orjson
import trio
import trio_websocket
from attrs import field, frozen
from twilio.request_validator import HMAC_SHA256, SIGNATURE_SETTINGS_HEADER, RequestValidator

from voicebridge.errors import SocketClosed, VoicebridgeError
from voicebridge.sim.audio import (
    FRAME_BYTES,
    FRAME_MS,
    MULAW_SILENCE,
    SAMPLE_RATE,
    is_speech,
    iter_frames,
    load_clip,
)
from voicebridge.sockets import WRITE_DEADLINE_S, SocketWriteTimeout, close_scope

__all__ = [
    "DEFAULT_MAX_CALL_S",
    "TURN_GAP_MS",
    "BargeIn",
    "CallReport",
    "Drop",
    "EndedBy",
    "FinalAction",
    "Flood",
    "Hangup",
    "HeardTurn",
    "LiveCall",
    "PressDigit",
    "Script",
    "SendMedia",
    "SendRaw",
    "Silence",
    "SimTwilioSettings",
    "Speak",
    "Step",
    "StopReading",
    "WaitForAssistant",
    "WaitForAssistantDone",
    "place_call",
]

#: Seconds per microphone frame.
FRAME_S = FRAME_MS / 1000
#: μ-law bytes played per millisecond.
BYTES_PER_MS = SAMPLE_RATE // 1000
#: A gap in the assistant's speech at least this long ends a heard turn. Inside a
#: shipped clip (espeak) no pause reaches 460 ms, while a real turn boundary takes the
#: caller's utterance plus the assistant's think time (> 1 s): 700 ms splits the
#: second and never the first. It stays below
#: ``WaitForAssistantDone.quiet_s``'s default so "done" implies "turn over".
TURN_GAP_MS = 700
_TURN_GAP_FRAMES = TURN_GAP_MS // FRAME_MS
#: Default bound on a call's stream: past it the caller hangs up (``max_duration``).
DEFAULT_MAX_CALL_S = 600.0
#: Twilio buffers at most 10 minutes of outbound audio (error 31931 past that):
#: audio beyond it is dropped and reported. This also bounds the playout queue.
MAX_QUEUED_AUDIO_BYTES = 10 * 60 * SAMPLE_RATE
#: Twilio's webhook timeout (its default for voice URLs is 15 s).
WEBHOOK_TIMEOUT_S = 15.0
#: How long the WebSocket handshake may take before the stream counts as failed.
STREAM_CONNECT_TIMEOUT_S = 10.0
#: Messages from the bridge buffered by trio-websocket before it stops reading the
#: socket (TCP backpressure then reaches the bridge); the listener drains them at once.
STREAM_MESSAGE_BUFFER = 16
#: Largest message accepted from the bridge (trio-websocket closes with 1009 past it):
#: a whole minute of audio in one media message is ~640 KB of base64.
MAX_BRIDGE_MESSAGE_BYTES = 1024 * 1024
#: Protocol violations kept verbatim; later ones are only counted, so a bridge that
#: sends garbage at 50 frames/s cannot grow the report without bound.
MAX_RECORDED_VIOLATIONS = 50
#: Characters of an offending value quoted in a violation message.
_QUOTE_CHARS = 60

_SILENCE_FRAME = bytes([MULAW_SILENCE]) * FRAME_BYTES
_SILENCE_FRAME_B64 = base64.b64encode(_SILENCE_FRAME).decode("ascii")
_DTMF_DIGITS = frozenset("0123456789*#")
_API_VERSION = "2010-04-01"
_USER_AGENT = "TwilioProxy/1.1"
#: What a shared-key Webhook Rule signs with (Twilio's public beta names only this one).
_SHARED_KEY_ALGORITHM = HMAC_SHA256


def _http_url(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{attribute.name} must be an http(s)://host URL, got {value!r}")


@frozen(kw_only=True)
class SimTwilioSettings:
    """Where the simulated Twilio sends a call, and as which account."""

    #: Where requests really go, e.g. ``http://127.0.0.1:8080``.
    bridge_url: str = field(validator=_http_url)
    #: The base URL Twilio believes it calls; signatures cover ``public_url + path``
    #: (Twilio signs the URL it was configured with). URLs in TwiML under this base
    #: (``ws(s)://`` for streams) are reached through ``bridge_url``, as a proxy would.
    public_url: str = field(validator=_http_url)
    voice_path: str = "/twilio/voice"
    account_sid: str
    auth_token: str = field(repr=False)
    from_number: str = "+15550100001"
    to_number: str = "+15550100002"
    #: The webhook's ``Direction``: ``inbound``, or ``outbound-api`` for REST-placed calls.
    direction: str = "inbound"
    #: The caller hangs up once the stream has run this long (``ended_by="max_duration"``).
    max_call_s: float = field(default=DEFAULT_MAX_CALL_S, validator=attrs.validators.gt(0))
    #: Sign the webhooks as a shared-key Webhook Rule does: with this SharedKey secret,
    #: HMAC-SHA256, and ``X-Twilio-Webhooks-Signature-Settings: key=<shared_key_id>,…``.
    #: Empty: with the Auth Token (HMAC-SHA1), no settings header.
    shared_key: str = field(default="", repr=False)
    shared_key_id: str = ""
    #: A CA certificate (PEM file) to trust besides the system's for ``https``/``wss``
    #: (a TLS proxy's throwaway certificate); "" trusts the system's alone.
    ca_file: str = ""
    #: Twilio's own time from the TwiML to opening the Media Stream (``sim.latency``).
    stream_setup_s: float = field(default=0.0, validator=attrs.validators.ge(0))


# --- The script ----------------------------------------------------------------------


@frozen
class Silence:
    """The caller says nothing for ``seconds`` (the microphone keeps sending silence)."""

    seconds: float = field(validator=attrs.validators.ge(0))


@frozen
class Speak:
    """The caller speaks a shipped clip (``audio.load_clip``) at real time.

    The step ends when the clip's last frame has been sent.
    """

    clip: str


@frozen
class WaitForAssistant:
    """Wait until the caller has heard ``heard_ms`` of the current assistant turn.

    ``heard_ms=0`` waits for the first speech frame of a turn (returns at once if a
    turn is being heard). On timeout the caller hangs up (``ended_by="step_timeout"``).
    """

    heard_ms: int = field(default=0, validator=attrs.validators.ge(0))
    timeout_s: float = field(default=30.0, validator=attrs.validators.gt(0))


@frozen
class WaitForAssistantDone:
    """Wait until the assistant has spoken since the caller last stopped speaking, then
    been silent for ``quiet_s``.

    "Since the caller last stopped speaking" is the end of the last ``Speak`` step (or
    the stream's start): the step waits for the assistant's answer to be over. If that
    answer already ended ``quiet_s`` ago, it returns at once. The wait is never
    shorter than ``TURN_GAP_MS``: done means the turn is over. On timeout the caller
    hangs up (``ended_by="step_timeout"``).
    """

    quiet_s: float = field(default=1.0, validator=attrs.validators.gt(0))
    timeout_s: float = field(default=30.0, validator=attrs.validators.gt(0))


def _dtmf_digit(_instance: object, _attribute: attrs.Attribute[str], value: str) -> None:
    if value not in _DTMF_DIGITS or len(value) != 1:
        raise ValueError(f"a DTMF digit is one of 0-9 * #, got {value!r}")


@frozen
class PressDigit:
    """The caller presses a key: one ``dtmf`` message (media keeps flowing)."""

    digit: str = field(validator=_dtmf_digit)


@frozen
class SendRaw:
    """Send ``frame`` as is (a text frame for ``str``, binary for ``bytes``): bad-input tests."""

    frame: str | bytes


@frozen
class Hangup:
    """The caller hangs up: ``stop``, then the WebSocket is closed (as Twilio does).

    ``media_after_stop`` misbehaves on purpose (fault injection; Twilio never does it):
    that many more ``media`` frames follow the ``stop`` before the close.
    """

    media_after_stop: int = field(default=0, validator=attrs.validators.ge(0))


@frozen
class Drop:
    """The connection drops: TCP is closed with neither ``stop`` nor a WebSocket close frame.

    The call itself is still up, so Twilio goes on to the ``<Connect action>``
    (``ended_by="dropped"``).
    """


@frozen
class Flood:
    """``seconds`` of microphone frames (silence) sent back to back, as fast as TCP takes them.

    Sequence numbers and timestamps stay consecutive; the microphone then resumes its
    real-time pace from the wall clock (its timestamps now run ``seconds`` ahead of it).
    """

    seconds: float = field(validator=attrs.validators.gt(0))


@frozen
class SendMedia:
    """One ``media`` frame carrying ``audio`` whatever its length (Twilio's are 20 ms)."""

    audio: bytes = field(validator=attrs.validators.min_len(1))


@frozen
class StopReading:
    """Twilio stops reading the socket for ``seconds`` (``math.inf``: never again).

    Nothing the bridge sends is played or echoed meanwhile; once trio-websocket's queue
    (``STREAM_MESSAGE_BUFFER``) is full, TCP backpressure reaches the bridge. The
    microphone keeps sending; the step returns at once.
    """

    seconds: float = field(validator=attrs.validators.gt(0))


Step: TypeAlias = (
    Silence
    | Speak
    | WaitForAssistant
    | WaitForAssistantDone
    | PressDigit
    | SendRaw
    | Hangup
    | Drop
    | Flood
    | SendMedia
    | StopReading
)
Script: TypeAlias = Sequence[Step]

FinalAction = Literal["hangup", "say", "dial", "connect", "none"]
EndedBy = Literal[
    "no_stream", "stream_failed", "server", "caller", "dropped", "max_duration", "step_timeout"
]


# --- The report ----------------------------------------------------------------------


@frozen(kw_only=True)
class HeardTurn:
    """One assistant turn as the caller heard it (see the module docstring)."""

    #: Start of the turn's first speech frame, ms since stream start.
    start_ms: float
    #: From ``start_ms`` to the end of the turn's last heard speech frame.
    heard_ms: float
    #: A ``clear`` ended the turn.
    interrupted: bool


@frozen(kw_only=True)
class BargeIn:
    """The caller started speaking while assistant speech was audible or queued.

    Recorded for each ``Speak`` whose first speech frame is sent while the frame just
    heard was assistant speech or assistant speech is queued at Twilio to play within
    ``TURN_GAP_MS``.
    """

    #: Timestamp of the utterance's first speech frame (the ``media.timestamp`` the
    #: bridge sees, less frames a ``Flood`` or ``SendMedia`` sent ahead of the
    #: microphone's pace), ms since stream start.
    speech_onset_ms: float
    #: When the bridge's ``clear`` arrived (first clear at or after the onset and
    #: before the next barge-in's onset), ms since stream start; None: no clear.
    clear_ms: float | None
    #: ``clear_ms - speech_onset_ms``; None when there was no clear.
    latency_ms: float | None
    #: Assistant speech heard after the clear and before the interrupting utterance
    #: ended (speech frames x 20 ms). A correct bridge leaks nothing: 0.
    heard_after_clear_ms: float
    #: ``heard_ms`` of the turn the clear cut (0 if no turn was being heard).
    heard_of_turn_ms: float


@frozen(kw_only=True)
class CallReport:
    """Everything the simulated Twilio observed of one call."""

    call_sid: str
    #: "" when no stream was opened.
    stream_sid: str
    #: HTTP status of the voice webhook; 0 when no response came (network error).
    webhook_status: int
    webhook_twiml: str
    #: The Media Stream WebSocket was opened (handshake completed).
    streamed: bool
    #: How the call ended (see ``EndedBy``).
    ended_by: EndedBy
    #: Index in the script of the step that timed out, if one did.
    timed_out_step: int | None
    #: Start of the first assistant speech frame heard, ms since stream start.
    first_audio_ms: float | None
    turns: tuple[HeardTurn, ...]
    barge_ins: tuple[BargeIn, ...]
    #: ``mark`` messages the bridge sent.
    marks_sent: int
    #: Mark echoes we sent back (played, or discarded by a clear).
    marks_echoed: int
    #: Of ``marks_echoed``, those echoed because a ``clear`` discarded their audio.
    marks_cleared: int
    #: ``clear`` messages the bridge sent.
    clears: int
    #: ``media`` messages we sent (the caller's microphone).
    frames_sent: int
    #: μ-law bytes of assistant audio played to the caller (content-blind; audio a
    #: clear discarded or the end of the call cut off is not counted).
    bytes_heard: int
    #: What Twilio's debugger would show, one line each, error code first
    #: (31950/31951 bad frames, 31931 buffer overflow, 11200 HTTP, 12100 TwiML, 31920
    #: handshake, …). Empty for a correct bridge.
    protocol_violations: list[str]
    #: WebSocket close code: the bridge's when it closed the stream, 1000 after our
    #: hang-up, 1006 when the connection dropped; None without a stream.
    close_code: int | None
    #: Body returned by the ``<Connect action>`` URL ("" if none was fetched).
    action_twiml: str
    #: Summary of the TwiML that ran after the stream: the action's answer, or the
    #: verbs after ``</Connect>`` when there is no action, or the webhook's answer
    #: when it held no stream. ``connect`` > ``dial`` > ``say`` > ``hangup`` (an
    #: explicit ``<Hangup/>`` or TwiML that simply runs out); ``none``: no TwiML was
    #: obtained, or only verbs outside this list.
    final_action: FinalAction
    #: Text of every ``<Say>`` in that TwiML, joined by a space.
    final_say: str
    #: Number (or SIP/client address) of its first ``<Dial>``.
    final_dial: str
    #: From the webhook POST to the end of the action request, seconds.
    duration_s: float
    #: What the caller heard from stream start to stream end, real-time aligned
    #: (silence where nothing played); raw μ-law 8 kHz for ``audio.write_wav``.
    heard_audio: bytes = field(repr=False)
    #: How Twilio's REST API changed the call while it streamed (``LiveCall``): ""
    #: (it did not), ``redirect`` (new TwiML: ``final_*`` describe it, no
    #: ``<Connect action>`` was fetched) or ``completed`` (hung up).
    rest_update: str = ""
    #: μ-law bytes of assistant audio the bridge sent, heard or not (a clear or the end
    #: of the call may have cut it), up to Twilio's 10-minute buffer.
    audio_received_bytes: int = 0
    #: From sending the voice webhook to the start of the first assistant speech heard,
    #: ms (the webhook's own trip to the bridge included); None: none heard.
    first_audio_after_webhook_ms: float | None = None


#: How long a REST update may take to tell the Media Stream it ends (``stop``).
LIVE_UPDATE_CLOSE_S = 1.0


class LiveCall:
    """A call in progress as Twilio's REST API sees it; ``Calls/{sid}`` updates act on it.

    ``redirect`` and ``complete`` end the Media Stream the way Twilio does (``stop``;
    the bridge closes the socket); the call then runs the new TwiML instead of the
    ``<Connect action>``. A redirected call is still in progress: a later redirect
    replaces its TwiML and ``complete`` ends it; a completed call takes no update
    (Twilio answers 21220). An update before the stream opened only takes effect once
    it has.
    """

    def __init__(self, call_sid: str) -> None:
        self.call_sid = call_sid
        #: "" until updated, then ``redirect`` or ``completed``.
        self.update = ""
        self.twiml = ""
        self._writer: _StreamWriter | None = None

    async def redirect(self, twiml: str) -> None:
        if self.update != "completed":
            first = not self.update
            self.update, self.twiml = "redirect", twiml
            if first:
                await self._end_stream()

    async def complete(self) -> None:
        if self.update != "completed":
            first = not self.update
            self.update, self.twiml = "completed", ""
            if first:
                await self._end_stream()

    async def _attach(self, writer: _StreamWriter) -> None:
        self._writer = writer
        if self.update:
            await self._end_stream()

    async def _end_stream(self) -> None:
        """Send ``stop``; the bridge then closes the socket, which ends the stream's tasks
        (closing it from here too would race their own close). Bounded, as the stream
        may be ending meanwhile."""
        writer = self._writer
        if writer is not None:
            stop = {"accountSid": writer._ids.account_sid, "callSid": writer._ids.call_sid}
            with trio.move_on_after(LIVE_UPDATE_CLOSE_S), contextlib.suppress(SocketClosed):
                await writer._send_numbered("stop", stop)


# --- Public entry point --------------------------------------------------------------


async def place_call(
    settings: SimTwilioSettings,
    script: Script,
    *,
    call_sid: str | None = None,
    http: httpx.AsyncClient | None = None,
    live: LiveCall | None = None,
) -> CallReport:
    """Place one inbound call against the server at ``settings.bridge_url``; report it.

    Clips are loaded before dialling, so an unknown clip raises ``UnknownClipError``
    (and a bad step ``ValueError``) without touching the network. Network failures
    and protocol faults do not raise: they end the call and appear in the report,
    as they would in Twilio's debugger. ``http`` is reused if given (and left open).
    Cancellation aborts the call where it stands (sockets are closed). ``live`` (its
    ``call_sid`` is the call's) lets a simulated REST API update the call meanwhile.
    """
    utterances = _load_utterances(script)
    started = trio.current_time()
    call_sid = live.call_sid if live is not None else call_sid or "CA" + secrets.token_hex(16)
    if http is None:
        async with httpx.AsyncClient(verify=_tls_context(settings.ca_file)) as own_http:
            call = _SimCall(settings, tuple(script), utterances, call_sid, own_http, live)
            return await call.run(started)
    return await _SimCall(settings, tuple(script), utterances, call_sid, http, live).run(started)


@functools.cache
def _tls_context(ca_file: str = "") -> ssl.SSLContext:
    """One default TLS client context for every call (per extra CA): loading the CA store
    takes ~20 ms."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(ca_file)
    return context


# --- One call ------------------------------------------------------------------------


@frozen
class _Utterance:
    """A clip cut into microphone frames, base64 ready."""

    payloads: tuple[str, ...]
    #: Index of the first frame that is speech (0 if none is).
    onset_frame: int


def _load_utterances(script: Iterable[Step]) -> dict[str, _Utterance]:
    utterances: dict[str, _Utterance] = {}
    for step in script:
        if isinstance(step, Speak) and step.clip not in utterances:
            frames = list(iter_frames(load_clip(step.clip)))
            onset = next((i for i, frame in enumerate(frames) if is_speech(frame)), 0)
            payloads = tuple(base64.b64encode(frame).decode("ascii") for frame in frames)
            utterances[step.clip] = _Utterance(payloads, onset)
    return utterances


@frozen
class _StreamTwiml:
    """The ``<Connect><Stream>`` of a webhook answer."""

    url: str
    parameters: tuple[tuple[str, str], ...]
    action: str | None
    action_method: str
    #: Verbs after ``</Connect>``: what runs when the stream ends and there is no action.
    after: tuple[ET.Element, ...]
    #: ``<Stream statusCallback>``: where the stream's events are posted ("": nowhere).
    status_callback: str = ""
    status_callback_method: str = "POST"


class _Violations:
    """The bounded list of protocol violations of one call."""

    def __init__(self) -> None:
        self._recorded: list[str] = []
        self._suppressed = 0

    def add(self, code: int, text: str) -> None:
        if len(self._recorded) < MAX_RECORDED_VIOLATIONS:
            self._recorded.append(f"{code}: {text}")
        else:
            self._suppressed += 1

    def as_list(self) -> list[str]:
        more = [f"… and {self._suppressed} more"] if self._suppressed else []
        return [*self._recorded, *more]


@frozen(kw_only=True)
class _StreamResult:
    stream_sid: str
    streamed: bool
    ended_by: EndedBy
    timed_out_step: int | None
    close_code: int | None
    playout: _Playout | None
    interruptions: tuple[_Interruption, ...]
    frames_sent: int
    marks_sent: int
    marks_echoed: int
    marks_cleared: int
    clears: int
    #: When the stream's ``start`` was sent (trio time); None without a stream.
    started_at: float | None = None


class _SimCall:
    """One call from webhook to action; ``run`` once."""

    def __init__(
        self,
        settings: SimTwilioSettings,
        script: tuple[Step, ...],
        utterances: Mapping[str, _Utterance],
        call_sid: str,
        http: httpx.AsyncClient,
        live: LiveCall | None = None,
    ) -> None:
        self._live = live
        self._settings = settings
        self._script = script
        self._utterances = utterances
        self._call_sid = call_sid
        self._http = http
        self._validator = RequestValidator(settings.auth_token)
        self._webhook_validator = RequestValidator(settings.shared_key or settings.auth_token)
        self._violations = _Violations()
        #: Where the stream's status events are posted, while the stream runs.
        self._status_nursery: trio.Nursery | None = None

    async def run(self, started: float) -> CallReport:
        settings = self._settings
        voice_url = _join(settings.public_url, settings.voice_path)
        status, twiml = await self._request_twiml(voice_url, "POST", self._call_params("ringing"))
        document = self._parse_twiml(twiml, "voice webhook") if _is_success(status) else None
        stream_twiml = self._find_stream(document) if document is not None else None
        if stream_twiml is None:
            final = _summarize(list(document) if document is not None else None)
            return self._report(started, status, twiml, _no_stream(), action_twiml="", final=final)

        await trio.sleep(settings.stream_setup_s)
        result = await self._stream(stream_twiml)
        action_twiml = ""
        if self._live is not None and self._live.update:
            # Twilio's REST API moved the call on: its new TwiML runs, not the action.
            redirected = None
            if self._live.update == "redirect":
                redirected = self._parse_twiml(self._live.twiml, "REST redirect")
            final = _summarize(list(redirected) if redirected is not None else [])
            report = self._report(started, status, twiml, result, action_twiml="", final=final)
            return attrs.evolve(report, rest_update=self._live.update)
        if stream_twiml.action is not None:
            hung_up = result.ended_by in ("caller", "max_duration", "step_timeout")
            action_url = urljoin(voice_url, stream_twiml.action)
            params = self._call_params("completed" if hung_up else "in-progress")
            action_status, action_twiml = await self._request_twiml(
                action_url, stream_twiml.action_method, params
            )
            action_document = (
                self._parse_twiml(action_twiml, "Connect action")
                if _is_success(action_status)
                else None
            )
            final = _summarize(list(action_document) if action_document is not None else None)
        else:
            final = _summarize(list(stream_twiml.after))
        return self._report(started, status, twiml, result, action_twiml=action_twiml, final=final)

    def _call_params(self, call_status: str) -> dict[str, str]:
        settings = self._settings
        params = {
            "CallSid": self._call_sid,
            "AccountSid": settings.account_sid,
            "From": settings.from_number,
            "To": settings.to_number,
            "CallStatus": call_status,
            "Direction": settings.direction,
            "ApiVersion": _API_VERSION,
        }
        if call_status == "ringing":
            params["Caller"] = settings.from_number
            params["Called"] = settings.to_number
        return params

    async def _request_twiml(
        self, public_url: str, method: str, params: dict[str, str]
    ) -> tuple[int, str]:
        """Signed request for TwiML, as Twilio makes it: (status, body), (0, "") on failure."""
        if method == "GET":
            separator = "&" if urlsplit(public_url).query else "?"
            signed_url, body_params = public_url + separator + urlencode(params), {}
        else:
            signed_url, body_params = public_url, params
        settings = self._settings
        algorithm = _SHARED_KEY_ALGORITHM if settings.shared_key else None
        signature = self._webhook_validator.compute_signature(signed_url, body_params, algorithm)
        headers = {"X-Twilio-Signature": signature, "User-Agent": _USER_AGENT}
        if settings.shared_key:
            headers[SIGNATURE_SETTINGS_HEADER] = (
                f"key={settings.shared_key_id},algorithm={_SHARED_KEY_ALGORITHM}"
            )
        target = _route(signed_url, self._settings.public_url, self._settings.bridge_url)
        try:
            response = await self._http.request(
                method,
                target,
                data=body_params or None,
                headers=headers,
                timeout=WEBHOOK_TIMEOUT_S,
            )
        except httpx.HTTPError as exc:
            self._violations.add(11200, f"HTTP retrieval failure: {method} {public_url}: {exc!r}")
            return 0, ""
        if not response.is_success:
            self._violations.add(
                11200, f"HTTP retrieval failure: {method} {public_url} -> {response.status_code}"
            )
        return response.status_code, response.text

    def _parse_twiml(self, twiml: str, what: str) -> ET.Element | None:
        try:
            root = ET.fromstring(twiml)
        except ET.ParseError as exc:
            self._violations.add(12100, f"{what}: TwiML does not parse: {exc}")
            return None
        if root.tag != "Response":
            self._violations.add(12100, f"{what}: TwiML root is <{root.tag}>, not <Response>")
            return None
        return root

    def _find_stream(self, document: ET.Element) -> _StreamTwiml | None:
        verbs = list(document)
        for index, verb in enumerate(verbs):
            if verb.tag != "Connect":
                continue
            stream = verb.find("Stream")
            if stream is None:
                return None
            url = stream.get("url", "")
            parts = urlsplit(url)
            if parts.scheme not in ("ws", "wss") or not parts.netloc:
                self._violations.add(31920, f"Stream url is not wss://: {url!r}")
                return None
            if parts.query or parts.fragment:
                self._violations.add(
                    31920, f"Stream url has a query string, which Twilio does not support: {url!r}"
                )
            parameters = []
            for parameter in stream.findall("Parameter"):
                name, value = parameter.get("name", ""), parameter.get("value", "")
                if len(name) + len(value) >= 500:
                    self._violations.add(31951, f"Stream Parameter {name!r} is 500 chars or more")
                parameters.append((name, value))
            return _StreamTwiml(
                url=url,
                parameters=tuple(parameters),
                action=verb.get("action"),
                action_method=verb.get("method", "POST").upper(),
                after=tuple(verbs[index + 1 :]),
                status_callback=stream.get("statusCallback", ""),
                status_callback_method=stream.get("statusCallbackMethod", "POST").upper(),
            )
        return None

    async def _stream(self, stream_twiml: _StreamTwiml) -> _StreamResult:
        """Open the Media Stream and run it until either side ends it; post its status
        events to the ``statusCallback`` as Twilio does (``stream-started`` once the
        WebSocket is open, ``stream-stopped`` when it is over, ``stream-error`` when the
        handshake failed). The events are posted beside the stream, never holding it up;
        this returns once they have been answered."""
        stream_sid = "MZ" + secrets.token_hex(16)
        async with trio.open_nursery() as status_nursery:
            self._status_nursery = status_nursery
            result = await self._open_stream(stream_twiml, stream_sid)
            if result.streamed:
                self._post_stream_status(stream_twiml, stream_sid, "stream-stopped")
        self._status_nursery = None
        return result

    def _post_stream_status(
        self, stream_twiml: _StreamTwiml, stream_sid: str, event: str, error: str = ""
    ) -> None:
        """Post one stream status event beside the call (no-op without a statusCallback)."""
        if not stream_twiml.status_callback or self._status_nursery is None:
            return
        params = {
            "AccountSid": self._settings.account_sid,
            "CallSid": self._call_sid,
            "StreamSid": stream_sid,
            # No name attribute on our streams: Twilio then names a stream by its SID.
            "StreamName": stream_sid,
            "StreamEvent": event,
            "Timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        }
        if error:
            params["StreamError"] = error
        voice_url = _join(self._settings.public_url, self._settings.voice_path)
        url = urljoin(voice_url, stream_twiml.status_callback)
        self._status_nursery.start_soon(
            self._request_twiml, url, stream_twiml.status_callback_method, params
        )

    async def _open_stream(self, stream_twiml: _StreamTwiml, stream_sid: str) -> _StreamResult:
        settings = self._settings
        signature = self._validator.compute_signature(stream_twiml.url, {})
        target = _route(stream_twiml.url, settings.public_url, settings.bridge_url)
        rejection: BaseException | None = None
        try:
            async with trio.open_nursery() as connection_nursery:
                try:
                    with trio.fail_after(STREAM_CONNECT_TIMEOUT_S):
                        connection, transport = await _connect_media_socket(
                            connection_nursery, target, signature, self._settings.ca_file
                        )
                except (trio_websocket.HandshakeError, OSError, trio.TooSlowError) as exc:
                    connection_nursery.cancel_scope.cancel(reason="stream handshake failed")
                    return self._stream_failed(stream_twiml, stream_sid, exc)
                self._post_stream_status(stream_twiml, stream_sid, "stream-started")
                socket = TrioWebSocket(connection)
                try:
                    return await self._run_stream(socket, transport, stream_sid, stream_twiml)
                finally:
                    await socket.aclose()
                    # The closing handshake is over; do not wait for the bridge to
                    # drop TCP (trio-websocket's client would wait for ever).
                    connection_nursery.cancel_scope.cancel(reason="media stream over")
        except* trio_websocket.ConnectionRejected as group:
            # A refused upgrade surfaces from trio-websocket's reader task.
            rejection = group.exceptions[0]
        return self._stream_failed(stream_twiml, stream_sid, rejection)

    def _stream_failed(
        self, stream_twiml: _StreamTwiml, stream_sid: str, error: BaseException | None
    ) -> _StreamResult:
        self._violations.add(31920, f"Stream handshake failed: {stream_twiml.url}: {error!r}")
        self._post_stream_status(
            stream_twiml,
            stream_sid,
            "stream-error",
            f"31920 Stream - WebSocket - Handshake Error: {_quote(error)}",
        )
        return attrs.evolve(_no_stream(), ended_by="stream_failed")

    async def _run_stream(
        self,
        socket: TrioWebSocket,
        transport: trio.abc.AsyncResource,
        stream_sid: str,
        stream_twiml: _StreamTwiml,
    ) -> _StreamResult:
        ids = _StreamIds(
            account_sid=self._settings.account_sid, call_sid=self._call_sid, stream_sid=stream_sid
        )
        writer = _StreamWriter(socket, ids)
        if self._live is not None:
            await self._live._attach(writer)
        try:
            await writer.send_connected()
            await writer.send_start(dict(stream_twiml.parameters))
        except SocketClosed as closed:
            return attrs.evolve(
                _no_stream(),
                stream_sid=stream_sid,
                streamed=True,
                ended_by="server",
                close_code=closed.code,
            )
        stream = _MediaStream(
            socket,
            writer,
            transport=transport,
            start_time=trio.current_time(),
            script=self._script,
            utterances=self._utterances,
            violations=self._violations,
            max_call_s=self._settings.max_call_s,
        )
        return await stream.run()

    def _report(
        self,
        started: float,
        status: int,
        twiml: str,
        result: _StreamResult,
        *,
        action_twiml: str,
        final: tuple[FinalAction, str, str],
    ) -> CallReport:
        playout = result.playout
        turns = playout.turns if playout is not None else ()
        first_after_webhook = None
        if turns and result.started_at is not None:
            first_after_webhook = (result.started_at - started) * 1000 + turns[0].start_ms
        return CallReport(
            call_sid=self._call_sid,
            stream_sid=result.stream_sid,
            webhook_status=status,
            webhook_twiml=twiml,
            streamed=result.streamed,
            ended_by=result.ended_by,
            timed_out_step=result.timed_out_step,
            first_audio_ms=turns[0].start_ms if turns else None,
            turns=turns,
            barge_ins=(playout.barge_ins(result.interruptions) if playout is not None else ()),
            marks_sent=result.marks_sent,
            marks_echoed=result.marks_echoed,
            marks_cleared=result.marks_cleared,
            clears=result.clears,
            frames_sent=result.frames_sent,
            bytes_heard=playout.bytes_heard if playout is not None else 0,
            audio_received_bytes=playout.bytes_received if playout is not None else 0,
            protocol_violations=self._violations.as_list(),
            close_code=result.close_code,
            action_twiml=action_twiml,
            final_action=final[0],
            final_say=final[1],
            final_dial=final[2],
            duration_s=trio.current_time() - started,
            heard_audio=playout.heard_audio if playout is not None else b"",
            first_audio_after_webhook_ms=first_after_webhook,
        )


class TrioWebSocket:
    """The caller's Media Stream as a ``sockets.PingableSocket``, over trio-websocket.

    The simulated caller speaks WebSocket with a library of its own, not the
    bridge's ``net.ws``: an independent client is what lets it catch the bridge's
    mistakes at the frame level.
    """

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws

    async def receive(self) -> str | bytes:
        try:
            return await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            raise SocketClosed(
                reason.code if reason else None, (reason.reason or "") if reason else ""
            ) from None

    async def send(self, message: str | bytes) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(WRITE_DEADLINE_S) as write_scope:
                try:
                    await self._ws.send_message(message)
                except trio_websocket.ConnectionClosed as exc:
                    reason = exc.reason
                    raise SocketClosed(reason.code if reason else None) from None
        if write_scope.cancelled_caught:
            raise SocketWriteTimeout(None, "write deadline passed")

    async def ping(self) -> None:
        # trio-websocket's ping() writes the ping and then waits for the pong in
        # one call, so the whole exchange is shielded; the caller bounds it with
        # its own pong deadline (see bridge.liveness), which still applies inside
        # the shield because that deadline scope is nested within it.
        try:
            await self._ws.ping()
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            raise SocketClosed(reason.code if reason else None) from None

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        with close_scope():
            await self._ws.aclose(code, reason or None)


async def _connect_media_socket(
    nursery: trio.Nursery, url: str, signature: str, ca_file: str = ""
) -> tuple[trio_websocket.WebSocketConnection, trio.abc.AsyncResource]:
    """Open the Media Stream WebSocket; also returns its TCP (or TLS) stream, for ``Drop``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    transport: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    if secure:
        transport = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=_tls_context(ca_file), https_compatible=True
        )
    else:
        transport = await trio.open_tcp_stream(host, port)
    connection = await trio_websocket.wrap_client_stream(
        nursery,
        transport,
        host if port in (80, 443) else f"{host}:{port}",
        (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
        extra_headers=[(b"x-twilio-signature", signature.encode("ascii"))],
        message_queue_size=STREAM_MESSAGE_BUFFER,
        max_message_size=MAX_BRIDGE_MESSAGE_BYTES,
    )
    return connection, transport


def _is_success(status: int) -> bool:
    return 200 <= status < 300


def _no_stream() -> _StreamResult:
    return _StreamResult(
        stream_sid="",
        streamed=False,
        ended_by="no_stream",
        timed_out_step=None,
        close_code=None,
        playout=None,
        interruptions=(),
        frames_sent=0,
        marks_sent=0,
        marks_echoed=0,
        marks_cleared=0,
        clears=0,
    )


# --- The Media Stream ----------------------------------------------------------------


@frozen(kw_only=True)
class _StreamIds:
    account_sid: str
    call_sid: str
    stream_sid: str


def _dumps(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode("utf-8")


class _StreamWriter:
    """The only way messages reach the bridge: numbers them and keeps writes whole.

    Invariant: ``sequenceNumber`` counts every message after ``connected`` in the
    order they hit the wire, because it is assigned under ``_write_lock``.
    """

    def __init__(self, socket: TrioWebSocket, ids: _StreamIds) -> None:
        self._socket = socket
        self._ids = ids
        self._write_lock = trio.StrictFIFOLock()
        self._next_sequence = 1
        self.frames_sent = 0
        self.marks_echoed = 0

    @property
    def stream_sid(self) -> str:
        return self._ids.stream_sid

    async def send_connected(self) -> None:
        message = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        async with self._write_lock:
            await self._socket.send(_dumps(message))

    async def send_start(self, custom_parameters: dict[str, str]) -> None:
        ids = self._ids
        body = {
            "accountSid": ids.account_sid,
            "streamSid": ids.stream_sid,
            "callSid": ids.call_sid,
            "tracks": ["inbound"],
            "customParameters": custom_parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE, "channels": 1},
        }
        await self._send_numbered("start", body)

    async def send_media(self, payload_b64: str) -> None:
        """The next microphone frame; ``chunk`` and ``timestamp`` follow ``frames_sent``."""
        async with self._write_lock:
            await self._send_media_locked(payload_b64)

    async def _send_media_locked(self, payload_b64: str) -> None:
        message = {
            "event": "media",
            "sequenceNumber": str(self._next_sequence),
            "streamSid": self._ids.stream_sid,
            "media": {
                "track": "inbound",
                "chunk": str(self.frames_sent + 1),
                "timestamp": str(self.frames_sent * FRAME_MS),
                "payload": payload_b64,
            },
        }
        await self._socket.send(_dumps(message))
        self._next_sequence += 1
        self.frames_sent += 1

    async def send_mark(self, name: str) -> None:
        await self._send_numbered("mark", {"name": name})
        self.marks_echoed += 1

    async def send_dtmf(self, digit: str) -> None:
        await self._send_numbered("dtmf", {"track": "inbound_track", "digit": digit})

    async def send_raw(self, frame: str | bytes) -> None:
        async with self._write_lock:
            await self._socket.send(frame)

    async def hang_up(self, *, media_after_stop: int = 0) -> None:
        """``stop``, then close the socket, with nothing in between (no echo after stop).

        ``media_after_stop`` silence frames are sent between the two (a fault).
        """
        ids = self._ids
        async with self._write_lock:
            message = {
                "event": "stop",
                "sequenceNumber": str(self._next_sequence),
                "streamSid": ids.stream_sid,
                "stop": {"accountSid": ids.account_sid, "callSid": ids.call_sid},
            }
            try:
                await self._socket.send(_dumps(message))
                self._next_sequence += 1
                for _ in range(media_after_stop):
                    await self._send_media_locked(_SILENCE_FRAME_B64)
            finally:
                await self._socket.aclose()

    async def _send_numbered(self, event: str, body: dict[str, Any]) -> None:
        async with self._write_lock:
            message = {
                "event": event,
                "sequenceNumber": str(self._next_sequence),
                "streamSid": self._ids.stream_sid,
                event: body,
            }
            await self._socket.send(_dumps(message))
            self._next_sequence += 1


@attrs.define
class _Interruption:
    """A caller utterance that began over assistant speech (a barge-in attempt)."""

    onset_ms: float
    #: End of the utterance's last frame; None while speaking (or if the call ended).
    end_ms: float | None = None


class _StepTimeout(VoicebridgeError):
    """A ``WaitFor…`` step ran out of time (caught by ``_talk``, never escapes)."""


class _MediaStream:
    """One open Media Stream: the caller's microphone and script, and Twilio's playout."""

    def __init__(
        self,
        socket: TrioWebSocket,
        writer: _StreamWriter,
        *,
        transport: trio.abc.AsyncResource,
        start_time: float,
        script: tuple[Step, ...],
        utterances: Mapping[str, _Utterance],
        violations: _Violations,
        max_call_s: float,
    ) -> None:
        self._socket = socket
        self._writer = writer
        self._transport = transport
        self._start = start_time
        self._script = script
        self._utterances = utterances
        self._violations = violations
        self._max_call_s = max_call_s
        self._playout = _Playout(start_time)
        self._interruptions: list[_Interruption] = []
        #: End of the caller's last utterance, ms since stream start.
        self._last_utterance_end_ms = 0.0
        self._ended_by: EndedBy | None = None
        self._timed_out_step: int | None = None
        self._close_code: int | None = None
        self._marks_sent = 0
        self._marks_cleared = 0
        self._clears = 0
        #: Media frames sent ahead of the microphone's real-time pace (Flood, SendMedia).
        self._unpaced_frames = 0
        #: Until then Twilio reads nothing from the socket (StopReading).
        self._reading_resumes_at = -math.inf
        #: Set when the caller's side is over: a paused reader then reads the rest.
        self._talk_done = trio.Event()

    async def run(self) -> _StreamResult:
        """Run the call from just after ``start`` until the stream closes (by either side)."""
        async with trio.open_nursery() as stream_nursery:
            stream_nursery.start_soon(self._listen, stream_nursery.cancel_scope)
            stream_nursery.start_soon(self._talk)
        self._playout.finish(trio.current_time())
        return _StreamResult(
            stream_sid=self._writer.stream_sid,
            streamed=True,
            ended_by=self._ended_by or "server",
            timed_out_step=self._timed_out_step,
            close_code=self._close_code,
            playout=self._playout,
            interruptions=tuple(self._interruptions),
            frames_sent=self._writer.frames_sent,
            marks_sent=self._marks_sent,
            marks_echoed=self._writer.marks_echoed,
            marks_cleared=self._marks_cleared,
            clears=self._clears,
            started_at=self._start,
        )

    def _end(self, ended_by: EndedBy) -> None:
        if self._ended_by is None:
            self._ended_by = ended_by

    # Twilio's side of the bridge's audio: receive, check, play, echo marks.

    async def _listen(self, stream_scope: trio.CancelScope) -> None:
        """Receive until the socket closes, then end the stream (stopping the caller)."""
        try:
            while True:
                if trio.current_time() < self._reading_resumes_at:
                    with trio.move_on_at(self._reading_resumes_at):
                        await self._talk_done.wait()
                message: str | bytes | None = None
                with trio.move_on_at(self._playout.next_mark_due()):
                    message = await self._socket.receive()
                if message is None:
                    for name in self._playout.pop_due_marks(trio.current_time()):
                        await self._writer.send_mark(name)
                else:
                    await self._on_bridge_message(message)
        except SocketClosed as closed:
            self._close_code = closed.code
        self._end("server")
        stream_scope.cancel(reason="the media stream closed")

    async def _on_bridge_message(self, message: str | bytes) -> None:
        try:
            command = _parse_bridge_message(message, self._writer.stream_sid)
        except _TwilioError as error:
            self._violations.add(error.code, error.text)
            return
        now = trio.current_time()
        if isinstance(command, _PlayMedia):
            if not self._playout.add_audio(now, command.audio):
                self._violations.add(31931, "more than 10 minutes of audio buffered; media dropped")
        elif isinstance(command, _PlayMark):
            self._marks_sent += 1
            if self._playout.add_mark(now, command.name):
                await self._writer.send_mark(command.name)
        else:
            self._clears += 1
            discarded = self._playout.clear(now)
            self._marks_cleared += len(discarded)
            for name in discarded:
                await self._writer.send_mark(name)

    # The caller: microphone and script.

    async def _talk(self) -> None:
        """Run the script, then keep the line open; hang up on timeout or max duration."""
        try:
            await self._run_script()
        finally:
            self._talk_done.set()

    async def _run_script(self) -> None:
        try:
            with trio.move_on_at(self._start + self._max_call_s):
                for index, step in enumerate(self._script):
                    try:
                        await self._perform(step)
                    except _StepTimeout:
                        self._timed_out_step = index
                        self._end("step_timeout")
                        await self._writer.hang_up()
                        return
                    if isinstance(step, Hangup | Drop):
                        return
                while True:  # script over: listen until the bridge ends the call
                    await self._send_frame(_SILENCE_FRAME_B64)
            self._end("max_duration")
            await self._writer.hang_up()
        except SocketClosed:
            # Closed by the bridge (_listen reports how), or a write got stuck: then
            # the stream is broken, and closing it ends _listen too.
            await self._socket.aclose()

    async def _perform(self, step: Step) -> None:
        if isinstance(step, Silence):
            for _ in range(round(step.seconds * 1000 / FRAME_MS)):
                await self._send_frame(_SILENCE_FRAME_B64)
        elif isinstance(step, Speak):
            await self._speak(self._utterances[step.clip])
        elif isinstance(step, WaitForAssistant):
            with trio.move_on_after(step.timeout_s) as wait_scope:
                while not self._heard_current_turn(step.heard_ms):
                    await self._send_frame(_SILENCE_FRAME_B64)
            if wait_scope.cancelled_caught:
                raise _StepTimeout
        elif isinstance(step, WaitForAssistantDone):
            with trio.move_on_after(step.timeout_s) as wait_scope:
                while not self._assistant_done(step.quiet_s):
                    await self._send_frame(_SILENCE_FRAME_B64)
            if wait_scope.cancelled_caught:
                raise _StepTimeout
        elif isinstance(step, PressDigit):
            await self._writer.send_dtmf(step.digit)
        elif isinstance(step, SendRaw):
            await self._writer.send_raw(step.frame)
        elif isinstance(step, Flood):
            frames = round(step.seconds * 1000 / FRAME_MS)
            for _ in range(frames):
                await self._writer.send_media(_SILENCE_FRAME_B64)
            self._unpaced_frames += frames
        elif isinstance(step, SendMedia):
            await self._writer.send_media(base64.b64encode(step.audio).decode("ascii"))
            self._unpaced_frames += 1
        elif isinstance(step, StopReading):
            self._reading_resumes_at = trio.current_time() + step.seconds
        elif isinstance(step, Drop):
            self._end("dropped")
            await self._transport.aclose()
        else:
            self._end("caller")
            await self._writer.hang_up(media_after_stop=step.media_after_stop)

    async def _speak(self, utterance: _Utterance) -> None:
        interruption: _Interruption | None = None
        for index, payload in enumerate(utterance.payloads):
            await self._wait_next_tick()
            if index == utterance.onset_frame and self._playout.assistant_speech_pending():
                interruption = _Interruption(self._mic_ms())
                self._interruptions.append(interruption)
            await self._writer.send_media(payload)
        self._last_utterance_end_ms = self._mic_ms()
        if interruption is not None:
            interruption.end_ms = self._last_utterance_end_ms

    async def _send_frame(self, payload_b64: str) -> None:
        await self._wait_next_tick()
        await self._writer.send_media(payload_b64)

    def _mic_ms(self) -> float:
        """Where the microphone is, ms since stream start (frames sent out of pace excluded)."""
        return float((self._writer.frames_sent - self._unpaced_frames) * FRAME_MS)

    async def _wait_next_tick(self) -> None:
        """Sleep until the next microphone frame is due, and let the ear catch up."""
        await trio.sleep_until(self._start + self._mic_ms() / 1000)
        self._playout.advance(trio.current_time())

    def _heard_current_turn(self, heard_ms: float) -> bool:
        current = self._playout.current_turn_heard_ms()
        return current is not None and current >= heard_ms

    def _assistant_done(self, quiet_s: float) -> bool:
        last_speech_end_ms = self._playout.last_speech_end_ms()
        if last_speech_end_ms is None or last_speech_end_ms <= self._last_utterance_end_ms:
            return False
        now_ms = (trio.current_time() - self._start) * 1000
        # "Done" means the turn is over: never sooner than the gap that ends a turn, so
        # the caller's next words are an answer, not a barge-in.
        return now_ms - last_speech_end_ms >= max(quiet_s * 1000, TURN_GAP_MS)


# --- What the bridge may send Twilio (docs/protocols.md §1) ------------------------


class _TwilioError(VoicebridgeError):
    """A frame Twilio would reject, with the error code its debugger would show."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


@frozen
class _PlayMedia:
    audio: bytes


@frozen
class _PlayMark:
    name: str


@frozen
class _ClearBuffer:
    pass


_BridgeCommand: TypeAlias = _PlayMedia | _PlayMark | _ClearBuffer

#: Exactly the fields Twilio accepts, per event (top level, then the body object).
_EXPECTED_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "media": (frozenset({"event", "streamSid", "media"}), frozenset({"payload"})),
    "mark": (frozenset({"event", "streamSid", "mark"}), frozenset({"name"})),
    "clear": (frozenset({"event", "streamSid"}), frozenset()),
}


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 1] + "…"


def _check_fields(what: str, present: Iterable[str], expected: frozenset[str]) -> None:
    keys = set(present)
    if extra := sorted(keys - expected):
        raise _TwilioError(31951, f"{what} has unexpected field(s) {', '.join(extra)}")
    if missing := sorted(expected - keys):
        raise _TwilioError(31951, f"{what} lacks field(s) {', '.join(missing)}")


def _parse_bridge_message(message: str | bytes, stream_sid: str) -> _BridgeCommand:
    """Check one frame from the bridge as Twilio does. Raises ``_TwilioError``."""
    if isinstance(message, bytes):
        raise _TwilioError(31950, f"binary frame ({len(message)} bytes); only text is accepted")
    try:
        decoded = orjson.loads(message)
    except orjson.JSONDecodeError:
        raise _TwilioError(31951, f"frame is not JSON: {_quote(message)}") from None
    if not isinstance(decoded, dict):
        raise _TwilioError(31951, f"frame is not a JSON object: {_quote(message)}")
    event = decoded.get("event")
    if not isinstance(event, str) or event not in _EXPECTED_FIELDS:
        raise _TwilioError(31951, f"unknown event {_quote(event)}")
    top_fields, body_fields = _EXPECTED_FIELDS[event]
    _check_fields(f"{event} message", decoded, top_fields)
    if decoded["streamSid"] != stream_sid:
        raise _TwilioError(
            31951, f"{event} message for wrong streamSid {_quote(decoded['streamSid'])}"
        )
    if event == "clear":
        return _ClearBuffer()
    body = decoded[event]
    if not isinstance(body, dict):
        raise _TwilioError(31951, f"{event} message: {event!r} is not an object")
    _check_fields(f"{event} message's {event!r}", body, body_fields)
    if event == "mark":
        name = body["name"]
        if not isinstance(name, str):
            raise _TwilioError(31951, f"mark name is not a string: {_quote(name)}")
        return _PlayMark(name)
    payload = body["payload"]
    if not isinstance(payload, str):
        raise _TwilioError(31951, f"media payload is not a string: {_quote(payload)}")
    try:
        audio = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _TwilioError(31951, f"media payload is not valid base64: {_quote(payload)}") from None
    return _PlayMedia(audio)


# --- Twilio's playback buffer and the caller's ear -----------------------------------


@frozen
class _Clear:
    ms: float
    #: Wall position (bytes) where the queue was cut.
    position: int
    #: ``heard_ms`` of the turn the clear ended; 0 when no turn was being heard.
    cut_turn_heard_ms: float


class _Playout:
    """Twilio's playback buffer for one stream and the caller's ear behind it (sans-I/O).

    Callers pass ``now`` (trio time); positions are μ-law bytes since stream start.
    Invariant: ``_wall[:position(now)]`` is what has been played (gaps padded with
    silence) and ``_wall[position(now):]`` is the queue: assistant audio only, so
    the queue is empty exactly when ``len(_wall) <= position(now)``.
    Invariant: ``_speech[f]`` is whether wall frame ``f`` (bytes ``160f…160f+160``)
    was heard as speech, for every frame already classified; frames are classified
    once they have been played (or, for the frame a clear cuts, at the clear).
    """

    def __init__(self, start_time: float) -> None:
        self._start = start_time
        self._wall = bytearray()
        #: Marks waiting for their audio to play out: (due trio time, name), in order.
        self._marks: deque[tuple[float, str]] = deque()
        self._bytes_accepted = 0
        self._bytes_discarded = 0
        self._speech = bytearray()
        #: (first, last) speech frame of the turn being heard.
        self._open_turn: tuple[int, int] | None = None
        self._last_speech_frame: int | None = None
        self._turns: list[HeardTurn] = []
        self._clears: list[_Clear] = []

    def _position(self, now: float) -> int:
        return max(0, int((now - self._start) * SAMPLE_RATE))

    # Fed by the bridge's messages.

    def add_audio(self, now: float, audio: bytes) -> bool:
        """Queue ``audio`` behind what is queued; False (dropped) past Twilio's limit."""
        position = self._position(now)
        queued = max(0, len(self._wall) - position)
        if queued + len(audio) > MAX_QUEUED_AUDIO_BYTES:
            return False
        if len(self._wall) < position:
            self._wall.extend(bytes([MULAW_SILENCE]) * (position - len(self._wall)))
        self._wall.extend(audio)
        self._bytes_accepted += len(audio)
        return True

    def add_mark(self, now: float, name: str) -> bool:
        """Queue a mark behind the queued audio; True: nothing is queued, echo it now."""
        if len(self._wall) <= self._position(now):
            return True
        self._marks.append((self._start + len(self._wall) / SAMPLE_RATE, name))
        return False

    def clear(self, now: float) -> list[str]:
        """Empty the queue at ``now``; returns every pending mark, to echo at once."""
        position = self._position(now)
        self._finish_frames_at(now)
        cut_turn_heard_ms = self._close_turn(interrupted=True)
        self._clears.append(_Clear((now - self._start) * 1000, position, cut_turn_heard_ms))
        self._cut(position)
        discarded = [name for _, name in self._marks]
        self._marks.clear()
        return discarded

    def next_mark_due(self) -> float:
        """Trio time at which the oldest pending mark is due (inf if none)."""
        return self._marks[0][0] if self._marks else math.inf

    def pop_due_marks(self, now: float) -> list[str]:
        due: list[str] = []
        while self._marks and self._marks[0][0] <= now:
            due.append(self._marks.popleft()[1])
        return due

    # Driven by the clock.

    def advance(self, now: float) -> None:
        """Classify every frame played completely by ``now``."""
        played_frames = self._position(now) // FRAME_BYTES
        frame = len(self._speech)
        audible_frames = min(played_frames, -(-len(self._wall) // FRAME_BYTES))
        while frame < audible_frames:
            self._classify(frame, self._wall_frame(frame, len(self._wall)))
            frame += 1
        if frame < played_frames:  # past the wall: silence
            self._speech.extend(bytes(played_frames - frame))
            self._close_turn_after_gap(played_frames - 1)

    def finish(self, now: float) -> None:
        """The stream ended at ``now``: what is still queued is never heard."""
        position = self._position(now)
        self._finish_frames_at(now)
        self._close_turn(interrupted=False)
        self._cut(position)
        self._marks.clear()
        if len(self._wall) < position:
            self._wall.extend(bytes([MULAW_SILENCE]) * (position - len(self._wall)))

    # What the caller perceives.

    def assistant_speech_pending(self) -> bool:
        """An assistant turn is being heard (a pause between its words included), or
        speech is queued to play within ``TURN_GAP_MS`` (call after ``advance``). Speech
        further ahead is a later turn, and the look-ahead bounds the scan however much
        the bridge has queued."""
        if self._open_turn is not None or (self._speech and self._speech[-1]):
            return True
        first = len(self._speech)
        for frame in range(first, first + _TURN_GAP_FRAMES):
            if frame * FRAME_BYTES >= len(self._wall):
                break
            if is_speech(self._wall_frame(frame, len(self._wall))):
                return True
        return False

    def current_turn_heard_ms(self) -> float | None:
        """``heard_ms`` of the turn being heard; None between turns."""
        if self._open_turn is None:
            return None
        first, last = self._open_turn
        return float((last - first + 1) * FRAME_MS)

    def last_speech_end_ms(self) -> float | None:
        """End of the last assistant speech frame heard, ms since stream start."""
        if self._last_speech_frame is None:
            return None
        return float((self._last_speech_frame + 1) * FRAME_MS)

    @property
    def turns(self) -> tuple[HeardTurn, ...]:
        return tuple(self._turns)

    @property
    def bytes_heard(self) -> int:
        return self._bytes_accepted - self._bytes_discarded

    @property
    def bytes_received(self) -> int:
        return self._bytes_accepted

    @property
    def heard_audio(self) -> bytes:
        return bytes(self._wall)

    def barge_ins(self, interruptions: Sequence[_Interruption]) -> tuple[BargeIn, ...]:
        """Match each interruption with the bridge's clear (call after ``finish``)."""
        stream_end_ms = len(self._wall) / BYTES_PER_MS
        barge_ins = []
        for index, interruption in enumerate(interruptions):
            next_onset_ms = (
                interruptions[index + 1].onset_ms if index + 1 < len(interruptions) else math.inf
            )
            clear = next(
                (c for c in self._clears if interruption.onset_ms <= c.ms < next_onset_ms), None
            )
            if clear is None:
                barge_ins.append(
                    BargeIn(
                        speech_onset_ms=interruption.onset_ms,
                        clear_ms=None,
                        latency_ms=None,
                        heard_after_clear_ms=0.0,
                        heard_of_turn_ms=0.0,
                    )
                )
                continue
            end_ms = interruption.end_ms if interruption.end_ms is not None else stream_end_ms
            first_frame = -(-clear.position // FRAME_BYTES)  # the first frame after the cut
            end_frame = math.ceil(end_ms / FRAME_MS)
            leaked_frames = sum(self._speech[first_frame:end_frame])
            barge_ins.append(
                BargeIn(
                    speech_onset_ms=interruption.onset_ms,
                    clear_ms=clear.ms,
                    latency_ms=clear.ms - interruption.onset_ms,
                    heard_after_clear_ms=float(leaked_frames * FRAME_MS),
                    heard_of_turn_ms=clear.cut_turn_heard_ms,
                )
            )
        return tuple(barge_ins)

    # Internals.

    def _wall_frame(self, frame: int, end: int) -> bytes:
        """Wall frame ``frame`` as heard, up to byte ``end``; silence beyond."""
        start = frame * FRAME_BYTES
        data = bytes(self._wall[start : min(start + FRAME_BYTES, end)])
        return data + bytes([MULAW_SILENCE]) * (FRAME_BYTES - len(data))

    def _finish_frames_at(self, now: float) -> None:
        """Classify every frame up to ``now``, the partly played one as heard so far."""
        self.advance(now)
        position = self._position(now)
        frame = len(self._speech)
        if frame * FRAME_BYTES < position:
            self._classify(frame, self._wall_frame(frame, min(position, len(self._wall))))

    def _cut(self, position: int) -> None:
        if len(self._wall) > position:
            self._bytes_discarded += len(self._wall) - position
            del self._wall[position:]

    def _classify(self, frame: int, data: bytes) -> None:
        speech = is_speech(data)
        self._speech.append(speech)
        if not speech:
            self._close_turn_after_gap(frame)
            return
        self._last_speech_frame = frame
        if self._open_turn is None:
            self._open_turn = (frame, frame)
        else:
            self._open_turn = (self._open_turn[0], frame)

    def _close_turn_after_gap(self, frame: int) -> None:
        """Frame ``frame`` was not speech: end the open turn if the gap is now long enough."""
        if self._open_turn is not None and frame - self._open_turn[1] >= _TURN_GAP_FRAMES:
            self._close_turn(interrupted=False)

    def _close_turn(self, *, interrupted: bool) -> float:
        """End the open turn, if any; returns its heard_ms (0 if none was open)."""
        if self._open_turn is None:
            return 0.0
        first, last = self._open_turn
        heard_ms = float((last - first + 1) * FRAME_MS)
        self._turns.append(
            HeardTurn(start_ms=float(first * FRAME_MS), heard_ms=heard_ms, interrupted=interrupted)
        )
        self._open_turn = None
        return heard_ms


# --- URLs and TwiML ------------------------------------------------------------------


def _join(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/")


def _route(url: str, public_base: str, bridge_base: str) -> str:
    """Where a request for ``url`` really goes: URLs under the public base go to the bridge.

    The scheme is ignored when matching (a bridge may announce ``wss://`` for an
    ``http://`` public base), and kept in kind: WebSocket URLs stay ``ws(s)://``.
    """
    scheme, _, rest = url.partition("://")
    public_rest = public_base.partition("://")[2].rstrip("/")
    if not (rest == public_rest or rest.startswith((public_rest + "/", public_rest + "?"))):
        return url
    bridge_scheme, _, bridge_rest = bridge_base.rstrip("/").partition("://")
    if scheme in ("ws", "wss"):
        bridge_scheme = "wss" if bridge_scheme == "https" else "ws"
    return f"{bridge_scheme}://{bridge_rest}{rest[len(public_rest) :]}"


def _summarize(verbs: Sequence[ET.Element] | None) -> tuple[FinalAction, str, str]:
    """(final_action, final_say, final_dial) of TwiML verbs; None: no TwiML was obtained."""
    if verbs is None:
        return "none", "", ""
    tags = [verb.tag for verb in verbs]
    say = " ".join(
        " ".join((verb.text or "").split()) for verb in verbs if verb.tag == "Say"
    ).strip()
    dial = ""
    for verb in verbs:
        if verb.tag == "Dial":
            target = next(iter(verb), None)
            dial = ((target.text if target is not None else verb.text) or "").strip()
            break
    action: FinalAction
    if "Connect" in tags:
        action = "connect"
    elif "Dial" in tags:
        action = "dial"
    elif "Say" in tags:
        action = "say"
    elif "Hangup" in tags or all(tag in ("Pause", "Hangup") for tag in tags):
        action = "hangup"
    else:
        action = "none"
    return action, say, dial
