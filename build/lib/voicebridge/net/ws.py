"""A lean WebSocket connection for the call's two sockets: wsproto, read by the call's own task.

Both of a call's sockets carry a message every few milliseconds, and a barge-in
must cross the bridge in one scheduling pass. The general-purpose stacks each put
a task of their own between the socket and the call (hypercorn's connection
reader, trio-websocket's reader) and yield to trio's scheduler on every write;
under load each such hop waits for the scheduler's next batch (profiles and
figures: docs/performance.md). ``WsConnection`` has no task of its own:

- ``receive()`` is called by the call's reader task. It parses the next frame of
  what was read already and returns it if it ends a message; otherwise it reads
  what the socket has, and waits until the socket is readable (the one scheduling
  pass) only when it has nothing. Frames are parsed one at a time, as they are
  asked for. Pings are answered and pongs noted on the way; a close frame is
  answered, and the messages that came before it are still returned before
  ``SocketClosed``. It skips the scheduler only within a slice: at least one
  checkpoint per ``FAIR_SLICE_EVENTS`` frames, and the transport's own per
  ``FAIR_SLICE_BYTES`` (``sockets.MessageSocket`` states the contract).
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
import re
from collections.abc import Iterator
from typing import Any

import attrs
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

from voicebridge.errors import SocketClosed
from voicebridge.net.transport import ABNORMAL_CLOSURE, Transport
from voicebridge.sockets import (
    FAIR_SLICE_EVENTS,
    WRITE_DEADLINE_S,
    SocketWriteTimeout,
    close_scope,
)

#: Largest message accepted. Twilio's media messages are ~350 bytes and Vapi's
#: control messages a few KiB (an end-of-call report with a transcript can reach
#: hundreds of KiB, but that comes by webhook, not on this socket).
MAX_MESSAGE_BYTES = 1024 * 1024
#: How long ``aclose`` waits for the peer's answering close frame before dropping the
#: connection (within the caller's own deadline). Live peers answer in a round trip.
CLOSE_REPLY_S = 1.0
MESSAGE_TOO_BIG = 1009


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
        # The events of the bytes fed to wsproto so far, parsed as they are taken.
        self._events: Iterator[Event] = ws.events()
        # Frames this connection may still handle before its reader checkpoints.
        # Invariant: 0 <= _slice_left <= FAIR_SLICE_EVENTS; at 0 no frame is taken
        # before a checkpoint (which refills it).
        self._slice_left = FAIR_SLICE_EVENTS
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
        """The next message; ``SocketClosed`` (with the code) once the connection is closed.

        Returns without a checkpoint when the message's bytes were read already or
        are readable at once; checkpoints at least once per ``FAIR_SLICE_EVENTS``
        frames it handles, and whenever it waits. Cancelled: no message is lost
        (every checkpoint comes before a frame is taken from wsproto).
        """
        while True:
            await self._take_turn_if_due()
            event = next(self._events, None)
            if event is not None:
                self._slice_left -= 1
                message = await self._handle(event)
                if message is not None:
                    return message
                continue
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
            self._feed(data)

    async def _take_turn_if_due(self) -> None:
        """Checkpoint once ``FAIR_SLICE_EVENTS`` frames were handled since the last time.

        A counter, not a clock: one decrement per frame on the hot path.
        """
        if self._slice_left <= 0:
            self._slice_left = FAIR_SLICE_EVENTS
            await trio.lowlevel.checkpoint()

    def _feed(self, data: bytes) -> None:
        self._ws.receive_data(data)
        self._events = self._ws.events()

    async def _handle(self, event: Event) -> str | bytes | None:
        """Act on one event; the message it completes, if any."""
        match event:
            case TextMessage() | BytesMessage():
                return self._on_message(event)
            case Ping():
                if self._close_code is None:  # a closing connection owes no pong
                    await self._write_event(event.response(), quiet=True)
            case Pong():
                pong = self._pings.pop(bytes(event.payload), None)
                if pong is not None:
                    pong.set()
            case CloseConnection():
                await self._on_close(event)
            case _:
                pass  # nothing else arrives on an open connection
        return None

    def _on_message(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        """The message ``event`` completes, if any (none once the connection is closed)."""
        if self._close_code is not None:
            return None
        data = event.data
        if event.message_finished and self._partial is None:
            if len(data) > self._max_message_bytes:
                self._fail(MESSAGE_TOO_BIG, f"message over {self._max_message_bytes} bytes")
                return None
            return data if isinstance(data, str) else bytes(data)
        self._partial_size += len(data)
        if self._partial_size > self._max_message_bytes:
            self._partial = None
            self._fail(MESSAGE_TOO_BIG, f"message over {self._max_message_bytes} bytes")
            return None
        if self._partial is None:
            self._partial = []
        self._partial.append(data)
        if not event.message_finished:
            return None
        parts = self._partial
        self._partial = None
        self._partial_size = 0
        return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)

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
        """Read (and drop) until the peer's close frame, unless a reader is doing it.

        As fair as ``receive``: a peer that keeps sending instead of answering does
        not hold the loop, and the caller's deadline is seen.
        """
        while not self._peer_closed.is_set():
            await self._take_turn_if_due()
            event = next(self._events, None)
            if event is None:
                data = await self._transport.receive_some()
                if not data:
                    return
                self._feed(data)
                continue
            self._slice_left -= 1
            if isinstance(event, CloseConnection):
                self._peer_closed.set()


# -- the server's side of the opening handshake -------------------------------------


class UpgradeRefused(Exception):
    """A request that is not a valid WebSocket upgrade; ``answer`` is the HTTP reply."""

    def __init__(self, reason: str, answer: bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answer = answer


#: Where a request head ends, as h11 finds it: the first blank line (bare LFs too).
_HEAD_END = re.compile(rb"\n\r?\n")


@attrs.frozen
class Upgrade:
    """An upgrade request ``read_upgrade`` parsed, to answer with ``accept_upgrade``."""

    #: wsproto's server side of the connection, past the request.
    ws: WSConnection
    request: Request
    #: What the client sent after the head in the same read: its first frames, when
    #: it did not wait for our 101 (clients may pipeline them).
    early: bytes


def read_upgrade(data: bytes) -> Upgrade:
    """Parse an upgrade request (its head, and whatever followed it).

    Raises ``UpgradeRefused`` with the 400 to send for anything wsproto does not
    accept as a WebSocket upgrade (a missing key, a wrong version, not a GET …).
    The bytes after the head are kept for ``accept_upgrade``: wsproto hands the
    bytes h11 read past the request to a client's connection, but not to a
    server's, so they go in only once the connection is open.
    """
    end = _HEAD_END.search(data)
    split = end.end() if end is not None else len(data)
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(data[:split])
        event = next(ws.events(), None)
    except RemoteProtocolError as exc:
        raise UpgradeRefused(str(exc), _BAD_UPGRADE) from None
    if not isinstance(event, Request):
        raise UpgradeRefused("not a complete upgrade request", _BAD_UPGRADE)
    return Upgrade(ws=ws, request=event, early=data[split:])


async def accept_upgrade(
    transport: Transport, upgrade: Upgrade, *, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> WsConnection:
    """Answer the upgrade ``read_upgrade`` parsed (101) and return the open connection.

    Its first ``receive`` returns the messages that came with the request first.
    Raises ``SocketClosed`` (the client left), ``SocketWriteTimeout``. The 101 is
    written shielded (a torn answer would be garbage) within ``WRITE_DEADLINE_S``.
    """
    ws = upgrade.ws
    data = memoryview(ws.send(AcceptConnection()))
    sent = transport.try_send(data)
    if sent < len(data) or transport.pending:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(WRITE_DEADLINE_S) as write_scope:
                await transport.send_rest(data[sent:])
        if write_scope.cancelled_caught:
            raise SocketWriteTimeout(None, "write deadline passed")
    if upgrade.early:
        ws.receive_data(upgrade.early)
    return WsConnection(transport, ws, max_message_bytes=max_message_bytes)


_BAD_UPGRADE = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 24\r\n"
    b"connection: close\r\n\r\nnot a WebSocket upgrade\n"
)
