"""Byte transports under the lean WebSocket connection: a raw socket, or TLS in memory over one.

A ``Transport`` is driven by the task that uses it (no task of its own): reads wait
with trio's I/O waits, writes go straight into the kernel's buffer. The media
socket, the assistant's leg, the simulators and the load generator all use these.

Reads skip trio's scheduler when bytes are already there, but never for long: see
``Transport.receive_some`` and ``FAIR_SLICE_BYTES``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from abc import ABC, abstractmethod
from typing import cast

import trio

from voicebridge.errors import SocketClosed, VoicebridgeError

#: One read takes at most this much: under load several frames arrive together.
RECV_BYTES = 64 * 1024
#: The close code of a connection that ended without a close frame (RFC 6455 7.1.5).
ABNORMAL_CLOSURE = 1006
#: Bytes ``receive_some`` may return without a checkpoint before it gives trio's
#: scheduler a turn (then it checkpoints before its next read). One full read: a live
#: call's frames (a few hundred bytes every 20 ms) never come near it, so the hot path
#: never pays for it, while a peer whose socket is always readable holds the loop for
#: less than two reads' worth of bytes (and the work its reader does with them).
FAIR_SLICE_BYTES = RECV_BYTES


class Transport(ABC):
    """A byte stream under a ``WsConnection``: a raw socket, or TLS over one.

    Checkpoints (the contract every transport keeps; trio's own socket methods
    checkpoint always, these skip the scheduler where it is safe and bounded):

    - ``receive_some`` returns without a checkpoint when bytes are readable at once,
      until ``FAIR_SLICE_BYTES`` have been returned that way since its last
      checkpoint; the next call then checkpoints before it reads. It checkpoints
      whenever it waits. So a peer that always has data still lets trio run other
      tasks every ``FAIR_SLICE_BYTES``. A transport may wait before it reads (one
      pass) where a read would most likely find nothing: ``SocketTransport`` does
      after a read that emptied the kernel's buffer.
    - ``try_send`` is synchronous: never a checkpoint.
    - ``send_rest`` checkpoints when it waits for the kernel; with nothing left to
      write it may return without one. Writes need no bound of their own: each one
      answers something read (bounded above) or a timer.
    - ``aclose`` always checkpoints.

    Writing is ``try_send`` (what can go now, without waiting), then ``send_rest``
    for the rest. A transport may take bytes in ``try_send`` that it has not yet
    handed to the kernel (TLS: a record the kernel took only in part). It then says
    so with ``pending``, and the writer must await ``send_rest`` (with what is left
    of its data, possibly nothing) before it lets another writer in.
    """

    #: Bytes ``try_send`` counted as taken are still to be written (``send_rest``).
    pending: bool = False

    #: Bytes returned by ``receive_some`` since its last checkpoint.
    #: Invariant: below ``FAIR_SLICE_BYTES`` + ``RECV_BYTES``.
    _unyielded = 0

    @abstractmethod
    async def receive_some(self) -> bytes:
        """Wait for bytes; b"" once the peer has closed (or reset) the connection.

        Without a checkpoint while bytes are readable at once, within
        ``FAIR_SLICE_BYTES`` (see the class docstring). Cancelled: nothing was read
        (every checkpoint comes before bytes are taken from the socket).
        """

    async def _take_turn_if_due(self) -> None:
        """Checkpoint if ``FAIR_SLICE_BYTES`` were returned since the last checkpoint.

        A counter, not a clock: the hot path pays one comparison per read.
        """
        if self._unyielded >= FAIR_SLICE_BYTES:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()

    #: The last read of the socket took less than a full buffer: the kernel had no
    #: more then, and a read straight after would almost always fail.
    _drained = False

    async def _wait_readable(self, sock: socket.socket) -> bool:
        """Wait until ``sock`` is readable; False if ``aclose`` closed it meanwhile."""
        self._unyielded = 0
        self._drained = False
        try:
            await trio.lowlevel.wait_readable(sock)
        except trio.ClosedResourceError:
            return False
        return True

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


def peer_address(sock: socket.socket) -> str:
    """The connected peer as ``host:port`` (``[host]:port`` for IPv6) for log lines.

    "?" when the kernel no longer knows it (the peer already reset the connection);
    the socket path, or "local", for a Unix socket.
    """
    try:
        peer = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer) if peer else "local"


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
        self._unyielded = 0
        self._drained = False

    async def receive_some(self) -> bytes:
        await self._take_turn_if_due()
        sock = self.sock
        # The last read emptied the kernel's buffer, a moment ago: a read now would
        # almost always fail (a system call and an exception per message, measured),
        # so wait first. Data that came meanwhile costs one pass.
        if self._drained and not await self._wait_readable(sock):
            return b""
        while True:
            try:
                # Into one buffer per thread, then copied out at its size: a plain
                # recv(RECV_BYTES) allocates 64 KiB and shrinks it to the few hundred
                # bytes that came, per read, and under load those shrunk blocks
                # fragment the heap (RSS grew ~55 KiB/s at 100 calls; measured).
                buffer = _receive_buffer()
                size = sock.recv_into(buffer)
            except BlockingIOError:
                if not await self._wait_readable(sock):
                    return b""
                continue
            except OSError:  # reset, or closed under us: the connection is gone
                return b""
            self._unyielded += size
            self._drained = 0 < size < RECV_BYTES
            return bytes(buffer[:size])

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
        self._unyielded = 0
        self._drained = False

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
        self._drained = False  # the peer's first frames may have come with its Finished

    async def _send_handshake(self) -> None:
        try:
            await self.send_rest(_NOTHING)
        except SocketClosed as exc:
            raise TlsHandshakeError(exc.reason) from None

    async def receive_some(self) -> bytes:
        await self._take_turn_if_due()
        buffer = _receive_buffer()
        while True:
            size = self._decrypt_into(buffer)
            if size:
                self._unyielded += size
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
        """Wait for ciphertext and hand it to OpenSSL; False once the connection is gone.

        After a read that emptied the kernel's buffer it waits before reading again,
        as ``SocketTransport.receive_some`` does.
        """
        sock = self.sock
        if self._drained and not await self._wait_readable(sock):
            return False
        while True:
            try:
                size = sock.recv_into(buffer)
            except BlockingIOError:
                if not await self._wait_readable(sock):
                    return False
                continue
            except OSError:  # reset, or closed under us
                return False
            if not size:
                return False
            self._drained = size < len(buffer)
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
