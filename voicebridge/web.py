"""HTTP and WebSocket routes: Twilio's webhooks and media socket; health. Adapters only.

The routes check what arrives (signatures, tokens, sizes), ask the registry
whether a call may be admitted, and hand a media socket to ``bridge.call.Call``.
They hold no call logic of their own.

- ``POST /twilio/voice``: the voice webhook. Signed → admitted → ``<Connect><Stream>``
  with a single-use stream token; full or draining → the overflow TwiML (never a 5xx).
  One admission per CallSid (``CallRegistry.admit``): a repeat before the stream begins
  gets the same answer, a replay after it a 403. Refused for load, a new call's overflow
  is answered by the front door itself (``early_overflow``), before hypercorn.
- ``WS /twilio/stream``: the media stream; one ``Call`` per socket. It is served by
  the front door on a lean WebSocket (``media_connection``; ``voicebridge.net.front``),
  not through hypercorn and quart.
- ``POST /twilio/after-stream``: the ``<Connect action>``: the call's outcome → TwiML.
- ``POST /twilio/stream-status``: the ``<Stream statusCallback>``: logged (a failed
  stream as a warning with Twilio's error code) and counted; answered 204.
- ``POST /vapi/webhook``, ``POST /control/calls``: call control (``control.routes``).

Only on the ops listener (``create_ops_app``; ``server.ops_listen``), never on the public
port: ``GET /healthz`` (the process is alive), ``GET /readyz`` (it admits calls),
``GET /metrics`` (Prometheus text format, ``observability.metrics``).
"""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from collections.abc import Callable, Sequence
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
from voicebridge.bridge.early import EarlyConnector
from voicebridge.bridge.outcome import CallRecord, Outcome
from voicebridge.bridge.registry import Answer, CallRegistry, Full, RefusalReason, Spent
from voicebridge.cluster import Acquired, BoxOnly, ClusterStore
from voicebridge.config import Config
from voicebridge.control.assistants import AssistantRefused, granted_assistant
from voicebridge.control.plane import ControlPlane, transfer_twiml
from voicebridge.control.routes import (
    TRUSTED_PROXIES_KEY,
    BodyTooLarge,
    add_control_routes,
    log_rejected,
    read_body,
    request_client,
)
from voicebridge.errors import SocketClosed
from voicebridge.net.front import EarlyRequest, EarlyResponse
from voicebridge.net.transport import SocketTransport, peer_address
from voicebridge.net.ws import UpgradeRefused, accept_upgrade, read_upgrade
from voicebridge.observability.logs import log_event
from voicebridge.observability.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from voicebridge.observability.metrics import BridgeMetrics
from voicebridge.observability.remote import client_address
from voicebridge.routing import (
    DEFAULT_ROUTE,
    OUTBOUND_ROUTE,
    ROUTE_PARAMETER,
    AssistantChoice,
    Decision,
    Router,
    choice_action,
    choice_twiml,
    decision_parameters,
    describe,
    encode_decision,
)
from voicebridge.routing_hook import RouteHook, decide
from voicebridge.twilio import twiml
from voicebridge.twilio.signature import SETTINGS_HEADER, SignatureError, WebhookVerifier
from voicebridge.twilio.stream_status import (
    StreamStatus,
    StreamStatusUnrecognized,
    parse_stream_status,
)
from voicebridge.twilio.token import StreamClaims, StreamTokens, is_call_sid
from voicebridge.vapi.endings import MAX_DURATION_REASON

log = logging.getLogger(__name__)

VOICE_PATH = "/twilio/voice"
STREAM_PATH = "/twilio/stream"
AFTER_STREAM_PATH = "/twilio/after-stream"
STREAM_STATUS_PATH = "/twilio/stream-status"
#: The ops listener's routes (``create_ops_app``); the public port answers them 404.
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
#: Twilio's webhook bodies are a few hundred bytes of form fields; 64 KiB is generous
#: and keeps a hostile client from making us buffer megabytes.
MAX_WEBHOOK_BYTES = 64 * 1024
TWIML = "text/xml"
#: As quart sends it for ``TWIML``.
TWIML_CONTENT_TYPE = TWIML + "; charset=utf-8"
#: The form encodings of Twilio's webhooks (the second is an old alias quart accepts).
FORM_MIMETYPES = ("application/x-www-form-urlencoded", "application/x-url-encoded")
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
#: Why new calls are refused, in the log and on /readyz.
_REFUSAL_TEXT: dict[RefusalReason, str] = {
    "at-capacity": "at capacity",
    "draining": "draining",
    "loop-behind": "event loop behind",
    "cluster-full": "the service is at cluster.max_calls",
    "store-down": "the cluster store does not answer",
}


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
    #: Which assistant answers (``[[routes]]``), and the decision hook (None: none).
    router: Router
    hook: RouteHook | None
    #: Vapi webhooks, tools, transfers, outbound calls; None: call control is off.
    control: ControlPlane | None = None
    #: Kept across reloads (pass the old one on), so counters never restart.
    metrics: BridgeMetrics = field(factory=BridgeMetrics)
    #: Creates the Vapi call as the webhook is answered (``[vapi] create_early``); None: off.
    early: EarlyConnector | None = None
    #: What this box shares with the other boxes of the service (``[cluster]``).
    cluster: ClusterStore = field(factory=BoxOnly)


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


