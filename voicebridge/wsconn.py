"""A lean WebSocket connection for the call's two sockets: wsproto, read by the call's own task.

Both of a call's sockets carry a message every few milliseconds, and a barge-in
must cross the bridge in one scheduling pass. The general-purpose stacks each put
a task of their own between the socket and the call (hypercorn's connection
reader, trio-websocket's reader) and yield to trio's scheduler on every write;
under load each such hop waits for the scheduler's next batch (profiles and
figures: docs/performance.md). ``WsConnection`` has no task of its own:

- ``receive()`` is called by the call's reader task. It returns a message wsproto
  already parsed if there is one; otherwise it waits until the socket is readable
  (the one scheduling pass), reads everything there is and parses it. Pings are
  answered and pongs noted on the way; a close frame is answered, and the messages
  that came before it are still returned before ``SocketClosed``.
- ``send()`` writes the frame straight into the kernel's buffer and returns
  without yielding when the buffer takes it whole (nearly always); only when the
  buffer is full does it wait, shielded (a torn frame would corrupt the connection)
  and bounded by ``WRITE_DEADLINE_S``. Over TLS (a ``wss://`` Vapi URL,
  ``TlsSocketTransport``) it is the same: the frame is encrypted in memory and its
  records go straight into the kernel's buffer. Writers take turns under a lock
  whose uncontended acquire does not yield either.
- ``ping()`` writes a ping and waits for its pong, which the reader notes: like
  trio-websocket's, it needs someone to be reading.

The framing, masking, UTF-8 checks and close handshake are wsproto's. A message
over ``MAX_MESSAGE_BYTES`` closes the connection with 1009; a frame that breaks the
protocol closes it with wsproto's code (1002, 1007, …). Either way ``receive``
raises ``SocketClosed`` with that code, so the call ends with one log line.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, cast

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from voicebridge.errors import SocketClosed, VoicebridgeError
from voicebridge.sockets import WRITE_DEADLINE_S, SocketWriteTimeout, close_scope

#: Largest message accepted. Twilio's media messages are ~350 bytes and Vapi's
#: control messages a few KiB (an end-of-call report with a transcript can reach
#: hundreds of KiB, but that comes by webhook, not on this socket).
MAX_MESSAGE_BYTES = 1024 * 1024
#: One read takes at most this much: under load several frames arrive together.
RECV_BYTES = 64 * 1024
#: How long ``aclose`` waits for the peer's answering close frame before dropping the
#: connection (within the caller's own deadline). Live peers answer in a round trip.
CLOSE_REPLY_S = 1.0
#: The close code of a connection that ended without a close frame (RFC 6455 7.1.5).
ABNORMAL_CLOSURE = 1006
MESSAGE_TOO_BIG = 1009


class Transport(ABC):
    """A byte stream under a ``WsConnection``: a raw socket, or TLS over one.

    Writing is ``try_send`` (what can go now, without waiting), then ``send_rest``
    for the rest. A transport may take bytes in ``try_send`` that it has not yet
    handed to the kernel (TLS: a record the kernel took only in part). It then says
    so with ``pending``, and the writer must await ``send_rest`` (with what is left
    of its data, possibly nothing) before it lets another writer in.
    """

    #: Bytes ``try_send`` counted as taken are still to be written (``send_rest``).
    pending: bool = False

    @abstractmethod
    async def receive_some(self) -> bytes:
        """Wait for bytes; b"" once the peer has closed (or reset) the connection."""

    @abstractmethod
    def try_send(self, data: memoryview) -> int:
        """Take what can go now, without waiting; how many bytes of ``data`` it took."""

    @abstractmethod
    async def send_rest(self, data: memoryview) -> None:
        """Write what is ``pending``, then all of ``data``, waiting as needed.

        Raises ``SocketClosed``. The caller bounds it (and shields it: a write cut
        short tears the byte stream).
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Close the connection (best effort: nothing to report to the caller)."""


_per_thread = threading.local()


def _receive_buffer() -> memoryview:
    """This thread's read buffer (reads copy out of it before any other code runs)."""
    try:
        buffer: memoryview = _per_thread.buffer
    except AttributeError:
        buffer = _per_thread.buffer = memoryview(bytearray(RECV_BYTES))
    return buffer


