"""voicebridge.net.ws (and its transports) over real sockets, against a hand-driven wsproto peer.

Charter: every test connects a ``WsConnection`` to the far end of a
``socket.socketpair()``, where a wsproto connection driven by the test plays the
peer byte by byte. Over TLS (``TlsSocketTransport``) the pair is TCP on loopback
and the peer's TLS is trio's ``SSLStream`` (an implementation independent of
ours), with a self-signed certificate made by the ``openssl`` command (skipped
without it). No mocks. Our side is the client (as on the Vapi leg) unless a test
says otherwise. Anything timed runs on ``autojump_clock``; every test is guarded by
``trio.fail_after``.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import shutil
import socket
import ssl
import struct
import subprocess
import termios
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from voicebridge.errors import SocketClosed
from voicebridge.net import transport as net_transport
from voicebridge.net.transport import (
    FAIR_SLICE_BYTES,
    SocketTransport,
    TlsHandshakeError,
    TlsSocketTransport,
)
from voicebridge.net.ws import (
    CLOSE_REPLY_S,
    MAX_MESSAGE_BYTES,
    UpgradeRefused,
    WsConnection,
    accept_upgrade,
    read_upgrade,
)
from voicebridge.sockets import FAIR_SLICE_EVENTS, WRITE_DEADLINE_S, SocketWriteTimeout

#: Guard on every test: a socketpair exchange takes microseconds; on the autojump
#: clock this is virtual time, so a test that hangs fails at once.
GUARD_S = 10.0
#: A send buffer small enough that a few messages fill it.
SMALL_BUFFER = 4096


def handshake(ours: ConnectionType = ConnectionType.CLIENT) -> tuple[WSConnection, WSConnection]:
    """Two wsproto connections past the opening handshake: ours and the peer's."""
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="vapi.test", target="/call/transport")))
    assert isinstance(next(server.events()), Request)
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    return (client, server) if ours is ConnectionType.CLIENT else (server, client)


class Peer:
    """The far end of the socket: wsproto driven by the test."""

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self._events: deque[Event] = deque()
        self.eof = False

    async def send(self, *events: Event) -> None:
        """Every event's bytes in one write (so they arrive in one read when they fit)."""
        await self.stream.send_all(b"".join(self.ws.send(event) for event in events))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self) -> Event | None:
        """The next event from our side; None once it has closed the connection."""
        while not self._events:
            if self.eof:
                return None
            data = await self.stream.receive_some(65536)
            if not data:
                self.eof = True
                continue
            self.ws.receive_data(data)
            self._events.extend(self.ws.events())
        return self._events.popleft()

    async def next_message(self) -> str | bytes:
        """The next whole message (control frames on the way are not expected)."""
        parts: list[str | bytes] = []
        while True:
            event = await self.next_event()
            assert isinstance(event, Message), event
            parts.append(event.data)
            if event.message_finished:
                if isinstance(event, TextMessage):
                    return "".join(str(part) for part in parts)
                return b"".join(bytes(part) for part in parts)


class CountingTransport(SocketTransport):
    """A ``SocketTransport`` that counts its reads and its writes without waiting."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.reads = 0
        self.writes = 0

    async def receive_some(self) -> bytes:
        self.reads += 1
        return await super().receive_some()

    def try_send(self, data: memoryview | bytes | bytearray) -> int:
        self.writes += 1
        return super().try_send(data)


Connect = Callable[..., tuple[WsConnection, Peer]]


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Connect a ``WsConnection`` to a ``Peer`` over a socketpair; both closed at the end."""
    sockets: list[socket.socket] = []

    def make(
        *,
        ours: ConnectionType = ConnectionType.CLIENT,
        send_buffer: int | None = None,
        transport: Callable[[socket.socket], SocketTransport] = SocketTransport,
    ) -> tuple[WsConnection, Peer]:
        a, b = socket.socketpair()
        sockets.extend((a, b))
        if send_buffer is not None:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
            b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, send_buffer)
        _, their_ws = handshake(ours)
        connection = WsConnection(transport(a), client=ours is ConnectionType.CLIENT)
        peer = Peer(trio.SocketStream(trio.socket.from_stdlib_socket(b)), their_ws)
        return connection, peer

    yield make
    for sock in sockets:
        sock.close()


async def receive_until_closed(connection: WsConnection, code: int) -> None:
    """Be the reader of ``connection`` (no message expected) until it closes with ``code``."""
    with pytest.raises(SocketClosed) as closed:
        await connection.receive()
    assert closed.value.code == code


def connect_counting(connect: Connect) -> tuple[WsConnection, Peer, CountingTransport]:
    """``connect()`` over a ``CountingTransport``, which is returned too."""
    made: list[CountingTransport] = []

    def counting(sock: socket.socket) -> SocketTransport:
        made.append(CountingTransport(sock))
        return made[-1]

    connection, peer = connect(transport=counting)
    return connection, peer, made[0]


# --- reading -----------------------------------------------------------------------------


@pytest.mark.parametrize("ours", [ConnectionType.CLIENT, ConnectionType.SERVER])
async def test_whole_messages_arrive_in_order(connect: Connect, ours: ConnectionType) -> None:
    connection, peer = connect(ours=ours)
    sent: list[str | bytes] = ['{"type":"assistant.started"}', b"\xff" * 160, "é", b"", ""]
    with trio.fail_after(GUARD_S):
        for message in sent:
            if isinstance(message, str):
                await peer.send(TextMessage(data=message))
            else:
                await peer.send(BytesMessage(data=message))
        assert [await connection.receive() for _ in sent] == sent
        # And the other way, masked or not as the role requires.
        for message in sent:
            await connection.send(message)
        assert [await peer.next_message() for _ in sent] == sent