def _ops_response(body: str, status: int) -> Response:
    """A plain-text answer on the ops listener; the connection is kept for the next probe."""
    return Response(body + "\n", status=status, mimetype="text/plain")


def _parameter_value(name: str, value: str) -> str:
    """``value`` for a ``<Parameter>`` (informational: the caller's and called numbers),
    or "" when it would not fit Twilio's limit, or would not come back from Twilio as
    it was sent (characters XML drops or normalizes): the token vouches for the value
    exactly, and a call is never refused for it."""
    if len(name) + len(value) >= twiml.MAX_PARAMETER_CHARS or not value.isprintable():
        return ""
    return value


def form_params(body: bytes) -> list[tuple[str, str]]:
    """A form-encoded body's fields in order, repeats kept (Twilio signs them all).
    Raises ``UnicodeDecodeError``: Twilio's forms are UTF-8."""
    return urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True)


def _path_and_query() -> str:
    query = request.query_string.decode("latin-1")
    return request.path + (f"?{query}" if query else "")


def create_app(get_services: Callable[[], Services]) -> QuartTrio:
    """The quart-trio app. ``get_services`` returns the current services (reloadable)."""
    app = QuartTrio(__name__)
    app.config[TRUSTED_PROXIES_KEY] = lambda: get_services().config.server.trusted_proxies
    # Each route reads its body with its own limit (read_body). quart's limit only
    # counts the bytes that arrived and are not yet read: a backstop on what piles up
    # for a route that answers without reading, as large as the largest route's limit
    # (Vapi's end-of-call reports carry transcripts).
    app.config["MAX_CONTENT_LENGTH"] = max(
        MAX_WEBHOOK_BYTES, get_services().config.control.max_body_bytes
    )

    async def signed_form() -> tuple[dict[str, str], Response | None]:
        """The webhook's form, or the answer to give instead: 413 for a body over
        ``MAX_WEBHOOK_BYTES`` (read no further, chunked or not), 400 for a form that is
        not UTF-8, 403 when its signature is bad."""
        services = get_services()
        try:
            body = await read_body(MAX_WEBHOOK_BYTES)
        except BodyTooLarge as exc:
            services.metrics.webhook_rejected(request.path)
            log_rejected("too-large", str(exc))
            return {}, _text_response("body too large", 413)
        try:
            params = form_params(body) if request.mimetype in FORM_MIMETYPES else []
        except UnicodeDecodeError:
            return {}, _text_response("form is not UTF-8", 400)
        form = dict(params)
        if services.verifier is None:
            return form, None
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
                remote=request_client(),
            )
            return {}, _text_response("forbidden", 403)
        return form, None

    @app.post(VOICE_PATH)
    async def voice_webhook() -> Response:

        form, refusal = await signed_form()
        if refusal is not None:
            return refusal
        services = get_services()
        call_sid = form.get("CallSid", "")
        if not call_sid:
            return _text_response("CallSid missing", 400)
        if not is_call_sid(call_sid):  # Twilio's CallSids are CA + 32 hex digits
            return _text_response("CallSid malformed", 400)
        try:
            # An outbound call's own assistant, only as voicebridge granted it.
            assistant = granted_assistant(services.config, request.args, to=form.get("To", ""))
        except AssistantRefused as exc:
            services.metrics.webhook_rejected(request.path)
            log_rejected("assistant", str(exc), status=403, call_sid=call_sid)
            return _text_response("forbidden", 403)
        decision = await route_inbound(services, form, call_sid, outbound=bool(assistant))
        choice = decision.choice if decision is not None else AssistantChoice()
        if not isinstance(choice, AssistantChoice):  # dialled or refused: no admission
            return _twiml_response(choice_twiml(choice))
        # Exactly what the <Stream> will carry, and so what its token vouches for.
        claims = StreamClaims(
            call_sid=call_sid,
            assistant=assistant or choice.assistant_id,
            caller=_parameter_value(CALLER_PARAMETER, form.get("From", "")),
            called=_parameter_value(CALLED_PARAMETER, form.get("To", "")),
            route=_route_claim(decision),
            decision=encode_decision(choice),
        )

        def answer() -> str:
            """The stream TwiML with a new token; asked for only for a new admission."""
            # This box's own URL: the stream and what follows it never go through a
            # balancer to another box (docs/operations.md, "Several boxes").
            public_url = services.config.server.own_url
            parameters = {
                TOKEN_PARAMETER: services.tokens.issue(claims),
                CALLER_PARAMETER: claims.caller,
                CALLED_PARAMETER: claims.called,
            }
            if claims.assistant:
                parameters[ASSISTANT_PARAMETER] = claims.assistant
            if claims.route:
                parameters[ROUTE_PARAMETER] = claims.route
            parameters.update(decision_parameters(claims.decision))
            return twiml.connect_stream(
                stream_url="ws" + public_url.removeprefix("http") + STREAM_PATH,
                action_url=public_url + AFTER_STREAM_PATH,
                parameters=parameters,
                status_callback=public_url + STREAM_STATUS_PATH,
            )

        registry = services.registry
        match await _cluster_refusal(services, call_sid) or registry.admit(call_sid, answer):
            case Answer(twiml=body, repeat=repeat):
                if not repeat and services.early is not None:
                    services.early.start_early(claims)
                if repeat:
                    log_event(
                        log,
                        logging.INFO,
                        "webhook-repeated",
                        f"call {call_sid}: voice webhook repeated before its stream began; "
                        "answered as before",
                        call_sid=call_sid,
                        remote=request_client(),
                    )
                return _twiml_response(body)
            case Full() as full:
                return _twiml_response(refuse_call(services, call_sid, full))
            case Spent(reason=spent):
                # Twilio asks again only for an answer it never got, and without that
                # answer it cannot have opened the stream: this is a replay.
                services.metrics.webhook_rejected(request.path)
                what = (
                    "has streamed already"
                    if spent == "streamed"
                    else "was admitted before and its stream never came in time"
                )
                log_rejected(
                    "replayed",
                    f"call {call_sid} {what} (one admission per call)",
                    status=403,
                    call_sid=call_sid,
                )
                return _text_response("forbidden", 403)
            case unreachable:
                assert_never(unreachable)

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
            deadline = trio.current_time() + AFTER_STREAM_WAIT_S
            with trio.move_on_at(deadline):
                record = await services.registry.wait_record(call_sid)
            if record is None:  # another box's call, when the action came through the balancer
                record = await services.cluster.load_record(
                    call_sid, max(0.0, deadline - trio.current_time())
                )
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

    add_control_routes(app, lambda: get_services().control)
    return app


