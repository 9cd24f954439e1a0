"""HTTP and WebSocket routes: Twilio's webhooks and media socket, health. Adapters only.

The routes check what arrives (signatures, tokens, sizes), ask the registry
whether a call may be admitted, and hand a media socket to ``bridge.call.Call``.
They hold no call logic of their own.

- ``POST /twilio/voice``: the voice webhook. Signed → admitted → ``<Connect><Stream>``
  with a single-use stream token; full or draining → the overflow TwiML (never a 5xx).
- ``WS /twilio/stream``: the media stream; one ``Call`` per socket. It is served on
  ASGI directly (``asgi_app``), not through quart: see ``AsgiSocket``.
- ``POST /twilio/after-stream``: the ``<Connect action>``: the call's outcome → TwiML.
- ``POST /vapi/webhook``, ``POST /control/calls``: call control (``control.routes``).
- ``GET /healthz`` (the process is alive), ``GET /readyz`` (it admits calls),
  ``GET /metrics`` (Prometheus text format, ``observability.metrics``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import trio
from attrs import define, field
from hypercorn.typing import ASGIFramework as AsgiApp
from hypercorn.typing import ASGIReceiveCallable as Receive
from hypercorn.typing import ASGISendCallable as Send
from hypercorn.typing import Scope, WebsocketScope, WebsocketSendEvent
from hypercorn.utils import UnexpectedMessageError
from quart import Response, request
from quart_trio import QuartTrio

from voicebridge.bridge.call import (
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
from voicebridge.control.plane import ControlPlane, transfer_twiml
from voicebridge.control.routes import add_control_routes
from voicebridge.errors import SocketClosed
from voicebridge.observability.logs import log_event
from voicebridge.observability.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from voicebridge.observability.metrics import BridgeMetrics
from voicebridge.sockets import WRITE_DEADLINE_S, SocketWriteTimeout, close_scope
from voicebridge.twilio import twiml
from voicebridge.twilio.signature import SignatureError, WebhookVerifier
from voicebridge.twilio.token import StreamTokens

log = logging.getLogger(__name__)

VOICE_PATH = "/twilio/voice"
STREAM_PATH = "/twilio/stream"
AFTER_STREAM_PATH = "/twilio/after-stream"
#: Twilio's webhook bodies are a few hundred bytes of form fields; 64 KiB is generous
#: and keeps a hostile client from making us buffer megabytes.
MAX_WEBHOOK_BYTES = 64 * 1024
TWIML = "text/xml"
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


class AsgiSocket:
    """``MessageSocket`` over an ASGI WebSocket (hypercorn's), with no framework between.

    The media socket carries every caller frame (50 a second per call) and all the
    assistant's audio, so what each message costs is what a call costs. Through
    quart-trio each inbound message took one more task hop (its reader task and
    queue) and framework code each way; profiles of ``voicebridge loadtest`` put it
    at about a tenth of the bridge's CPU (docs/performance.md). The webhooks, which
    come once per call, stay on quart.

    A peer that disconnects arrives as ``websocket.disconnect``: ``receive`` raises
    ``SocketClosed`` with its close code.
    """

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._closed = False
        self._peer_closed: int | None = None

    async def receive(self) -> str | bytes:
        if self._peer_closed is not None:
            raise SocketClosed(self._peer_closed, "closed by the peer")
        message = await self._receive()
        if message["type"] == "websocket.receive":
            text = message.get("text")
            if text is not None:
                return text
            return message.get("bytes") or b""
        # websocket.disconnect: the peer closed (or the connection broke, 1006).
        code = message.get("code") if message["type"] == "websocket.disconnect" else None
        self._peer_closed = code if isinstance(code, int) else 1005
        raise SocketClosed(self._peer_closed, "closed by the peer")

    async def send(self, message: str | bytes) -> None:
        if self._closed:
            raise SocketClosed(None, "closed by us")
        if isinstance(message, str):
            event: WebsocketSendEvent = {"type": "websocket.send", "text": message, "bytes": None}
        else:
            event = {"type": "websocket.send", "text": None, "bytes": message}
        with trio.CancelScope(shield=True):
            with trio.move_on_after(WRITE_DEADLINE_S) as write_scope:
                try:
                    await self._send(event)
                except UnexpectedMessageError:
                    # hypercorn's verdict on a send after the close handshake began.
                    raise SocketClosed(self._peer_closed, "closed") from None
        if write_scope.cancelled_caught:
            raise SocketWriteTimeout(None, "write deadline passed")

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        # hypercorn refuses a close of a socket already closed: nothing to say then.
        with close_scope(), contextlib.suppress(UnexpectedMessageError):
            await self._send({"type": "websocket.close", "code": code, "reason": reason})


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
        from voicebridge.bridge.call import ASSISTANT_PARAMETER
        from voicebridge.control.assistants import AssistantRefused, granted_assistant
        from voicebridge.control.routes import log_rejected

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


def asgi_app(get_services: Callable[[], Services]) -> AsgiApp:
    """The application to serve: the media socket on bare ASGI, the rest through quart."""
    app = create_app(get_services)

    async def serve_asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == STREAM_PATH:
            await _media_stream(get_services(), scope, receive, send)
        else:
            await app(scope, receive, send)

    return serve_asgi


async def _media_stream(
    services: Services, scope: WebsocketScope, receive: Receive, send: Send
) -> None:
    """``WS /twilio/stream``: accept the socket and run one ``Call`` on it."""
    if (await receive())["type"] != "websocket.connect":
        return  # the client went away during the handshake
    # Advisory only (Twilio's own libraries disagree on whether the upgrade is
    # signed); the stream token in `start` is the gate. The verdict goes on the
    # call-start line (UPGRADE_SIGNATURE=valid|missing|mismatch|unchecked).
    upgrade_signature = "unchecked"
    if services.verifier is not None:
        headers = {name.decode("latin-1"): value for name, value in scope["headers"]}
        signature = headers.get("x-twilio-signature")
        try:
            services.verifier.verify_upgrade(
                path=scope["path"],
                signature=signature.decode("latin-1") if signature is not None else None,
            )
            upgrade_signature = "valid"
        except SignatureError as exc:
            upgrade_signature = exc.reason
    await send({"type": "websocket.accept", "subprotocol": None, "headers": ()})
    call = Call(
        AsgiSocket(receive, send),
        settings=services.call_settings,
        connector=services.metrics.timed(services.connector),
        verify_token=lambda token, call_sid: services.tokens.verify(token, call_sid=call_sid),
        tracker=services.registry,
        upgrade_signature=upgrade_signature,
        control=services.control,
        observer=services.metrics,
    )
    await call.run()


def after_stream_twiml(config: Config, call_sid: str, record: CallRecord | None) -> str:
    """What Twilio does once the stream is over: hang up, or the fallback."""
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
    if record.outcome.caller_gets_fallback:
        return twiml.caller_action(config.fallback)
    return twiml.hangup()
