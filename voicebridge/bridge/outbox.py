"""The assistant's outbox: caller audio and control messages to the assistant, in order."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final

import trio

from voicebridge.sockets import DirectSocket, PingableSocket


class _FlushMark:
    """In the queue: finish the frame a direct write began."""


_FLUSH: Final = _FlushMark()
#: What the queue carries: caller audio, control messages, ``_FLUSH``.
_Item = bytes | str | _FlushMark


class Put(enum.Enum):
    """What became of a caller frame handed to ``AssistantOutbox.put_audio``."""

    #: Handed whole to the socket, now.
    WRITTEN = "written"
    #: In the queue: the sender writes it (and reports it written) in its turn.
    QUEUED = "queued"
    #: The queue was full: the frame is stale, and gone.
    DROPPED = "dropped"


#: ``Put``'s members as module names, for the caller's hot path: on Python 3.11 a
#: member looked up through its class is several times slower than a module name.
WRITTEN: Final = Put.WRITTEN
QUEUED: Final = Put.QUEUED
DROPPED: Final = Put.DROPPED


class AssistantOutbox:
    """Everything written to the assistant's socket, in the order it was handed over.

    Caller audio comes from the Twilio reader, which must never wait on the assistant:
    ``put_audio`` writes a frame straight to the socket when it can (no hop to the
    sender task), queues it otherwise, and drops it when the queue is full (the audio
    is stale by then). Control messages (``send``) always queue and wait for room:
    they are never dropped. ``run`` is the sender task, the only one that waits on the
    socket's writes for this outbox.

    # Invariant: ``_queued`` is the number of items handed to the queue and not yet
    #   finished by the sender; a direct write happens only while it is 0, so nothing
    #   ever overtakes what is queued.
    # Invariant: a direct write that left part of its frame unwritten is followed at
    #   once by a queued flush, so the rest of that frame goes before anything else.
    """

    def __init__(
        self,
        socket: PingableSocket,
        *,
        buffer: int,
        on_queued_audio_written: Callable[[bytes], None],
    ) -> None:
        """``buffer``: items the queue holds (at least 1); ``on_queued_audio_written``:
        called with each queued caller frame once the sender handed it whole to the
        socket (a frame written at once is reported by ``put_audio`` itself)."""
        if buffer < 1:
            raise ValueError(f"buffer must be at least 1, got {buffer}")
        self._socket = socket
        self._direct = socket if isinstance(socket, DirectSocket) else None
        self._in, self._out = trio.open_memory_channel[_Item](buffer)
        self._queued = 0
        self._on_queued_audio_written = on_queued_audio_written

    def put_audio(self, frame: bytes) -> Put:
        """Hand over a caller audio frame: written now, queued, or dropped.

        Synchronous: never a checkpoint.
        """
        direct = self._direct
        if direct is not None and self._queued == 0 and direct.send_nowait(frame):
            if direct.needs_flush:
                # The queue is empty (``_queued == 0``): there is room for the flush.
                self._queued += 1
                self._in.send_nowait(_FLUSH)
            return WRITTEN
        try:
            self._in.send_nowait(frame)
        except trio.WouldBlock:
            return DROPPED
        self._queued += 1
        return QUEUED

    async def send(self, message: str) -> None:
        """Queue a control message, waiting for room; it is never dropped.

        Always a checkpoint. Cancelled: the message was queued whole or not at all.
        """
        self._queued += 1
        try:
            await self._in.send(message)
        except BaseException:
            self._queued -= 1
            raise

    async def run(self) -> None:
        """The sender task: write what is queued, in order, for ever.

        Raises what the socket's writes raise: ``SocketWriteTimeout`` (the assistant
        stopped reading) or ``SocketClosed``. Cancelled: the item in hand is written
        whole or not at all (the socket's writes are shielded); the rest stays queued.
        """
        socket = self._socket
        async for item in self._out:
            try:
                if isinstance(item, _FlushMark):
                    assert self._direct is not None, "only a direct write queues a flush"
                    await self._direct.flush()
                    continue
                await socket.send(item)
            finally:
                self._queued -= 1
            if isinstance(item, bytes):
                self._on_queued_audio_written(item)
