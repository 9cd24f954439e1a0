"""The front door (``voicebridge.net.front``): its limits, its routing, and what it assumes
of hypercorn.

Charter: real sockets, driven with raw bytes so that what is on the wire (split heads,
dribbled bodies, pipelined requests, HTTP/2 prefaces) is exactly what the test says.
Timed tests run on ``autojump_clock`` over a Unix socket, whose connect and delivery
complete inside the system call, so virtual times are exact; tests that need peer
addresses use TCP on 127.0.0.1, .2, .3 and real time. Every test has a ``fail_after``
guard. The attack from another OS process is in tests/net/test_front_attack.py.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypercorn.config import Config as HypercornConfig

from tests.harness import running_bridge
from voicebridge.config import EdgeConfig
from voicebridge.loopback import loopback_config
from voicebridge.net.front import (
    ACCEPT_BACKOFF_MAX_S,
    ACCEPT_BACKOFF_MIN_S,
    INCOMPLETE_GRACE_S,
    INCOMPLETE_SWEEP_S,
    PREREAD_BYTES,
    REFUSAL,
    EarlyAnswer,
    EarlyRequest,
    EarlyResponse,
    FrontCounters,
    MediaHandler,
    ensure_descriptor_limit,
    is_media_request,
    serve_front,
)
from voicebridge.net.transport import SocketTransport
from voicebridge.server import bind_listener, serve
from voicebridge.web import STREAM_PATH

#: The one guard of every test here (virtual seconds on the autojump clock).
GUARD_S = 120
MEDIA = "/media"
#: The HTTP/2 client connection preface (RFC 9113 section 3.4).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: An empty HTTP/2 SETTINGS frame, as a client sends right after the preface.
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


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


# -- a small app and a front door to run it behind -----------------------------------------


class App:
    """An ASGI app with lifespan support. Every request is read whole and answered with
    ``<method> <path> <body length> state=<greeting> client=<host>`` on a kept-alive
    connection; a request to ``/hang`` never gets an answer."""

    def __init__(self, *, greeting: str | None = None, startup_s: float = 0.0) -> None:
        self.greeting = greeting
        self.startup_s = startup_s
        #: (virtual time, what happened), in order.
        self.events: list[tuple[float, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.events.append((trio.current_time(), f"request {scope['path']}"))
        if scope["path"] == "/hang":
            try:
                await trio.sleep_forever()
            finally:
                self.events.append((trio.current_time(), "hang cancelled"))
        client = scope["client"][0] if scope["client"] else "-"
        greeting = scope["state"].get("greeting", "-")
        text = f"{scope['method']} {scope['path']} {len(body)} state={greeting} client={client}"
        answer = text.encode()
        headers = [(b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    async def _lifespan(self, scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await trio.sleep(self.startup_s)
                if self.greeting is not None:
                    scope["state"]["greeting"] = self.greeting
                self.events.append((trio.current_time(), "startup done"))
                await send({"type": "lifespan.startup.complete"})
            else:
                self.events.append((trio.current_time(), "shutdown"))
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _hold_media(transport: SocketTransport, head: bytes) -> None:
    """A media handler that keeps its connection until the client closes it (a call)."""
    try:
        while await transport.receive_some():
            pass
    finally:
        await transport.aclose()


@asynccontextmanager
async def front_door(
    listener: socket.socket,
    *,
    app: App | None = None,
    edge: EdgeConfig | None = None,
    config: HypercornConfig | None = None,
    media: MediaHandler = _hold_media,
    stop: trio.Event | None = None,
    preread_paths: frozenset[str] = frozenset(),
    early: EarlyAnswer | None = None,
) -> AsyncIterator[FrontCounters]:
    """``serve_front`` on ``listener`` until the block ends (then shut down gracefully)."""
    counters = FrontCounters()
    limits = edge if edge is not None else EdgeConfig()
    stop = stop if stop is not None else trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                serve_front,
                app if app is not None else App(),
                config if config is not None else HypercornConfig(),
                [listener],
                media_path=MEDIA,
                media=media,
                shutdown_trigger=stop.wait,
                limits=lambda: limits,
                counters=counters,
                preread_paths=preread_paths,
                early=early,
            )
        )
        yield counters
        stop.set()


def unix_listener(tmp_path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "front.sock"))
    listener.listen(128)
    return listener


async def connect_unix(tmp_path: Path) -> trio.SocketStream:
    return await trio.open_unix_socket(str(tmp_path / "front.sock"))


async def connect_tcp(port: int, source: str) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:``port`` from the address ``source``."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def read_all(stream: trio.SocketStream) -> bytes:
    """Everything until the server closes (or resets) the connection."""
    answer = b""
    try:
        while chunk := await stream.receive_some(65536):
            answer += chunk
    except trio.BrokenResourceError:
        pass
    return answer


async def read_response(stream: trio.SocketStream) -> bytes:
    """One response of the ``App`` (its body ends the read: Content-Length framing)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body


