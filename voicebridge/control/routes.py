"""HTTP endpoints of call control: Vapi's webhook and the outbound-call API. Adapters only.

- ``POST /vapi/webhook``: Vapi's server messages. Not authentic (``control.auth``) →
  401 and one log line, decided from the headers before any of the body is read in
  the ``secret`` and ``bearer`` modes (and for a missing or stale signature in
  ``hmac`` mode); over ``control.max_body_bytes`` → 413; a bad HMAC of the raw body
  bytes → 401; not JSON or not the envelope → 400; anything else → 200 with the
  answer (tool results, transfer destination, or ``{}``). Unknown types → 200 ``{}``.
- ``POST /control/calls``: ``{"to": "+1…"}`` (and optionally ``"assistant"``, one of
  ``outbound.assistants``) with ``Authorization: Bearer <control api token>`` places
  an outbound call → 201 ``{"callSid": …}``; 401 (before the body is read) without
  the token; 400 for a bad number or assistant.

Both answer 404 unless enabled in the configuration. Every body is read with
``read_body``: as it arrives, and never past its route's limit, whether it came with a
``Content-Length`` or chunked. Every answer closes the connection, so a body left
unread is never read.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson
from quart import Response, current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import RequestEntityTooLarge

from voicebridge.config import Config
from voicebridge.control import messages as msg
from voicebridge.control.assistants import AssistantRefused, is_e164, outbound_assistant
from voicebridge.control.auth import WebhookAuthError
from voicebridge.control.plane import ControlError, ControlPlane
from voicebridge.errors import VoicebridgeError
from voicebridge.observability.logs import log_event
from voicebridge.observability.remote import client_address
from voicebridge.twilio.rest import TwilioRestError

log = logging.getLogger(__name__)

WEBHOOK_PATH: Final = "/vapi/webhook"
CALLS_PATH: Final = "/control/calls"
#: An outbound-call request is one small JSON object.
MAX_CALL_REQUEST_BYTES: Final = 4096
JSON: Final = "application/json"


def vapi_server_override(config: Config) -> dict[str, Any] | None:
    """``assistantOverrides.server`` for calls we create: our webhook URL and its credential.

    None when call control is off or ``set_server_url`` is false. With a
    ``credential_id`` Vapi authenticates with that credential (required for HMAC: Vapi
    holds the key); otherwise the secret travels in ``server.headers``, the way Vapi
    sends it back (``X-Vapi-Secret``, or the bearer header with its prefix).
    """
    control = config.control
    if not control.enabled or not control.set_server_url or not config.server.own_url:
        return None
    server: dict[str, Any] = {"url": config.server.own_url + WEBHOOK_PATH}
    secret = config.credentials.vapi_webhook_secret.reveal()
    if control.credential_id:
        server["credentialId"] = control.credential_id
    elif control.auth == "secret":
        server["headers"] = {"X-Vapi-Secret": secret}
    elif control.auth == "bearer":
        server["headers"] = {control.bearer_header: control.bearer_prefix + secret}
    return server


class BodyTooLarge(VoicebridgeError):
    """The request's body is over its route's limit (answer 413). Safe to log."""


async def read_body(limit: int) -> bytes:
    """The current request's body, read as it arrives, never more than ``limit`` bytes.

    Raises ``BodyTooLarge`` at once when the declared ``Content-Length`` is over
    ``limit``, else as soon as the bytes received pass it (a chunked body declares no
    length): the rest is never read, and the 413's ``Connection: close`` drops it.
    quart's own ``MAX_CONTENT_LENGTH`` is no such limit here: it counts only the bytes
    not yet consumed, so a body read piece by piece (as its form parser does) passes
    it however long it is. Cancellation drops what was read so far.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"body of {declared} bytes is over {limit}")
    received = bytearray()
    try:
        async for chunk in request.body:
            received += chunk
            if len(received) > limit:
                raise BodyTooLarge(f"body over {limit} bytes (stopped reading)")
    except RequestEntityTooLarge:  # the app-wide backstop (create_app) tripped first
        raise BodyTooLarge(f"body over {limit} bytes (stopped reading)") from None
    return bytes(received)


def _json_response(body: bytes | Mapping[str, Any], status: int = 200) -> Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    response = Response(data, status=status, mimetype=JSON)
    response.headers["Connection"] = "close"
    return response


def _error(status: int, message: str) -> Response:
    return _json_response({"error": message}, status)


