"""The message-socket interface the call nursery talks to, and adapters for it.

The call code never sees quart, trio-websocket or hypercorn: it sees a
``MessageSocket``. That keeps the call nursery testable over in-memory pairs on
trio's ``autojump_clock`` and lets the web layer swap transports.

Writes are never torn: every adapter shields the write itself from cancellation
(a WebSocket frame cancelled half way corrupts the connection) and bounds it
with ``WRITE_DEADLINE_S`` so a peer that stops reading cannot hold us forever.

Scheduling is a contract too (``MessageSocket``): a read or write that completes
without waiting may skip trio's scheduler, but no connection holds the loop for
more than a small slice (``FAIR_SLICE_EVENTS``), however fast its peer sends.
"""

from __future__ import annotations

import contextlib
import math
from typing import Protocol, runtime_checkable

import trio

from voicebridge.errors import SocketClosed

#: How long one shielded write may take before the peer is declared stuck.
#: Loopback and LAN writes finish in microseconds; 5 s only trips on a peer that
#: has stopped reading (full TCP window), which is then treated as a dead leg.
WRITE_DEADLINE_S = 5.0


#: Messages (and control frames) a socket's reader may take in a row without a
#: checkpoint; the next ``receive`` then gives trio's scheduler a turn first. A live
#: call reads one frame per wake-up (a frame every 20 ms), so this costs it one extra
#: scheduling pass per 64 frames; a peer whose socket is always readable holds the
#: loop for at most 64 frames' handling (about a millisecond for media frames)
#: before every other task runs again.
FAIR_SLICE_EVENTS = 64


#: A close under an already-cancelled caller still gets this long to write its close
#: frame (a few bytes: microseconds on any live connection).
CLOSE_GRACE_S = 0.05


def close_scope() -> trio.CancelScope:
    """A shield for closing a socket that still honours the caller's deadline.

    Shielded, so an outer cancellation cannot tear the close frame; but bounded by
    the caller's effective deadline (or ``WRITE_DEADLINE_S``), with at least
    ``CLOSE_GRACE_S``, so a close never outlasts the time its caller gave it.
    """
    now = trio.current_time()
    deadline = min(trio.current_effective_deadline(), now + WRITE_DEADLINE_S)
    return trio.CancelScope(shield=True, deadline=max(deadline, now + CLOSE_GRACE_S))


class SocketWriteTimeout(SocketClosed):
    """A write could not complete within ``WRITE_DEADLINE_S`` (peer not reading)."""


