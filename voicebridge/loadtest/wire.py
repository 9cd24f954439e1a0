"""Lean HTTP/1.1 and WebSocket plumbing for the load generator, on raw non-blocking sockets.

The load generator must carry as many messages as the bridge it loads, from one
core, with CPU to spare; the general-purpose stacks (wsproto, trio-websocket, httpx)
cost several times what a message needs. This module does only what the generator
needs and no more:

- ``LeanWebSocket``: one WebSocket connection. ``send_text`` / ``send_binary`` write
  a whole frame straight into the kernel's socket buffer without yielding (a frame
  the buffer cannot take whole is finished by the connection's flusher task, before
  any later frame); ``receive_batch`` waits until the socket is readable and returns
  every complete data message that has arrived, answering pings on the way.
  Client frames are masked with the all-zero key, which RFC 6455 allows and which
  makes masking free.
- ``TlsSession``: the server end of TLS over the same raw socket, for the simulated
  Vapi's ``wss://`` sockets (``voicebridge loadtest --vapi-tls``). The stdlib's
  ``ssl.SSLObject`` works between two memory BIOs (``ssl.MemoryBIO``): a frame is
  encrypted where it is written and the socket's bytes are decrypted where they
  are read, with no task or stream in between.
- the opening handshakes of both ends (``connect_websocket``, ``accept_websocket``),
  a minimal request-head reader and a one-shot HTTP client (``http_request``) for the
  webhooks and ``POST /call``.

Nothing here is for production traffic: it trusts its peers to speak the protocol.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import ssl
import struct
from collections.abc import Callable, Mapping
from typing import cast

import trio
from attrs import frozen

from voicebridge.errors import VoicebridgeError

#: The GUID RFC 6455 appends to the client's key for ``Sec-WebSocket-Accept``.
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Largest request or response head we read (our peers send a few hundred bytes).
MAX_HEAD_BYTES = 64 * 1024
#: Largest HTTP body we read (TwiML, create-call bodies: a few KiB).
MAX_BODY_BYTES = 1024 * 1024
#: Largest WebSocket message we accept (a media message is < 2 KiB).
MAX_MESSAGE_BYTES = 1024 * 1024
#: One ``recv`` reads at most this much (many frames at once under load).
RECV_BYTES = 256 * 1024

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_ZERO_MASK = b"\x00\x00\x00\x00"
#: The first byte of a TLS handshake record (a ClientHello): never the start of HTTP.
TLS_HANDSHAKE_RECORD = 0x16
#: The most plaintext one TLS record carries: what one ``SSLObject.read`` returns.
TLS_RECORD_BYTES = 16 * 1024
#: Where ``TlsSession.decrypt`` reads each record's plaintext (no allocation per read;
#: every session shares it, as nothing waits between the read and the copy).
_PLAIN = bytearray(TLS_RECORD_BYTES)
_PLAIN_VIEW = memoryview(_PLAIN)


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


def _nonblocking(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def open_tcp(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket with Nagle off."""
    sock = _nonblocking(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    try:
        try:
            sock.connect((host, port))
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error)) from None
    except BaseException:
        sock.close()
        raise
    return sock


async def recv_some(sock: socket.socket) -> bytes:
    """What the socket has (waiting until it has something); b"" at its end."""
    while True:
        try:
            data = sock.recv(RECV_BYTES)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        except ConnectionError:
            return b""
        return data


async def _send_raw(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


class TlsSession:
    """The server end of one TLS connection over a raw non-blocking socket.

    ``handshake`` completes the handshake; then ``encrypt`` turns plaintext into the
    bytes to write to the socket, and ``decrypt`` turns the bytes read from it into
    plaintext, neither of them waiting. ``recv_some`` and ``send_all`` are the
    waiting forms, for the HTTP head and the upgrade before the WebSocket starts.
    """

    __slots__ = ("_incoming", "_object", "_outgoing", "sock")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, received: bytes = b"") -> None:
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        if received:
            self._incoming.write(received)

    async def handshake(self) -> None:
        """Complete the handshake; ``WireError`` when the peer goes away or refuses."""
        while True:
            try:
                self._object.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                data = await recv_some(self.sock)
                if not data:
                    raise WireError(
                        "connection closed in the TLS handshake (certificate refused?)"
                    ) from None
                self._incoming.write(data)
                continue
            except ssl.SSLError as exc:
                with contextlib.suppress(OSError):  # the alert, for the peer's logs
                    await self._flush()
                raise WireError(f"TLS handshake failed: {exc.reason or exc}") from None
            break
        await self._flush()

    async def _flush(self) -> None:
        if self._outgoing.pending:
            await _send_raw(self.sock, self._outgoing.read())

    def encrypt(self, data: bytes) -> bytes:
        """The socket bytes (one or more records) carrying ``data``."""
        self._object.write(data)
        return self._outgoing.read()

    def decrypt(self, data: bytes, into: bytearray) -> bool:
        """Feed bytes read from the socket; append the plaintext they complete to ``into``.

        False once the peer's ``close_notify`` was read (``read`` then returns b"",
        or raises ``SSLZeroReturnError`` if ours was sent too). A damaged record
        raises ``ssl.SSLError`` (an ``OSError``).
        """
        self._incoming.write(data)
        # With a buffer, ``read`` returns how much it put there (typeshed says bytes).
        read = cast(Callable[[int, bytearray], int], self._object.read)
        try:
            while count := read(TLS_RECORD_BYTES, _PLAIN):
                into += _PLAIN_VIEW[:count]
        except ssl.SSLWantReadError:
            return True
        except ssl.SSLZeroReturnError:
            return False
        return False

    def output(self) -> bytes:
        """Bytes TLS itself wants written (a reply to a key update, an alert), if any."""
        return self._outgoing.read() if self._outgoing.pending else b""

    def close_notify(self) -> bytes:
        """The socket bytes of our ``close_notify`` (best effort: b"" if TLS refuses)."""
        with contextlib.suppress(ssl.SSLError):
            self._object.unwrap()
        return self.output()

    async def recv_some(self) -> bytes:
        """The plaintext of what arrives next (waiting for a whole record); b"" at the end.

        Records already read (e.g. with the handshake's last flight) come first.
        """
        plain = bytearray()
        data = b""
        while True:
            try:
                still_open = self.decrypt(data, plain)
            except ssl.SSLError as exc:
                raise WireError(f"TLS: {exc.reason or exc}") from None
            if plain:
                return bytes(plain)
            if not still_open:
                return b""
            data = await recv_some(self.sock)
            if not data:
                return b""

    async def send_all(self, data: bytes) -> None:
        await _send_raw(self.sock, self.encrypt(data))