async def closed_at(stream: trio.SocketStream) -> float:
    """The virtual time at which the server closes ``stream`` (having sent nothing)."""
    assert await read_all(stream) == b""
    return trio.current_time()


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n"


# -- routing -------------------------------------------------------------------------------


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: a\r\n"
        + b"Content-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
    )


@attrs.define
class Early:
    """An early answer that answers requests whose body is ``b"early"`` and declines the
    rest; it keeps what it was offered."""

    offered: list[EarlyRequest] = attrs.field(factory=list)

    def __call__(self, request: EarlyRequest) -> EarlyResponse | None:
        self.offered.append(request)
        if request.body != b"early":
            return None
        return EarlyResponse(200, b"<Response/>", "text/xml; charset=utf-8")


async def test_a_whole_preread_request_the_early_answer_takes_is_answered_without_the_app(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    app, early = App(), Early()
    with trio.fail_after(GUARD_S):
        async with front_door(
            unix_listener(tmp_path), app=app, preread_paths=frozenset({"/hook"}), early=early
        ):
            client = await connect_unix(tmp_path)
            await client.send_all(post("/hook?a=1", b"early", b"X-Sig: s1\r\nX-Sig: s2\r\n"))
            answered = await read_all(client)
            declined = await connect_unix(tmp_path)
            await declined.send_all(post("/hook", b"later"))
            app_answer = await read_response(declined)
            await declined.aclose()
    assert answered == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/xml; charset=utf-8\r\n"
        b"content-length: 11\r\nconnection: close\r\n\r\n<Response/>"
    )
    first = early.offered[0]
    assert (first.method, first.target, first.body) == (b"POST", b"/hook?a=1", b"early")
    assert first.header(b"x-sig") == "s1" and first.header(b"x-other") is None
    assert [what for _, what in app.events if what.startswith("request")] == ["request /hook"]
    assert app_answer.endswith(b"POST /hook 5 state=- client=-")


async def test_only_a_whole_request_alone_on_its_connection_of_a_preread_path_is_offered(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    app, early = App(), Early()
    with trio.fail_after(GUARD_S):
        async with front_door(
            unix_listener(tmp_path), app=app, preread_paths=frozenset({"/hook"}), early=early
        ):
            # Another path; a request with another after it (closing after an early
            # answer would drop it); a body larger than the pre-read.
            for request, answers in [
                (post("/other", b"early"), 1),
                (post("/hook", b"early") + get("/next"), 2),
                (post("/hook", b"e" * (PREREAD_BYTES + 1)), 1),
            ]:
                client = await connect_unix(tmp_path)
                await client.send_all(request)
                for _ in range(answers):
                    assert b" 200 " in await read_response(client)
                await client.aclose()
    assert early.offered == []
    assert len([what for _, what in app.events if what.startswith("request")]) == 4



async def test_a_request_head_split_across_packets_reaches_hypercorn_whole(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD_S):
        async with front_door(unix_listener(tmp_path)):
            stream = await connect_unix(tmp_path)
            for piece in (b"GET /hea", b"lthz HTTP/1.1\r\nHo", b"st: a\r\n\r\n"):
                await stream.send_all(piece)
                await trio.sleep(0.5)
            answer = await read_response(stream)
            await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"GET /healthz 0 state=- client=-")


