"""Workers as ``voicebridge@N.service`` runs them: N real ``voicebridge serve`` processes
sharing one public socket, each with an ops socket of its own and ``worker=N``.

The sockets are handed down as systemd does (fds 3, 4, … with ``LISTEN_FDS``,
``LISTEN_FDNAMES`` and ``LISTEN_PID``: ``tests.test_systemd_integration.LAUNCHER``), the
worker's name in ``VOICEBRIDGE_SERVER_WORKER`` as the template's ``Environment=`` sets
it. Worker N's ops socket is on 127.0.0.(2+N), port 0: an address per worker, as
``voicebridge-ops@N.socket`` gives each its own (127.0.1.N:9180 on a real box).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import attrs
import trio

from tests.test_systemd_integration import LAUNCHER, SERVE, NotifySocket, Server, is_ready, serving


@attrs.frozen
class Worker:
    name: str
    server: Server
    #: Where its health and metrics are: ``http://127.0.0.N:port``.
    ops_url: str

    @property
    def ops_target(self) -> str:
        return self.ops_url.removeprefix("http://")


@attrs.frozen
class Workers:
    workers: tuple[Worker, ...]
    #: The shared public socket's port (on 127.0.0.1).
    public_port: int


def ops_listener(index: int) -> socket.socket:
    sock = socket.create_server((f"127.0.0.{2 + index}", 0), backlog=64)
    return sock


@asynccontextmanager
async def running_workers(
    count: int, config: Path, environment: Mapping[str, str], public: socket.socket
) -> AsyncIterator[Workers]:
    """``count`` workers on ``public`` (a listening socket the caller owns), each with
    ``environment`` plus what systemd would set; started once all said READY=1."""
    notify = NotifySocket()
    ops = [ops_listener(index) for index in range(count)]
    copies: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(notify.run)
            async with AsyncExitStack() as stack:
                workers = []
                for index, ops_sock in enumerate(ops):
                    # Far above 3 + 2, so that moving them onto 3, 4 never overwrites one
                    # still to be moved.
                    fds = [
                        fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 100)
                        for sock in (public, ops_sock)
                    ]
                    copies += fds
                    env = {
                        **environment,
                        "NOTIFY_SOCKET": notify.address,
                        "LISTEN_FDS": "2",
                        "LISTEN_FDNAMES": "public:ops",
                        "VOICEBRIDGE_SERVER_WORKER": str(index),
                    }
                    command = [
                        sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), *SERVE[1:]
                    ]
                    server = await stack.enter_async_context(
                        serving([*command, str(config)], env, pass_fds=fds)
                    )
                    host, port = ops_sock.getsockname()[:2]
                    workers.append(Worker(str(index), server, f"http://{host}:{port}"))
                await notify.wait_for(is_ready, count=count)
                yield Workers(tuple(workers), int(public.getsockname()[1]))
                # A drain each; `serving` waits for the exits (and kills past 10 s).
                for worker in workers:
                    worker.server.signal(signal.SIGTERM)
            nursery.cancel_scope.cancel(reason="workers stopped")
    finally:
        for fd in copies:
            os.close(fd)
        for sock in ops:
            sock.close()
