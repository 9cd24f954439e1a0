"""Playout's direct path: assistant audio written to Twilio by the task that fed it.

While the playout task waits for audio, ``Playout.feed`` writes the whole frames it
completes itself, each chunk's media and mark in one write, when the socket takes them
at once: no hop to the
playout task, whose scheduling pass under load is most of the assistant → caller
latency. What the socket does not take at once the playout task finishes, in order,
before anything else it writes (a clear included).
"""

from __future__ import annotations

import base64
import json
import socket

import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Request

from tests.bridge.peers import start_frame
from tests.net.test_ws import CountingTransport
from voicebridge.bridge.playout import FRAME_BYTES, Playout
from voicebridge.net.ws import WsConnection
from voicebridge.sockets import MemorySocket, MessageSocket, memory_socket_pair
from voicebridge.twilio.media import MediaStream


def playout_on(socket: MessageSocket) -> Playout:
    stream = MediaStream()
    stream.receive(start_frame())
    return Playout(
        socket,
        stream,
        lead_ms=300,
        chunk_ms=100,
        resume_gap_ms=600,
        call_started_at=trio.current_time(),
    )


async def sent(twilio: MemorySocket, count: int) -> list[dict[str, object]]:
    return [json.loads(await twilio.receive()) for _ in range(count)]


def payload_bytes(message: dict[str, object]) -> int:
    media = message["media"]
    assert isinstance(media, dict)
    return len(base64.b64decode(media["payload"]))


async def test_whole_frames_fed_while_playout_waits_go_out_from_the_feeder_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, twilio = memory_socket_pair()
    playout = playout_on(ours)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(playout.run)
        await trio.testing.wait_all_tasks_blocked()
        with trio.testing.assert_no_checkpoints():
            playout.feed(b"\x55" * (3 * FRAME_BYTES + 20))
            # Written before the playout task could run: taken with no scheduling pass.
            first = await sent(twilio, 2)
            playout.feed(b"\x55" * (FRAME_BYTES - 20))  # completes the held partial frame
            second = await sent(twilio, 2)
        assert [m["event"] for m in first + second] == ["media", "mark", "media", "mark"]
        assert (payload_bytes(first[0]), payload_bytes(second[0])) == (3 * FRAME_BYTES, FRAME_BYTES)
        assert playout.buffered_ms == 80
        nursery.cancel_scope.cancel()


async def test_a_mark_the_socket_cannot_take_at_once_follows_its_media_before_anything_else(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Room for one message in flight: the media goes from the feeder, its mark cannot.
    ours, twilio = memory_socket_pair(buffer=1)
    playout = playout_on(ours)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(playout.run)
        await trio.testing.wait_all_tasks_blocked()
        playout.feed(b"\x55" * FRAME_BYTES)
        playout.feed(b"\x66" * FRAME_BYTES)  # a write is owed: this one waits its turn
        messages = await sent(twilio, 4)
        assert [m["event"] for m in messages] == ["media", "mark", "media", "mark"]
        marks = [m["mark"]["name"] for m in messages[1::2]]  # type: ignore[index]
        assert marks == sorted(marks) and len(set(marks)) == 2
        nursery.cancel_scope.cancel()


async def test_a_barge_in_after_a_direct_write_clears_after_its_mark(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, twilio = memory_socket_pair(buffer=1)
    playout = playout_on(ours)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(playout.run)
        await trio.testing.wait_all_tasks_blocked()
        playout.feed(b"\x55" * FRAME_BYTES)  # media written, its mark owed
        nursery.start_soon(playout.barge_in)
        messages = await sent(twilio, 3)
        assert [m["event"] for m in messages] == ["media", "mark", "clear"]
        assert playout.buffered_ms == 0
        nursery.cancel_scope.cancel()


async def test_each_chunk_and_its_mark_cost_one_write_on_a_real_socket() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        transport = CountingTransport(ours)
        playout = playout_on(WsConnection(transport, client=False))
        # Twilio's end, read by wsproto (past a handshake it did with itself).
        twilio, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
        server.receive_data(twilio.send(Request(host="bridge", target="/media")))
        assert isinstance(next(server.events()), Request)
        twilio.receive_data(server.send(AcceptConnection()))
        assert isinstance(next(twilio.events()), AcceptConnection)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(playout.run)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(3):
                playout.feed(b"\x55" * FRAME_BYTES)
            assert transport.writes == 3
            nursery.cancel_scope.cancel()
        theirs.setblocking(False)
        twilio.receive_data(theirs.recv(65536))
        events = [json.loads(e.data)["event"] for e in twilio.events() if isinstance(e, Message)]
        assert events == ["media", "mark"] * 3


async def test_audio_fed_while_a_partial_frame_waits_puts_its_padding_off_without_a_wake(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Twilio runs dry at 0.02 (one frame, no echo yet); a partial frame would be padded
    # 60 ms after that, or after the last audio fed. Audio fed at 0.07 (still partial)
    # puts it off; at 0.10 the frame is complete and goes out whole, with no silence.
    ours, twilio = memory_socket_pair()
    playout = playout_on(ours)
    audio = bytes(range(100)) + bytes(range(100, 140)) + bytes(range(140, 160))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(playout.run)
        await trio.testing.wait_all_tasks_blocked()
        playout.feed(b"\x55" * FRAME_BYTES + audio[:100])
        await trio.sleep(0.07)
        playout.feed(audio[100:140])
        await trio.sleep(0.03)
        playout.feed(audio[140:])
        messages = await sent(twilio, 4)
        media = [m for m in messages if m["event"] == "media"]
        assert len(media) == 2
        second = media[1]["media"]
        assert isinstance(second, dict)
        assert base64.b64decode(second["payload"]) == audio
        assert playout.stats.padding_bytes == 0
        nursery.cancel_scope.cancel()


async def test_a_chunk_the_feeder_wrote_while_an_echo_is_owed_does_not_wake_the_playout_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, _twilio = memory_socket_pair()
    playout = playout_on(ours)
    steps: list[str] = []

    class PlayoutSteps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            steps.append(task.name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(playout.run, name="playout")
        await trio.testing.wait_all_tasks_blocked()
        playout.feed(b"\x55" * FRAME_BYTES)  # the first: the playout task arms its timer
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(PlayoutSteps())
        for _ in range(5):
            playout.feed(b"\x55" * FRAME_BYTES)
            await trio.testing.wait_all_tasks_blocked()
        assert playout.stats.media_messages == 6
        assert "playout" not in steps
        nursery.cancel_scope.cancel()