async def test_pipelined_and_kept_alive_requests_are_all_answered(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    post = b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    with trio.fail_after(GUARD_S):
        async with front_door(unix_listener(tmp_path)):
            stream = await connect_unix(tmp_path)
            await stream.send_all(get("/a") + post)
            first = await read_response(stream)
            second = await read_response(stream)
            await trio.sleep(1)
            await stream.send_all(get("/c"))
            third = await read_response(stream)
            await stream.aclose()
    assert first.endswith(b"GET /a 0 state=- client=-")
    assert second.endswith(b"POST /b 3 state=- client=-")
    assert third.endswith(b"GET /c 0 state=- client=-")


async def test_a_get_of_the_stream_path_that_is_no_upgrade_gets_400_and_the_server_goes_on() -> (
    None
):
    async def exchange(port: int, request: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            return await read_all(stream)

    with trio.fail_after(20):
        async with running_bridge() as bridge:
            port = bridge.listening.port
            answer = await exchange(port, get(STREAM_PATH))
            again = await exchange(port, get(STREAM_PATH))
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.endswith(b"not a WebSocket upgrade\n")
    assert again == answer


async def test_a_bug_in_a_connection_ends_that_connection_only(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken_media(transport: SocketTransport, head: bytes) -> None:
        raise RuntimeError("a bug in the media handler")

    listener = unix_listener(tmp_path)
    with trio.fail_after(GUARD_S):
        async with front_door(listener, media=broken_media) as counters:
            broken = await connect_unix(tmp_path)
            await broken.send_all(get(MEDIA))
            fine = await connect_unix(tmp_path)
            await fine.send_all(get("/other"))
            assert await read_all(broken) == b""  # closed, nothing said
            answer = await read_response(fine)
            await fine.aclose()
    assert answer.endswith(b"GET /other 0 state=- client=-")
    bugs = [r for r in caplog.records if "failed with a bug" in r.getMessage()]
    assert len(bugs) == 1
    assert bugs[0].exc_info is not None and "media handler" in str(bugs[0].exc_info[1])
    assert listener.fileno() == -1, "the listener is closed at shutdown"
    assert counters.open == 0


# -- deadlines -----------------------------------------------------------------------------


async def test_a_client_that_never_finishes_its_head_is_closed_at_the_head_deadline(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    edge = EdgeConfig(head_deadline_s=2.5)
    with trio.fail_after(GUARD_S):
        async with front_door(unix_listener(tmp_path), edge=edge) as counters:
            start = trio.current_time()
            stream = await connect_unix(tmp_path)
            await stream.send_all(b"GET /x HTTP/1.1\r\nHost:")
            assert await closed_at(stream) - start == 2.5
    assert counters.head_deadline == 1
    assert [r.getMessage() for r in caplog.records if r.name == "voicebridge.net.front"] == [
        "closed a connection from a local socket: its request head was not whole within "
        "2.5 s ([edge] head_deadline_s)"
    ]


async def test_a_silent_connection_is_closed_at_the_head_deadline(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD_S):
        async with front_door(unix_listener(tmp_path)) as counters:
            start = trio.current_time()
            stream = await connect_unix(tmp_path)
            assert await closed_at(stream) - start == EdgeConfig().head_deadline_s
    assert counters.head_deadline == 1


async def _dribble(stream: trio.SocketStream, pieces: list[bytes], every_s: float) -> None:
    for piece in pieces:
        try:
            await stream.send_all(piece)
        except trio.BrokenResourceError:
            return
        await trio.sleep(every_s)


@pytest.mark.parametrize(
    ("framing", "pieces"),
    [
        (b"Content-Length: 1000\r\n", [b"x"] * 1000),
        (b"Transfer-Encoding: chunked\r\n", [b"1\r\nx\r\n"] * 1000),
    ],
    ids=["content-length", "chunked"],
)
async def test_a_dribbled_body_is_closed_at_the_body_deadline_however_it_is_framed(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, framing: bytes, pieces: list[bytes]
) -> None:
    # One piece a second: never a read anywhere near hypercorn's per-read timeout.
    edge = EdgeConfig(body_deadline_s=7.0)
    config = HypercornConfig()
    config.read_timeout = 5
    with trio.fail_after(GUARD_S):
        async with front_door(unix_listener(tmp_path), edge=edge, config=config) as counters:
            stream = await connect_unix(tmp_path)
            await trio.sleep(3)  # the head deadline does not count the body's time
            await stream.send_all(b"POST /slow HTTP/1.1\r\nHost: a\r\n" + framing + b"\r\n")
            head_sent = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_dribble, stream, pieces, 1.0)
                assert await closed_at(stream) - head_sent == 7.0
                nursery.cancel_scope.cancel()
    assert (counters.body_deadline, counters.head_deadline) == (1, 0)


async def test_a_body_sent_in_time_is_answered_and_the_next_request_gets_a_fresh_head_deadline(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    edge = EdgeConfig(head_deadline_s=4.0, body_deadline_s=6.0)
    config = HypercornConfig()
    config.keep_alive_timeout = 1000  # only the front door's deadlines act here
    with trio.fail_after(GUARD_S):
        async with front_door(unix_listener(tmp_path), edge=edge, config=config) as counters:
            stream = await connect_unix(tmp_path)
            await trio.sleep(3.5)
            await stream.send_all(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
            await _dribble(stream, [b"x"] * 5, 1.0)  # 5 s of the body's 6
            answer = await read_response(stream)
            # Kept alive and idle far beyond both deadlines, then a slow head.
            await trio.sleep(30)
            started = trio.current_time()
            await stream.send_all(b"GET /b HTTP/1.1\r\n")
            assert await closed_at(stream) - started == 4.0
    assert answer.endswith(b"POST /a 5 state=- client=-")
    assert (counters.head_deadline, counters.body_deadline) == (1, 0)


# -- HTTP/2 --------------------------------------------------------------------------------


#: Attempts at HTTP/2 on a connection: the prior-knowledge preface, and the upgrade.
H2_ATTEMPTS = {
    "preface": H2_PREFACE + H2_SETTINGS,
    "upgrade": get(
        "/",
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n",
    ),
    "upgrade-spelled-oddly": get("/", b"Upgrade: H2C \r\n"),
}


@pytest.mark.parametrize("kept_alive", [False, True], ids=["first-request", "kept-alive"])
@pytest.mark.parametrize("attempt", list(H2_ATTEMPTS))
async def test_http2_is_refused_before_hypercorn_sees_it(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    attempt: str,
    kept_alive: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App()
    with trio.fail_after(GUARD_S):
        async with front_door(unix_listener(tmp_path), app=app) as counters:
            stream = await connect_unix(tmp_path)
            if kept_alive:
                await stream.send_all(get("/a"))
                first = await read_response(stream)
                assert first.endswith(b"GET /a 0 state=- client=-")
            await stream.send_all(H2_ATTEMPTS[attempt])
            answer = await read_all(stream)
    assert answer == b""  # no 101, no SETTINGS frame: closed
    requests = ["request /a"] if kept_alive else []
    assert [what for _, what in app.events] == ["startup done", *requests, "shutdown"]
    assert counters.http2_refused == 1
    assert [r.getMessage() for r in caplog.records if r.name == "voicebridge.net.front"] == [
        "closed a connection from a local socket: HTTP/2 is not served here"
    ]


@pytest.mark.parametrize("attempt", list(H2_ATTEMPTS))
async def test_hypercorn_alone_would_speak_http2_to_each_attempt(attempt: str) -> None:
    from hypercorn.trio import serve

    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = config.errorlog = None
    stop = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, App(), config, shutdown_trigger=stop.wait))
            port = int(binds[0].rsplit(":", 1)[1])
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(H2_ATTEMPTS[attempt])
            answer = await stream.receive_some(65536)
            await stream.aclose()
            stop.set()
    if attempt == "preface":
        assert answer[3] == 0x04, "a SETTINGS frame"
    else:
        assert answer.startswith(b"HTTP/1.1 101 ")


# -- connection caps -----------------------------------------------------------------------


async def test_the_per_address_cap_refuses_the_excess_of_one_address_only() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    edge = EdgeConfig(max_connections_per_peer=3)
    with trio.fail_after(20):
        async with front_door(listener, edge=edge) as counters:
            held = [await connect_tcp(port, "127.0.0.2") for _ in range(3)]
            excess = await connect_tcp(port, "127.0.0.2")
            refused = await read_all(excess)
            other = await connect_tcp(port, "127.0.0.3")
            await other.send_all(get("/other"))
            answer = await read_response(other)
            for stream in [*held, other]:
                await stream.aclose()
    assert refused == REFUSAL
    assert answer.endswith(b"GET /other 0 state=- client=127.0.0.3")
    assert (counters.refused_peer_cap, counters.accepted) == (1, 4)


async def test_an_address_with_too_many_requests_still_arriving_is_refused_more() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    edge = EdgeConfig(max_connections_per_peer=10, max_incomplete_per_peer=2)
    with trio.fail_after(20):
        async with front_door(listener, edge=edge) as counters:
            # Two connections that never finish their request head.
            dribbling = [await connect_tcp(port, "127.0.0.2") for _ in range(2)]
            for stream in dribbling:
                await stream.send_all(b"POST /x HTTP/1.1\r\nHost: a\r\n")
            await trio.sleep(INCOMPLETE_GRACE_S)  # young requests do not count
            refused = await read_all(await connect_tcp(port, "127.0.0.2"))
            # Once one of them has its whole request in, the address may open another.
            await dribbling[0].send_all(b"\r\n")
            await read_response(dribbling[0])
            again = await connect_tcp(port, "127.0.0.2")
            await again.send_all(get("/again"))
            answer = await read_response(again)
            for stream in [*dribbling, again]:
                await stream.aclose()
    assert refused == REFUSAL
    assert answer.endswith(b"GET /again 0 state=- client=127.0.0.2")
    assert counters.refused_peer_cap == 1


async def test_a_burst_is_let_in_and_those_of_it_that_dribble_are_shed() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    edge = EdgeConfig(max_connections_per_peer=10, max_incomplete_per_peer=2)
    with trio.fail_after(20):
        async with front_door(listener, edge=edge) as counters:
            # Five at once from one address: all young, all let in.
            burst = [await connect_tcp(port, "127.0.0.2") for _ in range(5)]
            for stream in burst:
                await stream.send_all(b"POST /x HTTP/1.1\r\nHost: a\r\n")
            await trio.sleep(INCOMPLETE_GRACE_S + 2 * INCOMPLETE_SWEEP_S)
            # Still arriving after the grace: the three oldest are closed, two kept.
            closed = [await read_all(stream) for stream in burst[:3]]
            for stream in burst[3:]:
                await stream.send_all(b"\r\n")
                assert (await read_response(stream)).startswith(b"HTTP/1.1 200")
            for stream in burst:
                await stream.aclose()
    assert closed == [b""] * 3
    assert counters.shed == 3


async def test_exempt_peers_are_not_held_to_the_per_address_cap() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    edge = EdgeConfig(max_connections_per_peer=2, exempt_peers=("127.0.0.0/30",))
    with trio.fail_after(20):
        async with front_door(listener, edge=edge) as counters:
            held = [await connect_tcp(port, "127.0.0.2") for _ in range(4)]
            await held[-1].send_all(get("/proxied"))
            answer = await read_response(held[-1])
            others = [await connect_tcp(port, "127.0.0.5") for _ in range(3)]
            refused = await read_all(others[-1])
            for stream in held + others:
                await stream.aclose()
    assert answer.endswith(b"GET /proxied 0 state=- client=127.0.0.2")
    assert refused == REFUSAL
    assert counters.refused_peer_cap == 1


async def test_at_the_total_cap_a_newcomer_displaces_the_oldest_connection_still_sending(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    edge = EdgeConfig(max_connections=8, max_connections_per_peer=8)
    with trio.fail_after(GUARD_S):
        async with front_door(unix_listener(tmp_path), edge=edge) as counters:
            # Two calls (past their head: never displaced), then six slow clients.
            calls = [await connect_unix(tmp_path) for _ in range(2)]
            for call in calls:
                await call.send_all(get(MEDIA))
            await trio.sleep(0.1)
            slow = []
            for _ in range(6):
                slow.append(await connect_unix(tmp_path))
                await slow[-1].send_all(b"POST /x HTTP/1.1\r\n")
                await trio.sleep(0.1)
            # Each witness closes once answered and a new slow client takes its place,
            # so each newcomer finds the cap reached.
            answers = []
            for index in range(3):
                witness = await connect_unix(tmp_path)
                await witness.send_all(get(f"/witness{index}", b"Connection: close\r\n"))
                answers.append(await read_all(witness))
                await witness.aclose()
                await trio.sleep(0.1)  # the server is done with it
                slow.append(await connect_unix(tmp_path))
                await slow[-1].send_all(b"POST /x HTTP/1.1\r\n")
            displaced = [await read_all(stream) for stream in slow[:3]]
            with trio.move_on_after(1):
                await slow[3].receive_some(1)
                pytest.fail("only the three oldest slow clients are displaced")
            for stream in calls + slow:
                await stream.aclose()
    assert [a.rsplit(b"\r\n", 1)[-1] for a in answers] == [
        f"GET /witness{i} 0 state=- client=-".encode() for i in range(3)
    ]
    assert displaced == [b""] * 3
    assert counters.shed == 3
    shed_lines = [r.getMessage() for r in caplog.records if r.name == "voicebridge.net.front"]
    # One line, the others counted into the next report (none came due here).
    assert shed_lines == [
        "closed a connection from a local socket still sending its request (head) to make "
        "room: 8 open ([edge] max_connections)"
    ]


async def test_at_the_total_cap_idle_kept_alive_connections_are_displaced_first(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    edge = EdgeConfig(max_connections=8, max_connections_per_peer=8)
    config = HypercornConfig()
    config.keep_alive_timeout = 1000  # only the front door closes them here
    with trio.fail_after(GUARD_S):
        async with front_door(unix_listener(tmp_path), edge=edge, config=config) as counters:
            slow = []
            for _ in range(4):  # older than every idle one
                slow.append(await connect_unix(tmp_path))
                await slow[-1].send_all(b"POST /x HTTP/1.1\r\n")
            idle = []
            for index in range(4):
                idle.append(await connect_unix(tmp_path))
                await idle[-1].send_all(get(f"/idle{index}"))
                await read_response(idle[-1])
                await trio.sleep(0.1)
            newcomer = await connect_unix(tmp_path)
            await newcomer.send_all(get("/new"))
            answer = await read_response(newcomer)
            assert await read_all(idle[0]) == b""
            with trio.move_on_after(1):
                async with trio.open_nursery() as nursery:
                    for stream in slow + idle[1:]:
                        nursery.start_soon(stream.receive_some, 1)
                pytest.fail("only the connection idle the longest is displaced")
            for stream in slow + idle + [newcomer]:
                await stream.aclose()
    assert answer.endswith(b"GET /new 0 state=- client=-")
    assert counters.shed == 1
    assert [r.getMessage() for r in caplog.records if r.name == "voicebridge.net.front"] == [
        "closed a connection from a local socket idle between requests to make room: 8 open "
        "([edge] max_connections)"
    ]


async def test_at_the_total_cap_with_nothing_to_displace_the_newcomer_is_refused(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    edge = EdgeConfig(max_connections=8, max_connections_per_peer=8)
    with trio.fail_after(GUARD_S):
        async with front_door(unix_listener(tmp_path), edge=edge) as counters:
            calls = [await connect_unix(tmp_path) for _ in range(8)]
            for call in calls:
                await call.send_all(get(MEDIA))
            await trio.sleep(0.1)
            newcomer = await connect_unix(tmp_path)
            refused = await read_all(newcomer)
            await calls[0].aclose()
            await trio.sleep(0.1)
            later = await connect_unix(tmp_path)
            await later.send_all(get("/later"))
            answer = await read_response(later)
            for stream in [*calls[1:], later]:
                await stream.aclose()
    assert refused == REFUSAL
    assert answer.endswith(b"GET /later 0 state=- client=-")
    assert (counters.refused_total_cap, counters.shed) == (1, 0)


# -- accept errors -------------------------------------------------------------------------


class _FailingListener(socket.socket):
    """A listening Unix socket whose first ``failures`` accepts fail with EMFILE."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_STREAM)
        self.bind(str(path))
        self.listen(16)
        self.failures = failures
        self.attempts: list[float] = []

    def accept(self) -> tuple[socket.socket, Any]:
        self.attempts.append(trio.current_time())
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


async def test_accept_errors_back_off_exponentially_and_are_logged_rate_limited(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    failures = 40
    listener = _FailingListener(tmp_path / "front.sock", failures)
    with trio.fail_after(GUARD_S):
        async with front_door(listener) as counters:
            stream = await connect_unix(tmp_path)
            await stream.send_all(get("/after"))
            answer = await read_response(stream)
            await stream.aclose()
    assert answer.endswith(b"GET /after 0 state=- client=-")
    assert counters.accept_errors == failures
    gaps = [b - a for a, b in zip(listener.attempts, listener.attempts[1:], strict=False)]
    expected = [min(ACCEPT_BACKOFF_MIN_S * 2**i, ACCEPT_BACKOFF_MAX_S) for i in range(failures)]
    assert gaps[:failures] == pytest.approx(expected)
    lines = [r.getMessage() for r in caplog.records if r.name == "voicebridge.net.front"]
    # 40 failures over about 33 s: the first, then one report per doubling gap.
    assert lines[0] == "cannot accept a connection (Too many open files); backing off"
    assert 3 <= len(lines) <= 7, lines
    assert all("more accept failures since the last report" in line for line in lines[1:])
    reported = sum(int(line.split("(and ")[1].split()[0]) for line in lines[1:])
    assert len(lines) + reported <= failures


# -- what the front door assumes of hypercorn ----------------------------------------------


async def test_lifespan_startup_ends_before_the_first_connection_is_served(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    app = App(startup_s=3.0)
    listener = unix_listener(tmp_path)
    # A client already waiting in the backlog when the server starts.
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early.connect(str(tmp_path / "front.sock"))
    early.sendall(get("/early"))
    with trio.fail_after(GUARD_S):
        async with front_door(listener, app=app):
            ready_at = trio.current_time()
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(early))
            answer = await read_response(stream)
            await stream.aclose()
    assert ready_at == 3.0
    assert [what for _, what in app.events][:2] == ["startup done", "request /early"]
    assert answer.endswith(b"GET /early 0 state=- client=-")


async def test_what_lifespan_startup_puts_in_the_state_reaches_every_request(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    with trio.fail_after(GUARD_S):
        async with front_door(unix_listener(tmp_path), app=App(greeting="hello")):
            answers = []
            for path in ("/one", "/two"):
                stream = await connect_unix(tmp_path)
                await stream.send_all(get(path))
                answers.append(await read_response(stream))
                await stream.aclose()
    assert answers[0].endswith(b"GET /one 0 state=hello client=-")
    assert answers[1].endswith(b"GET /two 0 state=hello client=-")


async def test_the_graceful_timeout_cancels_stragglers_then_lifespan_shutdown_runs(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    app = App()
    config = HypercornConfig()
    config.graceful_timeout = 4.0
    stop = trio.Event()
    with trio.fail_after(GUARD_S):
        async with front_door(unix_listener(tmp_path), app=app, config=config, stop=stop):
            straggler = await connect_unix(tmp_path)
            await straggler.send_all(get("/hang"))
            await trio.sleep(1)
            stop.set()
            stopped_at = trio.current_time()
        returned_at = trio.current_time()
        assert await read_all(straggler) == b""
    assert returned_at - stopped_at == 4.0
    assert app.events[-2:] == [(stopped_at + 4.0, "hang cancelled"), (stopped_at + 4.0, "shutdown")]


async def test_idle_kept_alive_connections_are_closed_at_shutdown_without_waiting(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    config = HypercornConfig()
    config.keep_alive_timeout = 1000
    config.graceful_timeout = 30
    stop = trio.Event()
    with trio.fail_after(GUARD_S):
        async with front_door(unix_listener(tmp_path), config=config, stop=stop):
            idle = await connect_unix(tmp_path)
            await idle.send_all(get("/a"))
            await read_response(idle)
            await trio.sleep(10)
            stop.set()
            stopped_at = trio.current_time()
            assert await read_all(idle) == b""
            closed_at_ = trio.current_time()
        returned_at = trio.current_time()
    assert closed_at_ == stopped_at
    assert returned_at == stopped_at


async def test_hypercorn_takes_the_addresses_from_the_stream_socket_and_serves_plain_http() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await App()(scope, receive, send)
            return
        seen.append({k: scope[k] for k in ("client", "server", "scheme", "http_version")})
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    with trio.fail_after(20):
        async with front_door(listener, app=app):  # type: ignore[arg-type]
            stream = await connect_tcp(port, "127.0.0.2")
            await stream.send_all(get("/where"))
            answer = await stream.receive_some(65536)
            client_port = stream.socket.getsockname()[1]
            await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 204")
    assert seen == [
        {
            "client": ("127.0.0.2", client_port),
            "server": ("127.0.0.1", port),
            "scheme": "http",
            "http_version": "1.1",
        }
    ]


# -- the descriptor limit ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "needed", "raised_to", "warned"),
    [
        ((1024, 524288), 1330, 1330, False),  # a login shell's soft limit: raised
        ((1024, 1200), 1330, 1200, True),  # the hard limit is too low: as far as it goes
        ((4096, 4096), 1330, None, False),  # the unit's LimitNOFILE: left alone
    ],
)
def test_the_descriptor_limit_is_raised_to_what_the_caps_need_or_a_warning_says_why_not(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    limits: tuple[int, int],
    needed: int,
    raised_to: int | None,
    warned: bool,
) -> None:
    current = list(limits)
    calls: list[tuple[int, int]] = []

    def setrlimit(which: int, value: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        calls.append(value)
        current[:] = value

    monkeypatch.setattr(resource, "getrlimit", lambda which: tuple(current))
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    soft = ensure_descriptor_limit(needed)
    assert calls == ([] if raised_to is None else [(raised_to, limits[1])])
    assert soft == current[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == (
        [
            f"the file descriptor limit (1200) is below what [edge] max_connections and "
            f"server.max_concurrent_calls need ({needed}): raise LimitNOFILE or lower them"
        ]
        if warned
        else []
    )


async def test_a_reload_applies_new_edge_limits_to_the_connections_after_it() -> None:
    listener = bind_listener("127.0.0.1:0")
    port = listener.getsockname()[1]
    base = loopback_config(
        port=port, vapi_base_url="http://127.0.0.1:9", auth_token="t" * 32, api_key="k" * 32
    )
    tight = base.evolve(edge=attrs.evolve(base.edge, max_connections_per_peer=2))
    loose = base.evolve(edge=attrs.evolve(base.edge, max_connections_per_peer=4))
    stop = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve,
                    tight,
                    listeners=[listener],
                    stop=stop,
                    handle_signals=True,
                    reload_config=lambda: loose,
                )
            )
            held = [await connect_tcp(port, "127.0.0.2") for _ in range(2)]
            assert await read_all(await connect_tcp(port, "127.0.0.2")) == REFUSAL
            os.kill(os.getpid(), signal.SIGHUP)
            await trio.sleep(0.5)
            held += [await connect_tcp(port, "127.0.0.2") for _ in range(2)]
            with trio.move_on_after(0.5):
                await held[-1].receive_some(1)
                pytest.fail("the fourth connection is admitted after the reload")
            assert await read_all(await connect_tcp(port, "127.0.0.2")) == REFUSAL
            for stream in held:
                await stream.aclose()
            stop.set()
