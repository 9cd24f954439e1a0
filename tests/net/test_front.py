"""The front door (``voicebridge.net.front``): media upgrades to the calls, the rest to hypercorn.

Run against the real server on loopback with raw sockets, so the bytes on the wire
(split heads, pipelined requests, a silent client) are exactly what the test says.
"""

from __future__ import annotations

import socket
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.config import Config as HypercornConfig

from tests.harness import running_bridge
from voicebridge.net.front import HEAD_DEADLINE_S, _read_head, is_media_request, serve_front
from voicebridge.net.transport import SocketTransport
from voicebridge.web import STREAM_PATH


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET /twilio/stream HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"GET /twilio/stream?x=1 HTTP/1.1\r\n\r\n", True),
        (b"GET /twilio/streams HTTP/1.1\r\n\r\n", False),
        (b"POST /twilio/stream HTTP/1.1\r\n\r\n", False),
        (b"GET /twilio/voice HTTP/1.1\r\n\r\n", False),
        (b"GET /twilio/stream", False),  # no whole request line
        (b"GET  /twilio/stream HTTP/1.1\r\n\r\n", False),
    ],
)
def test_only_a_get_of_the_stream_path_is_a_media_request(head: bytes, expected: bool) -> None:
    assert is_media_request(head, STREAM_PATH) is expected


async def _exchange(port: int, *pieces: bytes, pause_s: float = 0.05) -> bytes:
    """Send ``pieces`` with a pause between them; everything the server answers."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for piece in pieces:
            await stream.send_all(piece)
            await trio.sleep(pause_s)
        await stream.send_eof()
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    return answer


async def test_a_request_head_split_across_packets_reaches_hypercorn_whole() -> None:
    with trio.fail_after(20):
        async with running_bridge() as bridge:
            answer = await _exchange(
                bridge.listening.port,
                b"POST /twilio/vo",
                b"ice HTTP/1.1\r\nHo",
                b"st: a\r\nContent-Length: 0\r\n\r\n",
            )
    # The voice webhook's own answer to an unsigned request: its path arrived whole.
    assert answer.startswith(b"HTTP/1.1 403")
    assert answer.endswith(b"forbidden\n")


async def test_two_requests_on_one_connection_are_both_answered() -> None:
    with trio.fail_after(20):
        async with running_bridge() as bridge:
            # A 404 keeps the connection open (the Twilio routes close theirs).
            request = b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n"
            answer = await _exchange(bridge.listening.port, request + request)
    assert answer.count(b"HTTP/1.1 404") == 2


async def test_a_get_of_the_stream_path_that_is_no_upgrade_gets_400_and_the_server_goes_on() -> (
    None
):
    with trio.fail_after(20):
        async with running_bridge() as bridge:
            port = bridge.listening.port
            answer = await _exchange(port, b"GET /twilio/stream HTTP/1.1\r\nHost: a\r\n\r\n")
            after = await _exchange(
                port, b"POST /twilio/voice HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
            )
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.endswith(b"not a WebSocket upgrade\n")
    assert after.startswith(b"HTTP/1.1 403")


async def test_a_client_that_never_finishes_its_head_is_dropped_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    with theirs:
        theirs.sendall(b"GET /healthz HTTP/1.1\r\nHost:")
        start = trio.current_time()
        assert await _read_head(ours) is None
        assert trio.current_time() - start == HEAD_DEADLINE_S
    ours.close()


async def test_the_head_and_what_came_with_it_are_read_whole() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    with ours, theirs:
        theirs.sendall(b"POST /x HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody")
        assert await _read_head(ours) == b"POST /x HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"
        theirs.sendall(b"GET / HTTP/1.1\r\n")
        theirs.shutdown(socket.SHUT_WR)
        # A head cut short by the client is handed on as it is (hypercorn answers it).
        assert await _read_head(ours) == b"GET / HTTP/1.1\r\n"


async def _tiny_app(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app with lifespan support that answers every request "hello"."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    await receive()
    headers = [(b"content-length", b"5"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello"})


async def test_a_bug_in_a_connection_ends_that_connection_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken_media(transport: SocketTransport, head: bytes) -> None:
        raise RuntimeError("a bug in the media handler")

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_front,
                    _tiny_app,
                    HypercornConfig(),
                    [listener],
                    media_path="/media",
                    media=broken_media,
                    shutdown_trigger=stop.wait,
                )
            )
            broken = await _exchange(port, b"GET /media HTTP/1.1\r\nHost: a\r\n\r\n")
            fine = await _exchange(port, b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
            stop.set()
    assert broken == b""  # closed, nothing said
    assert fine.startswith(b"HTTP/1.1 200") and fine.endswith(b"hello")
    bugs = [r for r in caplog.records if "failed with a bug" in r.getMessage()]
    assert len(bugs) == 1
    assert bugs[0].exc_info is not None and "media handler" in str(bugs[0].exc_info[1])
    assert listener.fileno() == -1, "the listener is closed at shutdown"