async def _cluster_refusal(services: Services, call_sid: str) -> Full | None:
    """Why the service (not this box) refuses the new call ``call_sid``, or None.

    Asks the cluster store for a slot only when the box itself would admit a call; a
    repeat of the webhook finds its slot held. A slot taken for a call the registry then
    refuses (a replay) is given back by the store's next sync.
    """
    if services.registry.refusal() is not None:
        return None  # the registry refuses it, for the box's own reason
    match await services.cluster.acquire(call_sid):
        case Acquired.FULL:
            return Full("cluster-full")
        case Acquired.UNAVAILABLE if services.cluster.refuse_without_store:
            return Full("store-down")
        case _:
            return None


def create_ops_app(get_services: Callable[[], Services]) -> QuartTrio:
    """The ops listener's app: health, readiness and metrics, and nothing else.

    Served only on the ops listener (``voicebridge.net.ops``), never on the public port.
    ``get_services`` returns the current services (reloadable).
    """
    app = QuartTrio(__name__)
    # The routes take no body: quart keeps none of what a client sends past this.
    app.config["MAX_CONTENT_LENGTH"] = 0

    @app.get(HEALTH_PATH)
    async def healthz() -> Response:
        return _ops_response("ok", 200)

    @app.get(METRICS_PATH)
    async def metrics() -> Response:
        services = get_services()
        registry = services.registry
        body = services.metrics.exposition(
            active_calls=registry.active_count,
            admitting=registry.admitting,
            max_calls=registry.max_calls,
        )
        return Response(body, status=200, content_type=METRICS_CONTENT_TYPE)

    @app.get(READY_PATH)
    async def readyz() -> Response:
        registry = get_services().registry
        refusal = registry.refusal()
        if refusal is None:
            return _ops_response("ready", 200)
        return _ops_response(f"not ready: {_REFUSAL_TEXT[refusal.reason]}", 503)

    return app


