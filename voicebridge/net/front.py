"""The front door: each connection's first request head decides who serves it.

Twilio's media stream and the webhooks share one port (one public URL). Every
other request (the webhooks, health, metrics, call control) is served by
hypercorn and the quart app, as before. The media stream is not: each call's
socket carries a message every few milliseconds each way, and under hypercorn
every one of them crossed its connection-reader task, a queue and a send lock,
each a wait for trio's scheduler (docs/performance.md). So the front door accepts
the connections itself, reads the first request head, and

- a ``GET`` of the media stream path goes to ``media`` with the raw socket
  (``voicebridge.net.ws``: the call's own task reads it);
- anything else goes to hypercorn's per-connection server with the bytes already
  read put back in front of the stream, so hypercorn sees the connection whole.

Process life stays hypercorn's: the app's lifespan, the graceful timeout after the
shutdown trigger (connections still open get that long, then are cancelled), and
idle keep-alive connections closed at shutdown. hypercorn is pinned
(constraints.txt): its per-connection ``TCPServer``, ``Lifespan`` and
``WorkerContext`` are used as ``hypercorn.trio.worker_serve`` uses them.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState
from hypercorn.utils import wrap_app

from voicebridge.net.transport import SocketTransport

log = logging.getLogger(__name__)

#: The longest request head read before routing. hypercorn's own limit for an
#: incomplete request is 16 KiB (h11_max_incomplete_size); longer heads go to it
#: unrouted, and it answers them.
MAX_HEAD_BYTES = 16 * 1024
#: A connection that has not sent a whole request head by then is dropped.
HEAD_DEADLINE_S = 10.0
#: Accepting failed for lack of file descriptors or memory: pause this long, so a
#: full table does not turn the accept loop into a busy loop.
ACCEPT_BACKOFF_S = 0.1
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

#: Serves one media connection: the socket and the request head (with anything the
#: client sent after it). It owns the socket and closes it.
MediaHandler = Callable[[SocketTransport, bytes], Awaitable[None]]


def is_media_request(head: bytes, media_path: str) -> bool:
    """Whether ``head`` starts a ``GET`` of ``media_path`` (with or without a query)."""
    line_end = head.find(b"\r\n")
    if line_end < 0:
        return False
    parts = head[:line_end].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return False
    target = parts[1].split(b"?", 1)[0]
    return target == media_path.encode("ascii")


async def serve_front(
    app: ASGIFramework,
    config: HypercornConfig,
    listeners: Sequence[socket.socket],
    *,
    media_path: str,
    media: MediaHandler,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``listeners`` (listening sockets, owned and closed here) until shut down.

    Returns once ``shutdown_trigger`` has returned and every connection has ended
    (or been cancelled ``config.graceful_timeout`` later).
    """
    config.set_statsd_logger_class(StatsdLogger)
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, object] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    state = ConnectionState(lifespan_state.copy())
    front = _Front(wrapped, config, context, state, media_path, media)
    try:
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            async with trio.open_nursery() as connection_nursery:
                try:
                    async with trio.open_nursery() as accept_nursery:
                        for listener in listeners:
                            accept_nursery.start_soon(
                                front.accept_loop, listener, connection_nursery
                            )
                        task_status.started()
                        await shutdown_trigger()
                        accept_nursery.cancel_scope.cancel(reason="shutting down")
                finally:
                    _close_listeners(listeners)
                    await context.terminated.set()
                    connection_nursery.cancel_scope.deadline = (
                        trio.current_time() + config.graceful_timeout
                    )
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel(reason="shut down")
    finally:
        _close_listeners(listeners)


def _close_listeners(listeners: Sequence[socket.socket]) -> None:
    for listener in listeners:
        if listener.fileno() >= 0:
            trio.lowlevel.notify_closing(listener)
            listener.close()


class _Front:
    def __init__(
        self,
        app: object,
        config: HypercornConfig,
        context: WorkerContext,
        state: ConnectionState,
        media_path: str,
        media: MediaHandler,
    ) -> None:
        self._app = app
        self._config = config
        self._context = context
        self._state = state
        self._media_path = media_path
        self._media = media

    async def accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        listener.setblocking(False)
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                # Nothing waiting (or a sibling process on the same socket took it).
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError as exc:
                if exc.errno not in _ACCEPT_RESOURCE_ERRORS:
                    raise
                log.error("cannot accept a connection (%s); pausing", exc.strerror)
                await trio.sleep(ACCEPT_BACKOFF_S)
                continue
            nursery.start_soon(self.connection, conn)
            await trio.lowlevel.checkpoint()

    async def connection(self, conn: socket.socket) -> None:
        """Serve one connection. A bug here ends this connection only, with one log line."""
        try:
            await self._serve(conn)
        except Exception:
            log.error("a connection failed with a bug; closed it", exc_info=True)
        finally:
            if conn.fileno() >= 0:
                conn.close()

    async def _serve(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        head = await _read_head(conn)
        if head is None:
            return
        if is_media_request(head, self._media_path):
            await self._media(SocketTransport(conn), head)
            return
        stream = _Replayed(trio.SocketStream(trio.socket.from_stdlib_socket(conn)), head)
        server = TCPServer(self._app, self._config, self._context, self._state, stream)  # type: ignore[arg-type]
        await server.run()


async def _read_head(conn: socket.socket) -> bytes | None:
    """The bytes up to the end of the first request head (and any that came with them).

    None when the client closed, reset, or took longer than ``HEAD_DEADLINE_S``.
    A head longer than ``MAX_HEAD_BYTES`` is returned incomplete (hypercorn refuses it).
    """
    data = b""
    with trio.move_on_after(HEAD_DEADLINE_S):
        while b"\r\n\r\n" not in data and len(data) < MAX_HEAD_BYTES:
            try:
                chunk = conn.recv(MAX_HEAD_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(conn)
                continue
            except OSError:
                return None
            if not chunk:
                return data or None
            data += chunk
        return data
    return None


class _Replayed(trio.abc.HalfCloseableStream):
    """A socket stream with the bytes already read from it put back in front.

    hypercorn's ``TCPServer`` reads ``.socket`` for the addresses, and tells a plain
    connection from TLS by the missing ``do_handshake``: both as for a ``SocketStream``.
    """

    def __init__(self, stream: trio.SocketStream, head: bytes) -> None:
        self._stream = stream
        self._head = head
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._head:
            data, self._head = self._head, b""
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        # hypercorn closes a connection (Connection: close, or a body left unread) from
        # inside the app's last send, which quart-trio cancels as the stream closes:
        # unshielded, the checkpoint before the shutdown raises, the socket stays open
        # and hypercorn goes on reading whatever the client sends.
        with trio.CancelScope(shield=True):
            await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()