def text_frame(encoded: bytes, *, fin: bool = True, continuation: bool = False) -> bytes:
    """An unmasked (server-to-client) text or continuation frame, by hand."""
    first = (0x80 if fin else 0) | (0x0 if continuation else 0x1)
    if len(encoded) < 126:
        return bytes([first, len(encoded)]) + encoded
    return bytes([first, 126]) + struct.pack("!H", len(encoded)) + encoded


async def test_fragmented_messages_are_joined(connect: Connect) -> None:
    connection, peer = connect()
    text = "añb€c" * 50
    encoded = text.encode()
    with trio.fail_after(GUARD_S):
        # A binary message in two frames, then a text message in three frames split
        # inside multi-byte characters ("ñ" is two bytes, "€" three), with a ping
        # between its fragments (control frames may come between them).
        await peer.send(BytesMessage(data=b"\x01" * 300, message_finished=False))
        await peer.send(BytesMessage(data=b"\x02" * 5, message_finished=True))
        await peer.send_raw(text_frame(encoded[:2], fin=False))
        await peer.send(Ping(payload=b"mid"))
        await peer.send_raw(text_frame(encoded[2:6], fin=False, continuation=True))
        await peer.send_raw(text_frame(encoded[6:], continuation=True))
        assert await connection.receive() == b"\x01" * 300 + b"\x02" * 5
        assert await connection.receive() == text
        assert await peer.next_event() == Pong(payload=b"mid")


async def test_many_frames_in_one_read_are_returned_without_another_pass(
    connect: Connect,
) -> None:
    connection, peer, transport = connect_counting(connect)
    with trio.fail_after(GUARD_S):
        await peer.send(*(BytesMessage(data=bytes([i]) * 160) for i in range(50)))
        await trio.testing.wait_all_tasks_blocked()
        assert await connection.receive() == b"\x00" * 160
        # Everything else was read and parsed with the first: no read, no checkpoint.
        with trio.testing.assert_no_checkpoints():
            rest = [await connection.receive() for _ in range(49)]
    assert rest == [bytes([i]) * 160 for i in range(1, 50)]
    assert transport.reads == 1


@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
async def test_a_message_over_the_limit_closes_with_1009(
    connect: Connect, fragmented: bool
) -> None:
    connection, peer = connect()
    size = MAX_MESSAGE_BYTES + 1

    async def send(*events: Event) -> None:
        # Once we have closed, the peer's write of the rest may find the socket gone.
        with contextlib.suppress(trio.BrokenResourceError):
            await peer.send(*events)

    async with trio.open_nursery() as nursery:
        with trio.fail_after(GUARD_S):
            if fragmented:
                chunks = [b"\x00" * (64 * 1024)] * (size // (64 * 1024)) + [b"\x00"]
                events = [BytesMessage(data=c, message_finished=False) for c in chunks[:-1]]
                events.append(BytesMessage(data=chunks[-1], message_finished=True))
                nursery.start_soon(send, *events)
            else:
                nursery.start_soon(send, BytesMessage(data=b"\x00" * size))
            with pytest.raises(SocketClosed) as closed:
                await connection.receive()
            assert closed.value.code == 1009
            event = await peer.next_event()
            assert isinstance(event, CloseConnection)
            assert event.code == 1009
            # The connection stays closed; later messages are not delivered.
            with pytest.raises(SocketClosed):
                await connection.receive()
            # The frame's header alone condemns it: the megabyte behind it is not
            # waited for (the peer is still writing it when we hang up).
            await connection.aclose()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (bytes([0x83, 0]), 1002),  # a reserved opcode
        (bytes([0x81, 2]) + b"\xc3\x28", 1007),  # text that is not UTF-8
        (bytes([0x82, 0x82]) + b"mask" + b"ab", 1002),  # a masked frame from a server
        (bytes([0x09, 0]), 1002),  # a fragmented control frame
    ],
    ids=["opcode", "utf-8", "masked", "fragmented-ping"],
)
async def test_a_broken_frame_closes_with_wsproto_code(
    connect: Connect, frame: bytes, code: int
) -> None:
    connection, peer = connect()
    with trio.fail_after(GUARD_S):
        await peer.send(TextMessage(data="before"))
        await peer.send_raw(frame)
        await trio.testing.wait_all_tasks_blocked()
        assert await connection.receive() == "before"
        with pytest.raises(SocketClosed) as closed:
            await connection.receive()
        assert closed.value.code == code
        assert connection.close_code == code
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == code
        with pytest.raises(SocketClosed):
            await connection.send("after")
        await connection.aclose()  # our close frame went out already: TCP only
        assert await peer.next_event() is None


async def test_a_ping_is_answered_with_its_pong(connect: Connect) -> None:
    connection, peer = connect()
    with trio.fail_after(GUARD_S):
        await peer.send(Ping(payload=b"are you there"))
        async with trio.open_nursery() as nursery:

            async def expect_the_pong_then_talk() -> None:
                assert await peer.next_event() == Pong(payload=b"are you there")
                await peer.send(TextMessage(data="good"))

            nursery.start_soon(expect_the_pong_then_talk)
            assert await connection.receive() == "good"


async def test_our_ping_is_resolved_by_the_reader(connect: Connect) -> None:
    connection, peer = connect()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_until_closed, connection, 1000)
            async with trio.open_nursery() as pinging:
                pinging.start_soon(connection.ping)
                ping = await peer.next_event()
                assert isinstance(ping, Ping)
                await peer.send(Pong(payload=b"not ours"), ping.response())
            # Closing ends the reader.
            await peer.send(CloseConnection(code=1000))


async def test_a_ping_with_nobody_reading_waits(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    connection, peer = connect()
    with trio.fail_after(GUARD_S):
        with trio.move_on_after(1.0) as waited:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connection.ping)
                ping = await peer.next_event()
                assert isinstance(ping, Ping)
                await peer.send(ping.response())
                await trio.sleep_forever()
    assert waited.cancelled_caught


