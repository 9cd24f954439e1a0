"""A lean WebSocket connection for the call's two sockets, read by the call's own task.

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

The framing, masking and UTF-8 checks are ``net.frames``'; the opening handshake is
wsproto's (``read_upgrade``, and the Vapi client's). A message over
``MAX_MESSAGE_BYTES`` closes the connection with 1009 (judged from the frame's
header, before its payload is read); a frame that breaks the protocol closes it
with the code ``net.frames`` names (1002, 1007). Either way ``receive``
raises ``SocketClosed`` with that code, so the call ends with one log line.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import attrs
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.utilities import RemoteProtocolError

from voicebridge.errors import SocketClosed
from voicebridge.net.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    ProtocolViolation,
    client_frame,
    close_payload,
    server_frame,
)
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


class WsConnection:
    """``PingableSocket`` over a connection past its opening handshake; see the module docstring.

    ``client``: we opened the connection (the Vapi leg), so our frames are masked and
    the peer's must not be; otherwise we are the server (the media socket). ``early``:
    bytes read past the handshake, the peer's first frames.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        client: bool,
        early: bytes = b"",
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._transport = transport
        self._parser = FrameParser(masked=not client, max_message_bytes=max_message_bytes)
        if early:
            self._parser.feed(early)
        self._frame = client_frame if client else server_frame
        # Frames this connection may still handle before its reader checkpoints.
        # Invariant: 0 <= _slice_left <= FAIR_SLICE_EVENTS; at 0 no frame is taken
        # before a checkpoint (which refills it).
        self._slice_left = FAIR_SLICE_EVENTS
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
        # Our close frame is written (or being written): no frame may follow it.
        self._close_sent = False
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
        (every checkpoint comes before a frame is taken from the parser).
        """
        parser = self._parser
        while True:
            if self._slice_left <= 0:
                # A counter, not a clock: one decrement per frame on the hot path.
                self._slice_left = FAIR_SLICE_EVENTS
                await trio.lowlevel.checkpoint()
            try:
                frame = parser.next()
            except ProtocolViolation as exc:
                self._fail(exc.code, exc.reason)
                continue
            if frame is not None:
                self._slice_left -= 1
                opcode, payload = frame
                if opcode >= OP_CLOSE:
                    await self._control(opcode, payload)
                elif opcode != OP_CONTINUATION and self._close_code is None:
                    return payload  # type: ignore[return-value]
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
            parser.feed(data)

    async def _take_turn_if_due(self) -> None:
        """Checkpoint once ``FAIR_SLICE_EVENTS`` frames were handled since the last time."""
        if self._slice_left <= 0:
            self._slice_left = FAIR_SLICE_EVENTS
            await trio.lowlevel.checkpoint()

    async def _control(self, opcode: int, payload: Any) -> None:
        """Act on a control frame: answer a ping, note a pong, answer a close."""
        if opcode == OP_PING:
            if self._close_code is None and not self._close_sent:  # a closing one owes none
                await self._write_control(self._frame(OP_PONG, payload))
        elif opcode == OP_PONG:
            pong = self._pings.pop(payload, None)
            if pong is not None:
                pong.set()
        else:
            code, reason = payload
            if not self._close_sent:
                # The peer closed first: answer with the same code, then we are done.
                self._close_sent = True
                await self._write_control(self._frame(OP_CLOSE, close_payload(code, reason)))
                self._set_closed(code, reason or "closed by the peer")
            else:
                # The answer to our own close frame (ours is recorded already).
                self._set_closed(code, reason)
            self._peer_closed.set()

    def _fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol: send our close frame (best effort), stop reading."""
        self._set_closed(code, reason)
        if not self._close_sent:
            self._close_sent = True
            data = self._frame(OP_CLOSE, close_payload(code, reason[:100]))
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

    def _data_frame(self, message: str | bytes) -> bytes:
        if isinstance(message, str):
            return self._frame(OP_TEXT, message.encode("utf-8"))
        return self._frame(OP_BINARY, message)

    async def send(self, message: str | bytes) -> None:
        if self._close_code is not None or self._close_sent:
            raise SocketClosed(self._close_code, self._close_reason or "closing")
        await self._write(self._data_frame(message))

    def send_nowait(self, *messages: str | bytes) -> bool:
        """Write messages now, in order and in one system call, or say it cannot be done.

        False (nothing written) when another write holds the socket, the connection is
        closing, or the transport takes none of the frames (the kernel's buffer is
        full, or TLS still has older records to write).
        True when the frames went out, or the first part of them: then ``needs_flush``
        is True and the rest waits for ``flush()``, which the caller must see to; until
        then the socket stays locked, so every other write waits behind that rest. Over
        TLS the rest may be ciphertext only (the frames were encrypted whole, and the
        kernel took part of their records).
        """
        if self._write_lock.value == 0 or self._close_code is not None or self._close_sent:
            return False
        if len(messages) == 1:
            data = memoryview(self._data_frame(messages[0]))
        else:
            data = memoryview(b"".join(map(self._data_frame, messages)))
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
        """Part of what ``send_nowait`` took is still to be written (``flush``)."""
        return self._tail is not None

    async def flush(self) -> None:
        """Finish the frames ``send_nowait`` began; shielded and bounded like ``send``."""
        tail = self._tail
        if tail is None:
            return
        self._tail = None
        try:
            await self._finish_write(tail)
        finally:
            self._write_lock.release()

    async def _write_control(self, data: bytes) -> None:
        """Write a pong or the answer to a close; a connection already gone is no error."""
        with contextlib.suppress(SocketClosed):
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        """Write one whole frame, in turn with other writers; shielded and bounded."""
        lock = self._write_lock
        view = memoryview(data)
        if self._tail is not None:
            # The rest of a frame send_nowait began, not finished yet by the task that
            # owes it (which may never: it can be cancelled as the call ends). It goes
            # first, and this frame after it.
            await self.flush()
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
        if self._close_code is not None or self._close_sent:  # nobody would ever answer it
            raise SocketClosed(self._close_code, self._close_reason or "closing")
        self._ping_seq += 1
        payload = self._ping_seq.to_bytes(8, "big")
        pong = trio.Event()
        self._pings[payload] = pong
        try:
            await self._write(self._frame(OP_PING, payload))
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
                if not self._close_sent and self._close_code is None:
                    self._close_sent = True
                    self._set_closed(code, reason or "closed by us")
                    close = self._frame(OP_CLOSE, close_payload(code, reason[:100]))
                    await self._write_close(close)
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
            tail = self._tail
            if tail is not None:
                # The rest of a frame nobody finished comes first, within the same
                # deadline (not shielded like flush).
                self._tail = None
                try:
                    await self._transport.send_rest(tail)
                finally:
                    self._write_lock.release()
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
        parser = self._parser
        while not self._peer_closed.is_set():
            await self._take_turn_if_due()
            try:
                frame = parser.next()
            except ProtocolViolation:
                return  # a broken answer ends the wait as well as a close would
            if frame is None:
                if parser.done:
                    return
                data = await self._transport.receive_some()
                if not data:
                    return
                parser.feed(data)
                continue
            self._slice_left -= 1
            if frame[0] == OP_CLOSE:
                self._peer_closed.set()


# -- the server's side of the opening handshake -------------------------------------


class UpgradeRefused(Exception):
    """A request that is not a valid WebSocket upgrade; ``answer`` is the HTTP reply."""

    def __init__(self, reason: str, answer: bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answer = answer


#: Where a request head ends, as h11 finds it: the first blank line (bare LFs too).
HEAD_END = re.compile(rb"\n\r?\n")


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
    The bytes after the head are kept for ``accept_upgrade``, which hands them to
    the connection's frame parser once the connection is open.
    """
    end = HEAD_END.search(data)
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
    return WsConnection(
        transport, client=False, early=upgrade.early, max_message_bytes=max_message_bytes
    )


_BAD_UPGRADE = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 24\r\n"
    b"connection: close\r\n\r\nnot a WebSocket upgrade\n"
)
