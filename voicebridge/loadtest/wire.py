"""Lean HTTP/1.1 and WebSocket protocol code for the load generator, over ``voicebridge.net``.

The load generator must carry as many messages as the bridge it loads, from one
core, with CPU to spare; the general-purpose stacks (wsproto, trio-websocket, httpx)
cost several times what a message needs. The bytes go through the network layer's
transports (``net.transport``: a plain socket, or TLS in memory over one), which
write without yielding and read with trio's I/O waits. What is said over them is
this module's own, written apart from ``net.ws`` on purpose: the generator is an
oracle for the bridge, and must not share the bridge's WebSocket mistakes.

- ``LeanWebSocket``: one WebSocket connection. ``send_text`` / ``send_binary``
  write a whole frame through the transport without yielding (a frame the kernel
  cannot take whole is finished by the connection's flusher task, before any later
  frame), and never raise (a lost connection is the reader's to report);
  ``receive_batch`` waits for bytes and returns every complete data message
  that has arrived, answering pings on the way. Client frames are masked with the
  all-zero key, which RFC 6455 allows and which makes masking free.
- the opening handshakes of both ends (``connect_websocket``, ``accept_websocket``),
  a minimal request-head reader and a one-shot HTTP client (``http_request``) for the
  webhooks and ``POST /call``.
- ``StampedSocket``: the generator's TCP sockets, whose reads note when the kernel
  received the bytes (``LeanWebSocket.arrived_at``). Every latency is timed from
  that instant, so the generator's own loop, busy sending for every other call,
  adds nothing to what it measures.

Nothing here is for production traffic: it trusts its peers to speak the protocol.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable, Mapping

import trio
from attrs import frozen

from voicebridge.errors import SocketClosed, VoicebridgeError
from voicebridge.net.connect import open_tcp_socket, send_all
from voicebridge.net.transport import SocketTransport, TlsSocketTransport, Transport

#: The GUID RFC 6455 appends to the client's key for ``Sec-WebSocket-Accept``.
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Largest request or response head we read (our peers send a few hundred bytes).
MAX_HEAD_BYTES = 64 * 1024
#: Largest HTTP body we read (TwiML, create-call bodies: a few KiB).
MAX_BODY_BYTES = 1024 * 1024
#: Largest WebSocket message we accept (a media message is < 2 KiB).
MAX_MESSAGE_BYTES = 1024 * 1024

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_ZERO_MASK = b"\x00\x00\x00\x00"


#: ``SO_TIMESTAMPNS`` on Linux (the ``socket`` module does not name it): every read
#: comes with the time the kernel received its last packet, as a ``timespec``.
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")
_STAMP_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)


class StampedSocket(socket.socket):
    """A TCP socket whose ``recv_into`` notes when the kernel received what it read.

    ``arrived_at`` is that time (``time.time()`` seconds) for the last read: the
    arrival of the newest packet among what it returned, so a message that came
    earlier in the same read is stamped late, never early. 0.0 when that read came
    without a stamp: the kernel turns stamping on for the whole system a moment after
    the first socket asks, and does not stamp packets received before. The
    transports (``net.transport``) read through ``recv_into``, so they need nothing
    of this.
    """

    arrived_at = 0.0

    @classmethod
    def adopt(cls, sock: socket.socket) -> socket.socket:
        """``sock`` as a ``StampedSocket`` (``sock`` is then an empty shell), or
        ``sock`` itself where the kernel does not stamp reads."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        except OSError:
            return sock
        stamped = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        stamped.setblocking(False)
        return stamped

    def recv_into(  # type: ignore[override]
        self, buffer: memoryview, nbytes: int = 0, flags: int = 0
    ) -> int:
        if nbytes:
            buffer = buffer[:nbytes]
        size, ancillary, _, _ = self.recvmsg_into((buffer,), _STAMP_SPACE, flags)
        self.arrived_at = 0.0
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack(data)
                self.arrived_at = seconds + nanoseconds * 1e-9
        return size


class WireError(VoicebridgeError):
    """The peer broke the protocol, refused us, or went away."""


