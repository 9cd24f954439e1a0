"""HTTP and WebSocket routes: Twilio's webhooks and media socket, health. Adapters only.

The routes check what arrives (signatures, tokens, sizes), ask the registry
whether a call may be admitted, and hand a media socket to ``bridge.call.Call``.
They hold no call logic of their own.

- ``POST /twilio/voice``: the voice webhook. Signed → admitted → ``<Connect><Stream>``
  with a single-use stream token; full or draining → the overflow TwiML (never a 5xx).
- ``WS /twilio/stream``: the media stream; one ``Call`` per socket. It is served by
  the front door on a lean WebSocket (``media_connection``; ``voicebridge.net.front``),
  not through hypercorn and quart.
- ``POST /twilio/after-stream``: the ``<Connect action>``: the call's outcome → TwiML.
- ``POST /twilio/stream-status``: the ``<Stream statusCallback>``: logged (a failed
  stream as a warning with Twilio's error code) and counted; answered 204.
- ``POST /vapi/webhook``, ``POST /control/calls``: call control (``control.routes``).
- ``GET /healthz`` (the process is alive), ``GET /readyz`` (it admits calls),
  ``GET /metrics`` (Prometheus text format, ``observability.metrics``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import assert_never

import trio
from attrs import define, field
from quart import Response, request
from quart_trio import QuartTrio

from voicebridge.bridge.call import (
    ASSISTANT_PARAMETER,
    CALLED_PARAMETER,
    CALLER_PARAMETER,
    TOKEN_PARAMETER,
    AssistantConnector,
    Call,
    CallSettings,
)
from voicebridge.bridge.outcome import CallRecord, Outcome
from voicebridge.bridge.registry import CallRegistry
from voicebridge.config import Config
from voicebridge.control.assistants import AssistantRefused, granted_assistant
from voicebridge.control.plane import ControlPlane, transfer_twiml
from voicebridge.control.routes import add_control_routes, log_rejected
from voicebridge.errors import SocketClosed
from voicebridge.net.transport import SocketTransport
from voicebridge.net.ws import UpgradeRefused, accept_upgrade, read_upgrade
from voicebridge.observability.logs import log_event
from voicebridge.observability.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from voicebridge.observability.metrics import BridgeMetrics
from voicebridge.twilio import twiml
from voicebridge.twilio.signature import SETTINGS_HEADER, SignatureError, WebhookVerifier
from voicebridge.twilio.stream_status import (
    StreamStatus,
    StreamStatusUnrecognized,
    parse_stream_status,
)
from voicebridge.twilio.token import StreamTokens
from voicebridge.vapi.endings import MAX_DURATION_REASON

log = logging.getLogger(__name__)

VOICE_PATH = "/twilio/voice"
STREAM_PATH = "/twilio/stream"
AFTER_STREAM_PATH = "/twilio/after-stream"
STREAM_STATUS_PATH = "/twilio/stream-status"
#: Twilio's webhook bodies are a few hundred bytes of form fields; 64 KiB is generous
#: and keeps a hostile client from making us buffer megabytes.
MAX_WEBHOOK_BYTES = 64 * 1024
TWIML = "text/xml"
#: Twilio media frames are ~350 bytes of JSON; nothing legitimate comes near 64 KiB.
MAX_MEDIA_MESSAGE_BYTES = 64 * 1024
#: Stream errors that follow from what the bridge does on purpose, logged at info (and
#: still counted): 31921 is "your server closed the WebSocket", which is how the bridge
#: ends every stream whose assistant ended, to hand the call to the ``<Connect action>``.
EXPECTED_STREAM_ERRORS = frozenset({"31921"})
#: How long the ``<Connect action>`` waits for a call that is still winding down (its
#: goodbye to Vapi: one round trip, ``vapi.end_deadline_s`` at worst); well inside
#: Twilio's 15 s webhook timeout.
AFTER_STREAM_WAIT_S = 5.0


@define
class Services:
    """What the routes need; built once by the server and swapped whole on reload."""

    config: Config
    registry: CallRegistry
    tokens: StreamTokens
    #: None when signature checks are off (local tests only).
    verifier: WebhookVerifier | None
    connector: AssistantConnector
    call_settings: CallSettings
    #: Vapi webhooks, tools, transfers, outbound calls; None: call control is off.
    control: ControlPlane | None = None
    #: Kept across reloads (pass the old one on), so counters never restart.
    metrics: BridgeMetrics = field(factory=BridgeMetrics)


def _twiml_response(body: str) -> Response:
    response = Response(body, status=200, mimetype=TWIML)
    # quart-trio never times out an idle keep-alive connection; Twilio opens a new
    # one per webhook anyway.
    response.headers["Connection"] = "close"
    return response


def _text_response(body: str, status: int) -> Response:
    response = Response(body + "\n", status=status, mimetype="text/plain")
    response.headers["Connection"] = "close"
    return response


def _parameter_value(name: str, value: str) -> str:
    """``value`` for a ``<Parameter>`` (informational: the caller's and called numbers),
    or "" when it would not fit Twilio's limit: a call is never refused for it."""
    return value if len(name) + len(value) < twiml.MAX_PARAMETER_CHARS else ""


def _path_and_query() -> str:
    query = request.query_string.decode("latin-1")
    return request.path + (f"?{query}" if query else "")


def create_app(get_services: Callable[[], Services]) -> QuartTrio:
    """The quart-trio app. ``get_services`` returns the current services (reloadable)."""
    app = QuartTrio(__name__)
    # Vapi's end-of-call reports can be larger than any Twilio webhook: the app-wide
    # limit is the larger one, and the Twilio routes check their own (signed_form).
    app.config["MAX_CONTENT_LENGTH"] = max(
        MAX_WEBHOOK_BYTES, get_services().config.control.max_body_bytes
    )

    async def signed_form() -> tuple[dict[str, str], Response | None]:
        """The webhook's form, or the 403 to answer when its signature is bad."""
        services = get_services()
        if (request.content_length or 0) > MAX_WEBHOOK_BYTES:
            return {}, _text_response("body too large", 413)
        form = await request.form
        params = list(form.items(multi=True))
        if services.verifier is None:
            return dict(params), None
        try:
            services.verifier.verify_form(
                path_and_query=_path_and_query(),
                params=params,
                signature=request.headers.get("X-Twilio-Signature"),
                settings=request.headers.get(SETTINGS_HEADER),
            )
        except SignatureError as exc:
            services.metrics.webhook_rejected(request.path)
            log_event(
                log,
                logging.WARNING,
                "webhook-rejected",
                f"{request.path}: Twilio signature {exc.reason}; answered 403",
                call_sid=form.get("CallSid"),
                path=request.path,
                reason=exc.reason,
                remote=request.remote_addr,
            )
            return {}, _text_response("forbidden", 403)
        return dict(params), None

    @app.post(VOICE_PATH)
    async def voice_webhook() -> Response:

        form, refusal = await signed_form()
        if refusal is not None:
            return refusal
        services = get_services()
        call_sid = form.get("CallSid", "")
        if not call_sid:
            return _text_response("CallSid missing", 400)
        try:
            token = services.tokens.issue(call_sid)
        except ValueError:  # Twilio's CallSids are CA + 32 hex digits
            return _text_response("CallSid malformed", 400)
        try:
            # An outbound call's own assistant, only as voicebridge granted it.
            assistant = granted_assistant(services.config, request.args, to=form.get("To", ""))
        except AssistantRefused as exc:
            services.metrics.webhook_rejected(request.path)
            log_rejected("assistant", str(exc), status=403, call_sid=call_sid)
            return _text_response("forbidden", 403)
        if not services.registry.try_admit(call_sid):
            draining = services.registry.draining
            reason = "draining" if draining else "at capacity"
            services.metrics.call_refused("draining" if draining else "at-capacity")
            log_event(
                log,
                logging.WARNING,
                "call-refused",
                f"call {call_sid} refused ({reason}); playing the overflow message",
                call_sid=call_sid,
                reason=reason,
                active_calls=services.registry.active_count,
            )
            return _twiml_response(twiml.caller_action(services.config.overflow))
        public_url = services.config.server.public_url
        stream_url = "ws" + public_url.removeprefix("http") + STREAM_PATH
        parameters = {
            TOKEN_PARAMETER: token,
            CALLER_PARAMETER: _parameter_value(CALLER_PARAMETER, form.get("From", "")),
            CALLED_PARAMETER: _parameter_value(CALLED_PARAMETER, form.get("To", "")),
        }
        if assistant:
            parameters[ASSISTANT_PARAMETER] = assistant
        body = twiml.connect_stream(
            stream_url=stream_url,
            action_url=public_url + AFTER_STREAM_PATH,
            parameters=parameters,
            status_callback=public_url + STREAM_STATUS_PATH,
        )
        return _twiml_response(body)

    @app.post(AFTER_STREAM_PATH)
    async def after_stream() -> Response:
        form, refusal = await signed_form()
        if refusal is not None:
            return refusal
        services = get_services()
        call_sid = form.get("CallSid", "")
        record = services.registry.record_for_action(call_sid)
        if record is None:
            # Twilio asks as soon as the stream is gone, while the call may still be
            # saying goodbye to Vapi (a round trip): its outcome is a moment away.
            with trio.move_on_after(AFTER_STREAM_WAIT_S):
                record = await services.registry.wait_record(call_sid)
        return _twiml_response(after_stream_twiml(services.config, call_sid, record))

    @app.post(STREAM_STATUS_PATH)
    async def stream_status() -> Response:
        form, refusal = await signed_form()
        if refusal is not None:
            return refusal
        log_stream_status(get_services().metrics, parse_stream_status(form))
        # Twilio wants a 2xx and reads nothing: no TwiML, no body.
        response = Response("", status=204)
        response.headers["Connection"] = "close"
        return response

    @app.get("/healthz")
    async def healthz() -> Response:
        return _text_response("ok", 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        services = get_services()
        registry = services.registry
        body = services.metrics.exposition(
            active_calls=registry.active_count, admitting=registry.admitting
        )
        return Response(body, status=200, content_type=METRICS_CONTENT_TYPE)

    @app.get("/readyz")
    async def readyz() -> Response:
        registry = get_services().registry
        if registry.admitting:
            return _text_response("ready", 200)
        reason = "draining" if registry.draining else "at capacity"
        return _text_response(f"not ready: {reason}", 503)

    add_control_routes(app, lambda: get_services().control)
    return app


async def media_connection(services: Services, transport: SocketTransport, head: bytes) -> None:
    """``WS /twilio/stream``: the front door's media handler. Accept, run one ``Call``.

    The socket is served on ``voicebridge.net.ws`` (the call's own task reads it),
    not through hypercorn: see ``voicebridge.net.front``. Owns ``transport``: closed on
    the way out whatever happens.
    """
    try:
        try:
            ws, upgrade = read_upgrade(head)
        except UpgradeRefused as exc:
            log_event(
                log,
                logging.WARNING,
                "stream-refused",
                f"{STREAM_PATH}: not a WebSocket upgrade ({exc.reason}); answered 400",
                path=STREAM_PATH,
                reason=exc.reason,
            )
            with contextlib.suppress(SocketClosed):
                transport.try_send(memoryview(exc.answer))
            return
        # Advisory only (Twilio's own libraries disagree on whether the upgrade is
        # signed); the stream token in `start` is the gate. The verdict goes on the
        # call-start line (UPGRADE_SIGNATURE=valid|missing|mismatch|unchecked).
        upgrade_signature = "unchecked"
        if services.verifier is not None:
            signature = next(
                (v for k, v in upgrade.extra_headers if k.lower() == b"x-twilio-signature"),
                None,
            )
            settings_name = SETTINGS_HEADER.lower().encode()
            settings = next(
                (v for k, v in upgrade.extra_headers if k.lower() == settings_name), None
            )
            try:
                services.verifier.verify_upgrade(
                    path=upgrade.target.split("?", 1)[0],
                    signature=signature.decode("latin-1") if signature is not None else None,
                    settings=settings.decode("latin-1") if settings is not None else None,
                )
                upgrade_signature = "valid"
            except SignatureError as exc:
                upgrade_signature = exc.reason
        try:
            socket = await accept_upgrade(
                transport, ws, max_message_bytes=MAX_MEDIA_MESSAGE_BYTES
            )
        except SocketClosed:
            return  # the client went away during the handshake
        call = Call(
            socket,
            settings=services.call_settings,
            connector=services.metrics.timed(services.connector),
            verify_token=lambda token, call_sid: services.tokens.verify(token, call_sid=call_sid),
            tracker=services.registry,
            upgrade_signature=upgrade_signature,
            control=services.control,
            observer=services.metrics,
        )
        await call.run()
    finally:
        with trio.CancelScope(shield=True):
            await transport.aclose()


def log_stream_status(
    metrics: BridgeMetrics, status: StreamStatus | StreamStatusUnrecognized
) -> None:
    """One line per ``<Stream statusCallback>``: the start and the stop at debug (the
    call's own ``call-start``/``call-end`` lines say as much), a failure as a warning with
    Twilio's code and words (counted by code; one the bridge causes on purpose,
    ``EXPECTED_STREAM_ERRORS``, at info), an event this version does not know at info.
    Twilio's text is peer text: the log outputs escape it."""
    if isinstance(status, StreamStatusUnrecognized):
        log_event(
            log,
            logging.INFO,
            "stream-status-unknown",
            f"call {status.call_sid}: unknown stream status event {status.event!r}; ignored",
            call_sid=status.call_sid,
            stream_event=status.event,
            rate_limited=True,
        )
        return
    match status.event:
        case "stream-started":
            log_event(
                log,
                logging.DEBUG,
                "stream-started",
                f"call {status.call_sid}: Twilio started media stream {status.stream_sid}",
                call_sid=status.call_sid,
                stream_sid=status.stream_sid,
            )
        case "stream-stopped":
            log_event(
                log,
                logging.DEBUG,
                "stream-stopped",
                f"call {status.call_sid}: Twilio stopped media stream {status.stream_sid}",
                call_sid=status.call_sid,
                stream_sid=status.stream_sid,
            )
        case "stream-error":
            metrics.stream_error(status.code)
            log_event(
                log,
                logging.INFO if status.code in EXPECTED_STREAM_ERRORS else logging.WARNING,
                "stream-error",
                f"call {status.call_sid}: Twilio reports media stream error {status.code}: "
                f"{status.error or '(no description)'}",
                call_sid=status.call_sid,
                stream_sid=status.stream_sid or None,
                error_code=status.code,
                error=status.error or None,
            )
        case _:
            assert_never(status.event)


def after_stream_twiml(config: Config, call_sid: str, record: CallRecord | None) -> str:
    """What Twilio does once the stream is over: hang up, ``<Dial>`` a transfer, the
    overflow message (Vapi's concurrency limit), the max-duration goodbye, or the fallback."""
    if record is None:
        # Not a call this process ran (or it ran so long ago we forgot it): most likely
        # the process restarted mid-call. The caller may still be there; don't leave
        # them in silence.
        log_event(
            log,
            logging.WARNING,
            "after-stream-unknown",
            f"after-stream for unknown call {call_sid}; playing the fallback",
            call_sid=call_sid,
        )
        return twiml.caller_action(config.fallback)
    if record.outcome is Outcome.TRANSFERRED and record.transfer_to:
        return transfer_twiml(record.transfer_to, caller_id=config.transfer.caller_id)
    if record.outcome is Outcome.ASSISTANT_OVER_LIMIT:
        return twiml.caller_action(config.overflow)  # the caller may call back
    if record.outcome is Outcome.ASSISTANT_ENDED and record.ended_reason == MAX_DURATION_REASON:
        return twiml.caller_action(config.max_duration)
    if record.outcome.caller_gets_fallback:
        return twiml.caller_action(config.fallback)
    return twiml.hangup()