async def test_the_peers_close_is_answered_after_its_messages(connect: Connect) -> None:
    connection, peer = connect()
    with trio.fail_after(GUARD_S):
        await peer.send(
            TextMessage(data='{"type":"status-update","status":"ended"}'),
            BytesMessage(data=b"\x7f" * 320),
            CloseConnection(code=4000, reason="call ended"),
        )
        await trio.testing.wait_all_tasks_blocked()
        assert await connection.receive() == '{"type":"status-update","status":"ended"}'
        assert await connection.receive() == b"\x7f" * 320
        with pytest.raises(SocketClosed) as closed:
            await connection.receive()
        assert (closed.value.code, closed.value.reason) == (4000, "call ended")
        assert await peer.next_event() == CloseConnection(code=4000, reason="call ended")
        with pytest.raises(SocketClosed):
            await connection.send("too late")
        with pytest.raises(SocketClosed):
            await connection.ping()
        await connection.aclose()
        assert await peer.next_event() is None


async def test_a_peer_vanishing_without_a_close_is_1006(connect: Connect) -> None:
    connection, peer = connect()
    with trio.fail_after(GUARD_S):
        await peer.send(TextMessage(data="last words"))
        await peer.stream.aclose()
        assert await connection.receive() == "last words"
        with pytest.raises(SocketClosed) as closed:
            await connection.receive()
        assert closed.value.code == net_transport.ABNORMAL_CLOSURE
        with pytest.raises(SocketClosed):
            await connection.ping()  # nobody would ever answer it
        await connection.aclose()


async def test_a_reader_waiting_when_the_peer_vanishes(connect: Connect) -> None:
    connection, peer = connect()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.stream.aclose)
            with pytest.raises(SocketClosed) as closed:
                await connection.receive()
    assert closed.value.code == 1006


# --- closing -------------------------------------------------------------------------------


