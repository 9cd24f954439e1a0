"""The message-socket interface the call nursery talks to, and adapters for it.

The call code never sees quart, trio-websocket or hypercorn: it sees a
``MessageSocket``. That keeps the call nursery testable over in-memory pairs on
trio's ``autojump_clock`` and lets the web layer swap transports.

Writes are never torn: every adapter shields the write itself from cancellation
(a WebSocket frame cancelled half way corrupts the connection) and bounds it
with ``WRITE_DEADLINE_S`` so a peer that stops reading cannot hold us forever.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import trio

from voicebridge.errors import SocketClosed

#: How long one shielded write may take before the peer is declared stuck.
#: Loopback and LAN writes finish in microseconds; 5 s only trips on a peer that
#: has stopped reading (full TCP window), which is then treated as a dead leg.
WRITE_DEADLINE_S = 5.0


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
    """A WebSocket-like, message-oriented, bidirectional connection."""

    async def receive(self) -> str | bytes:
        """Wait for the next message. Raises ``SocketClosed`` once the socket is closed."""
        ...

    async def send(self, message: str | bytes) -> None:
        """Send one whole message; shielded, bounded by ``WRITE_DEADLINE_S``."""
        ...

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close politely (close frame); idempotent; never raises ``SocketClosed``."""
        ...


class PingableSocket(MessageSocket, Protocol):
    async def ping(self) -> None:
        """Send a WebSocket ping and wait for its pong. Raises ``SocketClosed``."""
        ...


@runtime_checkable
class DirectSocket(PingableSocket, Protocol):
    """A socket a reader task can also write to without waiting (``net.ws.WsConnection``).

    The caller's audio goes to Vapi through it straight from the Twilio reader when
    nothing is queued ahead, sparing the hop to the sender task (``bridge.call``).
    """

    def send_nowait(self, message: str | bytes) -> bool:
        """Write now or not at all (False); see ``needs_flush`` after True."""
        ...

    @property
    def needs_flush(self) -> bool:
        """Part of the last ``send_nowait`` frame is still to go (``flush``)."""
        ...

    async def flush(self) -> None:
        """Write the rest of that frame; shielded, bounded by ``WRITE_DEADLINE_S``."""
        ...


class MemorySocket:
    """One end of an in-memory socket pair (tests, and in-process simulations).

    Messages are delivered in order through bounded channels; ``ping`` is answered
    by the peer's ``receive`` loop unless the peer was told to ignore pings.
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

    async def receive(self) -> str | bytes:
        while True:
            try:
                item = await self._receive_channel.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                peer = self.peer
                raise SocketClosed(
                    peer.close_code if peer else None, peer.close_reason if peer else ""
                ) from None
            if isinstance(item, _Ping):
                if self.answers_pings:
                    item.pong.set()
                continue
            return item

    async def send(self, message: str | bytes) -> None:
        try:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(WRITE_DEADLINE_S) as write_scope:
                    await self._send_channel.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise SocketClosed(self.close_code, "peer gone") from None
        if write_scope.cancelled_caught:
            raise SocketWriteTimeout(None, "write deadline passed")

    def send_nowait(self, message: str | bytes) -> bool:
        """``DirectSocket``: deliver now if the buffer has room (a message is never split)."""
        try:
            self._send_channel.send_nowait(message)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    @property
    def needs_flush(self) -> bool:
        return False

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    async def ping(self) -> None:
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