#: What an HTTP exchange runs over: a raw socket, or TLS on one.
Channel = socket.socket | TlsSession


async def _recv_some(channel: Channel) -> bytes:
    if isinstance(channel, TlsSession):
        return await channel.recv_some()
    return await recv_some(channel)


async def _send_all(channel: Channel, data: bytes) -> None:
    if isinstance(channel, TlsSession):
        await channel.send_all(data)
    else:
        await _send_raw(channel, data)


async def read_head(sock: Channel, buffer: bytearray) -> bytes:
    """Read until the blank line ending an HTTP head; the head (leftover stays in ``buffer``)."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            return head
        if len(buffer) > MAX_HEAD_BYTES:
            raise WireError("HTTP head too long")
        data = await _recv_some(sock)
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


async def read_body(sock: Channel, buffer: bytearray, length: int) -> bytes:
    """Read exactly ``length`` body bytes (some may already be in ``buffer``)."""
    if length > MAX_BODY_BYTES:
        raise WireError(f"body of {length} bytes is too large")
    while len(buffer) < length:
        data = await _recv_some(sock)
        if not data:
            raise WireError("connection closed inside the body")
        buffer += data
    body = bytes(buffer[:length])
    del buffer[:length]
    return body


async def respond(
    sock: Channel, status: int, body: bytes, content_type: str = "application/json"
) -> None:
    """Write a whole response that closes the connection."""
    head = (
        f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    await _send_all(sock, head.encode("latin-1") + body)


async def http_request(
    host: str,
    port: int,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> HttpResult:
    """One request on a fresh connection (``connection: close``); the whole response."""
    sock = await open_tcp(host, port)
    try:
        lines = [f"{method} {path} HTTP/1.1", f"host: {host}:{port}", "connection: close",
                 f"content-length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        await _send_all(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        buffer = bytearray()
        head = await read_head(sock, buffer)
        first, *header_lines = head.split(b"\r\n")
        status = int(first.split(b" ")[1])
        response_headers = _headers(header_lines)
        if "content-length" in response_headers:
            content = await read_body(sock, buffer, int(response_headers["content-length"]))
        else:  # read to the end of the connection
            while data := await _recv_some(sock):
                buffer += data
                if len(buffer) > MAX_BODY_BYTES:
                    raise WireError("response body too large")
            content = bytes(buffer)
        return HttpResult(status, response_headers, content)
    finally:
        sock.close()


def _accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _WS_GUID).digest()).decode()


async def connect_websocket(
    host: str, port: int, path: str, headers: Mapping[str, str] | None = None
) -> LeanWebSocket:
    """Open a WebSocket (client end) to ``host:port`` at ``path``."""
    sock = await open_tcp(host, port)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"host: {host}:{port}", "upgrade: websocket",
                 "connection: Upgrade", f"sec-websocket-key: {key}", "sec-websocket-version: 13"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        await _send_all(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        buffer = bytearray()
        head = await read_head(sock, buffer)
        first, *header_lines = head.split(b"\r\n")
        status = first.split(b" ")[1]
        if status != b"101":
            raise WireError(f"upgrade refused: {first.decode('latin-1', 'replace')}")
        if _headers(header_lines).get("sec-websocket-accept") != _accept_key(key):
            raise WireError("upgrade answered with a wrong Sec-WebSocket-Accept")
    except BaseException:
        sock.close()
        raise
    return LeanWebSocket(sock, client=True, leftover=bytes(buffer))


async def accept_websocket(
    channel: Channel, request: RequestHead, leftover: bytearray
) -> LeanWebSocket:
    """Answer ``request`` (an upgrade) with 101 and return the server end."""
    key = request.headers.get("sec-websocket-key", "")
    answer = (
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        f"sec-websocket-accept: {_accept_key(key)}\r\n\r\n"
    )
    await _send_all(channel, answer.encode("latin-1"))
    if isinstance(channel, TlsSession):
        return LeanWebSocket(channel.sock, client=False, leftover=bytes(leftover), tls=channel)
    return LeanWebSocket(channel, client=False, leftover=bytes(leftover))


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
    """One WebSocket connection over a raw non-blocking socket (see the module docstring).

    Writes never yield and never interleave: a frame the kernel cannot take whole
    leaves its tail in ``_unsent``, and every later frame queues behind it until
    ``run_flusher`` (which the owner runs as a task) has written it out.

    With ``tls`` (a ``TlsSession`` on ``sock`` whose handshake is done; ``leftover``
    is then plaintext) each frame is encrypted as it is written, so ``_unsent``
    holds TLS records, and what is read is decrypted before it is parsed.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        client: bool,
        leftover: bytes = b"",
        tls: TlsSession | None = None,
    ) -> None:
        self.sock = sock
        self._tls = tls
        self._masked = client
        self._buffer = bytearray(leftover)
        self._unsent = bytearray()
        self._flush_needed = trio.Event()
        self._fragments: list[bytes] = []
        self._fragment_opcode = 0
        self.closed = False
        self.close_code: int | None = None
        # The peer's close frame was read (messages before it are still delivered).
        self._peer_closed = False
        # The peer's TLS close_notify was read (the same, for the end of the stream).
        self._tls_ended = False

    # -- writing -------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        self._write(encode_frame(OP_TEXT, text.encode(), masked=self._masked))

    def send_binary(self, data: bytes) -> None:
        self._write(encode_frame(OP_BINARY, data, masked=self._masked))

    def _write(self, frame: bytes) -> None:
        if self.closed:
            raise WebSocketClosed(self.close_code, "sending on a closed socket")
        if self._tls is not None:
            try:
                frame = self._tls.encrypt(frame)
            except ssl.SSLError as exc:
                self.closed = True
                raise WebSocketClosed(None, f"TLS: {exc.reason or exc}") from None
        self._push(frame)

    def _push(self, data: bytes) -> None:
        """Into the kernel's buffer now, or behind what is already waiting there."""
        if self._unsent:
            self._unsent += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.closed = True
            raise WebSocketClosed(None, str(exc)) from None
        if sent < len(data):
            self._unsent += data[sent:]
            self._flush_needed.set()

    @property
    def unsent_bytes(self) -> int:
        """Bytes waiting for the flusher (the kernel's buffer was full)."""
        return len(self._unsent)

    async def run_flusher(self) -> None:
        """Write out what the kernel could not take at once; run as the connection's task."""
        while True:
            await self._flush_needed.wait()
            self._flush_needed = trio.Event()
            while self._unsent:
                await trio.lowlevel.wait_writable(self.sock)
                try:
                    sent = self.sock.send(self._unsent)
                except BlockingIOError:
                    continue
                except OSError:
                    self.closed = True
                    return
                del self._unsent[:sent]

    def close(self, code: int = 1000) -> None:
        """Send a close frame (best effort) and shut the socket; idempotent."""
        if not self.closed:
            with contextlib.suppress(WebSocketClosed):
                self._write(encode_frame(OP_CLOSE, struct.pack("!H", code), masked=self._masked))
                if self._tls is not None:
                    self._push(self._tls.close_notify())
            self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()

    # -- reading -------------------------------------------------------------------

    async def receive_batch(self) -> list[tuple[int, bytes]]:
        """Wait for data; every complete (opcode, payload) data message that arrived.

        Pings are answered; a close frame is answered and raises ``WebSocketClosed``,
        as does the end of the TCP (or TLS) stream.
        """
        while True:
            messages = self._parse()
            if messages:
                return messages
            if self._peer_closed:
                raise WebSocketClosed(self.close_code, "closed by the peer")
            if self._tls_ended:
                self.closed = True
                raise WebSocketClosed(self.close_code, "TLS closed")
            try:
                data = self.sock.recv(RECV_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except OSError as exc:
                self.closed = True
                raise WebSocketClosed(None, str(exc)) from None
            if not data:
                self.closed = True
                raise WebSocketClosed(self.close_code, "TCP closed")
            if self._tls is None:
                self._buffer += data
            else:
                self._decrypt(self._tls, data)

    def _decrypt(self, tls: TlsSession, data: bytes) -> None:
        try:
            self._tls_ended = not tls.decrypt(data, self._buffer)
        except ssl.SSLError as exc:
            self.closed = True
            raise WebSocketClosed(None, f"TLS: {exc.reason or exc}") from None
        output = tls.output()
        if output and not self.closed:
            self._push(output)

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
            if not self.closed:
                with contextlib.suppress(WebSocketClosed):
                    self._write(
                        encode_frame(OP_CLOSE, payload[:2], masked=self._masked)
                    )
                self.closed = True
            self._peer_closed = True
