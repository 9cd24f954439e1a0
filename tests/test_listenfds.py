"""Socket activation: the real ``systemd-socket-activate`` hands a child process its sockets.

Charter: loopback only (127.0.0.1 and AF_UNIX sockets under tmp_path). The child is a
small Python script (written to tmp_path) that calls ``listen_sockets()``, prints what
it got as one JSON line, then serves: either accepting raw connections, or running
hypercorn on ``hypercorn_binds()``. Every wait on the child is under a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

import voicebridge
from voicebridge.listenfds import ListenFdsError, listen_sockets

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate not installed (Debian package: systemd)"
)

#: Real-time bound on each step with the child (start, report, reply). Each takes
#: milliseconds; the margin is for Python start-up on a loaded CI machine.
STEP_TIMEOUT_S = 10.0

#: The activated child. argv[1] is the mode: "accept" or "hypercorn".
CHILD = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys
    from voicebridge.listenfds import listen_sockets, hypercorn_binds

    pid_matched = os.environ.get("LISTEN_PID") == str(os.getpid())
    sockets = listen_sockets()
    print(json.dumps({
        "pid_matched": pid_matched,
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "sockets": [
            {
                "name": s.name,
                "fd": s.fd,
                "family": s.socket.family.name,
                "type": s.socket.type.name,
                "cloexec": bool(fcntl.fcntl(s.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
                "address": s.socket.getsockname(),
            }
            for s in sockets
        ],
    }), flush=True)

    if sys.argv[1] == "accept":
        for s in sockets:
            conn, _ = s.socket.accept()
            with conn:
                conn.sendall(("hello from " + s.name).encode())
    else:
        import trio
        from hypercorn.config import Config
        from hypercorn.trio import serve

        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                while True:
                    message = await receive()
                    kind = message["type"].rsplit(".", 1)[1]  # startup / shutdown
                    await send({"type": f"lifespan.{kind}.complete"})
            body = b"served by hypercorn"
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        config = Config()
        config.bind = hypercorn_binds(sockets)
        config.accesslog = None
        trio.run(serve, app, config)
    """
)


def free_tcp_port() -> int:
    """A port nothing listens on now (systemd-socket-activate cannot report port 0's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def read_line(stream: IO[str], what: str) -> str:
    """One line from the child's pipe, or fail after ``STEP_TIMEOUT_S``."""
    os.set_blocking(stream.fileno(), False)
    deadline = time.monotonic() + STEP_TIMEOUT_S
    buffer = ""
    while time.monotonic() < deadline:
        chunk = stream.readline()
        buffer += chunk or ""
        if buffer.endswith("\n"):
            return buffer
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}; got {buffer!r}")


class Activated:
    """A running ``systemd-socket-activate`` listening on a TCP and a Unix socket."""

    def __init__(self, process: subprocess.Popen[str], port: int, unix_path: str) -> None:
        self.process = process
        self.port = port
        self.unix_path = unix_path

    def connect_tcp(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=STEP_TIMEOUT_S)

    def connect_unix(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(STEP_TIMEOUT_S)
        sock.connect(self.unix_path)
        return sock

    def report(self) -> dict[str, Any]:
        """What the child found, once activated (the first connection triggers it)."""
        assert self.process.stdout is not None
        report: dict[str, Any] = json.loads(read_line(self.process.stdout, "the child's report"))
        return report


def activate(tmp_path: Path, mode: str) -> Iterator[Activated]:
    assert ACTIVATE is not None
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    port = free_tcp_port()
    unix_path = str(tmp_path / "admin.sock")
    package_root = str(Path(voicebridge.__file__).resolve().parent.parent)
    process = subprocess.Popen(
        [
            ACTIVATE,
            f"--listen=127.0.0.1:{port}",
            f"--listen={unix_path}",
            "--fdname=http:admin",
            f"--setenv=PYTHONPATH={package_root}",
            sys.executable,
            str(script),
            mode,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        # "Listening on 127.0.0.1:PORT as 3." and "… as 4.": both bound, nothing exec'd yet.
        for fd in (3, 4):
            assert (
                read_line(process.stderr, "systemd-socket-activate").rstrip().endswith(f" as {fd}.")
            )
        yield Activated(process, port, unix_path)
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def activated_accept(tmp_path: Path) -> Iterator[Activated]:
    yield from activate(tmp_path, "accept")


@pytest.fixture
def activated_hypercorn(tmp_path: Path) -> Iterator[Activated]:
    yield from activate(tmp_path, "hypercorn")


@needs_activate
def test_child_gets_named_sockets_that_accept(activated_accept: Activated) -> None:
    # The connection that activates the child waits in the backlog meanwhile.
    with activated_accept.connect_tcp() as tcp:
        report = activated_accept.report()
        assert report["pid_matched"]
        assert report["env_left"] == []  # unset: children would not take them again
        http, admin = report["sockets"]
        assert http == {
            "name": "http",
            "fd": 3,
            "family": "AF_INET",
            "type": "SOCK_STREAM",
            "cloexec": True,
            "address": ["127.0.0.1", activated_accept.port],
        }
        assert admin == {
            "name": "admin",
            "fd": 4,
            "family": "AF_UNIX",
            "type": "SOCK_STREAM",
            "cloexec": True,
            "address": activated_accept.unix_path,
        }
        assert tcp.recv(100) == b"hello from http"
    with activated_accept.connect_unix() as unix:
        assert unix.recv(100) == b"hello from admin"


@needs_activate
def test_hypercorn_serves_on_the_activated_socket(activated_hypercorn: Activated) -> None:
    with activated_hypercorn.connect_tcp() as tcp:
        report = activated_hypercorn.report()
        assert [s["name"] for s in report["sockets"]] == ["http", "admin"]
        tcp.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := tcp.recv(4096):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200 ")
    assert response.endswith(b"served by hypercorn")
    # The second socket (AF_UNIX) is served by the same hypercorn.
    with activated_hypercorn.connect_unix() as unix:
        unix.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := unix.recv(4096):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200 ")


# -- the environment contract, in-process (no descriptors are touched) ---------------


def test_variables_meant_for_another_process_are_ignored_and_unset() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "PATH": "/bin"}
    assert listen_sockets(environ) == []
    assert environ == {"PATH": "/bin"}


def test_not_activated_means_no_sockets() -> None:
    assert listen_sockets({}) == []


def test_unset_environment_false_keeps_the_variables() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert listen_sockets(environ, unset_environment=False) == []
    assert environ == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}


@pytest.mark.parametrize(
    ("fds", "names", "message"),
    [
        ("two", None, "is not a number"),
        ("2", "http", "has 1 names for LISTEN_FDS=2"),
    ],
)
def test_malformed_environment_is_an_error(fds: str, names: str | None, message: str) -> None:
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": fds}
    if names is not None:
        environ["LISTEN_FDNAMES"] = names
    with pytest.raises(ListenFdsError, match=message):
        listen_sockets(environ)
    assert "LISTEN_FDS" not in environ


def test_passed_descriptor_that_is_not_a_socket_is_an_error(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os
        from voicebridge.listenfds import ListenFdsError, listen_sockets
        read_end, _ = os.pipe()
        os.dup2(read_end, 3)
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="fifo")
        try:
            listen_sockets()
        except ListenFdsError as exc:
            print(exc)
        """
    )
    package_root = str(Path(voicebridge.__file__).resolve().parent.parent)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": package_root},
        check=True,
    )
    assert result.stdout.startswith("passed descriptor 3 ('fifo') is unusable:")