async def media_connection(services: Services, transport: SocketTransport, head: bytes) -> None:
    """``WS /twilio/stream``: the front door's media handler. Accept, run one ``Call``.

    The socket is served on ``voicebridge.net.ws`` (the call's own task reads it),
    not through hypercorn: see ``voicebridge.net.front``. Owns ``transport``: closed on
    the way out whatever happens. Every refusal before ``start`` is logged with the
    peer's address (``REMOTE``): here for the upgrade, by the ``Call`` after it.
    """
    remote = peer_address(transport.sock)
    try:
        try:
            upgrade = read_upgrade(head)
        except UpgradeRefused as exc:
            log_event(
                log,
                logging.WARNING,
                "stream-refused",
                f"{STREAM_PATH}: not a WebSocket upgrade from {remote} ({exc.reason}); "
                "answered 400",
                path=STREAM_PATH,
                reason=exc.reason,
                remote=remote,
            )
            with contextlib.suppress(SocketClosed):
                transport.try_send(memoryview(exc.answer))
            return
        # Advisory only (Twilio's own libraries disagree on whether the upgrade is
        # signed); the stream token in `start` is the gate. The verdict goes on the
        # call-start line (UPGRADE_SIGNATURE=valid|missing|mismatch|unchecked).
        upgrade_signature = "unchecked"
        if services.verifier is not None:
            headers = upgrade.request.extra_headers
            signature = next((v for k, v in headers if k.lower() == b"x-twilio-signature"), None)
            settings_name = SETTINGS_HEADER.lower().encode()
            settings = next((v for k, v in headers if k.lower() == settings_name), None)
            try:
                services.verifier.verify_upgrade(
                    path=upgrade.request.target.split("?", 1)[0],
                    signature=signature.decode("latin-1") if signature is not None else None,
                    settings=settings.decode("latin-1") if settings is not None else None,
                )
                upgrade_signature = "valid"
            except SignatureError as exc:
                upgrade_signature = exc.reason
        remote = _stream_client(remote, upgrade.request.extra_headers, services.config)
        try:
            socket = await accept_upgrade(
                transport, upgrade, max_message_bytes=MAX_MEDIA_MESSAGE_BYTES
            )
        except SocketClosed:
            return  # the client went away during the handshake
        call = Call(
            socket,
            settings=services.call_settings,
            connector=services.metrics.timed(services.connector),
            verify_token=services.tokens.verify,
            tracker=services.registry,
            upgrade_signature=upgrade_signature,
            control=services.control,
            observer=services.metrics,
            remote=remote,
        )
        await call.run()
    finally:
        with trio.CancelScope(shield=True):
            await transport.aclose()


def _stream_client(peer: str, headers: Sequence[tuple[bytes, bytes]], config: Config) -> str:
    """The media stream's client for ``REMOTE=``: ``peer``, or whom a trusted proxy names."""
    trusted = config.server.trusted_proxies
    if not trusted:
        return peer

    def joined(name: bytes) -> str | None:
        values = [v.decode("latin-1") for k, v in headers if k.lower() == name]
        return ", ".join(values) or None

    return client_address(
        peer,
        trusted=trusted,
        forwarded_for=joined(b"x-forwarded-for"),
        forwarded=joined(b"forwarded"),
    )


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


async def route_inbound(
    services: Services, form: dict[str, str], call_sid: str, *, outbound: bool
) -> Decision | None:
    """The call's route (``routing``; the hook asked when its route allows and the box
    admits calls), logged and counted; None for an outbound call, which is not routed.
    A call routed away from the assistants is answered here, without an admission."""
    if outbound or form.get("Direction", "").startswith("outbound"):
        return None
    caller, called = form.get("From", ""), form.get("To", "")
    decision = await decide(
        services.router,
        services.hook,
        call_sid=call_sid,
        caller=caller,
        called=called,
        observer=services.metrics,
        ask=services.registry.admitting,
    )
    note_route(services, decision, call_sid, caller, called)
    return decision