class WebSocketClosed(WireError):
    """The WebSocket is closed; ``code`` is the peer's close code (None: no close frame)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed ({code if code is not None else 'no close frame'}) {reason}")
        self.code = code


@frozen
class RequestHead:
    """An HTTP request line and headers (names lower-cased)."""

    method: str
    path: str
    headers: Mapping[str, str]


@frozen
class HttpResult:
    """A whole HTTP response."""

    status: int
    headers: Mapping[str, str]
    body: bytes


async def _write(transport: Transport, data: bytes) -> None:
    """All of ``data``; ``WireError`` if the connection is gone."""
    try:
        await send_all(transport, data)
    except SocketClosed as exc:
        raise WireError(exc.reason) from None


async def read_head(transport: Transport, buffer: bytearray) -> bytes:
    """Read until the blank line ending an HTTP head; the head (leftover stays in ``buffer``)."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            return head
        if len(buffer) > MAX_HEAD_BYTES:
            raise WireError("HTTP head too long")
        data = await transport.receive_some()
        if not data:
            raise WireError("connection closed before the end of the HTTP head")
        buffer += data


def _headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def parse_request_head(head: bytes) -> RequestHead:
    """The request line and headers of a request head."""
    first, *lines = head.split(b"\r\n")
    parts = first.decode("latin-1").split(" ")
    if len(parts) != 3:
        raise WireError(f"bad request line {first[:80]!r}")
    return RequestHead(parts[0], parts[1], _headers(lines))


async def read_body(transport: Transport, buffer: bytearray, length: int) -> bytes:
    """Read exactly ``length`` body bytes (some may already be in ``buffer``)."""
    if length > MAX_BODY_BYTES:
        raise WireError(f"body of {length} bytes is too large")
    while len(buffer) < length:
        data = await transport.receive_some()
        if not data:
            raise WireError("connection closed inside the body")
        buffer += data
    body = bytes(buffer[:length])
    del buffer[:length]
    return body


async def respond(
    transport: Transport, status: int, body: bytes, content_type: str = "application/json"
) -> None:
    """Write a whole response that closes the connection."""
    head = (
        f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    await _write(transport, head.encode("latin-1") + body)


async def _open(
    host: str, port: int, head_lines: list[str], body: bytes = b"",
    tls: ssl.SSLContext | None = None,
) -> tuple[Transport, bytes, bytearray]:
    """Connect (over TLS with ``tls``, checking the certificate names ``host``), send a
    request, read the response head: (transport, head, what followed it).

    The transport is closed if anything fails; the caller closes it otherwise.
    ``TlsHandshakeError`` when the TLS handshake fails.
    """
    sock = StampedSocket.adopt(await open_tcp_socket(host, port))
    transport: Transport
    if tls is None:
        transport = SocketTransport(sock)
    else:
        transport = TlsSocketTransport(sock, tls, server_hostname=host)
    try:
        if isinstance(transport, TlsSocketTransport):
            await transport.handshake()
        await _write(transport, ("\r\n".join(head_lines) + "\r\n\r\n").encode("latin-1") + body)
        buffer = bytearray()
        head = await read_head(transport, buffer)
    except BaseException:
        with trio.CancelScope(shield=True):
            await transport.aclose()
        raise
    return transport, head, buffer


def _request_lines(
    method: str, path: str, host: str, port: int, headers: Mapping[str, str] | None
) -> list[str]:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}:{port}"]
    return lines + [f"{name}: {value}" for name, value in (headers or {}).items()]


async def http_request(
    host: str,
    port: int,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> HttpResult:
    """One request on a fresh connection (``connection: close``, over TLS with ``tls``);
    the whole response."""
    lines = _request_lines(method, path, host, port, headers)
    lines[2:2] = ["connection: close", f"content-length: {len(body)}"]
    transport, head, buffer = await _open(host, port, lines, body, tls)
    try:
        first, *header_lines = head.split(b"\r\n")
        status = int(first.split(b" ")[1])
        response_headers = _headers(header_lines)
        if "content-length" in response_headers:
            length = int(response_headers["content-length"])
            content = await read_body(transport, buffer, length)
        else:  # read to the end of the connection
            while data := await transport.receive_some():
                buffer += data
                if len(buffer) > MAX_BODY_BYTES:
                    raise WireError("response body too large")
            content = bytes(buffer)
        return HttpResult(status, response_headers, content)
    finally:
        await transport.aclose()


def _accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _WS_GUID).digest()).decode()