class SocketTransport(Transport):
    """A connected non-blocking stdlib TCP socket, driven with trio's I/O waits."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # not TCP (a socketpair in tests): no Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        # Never True: the kernel takes a byte or it does not. An instance attribute
        # (not only the class's) because the hot write path reads it on every frame.
        self.pending = False

    async def receive_some(self) -> bytes:
        while True:
            try:
                # Into one buffer per thread, then copied out at its size: a plain
                # recv(RECV_BYTES) allocates 64 KiB and shrinks it to the few hundred
                # bytes that came, per read, and under load those shrunk blocks
                # fragment the heap (RSS grew ~55 KiB/s at 100 calls; measured).
                buffer = _receive_buffer()
                size = self.sock.recv_into(buffer)
                return bytes(buffer[:size])
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(self.sock)
                except trio.ClosedResourceError:  # aclose() closed it while we waited
                    return b""
            except OSError:  # reset, or closed under us: the connection is gone
                return b""

    def try_send(self, data: memoryview | bytes | bytearray) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            why = os.strerror(exc.errno or 0)
            raise SocketClosed(ABNORMAL_CLOSURE, f"connection lost ({why})") from None

    async def send_rest(self, data: memoryview) -> None:
        while data:
            try:
                await trio.lowlevel.wait_writable(self.sock)
            except trio.ClosedResourceError:  # aclose() closed it while we waited
                raise SocketClosed(ABNORMAL_CLOSURE, "connection closed") from None
            data = data[self.try_send(data) :]

    async def aclose(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
        await trio.lowlevel.checkpoint()


#: Plaintext that ``TlsSocketTransport.send_rest`` encrypts at a time (four TLS
#: records), so that a large message is not all held as ciphertext at once.
ENCRYPT_BYTES = 64 * 1024
_NOTHING = memoryview(b"")


class TlsHandshakeError(VoicebridgeError):
    """The TLS handshake failed: the peer closed the connection, or TLS itself failed
    (an untrusted certificate, a peer that does not speak TLS …); ``str`` says which."""


class TlsSocketTransport(Transport):
    """TLS on a connected non-blocking stdlib TCP socket, with no task of its own.

    OpenSSL works between two memory buffers (``ssl.SSLObject`` over two
    ``ssl.MemoryBIO``): ciphertext read from the socket goes into one, and the
    ciphertext to write comes out of the other. The socket itself is driven with
    trio's I/O waits, as ``SocketTransport`` drives a plain one, so over TLS too:

    - ``try_send`` encrypts the frame and hands its records to the kernel without
      yielding. ``trio.SSLStream`` yields on every write, so every caller frame
      would take the hop to the call's sender task.
    - ``receive_some`` reads the ciphertext into the per-thread buffer and decrypts
      every whole record into it, then copies the plaintext out at its size.
      ``trio.SSLStream`` allocates the largest read and shrinks it to what came,
      twice per read (the socket's and OpenSSL's): the allocations that fragmented
      the heap on the plain path (bench/findings.md, levers 9 and 10).

    Ciphertext the kernel did not take is kept, in order, and ``pending`` is True
    until ``send_rest`` has written it. ``try_send`` takes nothing while any is kept,
    so plaintext is encrypted only when its records can follow at once.

    ``handshake`` comes first. For a client, ``server_hostname`` is the name the
    certificate must carry (and the SNI).
    """

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        server_side: bool = False,
    ) -> None:
        # The raw socket's own transport writes the ciphertext and closes the socket.
        self._raw = SocketTransport(sock)
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        # Ciphertext the kernel has not taken yet, oldest first.
        self._owed = bytearray()
        self.pending = False
        # Nothing more to read: the peer's close_notify, the end of the TCP stream,
        # a reset, or a record that does not decrypt.
        self._eof = False
        # The handshake completed: a close_notify is owed on closing.
        self._established = False

    async def handshake(self) -> None:
        """Do the TLS handshake, bounded by the caller's scope; ``TlsHandshakeError``."""
        buffer = _receive_buffer()
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                with contextlib.suppress(SocketClosed):
                    self._push()  # the alert OpenSSL wrote to tell the peer why
                raise TlsHandshakeError(f"{type(exc).__name__}: {exc}") from exc
            await self._send_handshake()
            if not await self._read_ciphertext(buffer):
                raise TlsHandshakeError("the peer closed the connection")
        await self._send_handshake()  # our Finished (a client), session tickets (a server)
        self._established = True

    async def _send_handshake(self) -> None:
        try:
            await self.send_rest(_NOTHING)
        except SocketClosed as exc:
            raise TlsHandshakeError(exc.reason) from None

    async def receive_some(self) -> bytes:
        buffer = _receive_buffer()
        while True:
            size = self._decrypt_into(buffer)
            if size:
                return bytes(buffer[:size])
            if self._eof or not await self._read_ciphertext(buffer):
                self._eof = True
                return b""

    def _decrypt_into(self, buffer: memoryview) -> int:
        """Decrypt the whole records OpenSSL holds into ``buffer``, as many as fit.

        All of them, not one (``SSLObject.read`` returns one record at a time): the
        frames that came in one read are parsed in one pass, as on a plain socket.
        """
        tls = self._tls
        incoming = self._incoming
        size = 0
        limit = len(buffer)
        while size < limit and (incoming.pending or tls.pending()):
            try:
                # Into the buffer, it returns a count (typeshed says bytes).
                got = cast(int, tls.read(limit - size, buffer[size:]))
            except ssl.SSLWantReadError:
                break  # the rest of a record is still to come
            except ssl.SSLError:  # a broken record, or a TCP end without close_notify
                self._eof = True
                break
            if not got:  # the peer's close_notify
                self._eof = True
                break
            size += got
        if self._outgoing.pending:
            # OpenSSL answered something on the way (a TLS 1.3 key update). Whatever
            # the kernel does not take now goes ahead of the next write.
            with contextlib.suppress(SocketClosed):  # the next read finds the loss too
                self._push()
        return size

    async def _read_ciphertext(self, buffer: memoryview) -> bool:
        """Wait for ciphertext and hand it to OpenSSL; False once the connection is gone."""
        while True:
            try:
                size = self.sock.recv_into(buffer)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(self.sock)
                except trio.ClosedResourceError:  # aclose() closed it while we waited
                    return False
                continue
            except OSError:  # reset, or closed under us
                return False
            if not size:
                return False
            self._incoming.write(buffer[:size])
            return True

    def try_send(self, data: memoryview) -> int:
        if self.pending:
            self._push()
            if self.pending:
                return 0  # older ciphertext goes first (send_rest)
        self._encrypt(data)
        self._push()
        return len(data)

    async def send_rest(self, data: memoryview) -> None:
        while True:
            self._push()
            if not self.pending:
                if not data:
                    return
                self._encrypt(data[:ENCRYPT_BYTES])
                data = data[ENCRYPT_BYTES:]
                continue
            try:
                await trio.lowlevel.wait_writable(self.sock)
            except trio.ClosedResourceError:  # aclose() closed it while we waited
                raise SocketClosed(ABNORMAL_CLOSURE, "connection closed") from None

    def _encrypt(self, data: memoryview) -> None:
        if not data:
            return
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:  # after a close_notify, or a broken TLS state
            raise SocketClosed(ABNORMAL_CLOSURE, f"TLS failed ({exc})") from None

    def _push(self) -> None:
        """Hand the ciphertext to the kernel, oldest first, without waiting; keep the rest."""
        owed = self._owed
        if self._outgoing.pending:
            records = self._outgoing.read()
            if not owed:  # the common case: nothing older, and the kernel takes it all
                sent = self._raw.try_send(records)
                if sent < len(records):
                    owed += memoryview(records)[sent:]
                    self.pending = True
                return
            owed += records
        if owed:
            del owed[: self._raw.try_send(owed)]
            self.pending = bool(owed)

    async def aclose(self) -> None:
        if self._established and self.sock.fileno() >= 0:
            self._established = False
            # Best effort: a close_notify, if the kernel takes it now.
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()  # writes it, then wants the peer's (not awaited)
            with contextlib.suppress(SocketClosed):
                self._push()
        await self._raw.aclose()