def note_route(
    services: Services, decision: Decision, call_sid: str, caller: str, called: str
) -> None:
    """Count and log an inbound call's route (``route_inbound``)."""
    action = choice_action(decision.choice)
    services.metrics.call_routed(decision.route, action, decision.by)
    # A call the assistant takes has its call-start and call-end lines (with ROUTE=); for
    # one dialled or refused here, this is its line.
    log_event(
        log,
        logging.DEBUG if action == "assistant" else logging.INFO,
        "call-routed",
        f"call {call_sid} to {called or '?'} from {caller or '?'}: route {decision.route} "
        f"({decision.by}): {describe(decision.choice)}",
        call_sid=call_sid,
        route=decision.route,
        decided_by=decision.by,
        action=action,
        rate_limited=True,
    )


def refuse_call(services: Services, call_sid: str, full: Full) -> str:
    """Count and log the refusal of a new call; the overflow TwiML to answer it with.

    The one place a refused call is answered, whether the app or the front door
    (``early_overflow``) answers it.
    """
    reason, lag_s = full.reason, full.loop_lag_s
    services.metrics.call_refused(reason)
    log_event(
        log,
        logging.WARNING,
        "call-refused",
        f"call {call_sid} refused ({_REFUSAL_TEXT[reason]}"
        + (f": {lag_s * 1000:.0f} ms mean lag" if lag_s else "")
        + "); playing the overflow message",
        call_sid=call_sid,
        reason=reason,
        loop_lag_ms=round(lag_s * 1000, 1) if lag_s else None,
        active_calls=services.registry.active_count,
    )
    return twiml.caller_action(services.config.overflow)


class _NotRefused(Exception):
    """``early_overflow``'s admission would admit the call: the app takes it."""


def _not_refused() -> str:
    raise _NotRefused


def early_overflow(services: Services, request: EarlyRequest) -> EarlyResponse | None:
    """The front door's answer to a voice webhook that admission refuses for load, or
    None: the app serves the request (``net.front.EarlyAnswer``).

    While the box admits calls this costs one comparison. Otherwise the request is
    checked as the app checks it, in the same order and with the same functions, and
    answered here only when the app's answer would be the overflow TwiML for
    ``at-capacity`` or ``loop-behind``; anything else (a bad signature, a malformed
    form or CallSid, a refused grant, a route that dials or refuses, a repeat of an
    answered webhook, a replay, a draining server) is left to the app, which answers,
    counts and logs it. Nothing is counted or logged here unless this answers.
    """
    refusal = services.registry.refusal()
    if refusal is None or refusal.reason == "draining":
        return None
    if request.method != b"POST":
        return None
    path, _, query_bytes = request.target.partition(b"?")
    if path != VOICE_PATH.encode("ascii") or not query_bytes.isascii():
        return None  # raw non-ASCII in a query: whatever it means, the app says
    mimetype = (request.header(b"content-type") or "").partition(";")[0].strip().lower()
    if mimetype not in FORM_MIMETYPES:
        return None
    try:
        params = form_params(request.body)
    except UnicodeDecodeError:
        return None
    query = query_bytes.decode("latin-1")  # as ``_path_and_query`` has it
    form = dict(params)
    if services.verifier is not None:
        try:
            services.verifier.verify_form(
                path_and_query=VOICE_PATH + (f"?{query}" if query else ""),
                params=params,
                signature=request.header(b"x-twilio-signature"),
                settings=request.header(SETTINGS_HEADER.lower().encode("ascii")),
            )
        except SignatureError:
            return None
    call_sid = form.get("CallSid", "")
    if not is_call_sid(call_sid):
        return None
    args: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        args.setdefault(name, value)
    try:
        outbound = bool(granted_assistant(services.config, args, to=form.get("To", "")))
    except AssistantRefused:
        return None
    decision: Decision | None = None
    if not outbound and not form.get("Direction", "").startswith("outbound"):
        # What ``decide`` returns when the box does not admit calls: the route's own
        # choice, the hook not asked.
        decision = services.router.match(to=form.get("To", ""), caller=form.get("From", ""))
        if not isinstance(decision.choice, AssistantChoice):
            return None
    try:
        admission = services.registry.admit(call_sid, _not_refused)
    except _NotRefused:
        return None
    if not isinstance(admission, Full) or admission.reason == "draining":
        return None
    if decision is not None:
        note_route(services, decision, call_sid, form.get("From", ""), form.get("To", ""))
    body = refuse_call(services, call_sid, admission)
    return EarlyResponse(200, body.encode("utf-8"), TWIML_CONTENT_TYPE)


def _route_claim(decision: Decision | None) -> str:
    """The route a stream carries; the default one travels as "", so that its stream is
    what it was before routes existed."""
    if decision is None:
        return OUTBOUND_ROUTE
    return "" if decision.route == DEFAULT_ROUTE else decision.route
