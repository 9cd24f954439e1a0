"""A small HTTP/1.1 + WebSocket server (h11, wsproto) for the simulators, over ``voicebridge.net``.

The simulated peers need control that hypercorn and trio-websocket do not give:
stop answering pings, drop the TCP connection without a close frame, refuse an
upgrade with a chosen status. This module gives exactly that and nothing more.
Its bytes go through the network layer (``net.connect.serve_tcp`` accepts,
``net.transport.SocketTransport`` reads and writes); its HTTP and WebSocket logic
is h11's and wsproto's, apart from ``net.ws`` on purpose: the simulators are
oracles for the bridge, and must not share the bridge's WebSocket mistakes.

    async def on_http(request: HttpRequest) -> HttpResponse: ...
    async def on_websocket(request: HttpRequest, ws: SimWebSocket) -> None:
        await ws.accept()          # or: await ws.reject(403); return
        message = await ws.receive()
        await ws.send("hello")
        await ws.aclose(1000)

    port = await nursery.start(serve_http_ws, on_http, on_websocket)

Every connection runs in its own task under the server's connection nursery; an
exception escaping a handler is logged and ends that connection only (the TCP
stream is closed without a close frame). Cancelling ``serve_http_ws`` stops the
listener and every connection at once.

``SimWebSocket`` satisfies ``voicebridge.sockets.MessageSocket``: ``receive``
raises ``SocketClosed`` once the socket is closed; ``send`` is shielded and
bounded by ``WRITE_DEADLINE_S``. Pings are answered by the connection's reader
task unless ``answers_pings`` is set to False.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import cast

import attrs
import h11
import trio
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from voicebridge.errors import SocketClosed
from voicebridge.net.connect import send_all, serve_tcp
from voicebridge.net.transport import SocketTransport
from voicebridge.sockets import WRITE_DEADLINE_S, SocketWriteTimeout

logger = logging.getLogger(__name__)

#: Largest request line + headers accepted (h11's incomplete-event bound); a
#: Vapi create request's head is well under 2 KiB.
MAX_REQUEST_HEAD_BYTES = 16 * 1024
#: Largest HTTP request body accepted (413 beyond): a create-call body with an
#: inline assistant is a few KiB; 1 MiB only stops a runaway client.
MAX_REQUEST_BODY_BYTES = 1024 * 1024
#: Largest WebSocket message accepted (closed with 1009 beyond): audio frames are
#: 160-1600 bytes and control messages a few KiB.
MAX_MESSAGE_BYTES = 1024 * 1024
#: Received messages queued for the handler before the reader stops reading
#: (TCP backpressure then reaches the peer): 64 frames = 1.3 s of 20 ms audio.
MESSAGE_BUFFER = 64
#: A client must deliver a whole request head and body within this time.
REQUEST_TIMEOUT_S = 10.0
#: An idle keep-alive connection is closed after this long without a request.
KEEPALIVE_TIMEOUT_S = 30.0
#: How long ``aclose`` waits for the peer's close frame before dropping TCP.
CLOSE_HANDSHAKE_TIMEOUT_S = 2.0
#: Close code used when a connection ends without a close frame (RFC 6455 §7.1.5).
ABNORMAL_CLOSURE = 1006
#: Close code for an oversized message (RFC 6455 §7.4.1).
MESSAGE_TOO_BIG = 1009

SERVER_HEADER = ("server", "voicebridge-sim")


@attrs.frozen(kw_only=True)
class HttpRequest:
    """One HTTP request as the handlers see it; header names are lower-case."""

    method: str
    target: str
    headers: Mapping[str, str]
    body: bytes = b""

    @property
    def path(self) -> str:
        """``target`` without its query string."""
        return self.target.partition("?")[0]


@attrs.frozen(kw_only=True)
class HttpResponse:
    """A whole HTTP response; ``content-length`` is added by the server."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


HttpHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]
WebSocketHandler = Callable[[HttpRequest, "SimWebSocket"], Awaitable[None]]


