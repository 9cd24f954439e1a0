"""The Vapi leg's I/O: create a call with the WebSocket transport, open its socket, end it.

``create_call`` POSTs ``/call`` with httpx; ``open_transport`` opens the call's
transport socket (its own TCP/TLS connection and wsproto upgrade) and hands it out
as a ``net.ws.WsConnection``, read by the call's own task; ``end_call`` says
goodbye on it; ``post_control`` sends the socket's messages through Live Call Control
instead (how a call whose socket never opened is ended). Every failure to start the
leg is one ``VapiError`` whose ``kind`` the call's outcome can be built from; its
message is safe to log: it never holds the API key or the socket and control URLs
(bearer secrets).
"""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final, Literal, TypeAlias

import h11
import httpx
import orjson
import trio
import wsproto.utilities
from attrs import field, frozen
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request

from voicebridge.config import VapiConfig
from voicebridge.errors import ConfigError, SocketClosed, VoicebridgeError
from voicebridge.net.transport import (
    SocketTransport,
    TlsHandshakeError,
    TlsSocketTransport,
    Transport,
)
from voicebridge.net.ws import HEAD_END, WsConnection
from voicebridge.routing import create_overrides
from voicebridge.sockets import MessageSocket
from voicebridge.vapi import transport

VapiErrorKind: TypeAlias = Literal[
    "auth", "rejected", "limit", "server", "timeout", "refused", "dropped", "protocol"
]

#: How Vapi's 400 for the account's concurrency limit reads ("Over Concurrency Limit.",
#: "Concurrency limit reached"); any other 400 is a plain rejection.
_CONCURRENCY = re.compile(r"concurrency", re.IGNORECASE)

#: The webhooks call control needs, asked for explicitly: an assistant configured in
#: Vapi's dashboard may have trimmed its ``serverMessages``, and ``phone-call-control``
#: is not in Vapi's default set at all.
REQUIRED_SERVER_MESSAGES: Final[tuple[str, ...]] = (
    "tool-calls",
    "transfer-destination-request",
    "phone-call-control",
    "status-update",
    "end-of-call-report",
)

#: Vapi rejects a call ``name`` longer than this.
MAX_CALL_NAME_CHARS: Final = 40
#: Prefix of the call's ``name`` in Vapi's dashboard. Short, so the whole 34-character
#: CallSid fits in ``MAX_CALL_NAME_CHARS`` ("voicebridge " would cut 6 off it).
CALL_NAME_PREFIX: Final = "vb "
#: How much of Vapi's error text goes into a ``VapiError`` message: enough for
#: "Concurrency limit reached" or a validation error, short enough for one log line.
MAX_ERROR_DETAIL_CHARS: Final = 200
#: ``open_transport``'s default bound on closing the socket on exit: the close frame
#: and the peer's answer take one round trip; 2 s is ``VapiConfig.end_deadline_s``'s default.
CLOSE_DEADLINE_S: Final = 2.0