class MessageSocket(Protocol):
    """A WebSocket-like, message-oriented, bidirectional connection.

    Which methods may complete without a checkpoint (trio's own socket methods
    always checkpoint; these skip the scheduler only where it is safe and bounded):

    - ``receive``: may return without one when the message was buffered or readable
      at once; checkpoints at least once per ``FAIR_SLICE_EVENTS`` frames it takes
      (messages and the control frames between them), and whenever it waits.
    - ``send``: may return without one when the whole frame is taken at once; it
      checkpoints when it waits. No counter: every write answers a read (bounded
      above) or a timer.
    - ``aclose`` (and ``PingableSocket.ping``): always checkpoint.

    ``net.ws.WsConnection`` keeps this over real sockets (its transport bounds bytes
    as well, ``net.transport.FAIR_SLICE_BYTES``); ``MemorySocket`` keeps it in
    memory, so call tests schedule as production does.
    """

    async def receive(self) -> str | bytes:
        """Wait for the next message. Raises ``SocketClosed`` once the socket is closed.

        Fair (see the class docstring). Cancelled: no message is lost.
        """
        ...

    async def send(self, message: str | bytes) -> None:
        """Send one whole message; shielded, bounded by ``WRITE_DEADLINE_S``.

        Without a checkpoint when the frame is taken at once. Cancellation does not
        cut the frame: it is seen after the write, or at the next checkpoint.
        """
        ...

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close politely (close frame); idempotent; never raises ``SocketClosed``.

        Always a checkpoint; shielded, within the caller's deadline (``close_scope``).
        """
        ...


class PingableSocket(MessageSocket, Protocol):
    async def ping(self) -> None:
        """Send a WebSocket ping and wait for its pong. Raises ``SocketClosed``.

        Always a checkpoint (it waits for the pong). Cancelled: the ping went or
        did not, whole; the pong is no longer awaited.
        """
        ...


@runtime_checkable
class DirectSocket(PingableSocket, Protocol):
    """A socket a reader task can also write to without waiting (``net.ws.WsConnection``).

    The caller's audio goes to Vapi through it straight from the Twilio reader when
    nothing is queued ahead, sparing the hop to the sender task (``bridge.call``).
    """

    def send_nowait(self, *messages: str | bytes) -> bool:
        """Write the messages now, in order, or none at all (False); see ``needs_flush``
        after True. Several messages go in one write (one system call on a real socket).

        Synchronous: never a checkpoint.
        """
        ...

    @property
    def needs_flush(self) -> bool:
        """Part of what the last ``send_nowait`` took is still to go (``flush``); every
        other write waits behind it."""
        ...

    async def flush(self) -> None:
        """Write the rest of it; shielded, bounded by ``WRITE_DEADLINE_S``.

        Without a checkpoint when nothing is owed; checkpoints when it waits.
        """
        ...


class MemorySocket:
    """One end of an in-memory socket pair (tests, and in-process simulations).

    Messages are delivered in order through bounded channels; ``ping`` is answered
    by the peer's ``receive`` loop unless the peer was told to ignore pings.

    It schedules as ``net.ws.WsConnection`` does (``MessageSocket``): ``receive``
    takes a message already in the channel without a checkpoint, but checkpoints
    once per ``FAIR_SLICE_EVENTS`` messages and pings it takes; ``send`` with room in
    the channel does not checkpoint; ``ping`` and ``aclose`` always do.
    """

    def __init__(
        self,
        send_channel: trio.MemorySendChannel[str | bytes | _Ping],
        receive_channel: trio.MemoryReceiveChannel[str | bytes | _Ping],
    ) -> None:
        self._send_channel = send_channel
        self._receive_channel = receive_channel
        self.peer: MemorySocket | None = None
        self.answers_pings = True
        self.close_code: int | None = None
        self.close_reason = ""
        # Messages and pings this end may still take before its reader checkpoints
        # (as WsConnection counts frames).
        self._slice_left = FAIR_SLICE_EVENTS
        # Messages a send_nowait took but had no room for (needs_flush).
        self._tail: tuple[str | bytes, ...] = ()

    async def receive(self) -> str | bytes:
        channel = self._receive_channel
        while True:
            if self._slice_left <= 0:
                self._slice_left = FAIR_SLICE_EVENTS
                await trio.lowlevel.checkpoint()
            try:
                try:
                    item = channel.receive_nowait()
                except trio.WouldBlock:
                    item = await channel.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                peer = self.peer
                raise SocketClosed(
                    peer.close_code if peer else None, peer.close_reason if peer else ""
                ) from None
            self._slice_left -= 1
            if isinstance(item, _Ping):
                if self.answers_pings:
                    item.pong.set()
                continue
            return item

    async def send(self, message: str | bytes) -> None:
        if self._tail:
            await self.flush()  # what send_nowait owes goes first, as on a real socket
        await self._send(message)

    async def _send(self, message: str | bytes) -> None:
        try:
            try:
                self._send_channel.send_nowait(message)
                return
            except trio.WouldBlock:
                pass
            with trio.CancelScope(shield=True):
                with trio.move_on_after(WRITE_DEADLINE_S) as write_scope:
                    await self._send_channel.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise SocketClosed(self.close_code, "peer gone") from None
        if write_scope.cancelled_caught:
            raise SocketWriteTimeout(None, "write deadline passed")

    def send_nowait(self, *messages: str | bytes) -> bool:
        """``DirectSocket``: deliver what the buffer has room for now (a message is never
        split); False if that is not even the first. The messages it had no room for are
        owed, as the rest of a write the kernel took in part (``needs_flush``)."""
        if self._tail:
            return False
        channel = self._send_channel
        for taken, message in enumerate(messages):
            try:
                channel.send_nowait(message)
            except trio.WouldBlock:
                if not taken:
                    return False
                self._tail = messages[taken:]
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return bool(taken)  # the next write (or the reader) reports it
        return True

    @property
    def needs_flush(self) -> bool:
        return bool(self._tail)

    async def flush(self) -> None:
        """Deliver what ``send_nowait`` owes; no checkpoint when nothing is owed."""
        tail, self._tail = self._tail, ()
        for message in tail:
            await self._send(message)

    async def ping(self) -> None:
        if self._tail:
            await self.flush()
        ping = _Ping()
        try:
            await self._send_channel.send(ping)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise SocketClosed(self.close_code, "peer gone") from None
        await ping.pong.wait()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        tail, self._tail = self._tail, ()
        for message in tail:  # as the close frame follows what the kernel still holds
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                self._send_channel.send_nowait(message)
        await self._send_channel.aclose()
        await self._receive_channel.aclose()
        await trio.lowlevel.checkpoint()


class _Ping:
    __slots__ = ("pong",)

    def __init__(self) -> None:
        self.pong = trio.Event()


def memory_socket_pair(buffer: int | float = math.inf) -> tuple[MemorySocket, MemorySocket]:
    """Two connected ``MemorySocket`` ends; ``buffer`` messages may be in flight each way."""
    a_to_b_send, a_to_b_receive = trio.open_memory_channel[str | bytes | _Ping](buffer)
    b_to_a_send, b_to_a_receive = trio.open_memory_channel[str | bytes | _Ping](buffer)
    a = MemorySocket(a_to_b_send, b_to_a_receive)
    b = MemorySocket(b_to_a_send, a_to_b_receive)
    a.peer, b.peer = b, a
    return a, b
