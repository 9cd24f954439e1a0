"""The ops listener's server (``voicebridge.net.ops``), and what it assumes of hypercorn.

Charter: loopback only, port 0, a ``trio.fail_after`` guard on every test that uses real
sockets; the accept loop's back-off on a full descriptor table runs on the
``autojump_clock`` against a stand-in listener, with exact virtual times.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.config import Config as HypercornConfig

from voicebridge.net.ops import ACCEPT_BACKOFF_S, _accept, ops_hypercorn_config, serve_ops


class LifespanApp:
    """An ASGI app that records its lifespan and answers every request with what its
    startup put in the lifespan state."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                if kind == "startup":
                    scope["state"]["greeting"] = "set at startup"
                self.events.append(kind)
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        await receive()
        body = scope["state"].get("greeting", "no state").encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def serving(
    app: LifespanApp, config: HypercornConfig | None = None
) -> AsyncIterator[tuple[int, trio.Event, trio.Event]]:
    """``serve_ops`` on a fresh loopback port: (port, stop, returned)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    stop, returned = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        await serve_ops(
            app, config or ops_hypercorn_config(), [listener], shutdown_trigger=stop.wait,
            task_status=task_status,
        )
        returned.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        yield port, stop, returned


async def request(stream: trio.SocketStream) -> bytes:
    """One keep-alive GET on ``stream``; the whole answer (it has a content-length)."""
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: ops\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"startup"):
        chunk = await stream.receive_some(1000)
        assert chunk, answer
        answer += chunk
    return answer


async def test_the_apps_startup_runs_first_and_its_state_reaches_every_request() -> None:
    app = LifespanApp()
    with trio.fail_after(10):
        async with serving(app) as (port, stop, returned):
            assert app.events == ["startup"]
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            answers = [await request(stream), await request(stream)]
            await stream.aclose()
            stop.set()
            await returned.wait()
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"set at startup")
    assert app.events == ["startup", "shutdown"]


async def test_an_idle_keep_alive_connection_does_not_hold_the_shutdown() -> None:
    app = LifespanApp()
    config = ops_hypercorn_config()
    # Longer than the test: only closing idle connections at shutdown can pass it.
    config.graceful_timeout = 60
    with trio.fail_after(10):
        async with serving(app, config) as (port, stop, returned):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await request(stream)
            stop.set()
            # Closed at once, well before the keep-alive timeout would close it.
            with trio.fail_after(config.keep_alive_timeout / 2):
                assert await stream.receive_some(1000) == b""
                await returned.wait()
            await stream.aclose()
    assert app.events == ["startup", "shutdown"]


class FullTable:
    """A listener whose ``accept`` fails with EMFILE ``failures`` times, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.conn, self.peer = socket.socketpair()

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.conn, None


async def test_a_full_descriptor_table_pauses_accepting_with_one_log_line(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FullTable(failures=5)
    start = trio.current_time()
    with listener.conn, listener.peer:
        conn = await _accept(listener)  # type: ignore[arg-type]
        assert conn is listener.conn
    assert trio.current_time() - start == pytest.approx(5 * ACCEPT_BACKOFF_S)
    lines = [r for r in caplog.records if r.name == "voicebridge.net.ops"]
    assert [(r.levelno, r.getMessage()) for r in lines] == [
        (logging.ERROR, "cannot accept an ops connection (Too many open files); pausing")
    ]


async def test_any_other_accept_error_is_raised() -> None:
    class Broken:
        def accept(self) -> tuple[socket.socket, Any]:
            raise OSError(errno.EINVAL, "Invalid argument")

    with pytest.raises(OSError, match="Invalid argument"):
        await _accept(Broken())  # type: ignore[arg-type]


async def test_cancelled_it_closes_the_listeners() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_ops, LifespanApp(), ops_hypercorn_config(), [listener],
                    shutdown_trigger=trio.sleep_forever,
                )
            )
            nursery.cancel_scope.cancel()
    assert listener.fileno() == -1