async def connect_websocket(
    host: str, port: int, path: str, headers: Mapping[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> LeanWebSocket:
    """Open a WebSocket (client end) to ``host:port`` at ``path`` (``wss://`` with ``tls``)."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = _request_lines("GET", path, host, port, headers)
    lines[2:2] = ["upgrade: websocket", "connection: Upgrade", f"sec-websocket-key: {key}",
                  "sec-websocket-version: 13"]
    transport, head, buffer = await _open(host, port, lines, tls=tls)
    first, *header_lines = head.split(b"\r\n")
    refusal = None
    if first.split(b" ")[1] != b"101":
        refusal = f"upgrade refused: {first.decode('latin-1', 'replace')}"
    elif _headers(header_lines).get("sec-websocket-accept") != _accept_key(key):
        refusal = "upgrade answered with a wrong Sec-WebSocket-Accept"
    if refusal is not None:
        await transport.aclose()
        raise WireError(refusal)
    return LeanWebSocket(transport, client=True, leftover=bytes(buffer))


async def accept_websocket(
    transport: Transport, request: RequestHead, leftover: bytearray
) -> LeanWebSocket:
    """Answer ``request`` (an upgrade) with 101 and return the server end."""
    key = request.headers.get("sec-websocket-key", "")
    answer = (
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        f"sec-websocket-accept: {_accept_key(key)}\r\n\r\n"
    )
    await _write(transport, answer.encode("latin-1"))
    return LeanWebSocket(transport, client=False, leftover=bytes(leftover))


def encode_frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    """One whole, unfragmented frame; masked frames use the all-zero key (no XOR needed)."""
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = bytes((0x80 | opcode, mask_bit | length))
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, mask_bit | 127, length)
    if masked:
        return header + _ZERO_MASK + payload
    return header + payload


def _unmask(payload: bytes, key: bytes) -> bytes:
    if key == _ZERO_MASK or not payload:
        return payload
    length = len(payload)
    repeated = (key * (length // 4 + 1))[:length]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")
    return value.to_bytes(length, "little")


class LeanWebSocket:
    """One WebSocket connection over a ``net.transport.Transport`` (see the module docstring).

    Writes never yield and never interleave: when the transport cannot take a frame
    whole (or holds ciphertext it still owes the kernel), the rest goes to
    ``_queued``, and every later frame queues behind it until ``run_flusher`` (which
    the owner runs as a task) has written it all out.

    Invariant: ``_flushing`` is True from a write the transport did not finish until
    the flusher has written everything queued; while it is True nothing is handed
    to the transport but by the flusher, so the frames keep their order.

    ``close`` sends a close frame and stops the connection's reading and writing;
    ``aclose`` (which the owner awaits at the end) also closes the transport.
    """

    def __init__(self, transport: Transport, *, client: bool, leftover: bytes = b"") -> None:
        self._transport = transport
        sock = getattr(transport, "sock", None)
        self._stamped = sock if isinstance(sock, StampedSocket) else None
        # A plain socket's transport takes a frame's bytes as they are: a memoryview
        # around every frame would cost more than the rest of the write path.
        self._try_send_bytes: Callable[[bytes], int] | None = (
            transport.try_send if isinstance(transport, SocketTransport) else None
        )
        self._masked = client
        self._buffer = bytearray(leftover)
        self._queued = bytearray()
        self._flushing = False
        self._flush_needed = trio.Event()
        self._fragments: list[bytes] = []
        self._fragment_opcode = 0
        self.closed = False
        self.close_code: int | None = None
        # The peer's close frame was read (messages before it are still delivered).
        self._peer_closed = False

    # -- writing -------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        self._write(encode_frame(OP_TEXT, text.encode(), masked=self._masked))

    def send_binary(self, data: bytes) -> None:
        self._write(encode_frame(OP_BINARY, data, masked=self._masked))

    def _write(self, frame: bytes) -> None:
        """Into the kernel's buffer now, or behind what is already waiting for it.

        Never raises: a frame for a connection that is closed, or found lost here,
        is dropped, and the reader reports the end. The ticker writes for every
        call, and one call's lost connection must not stop the others.
        """
        if self.closed:
            return
        if self._flushing:
            self._queued += frame
            return
        transport = self._transport
        try_send_bytes = self._try_send_bytes
        try:
            if try_send_bytes is not None:
                sent = try_send_bytes(frame)
            else:
                sent = transport.try_send(memoryview(frame))
        except SocketClosed:
            self.closed = True
            return
        if sent < len(frame) or transport.pending:
            self._queued += frame[sent:]
            self._flushing = True
            self._flush_needed.set()

    @property
    def unsent_bytes(self) -> int:
        """Bytes waiting for the flusher (the kernel's buffer was full)."""
        return len(self._queued)

    async def run_flusher(self) -> None:
        """Write out what the transport could not take at once; run as the connection's task.

        Returns when the connection is lost. Cancellation may leave a frame half
        written: cancel it only when the connection is done with.
        """
        while True:
            await self._flush_needed.wait()
            self._flush_needed = trio.Event()
            try:
                while self._queued or self._transport.pending:
                    # Frames written meanwhile queue in a fresh buffer, behind these.
                    data, self._queued = self._queued, bytearray()
                    await self._transport.send_rest(memoryview(data))
            except SocketClosed:
                self.closed = True
                return
            self._flushing = False

    def close(self, code: int = 1000) -> None:
        """Send a close frame (best effort); no more reading or writing. Idempotent."""
        self._write(encode_frame(OP_CLOSE, struct.pack("!H", code), masked=self._masked))
        self.closed = True

    async def aclose(self, code: int = 1000) -> None:
        """``close``, then close the transport (TLS: with a close_notify, if it goes now)."""
        self.close(code)
        await self._transport.aclose()

    # -- reading -------------------------------------------------------------------

    def arrived_at(self, now: float) -> float:
        """When the bytes of the last ``receive_batch`` reached the kernel, on the clock
        that reads ``now`` at this instant (``now`` itself when not stamped)."""
        stamped = self._stamped
        if stamped is None or not stamped.arrived_at:
            return now
        return now - max(0.0, time.time() - stamped.arrived_at)

    async def receive_batch(self) -> list[tuple[int, bytes]]:
        """Wait for data; every complete (opcode, payload) data message that arrived.

        Pings are answered; a close frame is answered and raises ``WebSocketClosed``,
        as do the end of the byte stream and our own ``close``.
        """
        while True:
            messages = self._parse()
            if messages:
                return messages
            if self._peer_closed:
                raise WebSocketClosed(self.close_code, "closed by the peer")
            if self.closed:
                raise WebSocketClosed(self.close_code, "closed")
            data = await self._transport.receive_some()
            if not data:
                self.closed = True
                raise WebSocketClosed(self.close_code, "connection closed")
            self._buffer += data

    def _parse(self) -> list[tuple[int, bytes]]:
        messages: list[tuple[int, bytes]] = []
        buffer = self._buffer
        offset = 0
        end = len(buffer)
        while end - offset >= 2 and not self._peer_closed:
            first, second = buffer[offset], buffer[offset + 1]
            length = second & 0x7F
            position = offset + 2
            if length == 126:
                if end - position < 2:
                    break
                (length,) = struct.unpack_from("!H", buffer, position)
                position += 2
            elif length == 127:
                if end - position < 8:
                    break
                (length,) = struct.unpack_from("!Q", buffer, position)
                position += 8
            if length > MAX_MESSAGE_BYTES:
                raise WireError(f"frame of {length} bytes is too large")
            key = b""
            if second & 0x80:
                if end - position < 4:
                    break
                key = bytes(buffer[position : position + 4])
                position += 4
            if end - position < length:
                break
            payload = bytes(buffer[position : position + length])
            offset = position + length
            if key:
                payload = _unmask(payload, key)
            opcode = first & 0x0F
            if opcode >= OP_CLOSE:
                self._control(opcode, payload)
                continue
            if not first & 0x80:  # a fragment: keep it until the final one
                if opcode != OP_CONTINUATION:
                    self._fragment_opcode = opcode
                self._fragments.append(payload)
                continue
            if opcode == OP_CONTINUATION:
                self._fragments.append(payload)
                payload = b"".join(self._fragments)
                opcode = self._fragment_opcode
                self._fragments.clear()
            messages.append((opcode, payload))
        del buffer[:offset]
        return messages

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self._write(encode_frame(OP_PONG, payload, masked=self._masked))
        elif opcode == OP_CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.close_code = code
            self._write(encode_frame(OP_CLOSE, payload[:2], masked=self._masked))
            self.closed = True
            self._peer_closed = True
