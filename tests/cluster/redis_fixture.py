"""A real ``redis-server`` for the cluster tests: on a loopback address of its own, a
random port, a temporary directory, no persistence; stopped and started again at will.

Skipped (with the reason) only when ``redis-server`` is not installed
(``bootstrap.sh --test`` installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
)
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (bootstrap.sh --test)"
)
HOST = "127.0.0.4"


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process; ``stop`` and ``start`` keep its address."""

    def __init__(self, directory: Path, host: str = HOST) -> None:
        self.directory = directory
        self.host = host
        self.port = free_port(host)
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    async def start(self) -> None:
        assert REDIS_SERVER is not None
        self.process = await trio.lowlevel.open_process(
            [
                REDIS_SERVER,
                "--bind", self.host, "--port", str(self.port), "--dir", str(self.directory),
                "--save", "", "--appendonly", "no", "--protected-mode", "no",
                "--daemonize", "no", "--logfile", str(self.directory / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        with trio.fail_after(10):
            while True:
                try:
                    stream = await trio.open_tcp_stream(self.host, self.port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await stream.send_all(b"PING\r\n")
                reply = await stream.receive_some(64)
                await stream.aclose()
                if reply.startswith(b"+PONG"):
                    return

    async def stop(self) -> None:
        """SIGKILL: a store that vanishes, as in a crash (nothing saved)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            with trio.CancelScope(shield=True):
                await self.process.wait()
        self.process = None


@asynccontextmanager
async def running_redis(directory: Path, host: str = HOST) -> AsyncIterator[RedisServer]:
    await trio.Path(directory).mkdir(parents=True, exist_ok=True)
    server = RedisServer(directory, host)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
