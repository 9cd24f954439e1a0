"""voicebridge.sockets: ``MemorySocket`` keeps the scheduling contract of ``MessageSocket``.

The call tests run over memory sockets; they schedule as production only if these
skip trio's scheduler exactly where ``net.ws.WsConnection`` does (tests/net/test_ws.py
pins the same points over real sockets). Everything runs on ``autojump_clock``.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from voicebridge.errors import SocketClosed
from voicebridge.sockets import (
    FAIR_SLICE_EVENTS,
    WRITE_DEADLINE_S,
    SocketWriteTimeout,
    memory_socket_pair,
)


async def test_buffered_messages_come_a_slice_without_a_checkpoint_then_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = memory_socket_pair()
    for i in range(2 * FAIR_SLICE_EVENTS):
        await theirs.send(f"m{i}")
    with trio.testing.assert_no_checkpoints():
        got = [await ours.receive() for _ in range(FAIR_SLICE_EVENTS)]
    with trio.testing.assert_checkpoints():
        got.append(await ours.receive())
    # The message taken after the checkpoint opened the next slice.
    with trio.testing.assert_no_checkpoints():
        got += [await ours.receive() for _ in range(FAIR_SLICE_EVENTS - 1)]
    assert got == [f"m{i}" for i in range(2 * FAIR_SLICE_EVENTS)]


async def test_pings_count_against_the_slice_too(autojump_clock: trio.testing.MockClock) -> None:
    ours, theirs = memory_socket_pair()
    async with trio.open_nursery() as nursery:
        for _ in range(FAIR_SLICE_EVENTS):
            nursery.start_soon(theirs.ping)
        await trio.testing.wait_all_tasks_blocked()
        await theirs.send("after the pings")
        with trio.testing.assert_checkpoints():
            assert await ours.receive() == "after the pings"


async def test_receive_on_an_empty_socket_waits(autojump_clock: trio.testing.MockClock) -> None:
    ours, theirs = memory_socket_pair()
    async with trio.open_nursery() as nursery:

        async def send_later() -> None:
            await trio.sleep(1.0)
            await theirs.send("late")

        nursery.start_soon(send_later)
        t0 = trio.current_time()
        with trio.testing.assert_checkpoints():
            assert await ours.receive() == "late"
        assert trio.current_time() == t0 + 1.0


async def test_a_send_with_room_does_not_checkpoint_and_a_full_one_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = memory_socket_pair(buffer=2)
    with trio.testing.assert_no_checkpoints():
        await ours.send("one")
        await ours.send(b"two")
        assert ours.send_nowait("three") is False  # full: nothing written
        await ours.flush()  # nothing owed
    async with trio.open_nursery() as nursery:

        async def read_later() -> None:
            await trio.sleep(0.5)
            assert await theirs.receive() == "one"

        nursery.start_soon(read_later)
        t0 = trio.current_time()
        with trio.testing.assert_checkpoints():
            await ours.send("three")
        assert trio.current_time() == t0 + 0.5


async def test_messages_sent_at_once_without_room_for_all_are_owed_and_go_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # As a real socket whose kernel took the first frames of a write: the rest is owed
    # (needs_flush), and no later write overtakes it.
    ours, theirs = memory_socket_pair(buffer=2)
    with trio.testing.assert_no_checkpoints():
        assert ours.send_nowait("media", "mark", "more") is True
        assert ours.needs_flush
        assert ours.send_nowait("other") is False  # behind what is owed
    async with trio.open_nursery() as nursery:

        async def read_later() -> None:
            await trio.sleep(0.5)
            for expected in ("media", "mark", "more", "after"):
                assert await theirs.receive() == expected

        nursery.start_soon(read_later)
        await ours.send("after")  # finishes what is owed first
        assert trio.current_time() == 0.5
        assert not ours.needs_flush


async def test_a_send_nobody_reads_times_out_at_the_write_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, _theirs = memory_socket_pair(buffer=1)
    await ours.send("fills it")
    t0 = trio.current_time()
    with pytest.raises(SocketWriteTimeout):
        await ours.send("stuck")
    assert trio.current_time() == t0 + WRITE_DEADLINE_S


async def test_ping_and_aclose_always_checkpoint(autojump_clock: trio.testing.MockClock) -> None:
    ours, theirs = memory_socket_pair()
    closed: list[int | None] = []

    async def read_until_closed() -> None:  # answers the ping on the way
        try:
            while True:
                await theirs.receive()
        except SocketClosed as exc:
            closed.append(exc.code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_until_closed)
        with trio.testing.assert_checkpoints():
            await ours.ping()
        with trio.testing.assert_checkpoints():
            await ours.aclose(1008, "policy")
    assert closed == [1008]
