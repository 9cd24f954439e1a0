"""The ops listener: health and metrics on sockets of their own, apart from the front door.

``/healthz``, ``/readyz`` and ``/metrics`` are for the operator's probes and scraper,
on a loopback address or a Unix socket (``server.ops_listen``, or the ``ops`` socket
systemd passes); the public port never serves them. ``serve_ops`` gives those sockets
their own accept loop, their own cap on connections and hypercorn's per-connection
server for the ops app, with no media routing in between: however many connections
the public port holds, an ops connection is still accepted and answered.

hypercorn is used as its own ``hypercorn.trio.worker_serve`` uses it, and as the front
door does (``voicebridge.net.front``; the version is pinned in constraints.txt): its
``Lifespan`` for the app's startup and shutdown, one ``WorkerContext`` whose
``terminated`` event closes idle keep-alive connections at shutdown, and a
``TCPServer`` per connection.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.typing import ASGIFramework

from voicebridge.net.front import HypercornHost, serve_hypercorn

log = logging.getLogger(__name__)

#: Ops connections served at once. A scraper, a health probe and an operator's curl need
#: a handful; past this, new ones wait in the listen backlog, so a stuck or runaway local
#: client cannot take the descriptors the calls need.
MAX_OPS_CONNECTIONS = 16
#: hypercorn's per-read timeout on an ops connection: a probe sends its whole request
#: at once, so a client silent this long is gone or stuck.
OPS_READ_TIMEOUT_S = 10.0
#: How long an idle keep-alive ops connection stays open (a scraper reconnects).
OPS_KEEP_ALIVE_S = 5.0
#: How long ops connections still open at shutdown get before they are cancelled.
OPS_GRACEFUL_TIMEOUT_S = 1.0
#: Listen backlog of an ops socket we bind: probes come one at a time.
OPS_LISTEN_BACKLOG = 64
#: Accepting failed for lack of descriptors or memory: pause this long before retrying.
ACCEPT_BACKOFF_S = 0.1
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def bind_ops_listener(address: str) -> socket.socket:
    """A listening socket for ``server.ops_listen``: ``host:port`` (port 0 picks a free
    one) or an absolute path for a Unix socket.

    A socket file at that path that nothing listens on any more (left by a process that
    is gone) is replaced; one that something still listens on is not. Raises ``OSError``
    naming the address when it cannot listen there.
    """
    try:
        if address.startswith("/"):
            return _bind_unix(address)
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, int(port)), family=family, backlog=OPS_LISTEN_BACKLOG)
    except OSError as exc:
        raise OSError(exc.errno, f"ops listener {address}: {exc.strerror}") from exc


def _bind_unix(path: str) -> socket.socket:
    _remove_stale_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(OPS_LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_unix_socket(path: str) -> None:
    """Remove the socket file at ``path`` if nothing listens on it; leave anything else
    (bind then fails with "Address already in use")."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            # Non-blocking: a live listener with a full backlog must not hold the start.
            probe.setblocking(False)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)
            except BlockingIOError:
                pass  # alive, its backlog full


def ops_hypercorn_config() -> HypercornConfig:
    """hypercorn's settings for the ops listener: short timeouts, no access log."""
    config = HypercornConfig()
    config.read_timeout = int(OPS_READ_TIMEOUT_S)
    config.keep_alive_timeout = OPS_KEEP_ALIVE_S
    config.graceful_timeout = OPS_GRACEFUL_TIMEOUT_S
    config.accesslog = None
    config.errorlog = logging.getLogger("voicebridge.http")
    return config


async def serve_ops(
    app: ASGIFramework,
    config: HypercornConfig,
    listeners: Sequence[socket.socket],
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listeners`` (listening sockets, owned and closed here).

    Started (``task_status``) once the app's lifespan startup is done and the accept
    loops run. Returns once ``shutdown_trigger`` has returned and every ops connection
    has ended, or been cancelled ``config.graceful_timeout`` later. Cancelled, it closes
    the listeners and cancels its connections at once.
    """
    slots = trio.Semaphore(MAX_OPS_CONNECTIONS)

    def start_accepting(
        host: HypercornHost, accept_nursery: trio.Nursery, connection_nursery: trio.Nursery
    ) -> None:
        async def serve_connection(conn: socket.socket) -> None:
            """One ops connection, holding one of the ``slots`` until it ends."""
            try:
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
                server = TCPServer(host.app, config, host.context, host.state, stream)  # type: ignore[arg-type]
                await server.run()
            except Exception:
                log.error("an ops connection failed with a bug; closed it", exc_info=True)
            finally:
                slots.release()
                if conn.fileno() >= 0:
                    conn.close()

        for listener in listeners:
            accept_nursery.start_soon(
                _accept_loop, listener, slots, connection_nursery, serve_connection
            )

    await serve_hypercorn(
        app,
        config,
        listeners,
        start_accepting=start_accepting,
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )


async def _accept_loop(
    listener: socket.socket,
    slots: trio.Semaphore,
    nursery: trio.Nursery,
    serve_connection: Callable[[socket.socket], Awaitable[None]],
) -> None:
    """Accept from ``listener`` while a slot is free; each connection takes one, and
    ``serve_connection`` gives it back. Cancelled, it stops accepting."""
    listener.setblocking(False)
    while True:
        # Always a checkpoint: a stream of connections cannot hold the loop.
        await slots.acquire()
        try:
            conn = await _accept(listener)
        except BaseException:
            slots.release()
            raise
        nursery.start_soon(serve_connection, conn)


async def _accept(listener: socket.socket) -> socket.socket:
    """The next connection on ``listener``.

    A full descriptor table pauses for ``ACCEPT_BACKOFF_S`` at a time, with one log line
    until an accept succeeds again; any other error is raised.
    """
    starved = False
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
            if not starved:
                log.error("cannot accept an ops connection (%s); pausing", exc.strerror)
            starved = True
            await trio.sleep(ACCEPT_BACKOFF_S)
            continue
        return conn
