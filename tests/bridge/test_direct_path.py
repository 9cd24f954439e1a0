"""Caller audio written to Vapi straight from the Twilio reader, and what happens when
the kernel takes only part of a frame (``DirectSocket``, ``WsConnection.send_nowait``).

The call writes a caller frame from the reader task when nothing is queued for the
Vapi sender. A frame the socket took only in part is finished by the sender
(``flush``), and every later message queues behind it: Vapi gets every frame whole
and in order, and the reader still never waits on Vapi. ``send_nowait`` and
``flush`` themselves, on real sockets, are tested in ``tests/net/test_ws.py``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from tests.bridge.peers import MemoryCall, MemoryConnector, media_frame, stop_frame
from tests.faults.memory import CallSpec, MemoryCallRun, run_calls
from voicebridge.bridge.call import CALLER_AUDIO_BUFFER_FRAMES
from voicebridge.bridge.outcome import Outcome
from voicebridge.sockets import (
    WRITE_DEADLINE_S,
    MemorySocket,
    PingableSocket,
    SocketWriteTimeout,
    memory_socket_pair,
)


class PartialSocket(MemorySocket):
    """A memory socket whose ``send_nowait`` of the ``partial_at``-th message is taken
    only in part: the message is delivered when ``flush`` is let through."""

    def __init__(self, inner: MemorySocket, partial_at: int) -> None:
        super().__init__(inner._send_channel, inner._receive_channel)
        self.peer = inner.peer
        self.partial_at = partial_at
        self.nowait_calls = 0
        self.release_flush = trio.Event()
        self.flush_began = trio.Event()
        self.flushes = 0
        self._held: str | bytes | None = None

    def send_nowait(self, *messages: str | bytes) -> bool:
        if self._held is not None:
            raise AssertionError("send_nowait while a frame awaits its flush")
        self.nowait_calls += 1
        if self.nowait_calls == self.partial_at:
            (self._held,) = messages
            return True
        return super().send_nowait(*messages)

    @property
    def needs_flush(self) -> bool:
        return self._held is not None

    async def flush(self) -> None:
        self.flushes += 1
        self.flush_began.set()
        # As WsConnection.flush: bounded by the write deadline.
        with trio.move_on_after(WRITE_DEADLINE_S) as write_scope:
            await self.release_flush.wait()
        if write_scope.cancelled_caught:
            raise SocketWriteTimeout(None, "write deadline passed")
        held, self._held = self._held, None
        assert held is not None
        await super().send(held)

    async def send(self, message: str | bytes) -> None:
        if self._held is not None:
            raise AssertionError("a write overtook the frame awaiting its flush")
        await super().send(message)


class PartialConnector(MemoryConnector):
    def __init__(self, partial_at: int) -> None:
        super().__init__()
        self.partial_at = partial_at
        self.socket: PartialSocket | None = None

    @asynccontextmanager
    async def connect(self, call: MemoryCall) -> AsyncIterator[PingableSocket]:
        ours, theirs = memory_socket_pair(math.inf)
        self.socket = PartialSocket(ours, self.partial_at)
        self.peer = theirs
        self.opened.set()
        try:
            yield self.socket
        finally:
            await self.socket.aclose()


def _payload(n: int) -> bytes:
    return n.to_bytes(2, "big") * 80


async def _stream_numbered(run: MemoryCallRun, frames: int) -> None:
    start = trio.current_time()
    for n in range(frames):
        await trio.sleep_until(start + n * 0.02)
        await run.twilio.socket.send(media_frame(run.twilio.next_seq(), _payload(n)))


async def _collect_audio(peer: MemorySocket, into: list[bytes]) -> None:
    with trio.move_on_after(math.inf):
        try:
            while True:
                message = await peer.receive()
                if isinstance(message, bytes):
                    into.append(message)
        except Exception:
            return


async def test_a_frame_taken_in_part_is_finished_by_the_sender_and_nothing_overtakes_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    received: list[bytes] = []
    connectors: list[PartialConnector] = []

    def connector() -> PartialConnector:
        connectors.append(PartialConnector(partial_at=10))
        return connectors[-1]

    async def scenario(run: MemoryCallRun, nursery: trio.Nursery) -> None:
        streaming = trio.Event()

        async def stream() -> None:
            await _stream_numbered(run, 100)
            streaming.set()

        nursery.start_soon(stream)
        await run.connector.opened.wait()
        assert run.connector.peer is not None
        nursery.start_soon(_collect_audio, run.connector.peer, received)
        partial = connectors[0].socket
        assert partial is not None
        # The 10th direct write is taken in part; hold its flush for 120 ms (6 frames).
        await partial.flush_began.wait()
        held_at = trio.current_time()
        await trio.sleep(0.12)
        partial.release_flush.set()
        await streaming.wait()
        await trio.sleep(0.1)
        await run.twilio.socket.send(stop_frame(run.twilio.next_seq()))
        assert trio.current_time() - held_at >= 0.12

    [run] = await run_calls([CallSpec(scenario, connector=connector)])
    record = run.record
    assert record is not None
    assert record.outcome is Outcome.CALLER_HUNG_UP
    # Every frame that came after the leg was up reached Vapi whole, once, in order.
    numbers = [int.from_bytes(frame[:2], "big") for frame in received]
    assert numbers == list(range(numbers[0], 100))
    assert all(frame == _payload(n) for frame, n in zip(received, numbers, strict=True))
    assert record.frames_dropped == 0
    assert record.frames_to_assistant == len(received)
    # After the flush, direct writes resumed: the sender wrote only what queued meanwhile.
    partial = connectors[0].socket
    assert partial is not None
    assert partial.nowait_calls > 20


async def test_a_flush_that_never_finishes_fails_the_leg_and_the_reader_keeps_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connectors: list[PartialConnector] = []

    def connector() -> PartialConnector:
        connectors.append(PartialConnector(partial_at=5))
        return connectors[-1]

    async def scenario(run: MemoryCallRun, nursery: trio.Nursery) -> None:
        nursery.start_soon(run.twilio.stream_media)
        await run.connector.opened.wait()

    [run] = await run_calls([CallSpec(scenario, connector=connector)])
    record = run.record
    assert record is not None
    assert record.outcome is Outcome.ASSISTANT_LEG_FAILED
    assert record.detail == "unresponsive: Vapi stopped reading"
    # The flush never finishes: the sender is stuck in it, the channel fills, and every
    # later frame is dropped (the reader did not wait), until the write deadline.
    # Before the flush: 4 direct writes and the one taken in part; then the channel's
    # frames, which the failed leg never sent; every other frame was dropped.
    assert record.frames_to_assistant == 5
    unsent = record.frames_from_caller - record.frames_to_assistant - record.frames_dropped
    assert CALLER_AUDIO_BUFFER_FRAMES <= unsent <= CALLER_AUDIO_BUFFER_FRAMES + 1
    # The reader kept reading until the leg failed, at the write deadline (frames every
    # 20 ms from the stream's start; the flush began with the 5th).
    assert record.frames_from_caller >= (WRITE_DEADLINE_S + 0.08) / 0.02