class WsConnection:
    """``PingableSocket`` over an open wsproto connection; see the module docstring.

    ``ws`` has finished its opening handshake (``accept_upgrade``, or the Vapi
    client's); bytes read past the handshake are already in it.
    """

    def __init__(
        self,
        transport: Transport,
        ws: WSConnection,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._transport = transport
        self._ws = ws
        self._max_message_bytes = max_message_bytes
        self._messages: deque[str | bytes] = deque()
        # The frames of a fragmented message so far (rare: Twilio and Vapi send whole ones).
        self._partial: list[Any] | None = None
        self._partial_size = 0
        # Writers take turns. A semaphore, not a Lock: the rest of a frame that
        # send_nowait began is finished (and the turn handed back) by another task.
        self._write_lock = trio.Semaphore(1, max_value=1)
        # The rest of a frame send_nowait began; the write lock is held until flushed.
        self._tail: memoryview | None = None
        # Payloads of our pings awaiting their pong.
        self._pings: dict[bytes, trio.Event] = {}
        self._ping_seq = 0
        # Set once the connection is closed: the code for SocketClosed, and why.
        self._close_code: int | None = None
        self._close_reason = ""
        self._peer_closed = trio.Event()
        self._transport_closed = False
        # True while a task is in receive(): aclose then leaves the reading to it.
        self._reading = False

    @property
    def close_code(self) -> int | None:
        """The close code once closed (the peer's, ours, or 1006); None while open."""
        return self._close_code

    # -- reading --------------------------------------------------------------------

    async def receive(self) -> str | bytes:
        while True:
            await self._handle_events()
            if self._messages:
                return self._messages.popleft()
            if self._close_code is not None:
                raise SocketClosed(self._close_code, self._close_reason)
            self._reading = True
            try:
                data = await self._transport.receive_some()
            finally:
                self._reading = False
            if not data:
                self._lost("connection lost without a close frame")
                continue
            self._ws.receive_data(data)

    async def _handle_events(self) -> None:
        for event in self._ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                self._on_message(event)
            elif isinstance(event, Ping):
                await self._write_event(event.response(), quiet=True)
            elif isinstance(event, Pong):
                pong = self._pings.pop(bytes(event.payload), None)
                if pong is not None:
                    pong.set()
            elif isinstance(event, CloseConnection):
                await self._on_close(event)
            # Nothing else arrives on an open connection.

    def _on_message(self, event: TextMessage | BytesMessage) -> None:
        if self._close_code is not None:
            return
        data = event.data
        if event.message_finished and self._partial is None:
            if len(data) > self._max_message_bytes:
                self._fail(MESSAGE_TOO_BIG, f"message over {self._max_message_bytes} bytes")
                return
            self._messages.append(data if isinstance(data, str) else bytes(data))
            return
        self._partial_size += len(data)
        if self._partial_size > self._max_message_bytes:
            self._partial = None
            self._fail(MESSAGE_TOO_BIG, f"message over {self._max_message_bytes} bytes")
            return
        if self._partial is None:
            self._partial = []
        self._partial.append(data)
        if event.message_finished:
            parts = self._partial
            self._partial = None
            self._partial_size = 0
            joined = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
            self._messages.append(joined)

    async def _on_close(self, event: CloseConnection) -> None:
        state = self._ws.state
        if state is ConnectionState.REMOTE_CLOSING:
            # The peer closed first: answer with the same code, then we are done.
            await self._write_event(event.response(), quiet=True)
            self._set_closed(event.code, event.reason or "closed by the peer")
        elif state is ConnectionState.CLOSED:
            # The answer to our own close frame.
            self._set_closed(event.code, event.reason or "")  # no-op: ours is recorded
        else:
            # wsproto found the peer's bytes broken (ParseFailed): close with its code.
            self._fail(event.code, event.reason or "protocol error")
        self._peer_closed.set()

    def _fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol: send our close frame (best effort), stop reading."""
        self._set_closed(code, reason)
        with contextlib.suppress(LocalProtocolError):
            data = self._ws.send(CloseConnection(code=code, reason=reason[:100]))
            if self._write_lock.value:
                with contextlib.suppress(SocketClosed):
                    self._transport.try_send(memoryview(data))
        self._peer_closed.set()

    def _lost(self, reason: str) -> None:
        self._set_closed(ABNORMAL_CLOSURE, reason)
        self._peer_closed.set()

    def _set_closed(self, code: int, reason: str) -> None:
        if self._close_code is None:
            self._close_code = code
            self._close_reason = reason
        # Nobody will answer a ping on a closed connection.
        for pong in self._pings.values():
            pong.set()
        self._pings.clear()

    # -- writing --------------------------------------------------------------------

    async def send(self, message: str | bytes) -> None:
        if self._close_code is not None or self._ws.state is not ConnectionState.OPEN:
            raise SocketClosed(self._close_code, self._close_reason or "closing")
        if isinstance(message, str):
            await self._write(self._ws.send(TextMessage(data=message)))
        else:
            await self._write(self._ws.send(BytesMessage(data=message)))

    def send_nowait(self, message: str | bytes) -> bool:
        """Write one message now, without waiting, or say it cannot be done.

        False (nothing written) when another write holds the socket, the connection is
        closing, or the transport takes none of the frame (the kernel's buffer is full,
        or TLS still has older records to write).
        True when the frame went out, or part of it: then ``needs_flush`` is True and
        the rest waits for ``flush()``, which the caller must see to; until then the
        socket stays locked, so every other write waits behind that rest. Over TLS the
        rest may be ciphertext only (the frame was encrypted whole, and the kernel
        took part of its records).
        """
        if (
            self._write_lock.value == 0
            or self._close_code is not None
            or self._ws.state is not ConnectionState.OPEN
        ):
            return False
        if isinstance(message, str):
            data = memoryview(self._ws.send(TextMessage(data=message)))
        else:
            data = memoryview(self._ws.send(BytesMessage(data=message)))
        transport = self._transport
        try:
            sent = transport.try_send(data)
        except SocketClosed:
            return False  # the next write (or the reader) reports it
        if sent == 0:
            return False
        if sent < len(data) or transport.pending:
            self._write_lock.acquire_nowait()
            self._tail = data[sent:]  # nothing, when only TLS records are left
        return True

    @property
    def needs_flush(self) -> bool:
        """Part of a frame from ``send_nowait`` is still to be written (``flush``)."""
        return self._tail is not None

    async def flush(self) -> None:
        """Finish the frame ``send_nowait`` began; shielded and bounded like ``send``."""
        tail = self._tail
        if tail is None:
            return
        self._tail = None
        try:
            await self._finish_write(tail)
        finally:
            self._write_lock.release()

    async def _write_event(self, event: Event, *, quiet: bool = False) -> None:
        try:
            data = self._ws.send(event)
        except LocalProtocolError:
            if quiet:
                return
            raise SocketClosed(self._close_code, "closing") from None
        try:
            await self._write(data)
        except SocketClosed:
            if not quiet:
                raise

    async def _write(self, data: bytes) -> None:
        """Write one whole frame, in turn with other writers; shielded and bounded."""
        lock = self._write_lock
        view = memoryview(data)
        if lock.value:
            lock.acquire_nowait()  # the common case: no yield
            try:
                transport = self._transport
                sent = transport.try_send(view)
                if sent == len(view) and not transport.pending:
                    return
                await self._finish_write(view[sent:])
            finally:
                lock.release()
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(WRITE_DEADLINE_S) as wait_scope:
                await lock.acquire()
        if wait_scope.cancelled_caught:
            raise SocketWriteTimeout(None, "write deadline passed (another write stuck)")
        try:
            await self._finish_write(view)
        finally:
            lock.release()

    async def _finish_write(self, rest: memoryview) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(WRITE_DEADLINE_S) as write_scope:
                await self._transport.send_rest(rest)
        if write_scope.cancelled_caught:
            # Part of a frame may have gone out: the connection cannot be used again.
            self._lost("write deadline passed")
            raise SocketWriteTimeout(None, "write deadline passed")

    async def ping(self) -> None:
        """Write a ping and wait for its pong (noted by whoever is in ``receive``)."""
        if self._close_code is not None:  # nobody would ever answer it
            raise SocketClosed(self._close_code, self._close_reason)
        self._ping_seq += 1
        payload = self._ping_seq.to_bytes(8, "big")
        pong = trio.Event()
        self._pings[payload] = pong
        try:
            await self._write_event(Ping(payload=payload))
            await pong.wait()
        finally:
            self._pings.pop(payload, None)
        if self._close_code is not None:
            raise SocketClosed(self._close_code, self._close_reason)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close politely: our close frame, the peer's answer (briefly), then TCP."""
        if self._transport_closed:
            return
        with close_scope():
            try:
                # Lost (1006: the peer vanished, or a write was cut short): nothing more
                # can be written, and a close frame after a torn frame is garbage.
                if self._ws.state is ConnectionState.OPEN and self._close_code is None:
                    self._set_closed(code, reason or "closed by us")
                    close = CloseConnection(code=code, reason=reason[:100])
                    await self._write_close(self._ws.send(close))
                    with trio.move_on_after(CLOSE_REPLY_S):
                        if self._reading:
                            await self._peer_closed.wait()
                        else:
                            await self._read_until_closed()
            finally:
                self._transport_closed = True
                await self._transport.aclose()

    async def _write_close(self, data: bytes) -> None:
        """Write our close frame in turn with other writers, within ``close_scope``.

        Unlike ``_write`` it is not shielded on its own: the caller's deadline bounds
        it, also while it waits for a writer stuck mid-frame (closing the transport
        then releases that writer). A close frame cut short ends a connection that
        is ending anyway.
        """
        with contextlib.suppress(SocketClosed):
            async with self._write_lock:
                view = memoryview(data)
                transport = self._transport
                sent = transport.try_send(view)
                if sent < len(view) or transport.pending:
                    await transport.send_rest(view[sent:])

    async def _read_until_closed(self) -> None:
        """Read (and drop) until the peer's close frame, unless a reader is doing it."""
        while not self._peer_closed.is_set():
            data = await self._transport.receive_some()
            if not data:
                return
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, CloseConnection):
                    self._peer_closed.set()