async def test_aclose_sends_the_close_and_waits_for_the_answer(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    connection, peer = connect()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:

            async def answer_late() -> None:
                event = await peer.next_event()
                assert isinstance(event, CloseConnection)
                assert (event.code, event.reason) == (1000, "")
                await trio.sleep(0.3)
                await peer.send(event.response())
                assert await peer.next_event() is None  # then TCP closes

            nursery.start_soon(answer_late)
            start = trio.current_time()
            await connection.aclose()
            assert trio.current_time() - start == pytest.approx(0.3)
    assert connection.close_code == 1000
    await connection.aclose()  # idempotent
    with pytest.raises(SocketClosed):
        await connection.receive()


async def test_aclose_gives_up_on_a_peer_that_never_answers(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    connection, peer = connect()
    with trio.fail_after(GUARD_S):
        start = trio.current_time()
        await connection.aclose(4001, "going away")
        assert trio.current_time() - start == pytest.approx(CLOSE_REPLY_S)
        assert await peer.next_event() == CloseConnection(code=4001, reason="going away")
        assert await peer.next_event() is None


async def test_aclose_within_a_shorter_caller_deadline(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    connection, _peer = connect()
    with trio.fail_after(GUARD_S):
        start = trio.current_time()
        with trio.move_on_after(0.2):
            await connection.aclose()
        assert trio.current_time() - start == pytest.approx(0.2)


async def test_aclose_with_a_reader_leaves_the_reading_to_it(connect: Connect) -> None:
    connection, peer, transport = connect_counting(connect)
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_until_closed, connection, 1000)
            await trio.testing.wait_all_tasks_blocked()

            async def answer() -> None:
                event = await peer.next_event()
                assert isinstance(event, CloseConnection)
                await peer.send(event.response())

            nursery.start_soon(answer)
            await connection.aclose()
    assert transport.reads == 1  # the reader's, which brought the answer: aclose read none


async def test_aclose_under_a_waiting_reader_ends_it_with_socket_closed(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    connection, peer = connect()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_until_closed, connection, 1000)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            await connection.aclose()  # the peer never answers
            assert trio.current_time() - start == pytest.approx(CLOSE_REPLY_S)
    assert await peer.next_event() == CloseConnection(code=1000, reason="")


async def test_aclose_from_a_cancelled_caller_still_sends_the_close(connect: Connect) -> None:
    connection, peer = connect()
    with trio.fail_after(GUARD_S):
        with trio.CancelScope() as scope:
            scope.cancel()
            await connection.aclose()
        assert await peer.next_event() == CloseConnection(code=1000, reason="")
        assert await peer.next_event() is None


# --- fairness: a peer that always has data still lets other tasks run ---------------------


class StepMeter(trio.abc.Instrument):
    """How much ``measure()`` grew in each task step (from one checkpoint to the next).

    Only the steps of ``task`` when one is given (``steps`` counts them).
    """

    def __init__(self, measure: Callable[[], int], task: trio.lowlevel.Task | None = None):
        self.measure = measure
        self.task = task
        self.grew: list[int] = []
        self._before = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.task is None or task is self.task:
            self._before = self.measure()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.task is None or task is self.task:
            self.grew.append(self.measure() - self._before)

    def __enter__(self) -> StepMeter:
        trio.lowlevel.add_instrument(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        trio.lowlevel.remove_instrument(self)


async def test_a_slice_of_messages_takes_no_checkpoint_and_the_next_one_does(
    connect: Connect,
) -> None:
    connection, peer = connect()
    total = 2 * FAIR_SLICE_EVENTS
    with trio.fail_after(GUARD_S):
        await peer.send(*(BytesMessage(data=i.to_bytes(2, "big")) for i in range(total)))
        with trio.testing.assert_no_checkpoints():
            first = [await connection.receive() for _ in range(FAIR_SLICE_EVENTS)]
        with trio.testing.assert_checkpoints():
            then = await connection.receive()
    assert first == [i.to_bytes(2, "big") for i in range(FAIR_SLICE_EVENTS)]
    assert then == FAIR_SLICE_EVENTS.to_bytes(2, "big")


async def test_no_step_of_a_reader_whose_socket_always_has_data_exceeds_a_slice(
    connect: Connect,
) -> None:
    connection, peer = connect(ours=ConnectionType.SERVER)
    total = 10 * FAIR_SLICE_EVENTS
    received: list[str | bytes] = []
    with trio.fail_after(GUARD_S):
        # All of it readable at once: one read takes it all.
        await peer.send(*(TextMessage(data=f'{{"event":"x","n":{i}}}') for i in range(total)))
        with StepMeter(lambda: len(received)) as meter:
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    while len(received) < total:
                        received.append(await connection.receive())

                nursery.start_soon(read)
    assert received == [f'{{"event":"x","n":{i}}}' for i in range(total)]
    # Every other task got a turn after each slice, and each slice was whole.
    assert max(meter.grew) == FAIR_SLICE_EVENTS


async def test_a_flood_of_pings_is_answered_a_slice_at_a_time(connect: Connect) -> None:
    made: list[CountingTransport] = []

    def counting(sock: socket.socket) -> SocketTransport:
        made.append(CountingTransport(sock))
        return made[-1]

    connection, peer = connect(transport=counting)
    pings = 5 * FAIR_SLICE_EVENTS
    with trio.fail_after(GUARD_S):
        await peer.send(
            *(Ping(payload=i.to_bytes(4, "big")) for i in range(pings)),
            TextMessage(data="after the pings"),
        )
        pongs: list[Event | None] = []
        with StepMeter(lambda: made[0].writes) as meter:
            async with trio.open_nursery() as nursery:

                async def read_the_pongs() -> None:
                    # As a live peer does: its socket's buffer holds a few hundred.
                    while len(pongs) < pings:
                        pongs.append(await peer.next_event())

                nursery.start_soon(read_the_pongs)
                message = await connection.receive()
    assert message == "after the pings"
    assert pongs == [Pong(payload=i.to_bytes(4, "big")) for i in range(pings)]
    assert max(meter.grew) == FAIR_SLICE_EVENTS


async def test_a_transport_whose_socket_always_has_bytes_checkpoints_every_slice() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        transport = SocketTransport(ours)
        theirs.setblocking(False)
        written = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                written += theirs.send(b"\x55" * 65536)
        assert written > 2 * FAIR_SLICE_BYTES, "the socket buffer holds more than two slices"
        got = 0
        with trio.fail_after(GUARD_S):
            with trio.testing.assert_no_checkpoints():
                while got < FAIR_SLICE_BYTES:
                    got += len(await transport.receive_some())
            with trio.testing.assert_checkpoints():
                assert await transport.receive_some()


class CountingSocket(socket.socket):
    """A stdlib socket that counts its reads."""

    reads = 0

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self.reads += 1
        return super().recv_into(buffer, nbytes, flags)


async def test_after_a_read_that_emptied_the_socket_the_next_waits_before_reading() -> None:
    # Every message of a live call comes alone, tens of ms after the one before: a read
    # straight after one that emptied the kernel's buffer would nearly always fail (a
    # system call and an exception per message). It waits for the socket instead.
    plain, theirs = socket.socketpair()
    ours = CountingSocket(fileno=plain.detach())
    with ours, theirs:
        transport = SocketTransport(ours)
        theirs.send(b"first")
        with trio.fail_after(GUARD_S):
            assert await transport.receive_some() == b"first"
            assert ours.reads == 1
            async with trio.open_nursery() as nursery:
                got: list[bytes] = []

                async def read() -> None:
                    got.append(await transport.receive_some())

                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                assert ours.reads == 1  # waiting, without a read that fails
                theirs.send(b"second")
            assert got == [b"second"] and ours.reads == 2
            # Bytes that came before the next call are read after one pass.
            theirs.send(b"third")
            with trio.testing.assert_checkpoints():
                assert await transport.receive_some() == b"third"
            assert ours.reads == 3


async def test_tls_a_slice_of_messages_takes_no_checkpoint_and_the_next_one_does(
    tls_connect: TlsConnect,
) -> None:
    connection, peer, transport = await tls_connect()
    total = 2 * FAIR_SLICE_EVENTS
    with trio.fail_after(GUARD_S):
        await peer.send(*(BytesMessage(data=i.to_bytes(2, "big")) for i in range(total)))
        for _ in range(1000):  # wait for the records on loopback (see the test above)
            if unread_bytes(transport.sock) >= total * 4 + 22:
                break
            await trio.sleep(0.001)
        with trio.testing.assert_no_checkpoints():
            first = [await connection.receive() for _ in range(FAIR_SLICE_EVENTS)]
        with trio.testing.assert_checkpoints():
            then = await connection.receive()
    assert first == [i.to_bytes(2, "big") for i in range(FAIR_SLICE_EVENTS)]
    assert then == FAIR_SLICE_EVENTS.to_bytes(2, "big")


async def test_aclose_against_a_peer_that_floods_instead_of_answering_takes_turns(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    connection, peer = connect()
    slices = 20
    flood = b"".join(peer.ws.send(TextMessage(data="x")) for _ in range(slices * FAIR_SLICE_EVENTS))
    closing_steps = 0

    async def close() -> None:
        nonlocal closing_steps
        with StepMeter(lambda: 0, trio.lowlevel.current_task()) as meter:
            await connection.aclose()
        closing_steps = len(meter.grew)

    with trio.fail_after(GUARD_S):
        await peer.send_raw(flood)
        t0 = trio.current_time()
        await close()
        assert trio.current_time() == t0 + CLOSE_REPLY_S  # the peer never answered
    # It read the whole flood (and found no answer in it), a slice at a time.
    assert closing_steps > slices
    events = []
    while (event := await peer.next_event()) is not None:
        events.append(event)
    assert events == [CloseConnection(code=1000, reason="")]


async def test_ping_and_aclose_always_checkpoint_and_a_flush_owing_nothing_does_not(
    connect: Connect,
) -> None:
    connection, peer = connect()
    with trio.fail_after(GUARD_S):
        with trio.testing.assert_no_checkpoints():
            assert not connection.needs_flush
            await connection.flush()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_until_closed, connection, 1000)

            async def answer_the_ping_then_close() -> None:
                ping = await peer.next_event()
                assert isinstance(ping, Ping)
                await peer.send(ping.response())
                close = await peer.next_event()
                assert isinstance(close, CloseConnection)
                await peer.send(close.response())

            nursery.start_soon(answer_the_ping_then_close)
            with trio.testing.assert_checkpoints():
                await connection.ping()
            with trio.testing.assert_checkpoints():
                await connection.aclose()


# --- the server's opening handshake ---------------------------------------------------------


def masked_text_frame(text: str, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """A client's (masked) text frame, by hand: wsproto's client sends none before the 101."""
    data = text.encode()
    assert len(data) < 126
    return (
        bytes([0x81, 0x80 | len(data)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    )


async def test_frames_sent_with_the_upgrade_request_are_received() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        client = WSConnection(ConnectionType.CLIENT)
        request = client.send(Request(host="bridge.test", target="/twilio/stream"))
        early = ['{"event":"connected"}', '{"event":"start"}', "third"]
        # One segment: the head, then the client's first frames without waiting for the 101.
        upgrade = read_upgrade(request + b"".join(masked_text_frame(t) for t in early))
        assert upgrade.request.target == "/twilio/stream"
        with trio.fail_after(GUARD_S):
            connection = await accept_upgrade(SocketTransport(ours), upgrade)
            assert [await connection.receive() for _ in early] == early
            client.receive_data(theirs.recv(65536))
            assert isinstance(next(client.events()), AcceptConnection)


def test_an_incomplete_or_broken_upgrade_is_refused_with_a_400() -> None:
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(Request(host="bridge.test", target="/twilio/stream"))
    for head in (request[:-2], b"GET /twilio/stream HTTP/1.1\r\nhost: x\r\n\r\n", b"\x16\x03"):
        with pytest.raises(UpgradeRefused) as refused:
            read_upgrade(head)
        assert refused.value.answer.startswith(b"HTTP/1.1 400 ")


# --- writing -------------------------------------------------------------------------------


async def test_a_send_with_room_in_the_buffer_does_not_yield(connect: Connect) -> None:
    connection, peer = connect()
    with trio.fail_after(GUARD_S):
        with trio.testing.assert_no_checkpoints():
            for i in range(20):
                await connection.send(bytes([i]) * 160)
        assert [await peer.next_message() for _ in range(20)] == [
            bytes([i]) * 160 for i in range(20)
        ]


async def test_writes_that_fill_the_buffer_complete_once_the_peer_reads(
    connect: Connect,
) -> None:
    connection, peer = connect(send_buffer=SMALL_BUFFER)
    messages = [bytes([i % 256]) * 3000 for i in range(100)]
    all_sent = trio.Event()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:

            async def write_all() -> None:
                for message in messages:
                    await connection.send(message)
                all_sent.set()

            nursery.start_soon(write_all)
            await trio.testing.wait_all_tasks_blocked()
            assert not all_sent.is_set()  # the buffer is full: the writer waits
            received = [await peer.next_message() for _ in messages]
            await all_sent.wait()
    assert received == messages


async def test_a_write_the_peer_never_reads_times_out(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    connection, _peer = connect(send_buffer=SMALL_BUFFER)
    with trio.fail_after(GUARD_S):
        start = trio.current_time()
        with pytest.raises(SocketWriteTimeout):
            for _ in range(1000):
                start = trio.current_time()
                await connection.send(b"\x00" * 3000)
        assert trio.current_time() - start == pytest.approx(WRITE_DEADLINE_S)
        # Part of a frame may be out: the connection is done for.
        with pytest.raises(SocketClosed) as closed:
            await connection.receive()
        assert closed.value.code == net_transport.ABNORMAL_CLOSURE
        with pytest.raises(SocketClosed):
            await connection.send("again")
        start = trio.current_time()
        with pytest.raises(SocketClosed):
            await connection.ping()  # at once: no write, no wait for a pong
        assert trio.current_time() == start
        # Closing writes nothing more (it would go after a torn frame) and does not
        # wait for the stuck buffer again.
        start = trio.current_time()
        await connection.aclose()
        assert trio.current_time() - start < 0.1


async def test_a_stuck_write_is_not_cut_by_cancellation(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    connection, peer = connect(send_buffer=SMALL_BUFFER)
    message = b"\x55" * 200_000
    with trio.fail_after(GUARD_S):
        writer_scope = trio.CancelScope()

        async def write() -> None:
            with writer_scope:
                await connection.send(message)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            writer_scope.cancel()  # the writer is mid-frame
            # The frame still goes out whole once the peer reads.
            assert await peer.next_message() == message
        await connection.send("and the connection is still good")
        assert await peer.next_message() == "and the connection is still good"


async def test_a_frame_taken_in_part_is_finished_by_flush_before_any_other_write(
    connect: Connect,
) -> None:
    connection, peer = connect(send_buffer=SMALL_BUFFER)
    big = bytes(range(256)) * 4096  # 1 MiB: no small send buffer takes it whole
    with trio.fail_after(GUARD_S):
        assert connection.send_nowait(big)
        assert connection.needs_flush
        # A second message may not go now (the rest of the first must go first) …
        assert not connection.send_nowait(b"after")
        received: list[str | bytes] = []
        async with trio.open_nursery() as nursery:

            async def read_two() -> None:
                received.append(await peer.next_message())
                received.append(await peer.next_message())

            nursery.start_soon(read_two)
            # … and a normal write waits behind the flush rather than overtaking it.
            nursery.start_soon(connection.send, "control")
            await connection.flush()
        assert not connection.needs_flush
        assert received == [big, "control"]
        # With the buffer drained, a small frame goes whole, straight away.
        assert connection.send_nowait(b"small")
        assert not connection.needs_flush
        assert await peer.next_message() == b"small"


@pytest.mark.parametrize("ours", [ConnectionType.CLIENT, ConnectionType.SERVER])
async def test_several_messages_sent_at_once_go_in_one_write_whole_and_in_order(
    connect: Connect, ours: ConnectionType
) -> None:
    connection, peer, transport = connect_counting(
        lambda **kwargs: connect(ours=ours, **kwargs)
    )
    with trio.fail_after(GUARD_S):
        with trio.testing.assert_no_checkpoints():
            assert connection.send_nowait('{"event":"media"}', b"\x01" * 160, '{"event":"mark"}')
        assert transport.writes == 1
        assert not connection.needs_flush
        assert [await peer.next_message() for _ in range(3)] == [
            '{"event":"media"}',
            b"\x01" * 160,
            '{"event":"mark"}',
        ]


async def test_messages_sent_at_once_and_taken_in_part_are_finished_by_flush_in_order(
    connect: Connect,
) -> None:
    connection, peer = connect(send_buffer=SMALL_BUFFER)
    big = bytes(range(256)) * 4096
    with trio.fail_after(GUARD_S):
        assert connection.send_nowait(big, "its mark")
        assert connection.needs_flush
        received: list[str | bytes] = []
        async with trio.open_nursery() as nursery:

            async def read_three() -> None:
                for _ in range(3):
                    received.append(await peer.next_message())

            nursery.start_soon(read_three)
            nursery.start_soon(connection.send, "after")
            await connection.flush()
        assert received == [big, "its mark", "after"]


@pytest.mark.parametrize("then", ["send", "aclose"])
async def test_a_frame_whose_flush_never_comes_is_finished_by_the_next_write(
    connect: Connect, then: str
) -> None:
    # The task that owed the flush was cancelled (its call ended): the next write, or
    # the close, finishes the frame first instead of waiting out the write deadline.
    connection, peer = connect(send_buffer=SMALL_BUFFER)
    big = bytes(range(256)) * 4096
    with trio.fail_after(GUARD_S):
        assert connection.send_nowait(big)
        assert connection.needs_flush
        received: list[str | bytes] = []
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                received.append(await peer.next_message())
                if then == "send":
                    received.append(await peer.next_message())
                else:
                    event = await peer.next_event()
                    assert isinstance(event, CloseConnection)
                    await peer.send(event.response())

            nursery.start_soon(read)
            start = trio.current_time()
            if then == "send":
                await connection.send("goodbye")
            else:
                await connection.aclose(1000, "bye")
            assert trio.current_time() - start < WRITE_DEADLINE_S
        assert received[0] == big
        assert received[1:] == (["goodbye"] if then == "send" else [])
        assert not connection.needs_flush


async def test_concurrent_writers_never_interleave_frames(connect: Connect) -> None:
    connection, peer = connect(send_buffer=SMALL_BUFFER)
    writers, count = 4, 25

    def message(writer: int, n: int) -> bytes:
        return bytes([writer]) * (1000 + 997 * n) + n.to_bytes(2, "big")

    received: list[str | bytes] = []
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:

            async def write(writer: int) -> None:
                for n in range(count):
                    await connection.send(message(writer, n))
                    if n % 5 == 0:
                        await connection.send(f"text {writer} {n}")

            for writer in range(writers):
                nursery.start_soon(write, writer)
            for _ in range(writers * (count + count // 5)):
                received.append(await peer.next_message())
    for writer in range(writers):
        mine = [m for m in received if isinstance(m, bytes) and m[0] == writer]
        assert mine == [message(writer, n) for n in range(count)]
        texts = [m for m in received if isinstance(m, str) and m.split()[1] == str(writer)]
        assert texts == [f"text {writer} {n}" for n in range(0, count, 5)]


async def test_a_writer_stuck_when_the_connection_is_closed(
    connect: Connect, autojump_clock: trio.testing.MockClock
) -> None:
    connection, _peer = connect(send_buffer=SMALL_BUFFER)
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                with pytest.raises(SocketClosed):
                    await connection.send(b"\x00" * 200_000)

            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            with trio.move_on_after(0.5):
                await connection.aclose()
            # The close frame cannot go in the middle of the writer's frame; the
            # caller's deadline still bounds the close, and the writer is released.
            assert trio.current_time() - start == pytest.approx(0.5)


# --- over TLS (the wss:// Vapi leg) ---------------------------------------------------------


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key in ``folder`` (made by openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    request = (
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1"
        " -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1"
    )
    subprocess.run(
        [openssl, *request.split(), "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS server's context with ``make_certificate``'s certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


def tcp_pair(send_buffer: int | None = None) -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on loopback: ours and the peer's.

    ``send_buffer`` shrinks our send buffer and the peer's receive buffer, so that a
    large message fills them.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.socket()
        if send_buffer is not None:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, send_buffer)
        ours.connect(listener.getsockname())
        theirs, _ = listener.accept()
    return ours, theirs


def unread_bytes(sock: socket.socket) -> int:
    """How many bytes wait in ``sock``'s receive buffer."""
    count = array.array("i", [0])
    fcntl.ioctl(sock, termios.FIONREAD, count)
    return count[0]


def peer_stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


class CountingTlsTransport(TlsSocketTransport):
    """A ``TlsSocketTransport`` that counts its reads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads = 0

    async def receive_some(self) -> bytes:
        self.reads += 1
        return await super().receive_some()


TlsConnect = Callable[..., Awaitable[tuple[WsConnection, Peer, TlsSocketTransport]]]


@pytest.fixture
async def tls_connect(tls_files: tuple[Path, Path]) -> AsyncIterator[TlsConnect]:
    """Connect a ``WsConnection`` over ``TlsSocketTransport`` to a ``Peer`` over trio's TLS.

    Both handshakes (TLS, then WebSocket) are done; the sockets are closed at the end.
    """
    cert, _key = tls_files
    sockets: list[socket.socket] = []

    async def make(
        *,
        ours: ConnectionType = ConnectionType.CLIENT,
        send_buffer: int | None = None,
        transport: type[TlsSocketTransport] = TlsSocketTransport,
    ) -> tuple[WsConnection, Peer, TlsSocketTransport]:
        a, b = tcp_pair(send_buffer)
        sockets.extend((a, b))
        client = ssl.create_default_context(cafile=str(cert))
        server = server_context(*tls_files)
        if ours is ConnectionType.CLIENT:
            our_tls = transport(a, client, server_hostname="127.0.0.1")
            their_tls = trio.SSLStream(peer_stream(b), server, server_side=True)
        else:
            our_tls = transport(a, server, server_side=True)
            their_tls = trio.SSLStream(peer_stream(b), client, server_hostname="127.0.0.1")
        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(their_tls.do_handshake)
                await our_tls.handshake()
        _, their_ws = handshake(ours)
        connection = WsConnection(our_tls, client=ours is ConnectionType.CLIENT)
        return connection, Peer(their_tls, their_ws), our_tls

    yield make
    for sock in sockets:
        sock.close()


def as_event(message: str | bytes) -> Message:
    if isinstance(message, str):
        return TextMessage(data=message)
    return BytesMessage(data=message)


@pytest.mark.parametrize("ours", [ConnectionType.CLIENT, ConnectionType.SERVER])
async def test_tls_whole_messages_arrive_in_order_both_ways(
    tls_connect: TlsConnect, ours: ConnectionType
) -> None:
    connection, peer, _ = await tls_connect(ours=ours)
    # Larger than a TLS record (16 KiB) too: 100 KiB is seven records, 60,000 bytes of
    # text four, each split across reads.
    sent: list[str | bytes] = [
        '{"type":"assistant.started"}',
        b"\xff" * 160,
        bytes(range(256)) * 400,
        "añb€" * 6000,
        b"",
        "",
        b"\x01" * 160,
    ]
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:

            async def peer_sends() -> None:
                for message in sent:
                    await peer.send(as_event(message))

            nursery.start_soon(peer_sends)
            assert [await connection.receive() for _ in sent] == sent
        async with trio.open_nursery() as nursery:

            async def we_send() -> None:
                for message in sent:
                    await connection.send(message)

            nursery.start_soon(we_send)
            assert [await peer.next_message() for _ in sent] == sent


async def test_tls_many_records_in_one_read_are_returned_without_another_pass(
    tls_connect: TlsConnect,
) -> None:
    connection, peer, transport = await tls_connect(transport=CountingTlsTransport)
    assert isinstance(transport, CountingTlsTransport)
    with trio.fail_after(GUARD_S):
        for i in range(50):  # fifty writes: fifty TLS records
            await peer.send(BytesMessage(data=bytes([i]) * 160))
        # TCP on loopback may hold small writes back for a moment (autocorking): wait
        # until all fifty records (a 162-byte frame and 22 bytes of TLS 1.3 each) are in.
        for _ in range(1000):
            if unread_bytes(transport.sock) >= 50 * (162 + 22):
                break
            await trio.sleep(0.001)
        assert await connection.receive() == b"\x00" * 160
        # Every record was decrypted with the first: no read, no checkpoint.
        with trio.testing.assert_no_checkpoints():
            rest = [await connection.receive() for _ in range(49)]
    assert rest == [bytes([i]) * 160 for i in range(1, 50)]
    assert transport.reads == 1


async def test_tls_writes_with_room_in_the_buffer_do_not_yield(tls_connect: TlsConnect) -> None:
    connection, peer, transport = await tls_connect()
    with trio.fail_after(GUARD_S):
        with trio.testing.assert_no_checkpoints():
            for i in range(20):
                assert connection.send_nowait(bytes([i]) * 160)
                assert not connection.needs_flush
                await connection.send(f'{{"type":"add-message","n":{i}}}')
        assert not transport.pending
        received = [await peer.next_message() for _ in range(40)]
    assert received[0::2] == [bytes([i]) * 160 for i in range(20)]
    assert received[1::2] == [f'{{"type":"add-message","n":{i}}}' for i in range(20)]


async def test_tls_a_frame_taken_in_part_is_finished_by_flush_before_any_other_write(
    tls_connect: TlsConnect,
) -> None:
    connection, peer, transport = await tls_connect(send_buffer=SMALL_BUFFER)
    big = bytes(range(256)) * 4096  # 1 MiB: encrypted whole, its records taken in part
    with trio.fail_after(GUARD_S):
        assert connection.send_nowait(big)
        assert connection.needs_flush
        assert transport.pending
        # Nothing goes now while records are owed …
        assert not connection.send_nowait(b"after")
        assert transport.try_send(memoryview(b"after")) == 0
        received: list[str | bytes] = []
        async with trio.open_nursery() as nursery:

            async def read_two() -> None:
                received.append(await peer.next_message())
                received.append(await peer.next_message())

            nursery.start_soon(read_two)
            # … and a normal write waits behind the flush rather than overtaking it.
            nursery.start_soon(connection.send, "control")
            await connection.flush()
        assert not connection.needs_flush
        assert not transport.pending
        assert received == [big, "control"]
        # With the buffer drained, a small frame goes whole, straight away.
        assert connection.send_nowait(b"small")
        assert not connection.needs_flush
        assert await peer.next_message() == b"small"


async def test_tls_direct_and_queued_writes_keep_every_message_whole_and_in_order(
    tls_connect: TlsConnect,
) -> None:
    connection, peer, _ = await tls_connect(send_buffer=SMALL_BUFFER)
    count = 300

    def frame(n: int) -> bytes:
        return n.to_bytes(2, "big") + bytes([n % 256]) * (160 + 97 * (n % 40))

    def text(n: int) -> str:
        return f"control {n} " + "x" * (n * 13 % 400)

    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:

            async def direct() -> None:
                # As the call's Twilio reader: written now, else through a normal send.
                for n in range(count):
                    if connection.send_nowait(frame(n)):
                        if connection.needs_flush:
                            await connection.flush()
                    else:
                        await connection.send(frame(n))

            async def queued() -> None:
                for n in range(count // 3):
                    await connection.send(text(n))

            nursery.start_soon(direct)
            nursery.start_soon(queued)
            received = [await peer.next_message() for _ in range(count + count // 3)]
    assert [m for m in received if isinstance(m, bytes)] == [frame(n) for n in range(count)]
    assert [m for m in received if isinstance(m, str)] == [text(n) for n in range(count // 3)]


@pytest.mark.parametrize("then_tcp", [False, True], ids=["close-notify", "close-notify-fin"])
async def test_tls_the_peers_close_notify_ends_the_connection_after_its_messages(
    tls_connect: TlsConnect, then_tcp: bool
) -> None:
    connection, peer, _ = await tls_connect()
    assert isinstance(peer.stream, trio.SSLStream)
    tls = peer.stream
    with trio.fail_after(GUARD_S):
        await peer.send(TextMessage(data="last words"))
        async with trio.open_nursery() as nursery:
            if then_tcp:
                await tls.aclose()  # close_notify, then the TCP close
            else:
                # close_notify alone; the TCP connection stays up until ours comes back.
                nursery.start_soon(tls.unwrap)
            assert await connection.receive() == "last words"
            with pytest.raises(SocketClosed) as closed:
                await connection.receive()
            assert closed.value.code == net_transport.ABNORMAL_CLOSURE  # TLS ended, no close frame
            with pytest.raises(SocketClosed):
                await connection.send("too late")
            await connection.aclose()  # our close_notify ends the peer's unwrap


async def test_tls_a_reset_ends_reading_and_writing(tls_connect: TlsConnect) -> None:
    connection, peer, transport = await tls_connect()
    assert isinstance(peer.stream, trio.SSLStream)
    raw = peer.stream.transport_stream
    assert isinstance(raw, trio.SocketStream)
    raw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw.aclose)  # an RST, not a FIN
            with pytest.raises(SocketClosed) as closed:
                await connection.receive()
        assert closed.value.code == net_transport.ABNORMAL_CLOSURE
        with pytest.raises(SocketClosed):
            transport.try_send(memoryview(b"\x00" * 160))
        await connection.aclose()


async def test_tls_aclose_sends_the_close_frame_then_close_notify(
    tls_connect: TlsConnect,
) -> None:
    connection, peer, _ = await tls_connect()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:

            async def answer() -> None:
                event = await peer.next_event()
                assert event == CloseConnection(code=1000, reason="")
                await peer.send(CloseConnection(code=1000))
                # A clean end of TLS: without our close_notify, trio's SSLStream
                # would raise BrokenResourceError here.
                assert await peer.next_event() is None

            nursery.start_soon(answer)
            await connection.aclose()
    assert connection.close_code == 1000


async def test_tls_handshake_with_an_untrusted_certificate_fails(
    tls_files: tuple[Path, Path],
) -> None:
    ours, theirs = tcp_pair()
    with ours, theirs:
        # Only the system's CAs: the self-signed certificate is not among them.
        transport = TlsSocketTransport(
            ours, ssl.create_default_context(), server_hostname="127.0.0.1"
        )
        peer = trio.SSLStream(peer_stream(theirs), server_context(*tls_files), server_side=True)
        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:

                async def peer_handshake() -> None:
                    with pytest.raises(trio.BrokenResourceError):
                        await peer.do_handshake()  # our alert reached it

                nursery.start_soon(peer_handshake)
                with pytest.raises(TlsHandshakeError, match="certificate verify failed"):
                    await transport.handshake()
                await transport.aclose()


async def test_tls_handshake_with_a_peer_that_hangs_up(tls_files: tuple[Path, Path]) -> None:
    ours, theirs = tcp_pair()
    with ours, theirs:
        transport = TlsSocketTransport(
            ours, ssl.create_default_context(cafile=str(tls_files[0])), server_hostname="127.0.0.1"
        )
        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:

                async def read_the_hello_and_hang_up() -> None:
                    stream = peer_stream(theirs)
                    assert await stream.receive_some(65536)
                    await stream.aclose()

                nursery.start_soon(read_the_hello_and_hang_up)
                with pytest.raises(TlsHandshakeError, match="the peer closed the connection"):
                    await transport.handshake()
            await transport.aclose()


class TlsOverCountingSocket(TlsSocketTransport):
    """TLS over a ``CountingSocket`` (the socket given is taken over)."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(CountingSocket(fileno=sock.detach()), *args, **kwargs)


async def test_tls_after_a_read_that_emptied_the_socket_the_next_waits_before_reading(
    tls_connect: TlsConnect,
) -> None:
    connection, peer, transport = await tls_connect(transport=TlsOverCountingSocket)
    counting = transport.sock
    assert isinstance(counting, CountingSocket)
    with counting, trio.fail_after(GUARD_S):
        await peer.send(as_event("first"))
        assert await connection.receive() == "first"
        reads = counting.reads
        async with trio.open_nursery() as nursery:
            got: list[str | bytes] = []

            async def read() -> None:
                got.append(await connection.receive())

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert counting.reads == reads  # waiting, without a read that fails
            await peer.send(as_event("second"))
        assert got == ["second"] and counting.reads == reads + 1
