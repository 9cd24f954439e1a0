"""voicebridge.wsconn over real sockets, against a hand-driven wsproto peer.

Charter: every test connects a ``WsConnection`` to the far end of a
``socket.socketpair()`` (or a trio memory stream for ``StreamTransport``), where a
wsproto connection driven by the test plays the peer byte by byte. No mocks. Our
side is the client (as on the Vapi leg) unless a test says otherwise. Anything
timed runs on ``autojump_clock``; every test is guarded by ``trio.fail_after``.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

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

from voicebridge import wsconn
from voicebridge.errors import SocketClosed
from voicebridge.sockets import WRITE_DEADLINE_S, SocketWriteTimeout
from voicebridge.wsconn import (
    CLOSE_REPLY_S,
    MAX_MESSAGE_BYTES,
    SocketTransport,
    StreamTransport,
    WsConnection,
)

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
    """A ``SocketTransport`` that counts its reads."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.reads = 0

    async def receive_some(self) -> bytes:
        self.reads += 1
        return await super().receive_some()


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
        our_ws, their_ws = handshake(ours)
        connection = WsConnection(transport(a), our_ws)
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
    async with trio.open_nursery() as nursery:
        with trio.fail_after(GUARD_S):
            if fragmented:
                chunks = [b"\x00" * (64 * 1024)] * (size // (64 * 1024)) + [b"\x00"]
                events = [BytesMessage(data=c, message_finished=False) for c in chunks[:-1]]
                events.append(BytesMessage(data=chunks[-1], message_finished=True))
                nursery.start_soon(peer.send, *events)
            else:
                nursery.start_soon(peer.send, BytesMessage(data=b"\x00" * size))
            with pytest.raises(SocketClosed) as closed:
                await connection.receive()
            assert closed.value.code == 1009
            event = await peer.next_event()
            assert isinstance(event, CloseConnection)
            assert event.code == 1009
            # The connection stays closed; later messages are not delivered.
            with pytest.raises(SocketClosed):
                await connection.receive()


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
        assert closed.value.code == wsconn.ABNORMAL_CLOSURE
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
        assert closed.value.code == wsconn.ABNORMAL_CLOSURE
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


# --- over a trio stream (the TLS path) ------------------------------------------------------


@pytest.fixture
async def stream_pair() -> AsyncIterator[tuple[WsConnection, Peer]]:
    ours, theirs = trio.testing.memory_stream_pair()
    our_ws, their_ws = handshake()
    yield WsConnection(StreamTransport(ours), our_ws), Peer(theirs, their_ws)


async def test_stream_transport_messages_ping_and_close(
    stream_pair: tuple[WsConnection, Peer],
) -> None:
    connection, peer = stream_pair
    with trio.fail_after(GUARD_S):
        await connection.send("hello")
        await connection.send(b"\x01\x02")
        assert await peer.next_message() == "hello"
        assert await peer.next_message() == b"\x01\x02"
        await peer.send(TextMessage(data="hi"), Ping(payload=b"p"))
        assert await connection.receive() == "hi"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_until_closed, connection, 1000)
            assert await peer.next_event() == Pong(payload=b"p")
            await peer.send(CloseConnection(code=1000))
            assert await peer.next_event() == CloseConnection(code=1000, reason="")
        await connection.aclose()


async def test_stream_transport_peer_gone(stream_pair: tuple[WsConnection, Peer]) -> None:
    connection, peer = stream_pair
    with trio.fail_after(GUARD_S):
        await peer.stream.aclose()
        with pytest.raises(SocketClosed) as closed:
            await connection.receive()
        assert closed.value.code == 1006
        with pytest.raises(SocketClosed):
            await connection.send("into the void")
        await connection.aclose()