# -- the server's side of the opening handshake -------------------------------------


class UpgradeRefused(Exception):
    """A request that is not a valid WebSocket upgrade; ``answer`` is the HTTP reply."""

    def __init__(self, reason: str, answer: bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answer = answer


def read_upgrade(head: bytes) -> tuple[WSConnection, Request]:
    """Parse an upgrade request (its head, and whatever followed it).

    Raises ``UpgradeRefused`` with the 400 to send for anything wsproto does not
    accept as a WebSocket upgrade (a missing key, a wrong version, not a GET …).
    """
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(head)
        event = next(ws.events(), None)
    except RemoteProtocolError as exc:
        raise UpgradeRefused(str(exc), _BAD_UPGRADE) from None
    if not isinstance(event, Request):
        raise UpgradeRefused("not a complete upgrade request", _BAD_UPGRADE)
    return ws, event


async def accept_upgrade(
    transport: Transport, ws: WSConnection, *, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> WsConnection:
    """Answer the upgrade ``read_upgrade`` parsed (101) and return the open connection."""
    data = memoryview(ws.send(AcceptConnection()))
    sent = transport.try_send(data)
    if sent < len(data) or transport.pending:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(WRITE_DEADLINE_S) as write_scope:
                await transport.send_rest(data[sent:])
        if write_scope.cancelled_caught:
            raise SocketWriteTimeout(None, "write deadline passed")
    return WsConnection(transport, ws, max_message_bytes=max_message_bytes)


_BAD_UPGRADE = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 24\r\n"
    b"connection: close\r\n\r\nnot a WebSocket upgrade\n"
)