async def serve_http_ws(
    handler_http: HttpHandler,
    handler_ws: WebSocketHandler,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` and serve until cancelled; ``task_status.started(bound_port)``.

    Plain requests go to ``handler_http``; WebSocket upgrade requests (``GET`` with
    ``Upgrade: websocket``) go to ``handler_ws``, which must ``accept()`` or
    ``reject()`` the socket (a handler that does neither gets a 500 rejection).
    """
    serve = functools.partial(_serve_connection, handler_http=handler_http, handler_ws=handler_ws)
    await serve_tcp(serve, host=host, port=port, task_status=task_status)


async def _serve_connection(
    sock: socket.socket, *, handler_http: HttpHandler, handler_ws: WebSocketHandler
) -> None:
    """One TCP connection: keep-alive HTTP requests, or one WebSocket after an upgrade."""
    transport = SocketTransport(sock)
    try:
        await _HttpConnection(transport, handler_http, handler_ws).run()
    except SocketClosed:
        pass  # the peer went away mid-exchange: nothing to answer
    except Exception:
        # The connection boundary: a handler bug ends this connection, not the server.
        logger.exception("simulated server connection failed")
    finally:
        await transport.aclose()


class _HttpConnection:
    def __init__(
        self, transport: SocketTransport, handler_http: HttpHandler, handler_ws: WebSocketHandler
    ) -> None:
        self._transport = transport
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
        self._handler_http = handler_http
        self._handler_ws = handler_ws

    async def run(self) -> None:
        while True:
            request: h11.Request | None = None
            with trio.move_on_after(KEEPALIVE_TIMEOUT_S):
                request = await self._read_request_head()
            if request is None:
                return  # closed, malformed, or idle past the keep-alive timeout
            try:
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    body = await self._read_body(request)
            except trio.TooSlowError:
                await self._send_response(HttpResponse(status=408), close=True)
                return
            except _BodyTooLarge:
                await self._send_response(HttpResponse(status=413), close=True)
                return
            except h11.RemoteProtocolError as exc:
                await self._send_response(HttpResponse(status=exc.error_status_hint), close=True)
                return
            http_request = HttpRequest(
                method=request.method.decode("ascii"),
                target=request.target.decode("latin-1"),
                headers=_header_map(request.headers),
                body=body,
            )
            if _is_websocket_upgrade(http_request):
                trailing_data, _ = self._h11.trailing_data
                await _serve_websocket(
                    self._transport, request, http_request, trailing_data, self._handler_ws
                )
                return
            response = await self._handler_http(http_request)
            await self._send_response(response, close=False)
            if self._h11.our_state is h11.MUST_CLOSE:
                return
            self._h11.start_next_cycle()

    async def _read_request_head(self) -> h11.Request | None:
        """The next request's head, or None when the client closed or sent garbage."""
        try:
            event = await self._next_event()
        except h11.RemoteProtocolError as exc:
            await self._send_response(HttpResponse(status=exc.error_status_hint), close=True)
            return None
        if isinstance(event, h11.Request):
            return event
        return None  # ConnectionClosed

    async def _read_body(self, request: h11.Request) -> bytes:
        """The request body; raises ``_BodyTooLarge`` (even before reading, by content-length)."""
        for name, value in request.headers:
            if name == b"content-length" and int(value) > MAX_REQUEST_BODY_BYTES:
                raise _BodyTooLarge  # refused unread
        parts: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_REQUEST_BODY_BYTES:
                    raise _BodyTooLarge
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:
                raise SocketClosed(None, "client closed during the request body")

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                self._h11.receive_data(await self._transport.receive_some())
                continue
            return cast("h11.Event | type[h11.PAUSED]", event)  # NEED_DATA handled above

    async def _send_response(self, response: HttpResponse, *, close: bool) -> None:
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # too late to answer; (IDLE: a malformed request, h11 lets us answer it)
        headers = [
            *response.headers,
            SERVER_HEADER,
            ("content-length", str(len(response.body))),
        ]
        if close:
            headers.append(("connection", "close"))
        data = self._h11.send(h11.Response(status_code=response.status, headers=headers))
        data += self._h11.send(h11.Data(data=response.body)) if response.body else b""
        data += self._h11.send(h11.EndOfMessage())
        with trio.CancelScope(shield=True), trio.move_on_after(WRITE_DEADLINE_S):
            await send_all(self._transport, data)


class _BodyTooLarge(Exception):
    pass


def _header_map(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for name, value in headers:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        merged[key] = f"{merged[key]}, {text}" if key in merged else text
    return merged


def _is_websocket_upgrade(request: HttpRequest) -> bool:
    return request.method == "GET" and "websocket" in request.headers.get("upgrade", "").lower()


async def _serve_websocket(
    transport: SocketTransport,
    h11_request: h11.Request,
    request: HttpRequest,
    trailing_data: bytes,
    handler_ws: WebSocketHandler,
) -> None:
    """Run ``handler_ws`` for one upgrade request; the reader task starts on ``accept()``."""
    handshake = H11Handshake(ConnectionType.SERVER)
    try:
        handshake.initiate_upgrade_connection(list(h11_request.headers), h11_request.target)
    except WsRemoteProtocolError:
        response = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        with trio.CancelScope(shield=True), trio.move_on_after(WRITE_DEADLINE_S):
            await send_all(transport, response)
        return
    async with trio.open_nursery() as websocket_nursery:
        ws = SimWebSocket(transport, handshake, trailing_data, websocket_nursery)
        await handler_ws(request, ws)
        await ws._finish_after_handler()
        websocket_nursery.cancel_scope.cancel(reason="websocket handler returned")


class SimWebSocket:
    """The server end of one WebSocket, with the knobs a fault-injecting peer needs.

    Invariant: every byte written to the transport goes through ``_write`` under
    ``_write_lock``, so wsproto's state and the wire agree and frames never interleave.
    """

    def __init__(
        self,
        transport: SocketTransport,
        handshake: H11Handshake,
        trailing_data: bytes,
        websocket_nursery: trio.Nursery,
    ) -> None:
        self._transport = transport
        self._handshake = handshake
        self._trailing_data = trailing_data
        self._nursery = websocket_nursery
        self._connection: Connection | None = None
        self._write_lock = trio.Lock()
        self._send_messages, self._received_messages = trio.open_memory_channel[str | bytes](
            MESSAGE_BUFFER
        )
        self._closed = trio.Event()
        #: Answer the peer's pings (the normal behaviour); set False to go silent
        #: on pings while everything else keeps working (a half-dead peer).
        self.answers_pings = True
        #: The close code once closed: the peer's, ours, or 1006 with no close frame.
        self.close_code: int | None = None
        self.close_reason = ""

    @property
    def is_open(self) -> bool:
        return (
            self._connection is not None
            and self._connection.state is ConnectionState.OPEN
            and not self._closed.is_set()
        )

    async def accept(self) -> None:
        """Complete the upgrade (101) and start reading frames. Raises ``SocketClosed``."""
        if self._connection is not None or self._closed.is_set():
            raise RuntimeError("accept() or reject() was already called")
        await self._write(lambda: self._handshake.send(AcceptConnection()))
        connection = self._handshake.connection
        assert connection is not None
        self._connection = connection
        if self._trailing_data:
            connection.receive_data(self._trailing_data)
        self._nursery.start_soon(self._read_frames)

    async def reject(self, status: int, body: bytes = b"") -> None:
        """Refuse the upgrade with an HTTP ``status`` (and optional JSON ``body``); closes TCP."""
        if self._connection is not None or self._closed.is_set():
            raise RuntimeError("accept() or reject() was already called")
        headers = [(b"content-type", b"application/json")] if body else []
        event = RejectConnection(status_code=status, headers=headers, has_body=True)

        def rejection() -> bytes:
            data = self._handshake.send(event)
            return data + self._handshake.send(RejectData(data=body, body_finished=True))

        try:
            await self._write(rejection)
        finally:
            await self._drop(status)

    async def wait_abandoned(self) -> None:
        """Before ``accept()`` or ``reject()``: return once the peer has closed its
        connection (it gave up on the upgrade). For a handler that holds the upgrade;
        what the peer sends meanwhile is kept for the connection. Cancelled: nothing is lost.
        """
        if self._connection is not None or self._closed.is_set():
            raise RuntimeError("accept() or reject() was already called")
        while data := await self._transport.receive_some():
            self._trailing_data += data
        await self._drop(ABNORMAL_CLOSURE)

    async def receive(self) -> str | bytes:
        """The next whole message. Raises ``SocketClosed`` once the socket is closed."""
        try:
            return await self._received_messages.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise SocketClosed(self.close_code, self.close_reason) from None

    async def send(self, message: str | bytes) -> None:
        """Send one message: shielded, bounded by ``WRITE_DEADLINE_S``. Raises ``SocketClosed``."""
        event: TextMessage | BytesMessage = (
            TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        )
        await self._write(lambda: self._frame(event))

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close politely: close frame, wait (bounded) for the peer's, then close TCP.

        Idempotent; shielded from cancellation; never raises ``SocketClosed``.
        """
        with trio.CancelScope(shield=True):
            if self.is_open:
                try:
                    await self._write(
                        lambda: self._frame(CloseConnection(code=code, reason=reason))
                    )
                except SocketClosed:
                    pass
                else:
                    self.close_code, self.close_reason = code, reason
                    with trio.move_on_after(CLOSE_HANDSHAKE_TIMEOUT_S):
                        await self._closed.wait()
            await self._drop(code)

    async def abort(self) -> None:
        """Drop the TCP connection at once, with no close frame (the peer sees 1006)."""
        await self._drop(ABNORMAL_CLOSURE)

    def _frame(self, event: Event) -> bytes:
        connection = self._connection
        if connection is None or connection.state is not ConnectionState.OPEN:
            raise SocketClosed(self.close_code, "websocket is not open")
        return connection.send(event)

    async def _write(self, make_data: Callable[[], bytes]) -> None:
        """Encode and write under the lock so frames never interleave; shielded, bounded."""
        async with self._write_lock:
            if self._closed.is_set():
                raise SocketClosed(self.close_code, self.close_reason)
            with trio.CancelScope(shield=True):
                with trio.move_on_after(WRITE_DEADLINE_S) as write_scope:
                    data = make_data()
                    try:
                        await send_all(self._transport, data)
                    except SocketClosed:
                        self._mark_closed(ABNORMAL_CLOSURE, "connection lost")
                        raise SocketClosed(self.close_code, self.close_reason) from None
            if write_scope.cancelled_caught:
                await self._drop(ABNORMAL_CLOSURE)  # a half-written frame: the stream is lost
                raise SocketWriteTimeout(None, "write deadline passed")

    async def _read_frames(self) -> None:
        """Reader task: parse frames, answer pings and close, queue messages."""
        connection = self._connection
        assert connection is not None
        parts: list[str | bytes] = []
        size = 0
        try:
            while True:
                for event in connection.events():
                    if isinstance(event, Message):
                        size += len(event.data)
                        if size > MAX_MESSAGE_BYTES:
                            too_big = CloseConnection(
                                code=MESSAGE_TOO_BIG, reason="message too big"
                            )
                            await self._write_control_or_ignore(
                                functools.partial(self._frame, too_big)
                            )
                            await self._drop(MESSAGE_TOO_BIG)
                            return
                        parts.append(event.data)
                        if event.message_finished:
                            message = (
                                "".join(p for p in parts if isinstance(p, str))
                                if isinstance(event, TextMessage)
                                else b"".join(p for p in parts if isinstance(p, bytes))
                            )
                            parts, size = [], 0
                            try:
                                await self._send_messages.send(message)
                            except trio.ClosedResourceError:
                                return  # dropped (abort) while the handler lagged
                    elif isinstance(event, Ping):
                        if self.answers_pings:
                            await self._write_control_or_ignore(
                                functools.partial(self._frame, event.response())
                            )
                    elif isinstance(event, CloseConnection):
                        await self._on_close_frame(connection, event)
                        return
                data = await self._transport.receive_some()
                connection.receive_data(data or None)  # b"": the end of the stream
        finally:
            self._send_messages.close()

    async def _write_control_or_ignore(self, make_data: Callable[[], bytes]) -> None:
        """A reader-side write (pong, close echo): a lost stream is noticed by the next read."""
        with contextlib.suppress(SocketClosed):
            await self._write(make_data)

    async def _on_close_frame(self, connection: Connection, event: CloseConnection) -> None:
        if connection.state is ConnectionState.REMOTE_CLOSING:
            # The peer started the closing handshake: echo its code, then hang up.
            await self._write_control_or_ignore(lambda: connection.send(event.response()))
            self._mark_closed(event.code, event.reason or "")
        elif connection.state is ConnectionState.OPEN:
            # wsproto reports a malformed frame as a close event while still open.
            await self._write_control_or_ignore(
                lambda: connection.send(CloseConnection(code=event.code))
            )
            self._mark_closed(event.code, event.reason or "")
        else:
            # The peer's answer to our close (or the end of the stream, 1006).
            self._mark_closed(self.close_code or event.code, self.close_reason)
        await self._drop(self.close_code or ABNORMAL_CLOSURE)

    def _mark_closed(self, code: int, reason: str) -> None:
        if not self._closed.is_set():
            if self.close_code is None:
                self.close_code, self.close_reason = code, reason
            self._closed.set()

    async def _drop(self, code: int) -> None:
        self._mark_closed(code, self.close_reason)
        self._send_messages.close()
        with trio.CancelScope(shield=True):
            await self._transport.aclose()

    async def _finish_after_handler(self) -> None:
        if self._connection is None and not self._closed.is_set():
            logger.error("websocket handler returned without accept() or reject()")
            await self.reject(500)
        else:
            await self.aclose(1000)