class VapiError(VoicebridgeError):
    """Starting (or talking to) the Vapi leg failed; ``kind`` says how.

    - ``auth``: Vapi refused our API key (HTTP 401/403), or the key is unusable;
    - ``rejected``: Vapi refused the request (other 4xx: validation, credits);
    - ``limit``: Vapi refused the call for the account's concurrency limit (a 400
      saying so, or a 201 whose ``subscriptionLimits.concurrencyBlocked`` is true);
    - ``server``: Vapi failed (5xx);
    - ``timeout``: no complete answer within the deadline;
    - ``refused``: no connection (refused, DNS, unreachable, bad URL scheme);
    - ``dropped``: the connection broke before the answer was complete;
    - ``protocol``: an answer we cannot use (not JSON, fields missing, not a WebSocket).

    ``status_code`` is the HTTP status when there was one. ``str(error)`` is one
    readable line without the API key or the socket URL.
    """

    def __init__(
        self, kind: VapiErrorKind, message: str, *, status_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.kind: VapiErrorKind = kind
        self.status_code = status_code


@frozen(kw_only=True)
class VapiCall:
    """A created Vapi call: its id and where to reach it."""

    id: str
    #: ``transport.websocketCallUrl``: a bearer secret, never logged.
    websocket_url: str = field(repr=False)
    #: ``monitor.controlUrl`` (Live Call Control), when Vapi sent one; also a secret.
    control_url: str | None = field(repr=False, default=None)


# --- Creating the call ----------------------------------------------------------------


def call_name(call_sid: str) -> str:
    """The call's ``name`` in Vapi: the prefix and the CallSid, at most 40 characters."""
    return f"{CALL_NAME_PREFIX}{call_sid}"[:MAX_CALL_NAME_CHARS]


def build_create_body(
    config: VapiConfig,
    *,
    call_sid: str,
    caller: str,
    called: str,
    server: Mapping[str, Any] | None = None,
    assistant: str = "",
    decision: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /call`` for one Twilio call (PROTOCOLS.md section 2).

    The assistant is ``assistant`` (an outbound call's own, already checked against
    ``outbound.assistants``), else ``config.assistant_id``, else the inline
    ``config.assistant``; none of them is a ``ConfigError``. The CallSid and numbers go in both
    ``assistantOverrides.metadata`` (for our logs and webhooks) and ``variableValues``
    (for the assistant's prompt templates): the schema has no top-level metadata.
    ``server`` (our webhook URL and its credential, ``control.routes``) becomes
    ``assistantOverrides.server``, so that Vapi's webhooks for the call come to us.
    ``decision`` is the call's route's (``routing``): its inline ``assistant`` stands in
    for the configured one, and its ``assistantOverrides`` go first, under the bridge's
    own (``routing.create_overrides``).
    """
    decision = decision or {}
    body: dict[str, Any] = {"name": call_name(call_sid)}
    if assistant:
        body["assistantId"] = assistant
    elif decision.get("assistant"):
        body["assistant"] = decision["assistant"]
    elif config.assistant_id:
        body["assistantId"] = config.assistant_id
    elif config.assistant:
        body["assistant"] = config.assistant
    else:
        raise ConfigError("vapi.assistant_id", "set assistant_id or an inline assistant")
    correlation = {"twilioCallSid": call_sid, "caller": caller, "called": called}
    body["assistantOverrides"] = {
        **create_overrides(decision, correlation),
        "clientMessages": list(transport.REQUIRED_CLIENT_MESSAGES),
        # Sent so that the bridge knows them instead of assuming (its silence deadline
        # is derived from the silence timeout; Vapi's schema has no default for it).
        "maxDurationSeconds": config.max_duration_s,
        "silenceTimeoutSeconds": config.silence_timeout_s,
    }
    if server:
        body["assistantOverrides"]["server"] = dict(server)
        body["assistantOverrides"]["serverMessages"] = list(REQUIRED_SERVER_MESSAGES)
    body["transport"] = {
        "provider": "vapi.websocket",
        "audioFormat": {
            "format": config.audio_format,
            "container": "raw",
            "sampleRate": config.sample_rate,
        },
    }
    return body


async def create_call(
    http: httpx.AsyncClient,
    config: VapiConfig,
    api_key: str,
    *,
    call_sid: str,
    caller: str,
    called: str,
    server: Mapping[str, Any] | None = None,
    assistant: str = "",
    decision: Mapping[str, Any] | None = None,
) -> VapiCall:
    """Create the Vapi call for a Twilio call: ``POST {base_url}/call``; its ``VapiCall``.

    The whole exchange (connect, request, complete response) is bounded by
    ``config.create_deadline_s`` with a trio deadline, whatever ``http``'s own timeouts.
    Every failure raises ``VapiError`` (see its kinds); a bad config raises
    ``ConfigError``. On cancellation the request is abandoned (httpx closes its
    connection) and ``trio.Cancelled`` propagates; Vapi may then have created a call
    that nobody connects to, which Vapi ends by itself for lack of audio.
    ``assistant`` is the call's own assistant id, as in ``build_create_body``.
    """
    body = orjson.dumps(
        build_create_body(
            config,
            call_sid=call_sid,
            caller=caller,
            called=called,
            server=server,
            assistant=assistant,
            decision=decision,
        )
    )
    headers = {
        "Authorization": f"Bearer {_checked_api_key(api_key)}",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    url = f"{config.base_url.rstrip('/')}/call"
    response = await _post(
        http,
        url,
        body,
        headers,
        deadline_s=config.create_deadline_s,
        secrets=(api_key,),
        error=_create_error,
    )
    return _call_from_response(response, api_key)


async def _post(
    http: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    deadline_s: float,
    secrets: tuple[str, ...],
    error: Callable[[VapiErrorKind, str], VapiError],
) -> httpx.Response:
    """POST ``body`` to ``url``; the complete answer, whatever its status.

    Bounded by ``deadline_s`` with a trio deadline, whatever ``http``'s own timeouts.
    No answer raises ``error(kind, detail)``: ``timeout``, ``refused`` (no connection,
    or a URL httpx cannot use), ``protocol`` (a request httpx cannot send) or
    ``dropped`` (the connection broke); ``secrets`` are blanked in the detail. On
    cancellation the request is abandoned (httpx closes its connection).
    """
    response: httpx.Response | None = None
    with trio.move_on_after(deadline_s):
        try:
            response = await http.post(url, content=body, headers=headers)
        except httpx.TimeoutException as exc:  # the client's own timeouts, if shorter
            raise error("timeout", _describe(exc, *secrets)) from None
        except (httpx.ConnectError, httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise error("refused", _describe(exc, *secrets)) from None
        except httpx.LocalProtocolError as exc:
            raise error("protocol", _describe(exc, *secrets)) from None
        except httpx.TransportError as exc:
            # ReadError, WriteError, RemoteProtocolError ("Server disconnected …",
            # incomplete body), CloseError, ProxyError: the connection broke.
            raise error("dropped", _describe(exc, *secrets)) from None
    if response is None:
        raise error("timeout", f"no complete answer within {deadline_s:g} s")
    return response


def _status_kind(status: int) -> VapiErrorKind:
    """The ``VapiError`` kind of an HTTP status that is not a success."""
    if status in (401, 403):
        return "auth"
    if 400 <= status < 500:
        return "rejected"  # 400 validation, 402 credits, 404 no such call, 429 rate …
    if 500 <= status < 600:
        return "server"
    return "protocol"  # 1xx/3xx (or a 200 to an upgrade): nothing Vapi documents


def _call_from_response(response: httpx.Response, api_key: str) -> VapiCall:
    status = response.status_code
    if status not in (200, 201):
        detail = f"HTTP {status}"
        vapi_message = _vapi_error_message(response.content, api_key)
        if vapi_message:
            detail = f"{detail}: {vapi_message}"
        kind: VapiErrorKind = _status_kind(status)
        if status == 400 and _CONCURRENCY.search(vapi_message):
            kind = "limit"
        raise _create_error(kind, detail, status_code=status)
    # From here on never quote the body: it holds the socket URL.
    try:
        document = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise _create_error("protocol", f"HTTP {status} body is not JSON", status) from None
    if not isinstance(document, dict):
        raise _create_error("protocol", f"HTTP {status} body is not a JSON object", status)
    call_id = document.get("id")
    limits = document.get("subscriptionLimits")
    if isinstance(limits, dict) and limits.get("concurrencyBlocked") is True:
        # A call created but blocked (Vapi ends it at once), or the batch answer's form
        # (results, errors, subscriptionLimits; no top-level id): blocked either way.
        which = f"call {call_id}" if isinstance(call_id, str) and call_id else "the call"
        raise _create_error(
            "limit", f"HTTP {status}: {which} blocked by the concurrency limit", status
        )
    if not isinstance(call_id, str) or not call_id:
        raise _create_error("protocol", f"HTTP {status} body has no 'id'", status)
    call_transport = document.get("transport")
    websocket_url = (
        call_transport.get("websocketCallUrl") if isinstance(call_transport, dict) else None
    )
    if not isinstance(websocket_url, str) or not websocket_url:
        raise _create_error(
            "protocol", f"HTTP {status} body has no 'transport.websocketCallUrl'", status
        )
    parts = urllib.parse.urlsplit(websocket_url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise _create_error(
            "protocol", f"HTTP {status}: 'transport.websocketCallUrl' is not a ws(s) URL", status
        )
    monitor = document.get("monitor")
    control_url = monitor.get("controlUrl") if isinstance(monitor, dict) else None
    return VapiCall(
        id=call_id,
        websocket_url=websocket_url,
        control_url=control_url if isinstance(control_url, str) and control_url else None,
    )


def _vapi_error_message(content: bytes, api_key: str) -> str:
    """Vapi's ``message`` (a string, or a list of validation errors) from an error body."""
    try:
        document = orjson.loads(content)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(document, dict):
        return ""
    message = document.get("message")
    if isinstance(message, list):
        message = "; ".join(item for item in message if isinstance(item, str))
    if not isinstance(message, str) or not message:
        message = document.get("error")
    return _clean(message, api_key) if isinstance(message, str) else ""


def _create_error(kind: VapiErrorKind, detail: str, status_code: int | None = None) -> VapiError:
    return VapiError(kind, f"Vapi create-call failed ({kind}): {detail}", status_code=status_code)


def _checked_api_key(api_key: str) -> str:
    """``api_key``, if it can go in a header; a ``VapiError`` (auth) saying why not otherwise."""
    if not api_key:
        raise VapiError("auth", "Vapi API key is empty")
    if not api_key.isascii() or not api_key.isprintable() or any(c.isspace() for c in api_key):
        raise VapiError(
            "auth",
            "Vapi API key holds whitespace or non-printable characters"
            " (a trailing newline in the credential file?)",
        )
    return api_key


# --- The transport socket ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_transport(
    call: VapiCall,
    api_key: str,
    *,
    connect_deadline_s: float,
    close_deadline_s: float = CLOSE_DEADLINE_S,
) -> AsyncIterator[WsConnection]:
    """Open ``call``'s transport socket; ``async with`` it to use it as a ``WsConnection``.

    The API key goes in ``Authorization`` on the upgrade. ``wss://`` URLs use the
    default TLS context, ``ws://`` (the local simulator) plain TCP.

    Connecting (DNS, TCP, TLS, upgrade) is bounded by ``connect_deadline_s``; failing
    raises ``VapiError``: ``refused`` (no TCP connection), ``auth`` (upgrade answered
    401/403), ``server`` (5xx), ``rejected`` (other 4xx), ``protocol`` (an answer that
    is not a WebSocket upgrade, or a URL that is not a ws(s) URL), ``dropped`` (the
    peer closed the connection, or failed TLS, before answering the upgrade) or
    ``timeout`` (no answer within the deadline).

    Cancellation while connecting propagates as ``trio.Cancelled``. The body's
    exceptions, ``trio.Cancelled`` included, propagate unchanged (the connection has
    no task of its own, so nothing wraps them in an exception group). On exit the
    socket is closed (code 1000, and Vapi's answering close frame read), shielded from
    cancellation and bounded by ``close_deadline_s``; when the exit is a cancellation,
    only ``sockets.CLOSE_GRACE_S`` (see ``_close_on_exit``). Say goodbye with
    ``end_call`` *inside* the block, before any scope around it is cancelled.
    """
    authorization = f"Bearer {_checked_api_key(api_key)}".encode()
    secrets = (api_key, call.websocket_url)
    target = _Target.parse(call.websocket_url)
    ws = WSConnection(ConnectionType.CLIENT)
    try:
        request = ws.send(
            Request(
                host=target.host_header,
                target=target.resource,
                extra_headers=[(b"authorization", authorization)],
            )
        )
    except (ValueError, h11.LocalProtocolError, wsproto.utilities.LocalProtocolError):
        # A host or path that cannot go in an HTTP request (wsproto/h11's verdict).
        raise _connect_error("protocol", "the call's socket URL is not a ws(s) URL") from None

    # Invariant: this deadline covers connecting only; the body runs outside it.
    connection: WsConnection | None = None
    with trio.move_on_after(connect_deadline_s):
        transport = await _connect_transport(target, secrets)
        try:
            early = await _upgrade(transport, ws, request, secrets)
        except BaseException:
            await _drop(transport)
            raise
        connection = WsConnection(transport, client=True, early=early)
    if connection is None:
        raise _connect_error("timeout", f"no upgrade within {connect_deadline_s:g} s")
    try:
        yield connection
    finally:
        await _close_on_exit(connection, close_deadline_s)


@frozen(kw_only=True)
class _Target:
    """Where a ``ws(s)://`` URL points: what to connect to and what to ask for."""

    tls: bool
    hostname: str
    port: int
    #: The ``Host`` header: the host, with the port unless it is the scheme's default.
    host_header: str
    #: The request target: path and query (the secret part of the URL).
    resource: str

    @classmethod
    def parse(cls, url: str) -> _Target:
        """The parts of ``url``; a ``VapiError`` (protocol) for anything but a ws(s) URL."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port  # ValueError when out of range or not a number
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise _connect_error("protocol", "the call's socket URL is not a ws(s) URL")
        tls = parts.scheme == "wss"
        default_port = 443 if tls else 80
        hostname = parts.hostname
        host = f"[{hostname}]" if ":" in hostname else hostname  # an IPv6 literal
        if port is not None and port != default_port:
            host = f"{host}:{port}"
        resource = parts.path or "/"
        if parts.query:
            resource = f"{resource}?{parts.query}"
        return cls(
            tls=tls,
            hostname=hostname,
            port=default_port if port is None else port,
            host_header=host,
            resource=resource,
        )


async def _connect_transport(target: _Target, secrets: tuple[str, ...]) -> Transport:
    """TCP (and TLS for ``wss://``) to ``target``; ``VapiError`` refused or dropped.

    Either way the call's own task reads and writes the raw socket (``net.ws``); over
    TLS, OpenSSL encrypts and decrypts in memory (``TlsSocketTransport``).
    """
    try:
        stream = await trio.open_tcp_stream(target.hostname, target.port)
    except OSError as exc:  # refused, unreachable, DNS (gaierror)
        raise _connect_error("refused", _describe(exc, *secrets)) from None
    sock = socket.socket(fileno=stream.socket.detach())
    if not target.tls:
        return SocketTransport(sock)
    try:
        transport = TlsSocketTransport(
            sock, _default_ssl_context(), server_hostname=target.hostname
        )
    except BaseException:
        sock.close()
        raise
    try:
        await transport.handshake()
    except TlsHandshakeError as exc:
        await _drop(transport)
        detail = _clean(str(exc), *secrets)
        raise _connect_error("dropped", f"TLS handshake failed ({detail})") from None
    except BaseException:
        await _drop(transport)
        raise
    return transport


async def _upgrade(
    transport: Transport, ws: WSConnection, request: bytes, secrets: tuple[str, ...]
) -> bytes:
    """Send the upgrade ``request`` and read the answer until ``ws`` is open.

    Returns the bytes that followed the 101's head (Vapi's first frames, when they
    came in the same read), for the connection to parse. Raises ``VapiError``: the
    upgrade refused (its status), ``protocol`` (not HTTP, or HTTP but not a
    WebSocket answer), ``dropped`` (the connection closed first).
    """
    view = memoryview(request)
    try:
        sent = transport.try_send(view)
        if sent < len(view) or transport.pending:
            await transport.send_rest(view[sent:])
    except SocketClosed as exc:
        raise _connect_error("dropped", f"sending the upgrade: {exc.reason}") from None
    answer = b""
    while True:
        data = await transport.receive_some()
        answer += data
        try:
            ws.receive_data(data)  # b"": the peer closed
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    # What follows the head (where h11 ended it) is the connection's.
                    end = HEAD_END.search(answer)
                    return answer[end.end() :] if end is not None else b""
                if isinstance(event, RejectConnection):
                    raise _rejected_upgrade(event.status_code)
        except wsproto.utilities.RemoteProtocolError as exc:
            if not data:  # an answer cut short by the peer closing
                break
            detail = _clean(str(exc), *secrets)
            raise _connect_error(
                "protocol", f"the answer to the upgrade is not a WebSocket upgrade ({detail})"
            ) from None
        if not data:
            break
    raise _connect_error("dropped", "the connection closed before the upgrade was answered")


async def _drop(transport: Transport) -> None:
    """Close ``transport`` at once (no goodbye): a connection that never opened."""
    with trio.CancelScope() as scope:
        scope.cancel()
        await transport.aclose()


async def _close_on_exit(connection: WsConnection, deadline_s: float) -> None:
    """Close ``connection`` (code 1000) within ``deadline_s``.

    The close is shielded within its caller's deadline (``sockets.close_scope``): when
    the scope around ``open_transport`` is being cancelled, the call is going away and
    must not wait on Vapi, so the close frame and Vapi's answer get only
    ``sockets.CLOSE_GRACE_S`` (a round trip on a live connection), after which the
    TCP connection is dropped.
    """
    with trio.move_on_after(deadline_s):
        await connection.aclose()


def _rejected_upgrade(status: int) -> VapiError:
    # 404: no such call (ended, or the URL is stale); a 200: a web server, not a
    # WebSocket endpoint (protocol).
    kind = _status_kind(status)
    return VapiError(
        kind,
        f"Vapi transport connect failed ({kind}): upgrade answered HTTP {status}",
        status_code=status,
    )


def _connect_error(kind: VapiErrorKind, detail: str) -> VapiError:
    return VapiError(kind, f"Vapi transport connect failed ({kind}): {detail}")


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """One shared default TLS context: building one loads the CA store (milliseconds).

    Renegotiation is refused: ``TlsSocketTransport`` encrypts a write without reading,
    and a TLS 1.2 server's renegotiation would put a read in the middle of it (TLS 1.3
    has none).
    """
    context = ssl.create_default_context()
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


# --- Ending the call --------------------------------------------------------------------


async def end_call(socket: MessageSocket, *, deadline_s: float) -> None:
    """End the Vapi call politely: send ``end-call``, then close the socket.

    Meant for teardown, so it is shielded from outer cancellation; ``deadline_s``
    bounds all of it, and a surrounding cancellation is delivered at the caller's next
    checkpoint. A socket already closed (by Vapi, or by us) is the expected race and
    is not an error: ``end_call`` never raises ``SocketClosed``. The socket's own
    shielded write bound (``sockets.WRITE_DEADLINE_S``) cannot be cut short from
    here: a socket whose peer stops reading can hold it that long.
    """
    with trio.move_on_after(deadline_s, shield=True):
        with contextlib.suppress(SocketClosed):
            await socket.send(transport.end_call())
        await socket.aclose()


async def post_control(
    http: httpx.AsyncClient, control_url: str, message: str, *, deadline_s: float
) -> None:
    """POST ``message`` to a call's ``monitor.controlUrl`` (Live Call Control).

    ``message`` is the JSON text of a message for the transport socket
    (``vapi.transport``: ``end_call()``, ``add_message(…)``): the control URL takes the
    same bodies. No API key goes with it; the URL is the credential, a secret like
    the socket's URL (never logged). Bounded by ``deadline_s``. Any answer but a 2xx,
    or none, raises ``VapiError`` (``auth``, ``rejected``, ``server``; ``timeout``,
    ``refused``, ``protocol``, ``dropped`` as for the create). Cancelled: the request
    is abandoned.
    """
    response = await _post(
        http,
        control_url,
        message.encode(),
        {"Content-Type": "application/json"},
        deadline_s=deadline_s,
        secrets=(control_url,),
        error=_control_error,
    )
    status = response.status_code
    if not 200 <= status < 300:
        detail = f"HTTP {status}"
        vapi_message = _vapi_error_message(response.content, control_url)
        if vapi_message:
            detail = f"{detail}: {vapi_message}"
        raise _control_error(_status_kind(status), detail, status_code=status)


def _control_error(kind: VapiErrorKind, detail: str, status_code: int | None = None) -> VapiError:
    return VapiError(kind, f"Vapi call control failed ({kind}): {detail}", status_code=status_code)


# --- Keeping secrets out of messages ------------------------------------------------------


def _describe(exc: BaseException, *secrets: str) -> str:
    """``Type: message`` of a library exception, cleaned for a log line."""
    text = str(exc)
    return _clean(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, *secrets)


def _clean(text: str, *secrets: str) -> str:
    """``text`` on one line, truncated, with every ``secret`` (and URL path) blanked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
        if "://" in secret:  # a URL's path alone (in an OSError, a log line) is the secret
            path = urllib.parse.urlsplit(secret).path
            if len(path) > 1:
                text = text.replace(path, "/***")
    text = " ".join(text.split())
    if len(text) > MAX_ERROR_DETAIL_CHARS:
        text = text[: MAX_ERROR_DETAIL_CHARS - 1] + "…"
    return text
