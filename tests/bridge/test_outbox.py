"""The assistant's outbox on its own: what reaches the assistant, in which order, and
where it may checkpoint.

Over in-memory sockets: a write the outbox makes at once reaches the peer before the
sender task (``run``) has run at all; a queued one only once it runs.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from tests.bridge.test_direct_path import PartialSocket
from voicebridge.bridge.outbox import AssistantOutbox, Put
from voicebridge.sockets import MemorySocket, SocketWriteTimeout, memory_socket_pair


class PlainSocket:
    """A ``PingableSocket`` that cannot be written to without waiting (no ``send_nowait``)."""

    def __init__(self, inner: MemorySocket) -> None:
        self._inner = inner

    async def receive(self) -> str | bytes:
        return await self._inner.receive()

    async def send(self, message: str | bytes) -> None:
        await self._inner.send(message)

    async def ping(self) -> None:
        await self._inner.ping()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        await self._inner.aclose(code, reason)


class Written:
    """``on_queued_audio_written``: the queued frames the sender reports written."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def __call__(self, frame: bytes) -> None:
        self.frames.append(frame)


async def _received_now(peer: MemorySocket) -> list[str | bytes]:
    """What the peer can take without waiting."""
    got: list[str | bytes] = []
    with trio.CancelScope() as scope:
        scope.cancel()  # a receive that would wait ends the loop
        while True:
            got.append(await peer.receive())
    return got


async def test_audio_with_nothing_queued_is_written_at_once_without_a_checkpoint() -> None:
    ours, peer = memory_socket_pair(math.inf)
    written = Written()
    outbox = AssistantOutbox(ours, buffer=4, on_queued_audio_written=written)
    with trio.testing.assert_no_checkpoints():
        assert outbox.put_audio(b"a1") is Put.WRITTEN
        assert outbox.put_audio(b"a2") is Put.WRITTEN
    # No sender has run: the frames went straight to the socket.
    assert await _received_now(peer) == [b"a1", b"a2"]
    assert written.frames == []


async def test_nothing_overtakes_a_queued_control_message(nursery: trio.Nursery) -> None:
    ours, peer = memory_socket_pair(math.inf)
    written = Written()
    outbox = AssistantOutbox(ours, buffer=4, on_queued_audio_written=written)
    assert outbox.put_audio(b"a1") is Put.WRITTEN
    with trio.testing.assert_checkpoints():
        await outbox.send("control")
    with trio.testing.assert_no_checkpoints():
        assert outbox.put_audio(b"a2") is Put.QUEUED  # behind the control message
    assert await _received_now(peer) == [b"a1"]
    assert written.frames == []
    nursery.start_soon(outbox.run)
    await trio.testing.wait_all_tasks_blocked()
    assert await _received_now(peer) == ["control", b"a2"]
    assert written.frames == [b"a2"]
    # The queue is empty again: audio goes straight to the socket once more.
    nursery.cancel_scope.cancel()  # no sender from here
    assert outbox.put_audio(b"a3") is Put.WRITTEN
    assert await _received_now(peer) == [b"a3"]


async def test_a_frame_taken_in_part_is_finished_before_anything_else(
    nursery: trio.Nursery,
) -> None:
    inner, peer = memory_socket_pair(math.inf)
    socket = PartialSocket(inner, partial_at=2)
    written = Written()
    outbox = AssistantOutbox(socket, buffer=4, on_queued_audio_written=written)
    with trio.testing.assert_no_checkpoints():
        assert outbox.put_audio(b"a1") is Put.WRITTEN
        assert outbox.put_audio(b"a2") is Put.WRITTEN  # the socket took part of it …
        assert outbox.put_audio(b"a3") is Put.QUEUED  # … so this queues behind its flush
    await outbox.send("control")
    assert await _received_now(peer) == [b"a1"]
    assert socket.nowait_calls == 2, "a3 was never offered to the socket directly"
    nursery.start_soon(outbox.run)
    await socket.flush_began.wait()
    socket.release_flush.set()
    await trio.testing.wait_all_tasks_blocked()
    assert await _received_now(peer) == [b"a2", b"a3", "control"]
    assert written.frames == [b"a3"]


async def test_audio_past_a_full_queue_is_dropped_and_never_reported_written() -> None:
    ours, peer = memory_socket_pair(0)  # the peer takes nothing without waiting
    written = Written()
    outbox = AssistantOutbox(ours, buffer=2, on_queued_audio_written=written)
    with trio.testing.assert_no_checkpoints():
        assert outbox.put_audio(b"a1") is Put.QUEUED
        assert outbox.put_audio(b"a2") is Put.QUEUED
        assert outbox.put_audio(b"a3") is Put.DROPPED
    assert written.frames == []
    assert await _received_now(peer) == []


async def test_a_socket_without_direct_writes_gets_everything_through_the_sender(
    nursery: trio.Nursery,
) -> None:
    inner, peer = memory_socket_pair(math.inf)
    written = Written()
    outbox = AssistantOutbox(PlainSocket(inner), buffer=4, on_queued_audio_written=written)
    assert outbox.put_audio(b"a1") is Put.QUEUED
    assert await _received_now(peer) == []
    nursery.start_soon(outbox.run)
    await trio.testing.wait_all_tasks_blocked()
    assert await _received_now(peer) == [b"a1"]
    assert written.frames == [b"a1"]


async def test_a_control_message_cancelled_while_waiting_for_room_is_not_queued(
    nursery: trio.Nursery,
) -> None:
    ours, peer = memory_socket_pair(math.inf)
    outbox = AssistantOutbox(ours, buffer=1, on_queued_audio_written=Written())
    await outbox.send("first")  # fills the queue
    with trio.move_on_after(1) as waited:
        await outbox.send("never")
    assert waited.cancelled_caught
    nursery.start_soon(outbox.run)
    await trio.testing.wait_all_tasks_blocked()
    assert await _received_now(peer) == ["first"]
    # Nothing is left queued: audio is written at once again.
    nursery.cancel_scope.cancel()
    assert outbox.put_audio(b"a1") is Put.WRITTEN
    assert await _received_now(peer) == [b"a1"]


async def test_the_sender_fails_when_the_assistant_stops_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, _peer = memory_socket_pair(0)
    outbox = AssistantOutbox(ours, buffer=4, on_queued_audio_written=Written())
    await outbox.send("control")
    with pytest.raises(SocketWriteTimeout):
        await outbox.run()


def test_the_queue_holds_at_least_one_item() -> None:
    ours, _ = memory_socket_pair(math.inf)
    with pytest.raises(ValueError, match="at least 1"):
        AssistantOutbox(ours, buffer=0, on_queued_audio_written=Written())