def add_control_routes(app: QuartTrio, get_control: Callable[[], ControlPlane | None]) -> None:
    """Register the call-control endpoints on ``app``; ``get_control`` gives the current plane."""

    def spawn(work: Callable[[], Any]) -> None:
        app.add_background_task(work)

    @app.post(WEBHOOK_PATH)
    async def vapi_webhook() -> Response:
        plane = get_control()
        if plane is None or plane.authenticator is None:
            return _error(404, "not found")
        authenticator = plane.authenticator
        config = plane.config
        headers = {name.lower(): value for name, value in request.headers.items()}
        now = time.time()
        try:
            # Before the body: a request without the credential costs its head only.
            authenticator.verify_headers(headers=headers, now=now)
        except WebhookAuthError as exc:
            log_rejected(exc.reason, str(exc))
            _count_rejected(plane)
            return _error(401, "unauthorized")
        try:
            body = await read_body(config.control.max_body_bytes)
        except BodyTooLarge as exc:
            log_rejected("too-large", str(exc))
            return _error(413, "body too large")
        if authenticator.needs_body:
            query = request.query_string.decode("latin-1")
            url = config.server.own_url + request.path + (f"?{query}" if query else "")
            try:
                authenticator.verify(
                    headers=headers, body=body, method=request.method, url=url, now=now
                )
            except WebhookAuthError as exc:
                log_rejected(exc.reason, str(exc))
                _count_rejected(plane)
                return _error(401, "unauthorized")
        try:
            message = msg.parse_webhook(body)
        except msg.MalformedWebhook as exc:
            log.info("Vapi webhook refused (400): %s", exc)
            return _error(400, "not a Vapi server message")
        return _json_response(await plane.handle(message, spawn))

    @app.post(CALLS_PATH)
    async def place_call() -> Response:
        plane = get_control()
        if plane is None or not plane.config.outbound.http_enabled:
            return _error(404, "not found")
        token = plane.config.credentials.control_api_token.reveal()
        given = request.headers.get("Authorization", "")
        if not token or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            log_rejected("mismatch", "outbound call request without the control API token")
            _count_rejected(plane)
            return _error(401, "unauthorized")
        try:
            document = orjson.loads(await read_body(MAX_CALL_REQUEST_BYTES))
        except BodyTooLarge as exc:
            log_rejected("too-large", str(exc))
            return _error(413, "body too large")
        except orjson.JSONDecodeError:
            return _error(400, 'expected JSON {"to": "+15551234567"}')
        if not isinstance(document, dict):
            return _error(400, 'expected JSON {"to": "+15551234567"}')
        to = document.get("to")
        if not isinstance(to, str) or not is_e164(to):
            return _error(400, "'to' must be an E.164 number")
        assistant = document.get("assistant", "")
        if not isinstance(assistant, str):
            return _error(400, "'assistant' must be a string")
        try:
            outbound_assistant(plane.config, assistant)
        except AssistantRefused as exc:
            log.warning("outbound call to %s refused: %s", to, exc)
            return _error(400, str(exc))
        try:
            call_sid = await plane.place_call(to, assistant=assistant)
        except (ControlError, AssistantRefused) as exc:
            return _error(503, str(exc))
        except TwilioRestError as exc:
            log.warning("outbound call to %s failed: %s", to, exc)
            return _error(502, "Twilio refused the call")
        return _json_response({"callSid": call_sid}, 201)


#: The app's ``config`` key of a function returning ``server.trusted_proxies`` as it is
#: now (``web.create_app`` sets it; a reload changes what it returns).
TRUSTED_PROXIES_KEY = "VOICEBRIDGE_TRUSTED_PROXIES"


def request_client() -> str:
    """The client of the request being answered, for ``REMOTE=``: the peer, or the client
    a trusted proxy names (``observability.remote``)."""
    trusted = current_app.config.get(TRUSTED_PROXIES_KEY)
    return client_address(
        request.remote_addr or "?",
        trusted=trusted() if trusted is not None else (),
        forwarded_for=", ".join(request.headers.getlist("X-Forwarded-For")) or None,
        forwarded=", ".join(request.headers.getlist("Forwarded")) or None,
    )


def _count_rejected(plane: ControlPlane) -> None:
    """Count the request being answered 401 (``voicebridge_webhook_auth_failures_total``)."""
    if plane.observer is not None:
        plane.observer.webhook_rejected(request.path)


def log_rejected(
    reason: str, detail: str, *, status: int | None = None, call_sid: str | None = None
) -> None:
    """The one ``EVENT=webhook-rejected`` warning about the request being answered
    ``status`` (by default 413 for ``too-large``, else 401)."""
    if status is None:
        status = 413 if reason == "too-large" else 401
    log_event(
        log,
        logging.WARNING,
        "webhook-rejected",
        f"{request.path}: {detail}; answered {status}",
        call_sid=call_sid,
        path=request.path,
        reason=reason,
        remote=request_client(),
    )
