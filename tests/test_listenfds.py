"""Socket activation: the real ``systemd-socket-activate`` hands a child process its sockets.

Charter: loopback only (127.0.0.1 and AF_UNIX sockets under tmp_path). The child is a
small Python script (written to tmp_path) that calls ``listen_sockets()``, prints what
it got (and which role ``by_role()`` gives each socket) as one JSON line, then accepts
one raw connection on each socket. Every wait on the child is under a deadline.
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
from voicebridge.listenfds import ListenFdsError, ListenSocket, by_role, listen_sockets

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate not installed (Debian package: systemd)"
)

#: Real-time bound on each step with the child (start, report, reply). Each takes
#: milliseconds; the margin is for Python start-up on a loaded CI machine.
STEP_TIMEOUT_S = 10.0

#: The activated child.
CHILD = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys
    from voicebridge.listenfds import by_role, listen_sockets

    pid_matched = os.environ.get("LISTEN_PID") == str(os.getpid())
    sockets = listen_sockets()
    roles = by_role(sockets)
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
        "public": [s.fileno() for s in roles.public],
        "ops": [s.fileno() for s in roles.ops],
    }), flush=True)

    for s in sockets:
        conn, _ = s.socket.accept()
        with conn:
            conn.sendall(("hello from " + s.name).encode())
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


def activate(tmp_path: Path, fdnames: str | None) -> Iterator[Activated]:
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
            *([f"--fdname={fdnames}"] if fdnames is not None else []),
            f"--setenv=PYTHONPATH={package_root}",
            sys.executable,
            str(script),
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
def activated(tmp_path: Path) -> Iterator[Activated]:
    """The public listener on TCP, the ops listener on a Unix socket, named as the units
    name them (voicebridge.socket, voicebridge-ops.socket)."""
    yield from activate(tmp_path, "public:ops")


@pytest.fixture
def activated_unnamed(tmp_path: Path) -> Iterator[Activated]:
    yield from activate(tmp_path, None)


@needs_activate
def test_child_gets_named_sockets_that_accept(activated: Activated) -> None:
    # The connection that activates the child waits in the backlog meanwhile.
    with activated.connect_tcp() as tcp:
        report = activated.report()
        assert report["pid_matched"]
        assert report["env_left"] == []  # unset: children would not take them again
        public, ops = report["sockets"]
        assert public == {
            "name": "public",
            "fd": 3,
            "family": "AF_INET",
            "type": "SOCK_STREAM",
            "cloexec": True,
            "address": ["127.0.0.1", activated.port],
        }
        assert ops == {
            "name": "ops",
            "fd": 4,
            "family": "AF_UNIX",
            "type": "SOCK_STREAM",
            "cloexec": True,
            "address": activated.unix_path,
        }
        assert (report["public"], report["ops"]) == ([3], [4])
        assert tcp.recv(100) == b"hello from public"
    with activated.connect_unix() as unix:
        assert unix.recv(100) == b"hello from ops"


@needs_activate
def test_unnamed_sockets_are_all_public(activated_unnamed: Activated) -> None:
    # A unit without FileDescriptorName= (or an older voicebridge.socket) keeps working:
    # everything it passes is served as the public listener; no socket is taken for ops.
    with activated_unnamed.connect_tcp() as tcp:
        report = activated_unnamed.report()
        assert [s["name"] for s in report["sockets"]] == ["unknown", "unknown"]
        assert (report["public"], report["ops"]) == ([3, 4], [])
        assert tcp.recv(100) == b"hello from unknown"
    with activated_unnamed.connect_unix() as unix:
        assert unix.recv(100) == b"hello from unknown"


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


def test_by_role_takes_the_ops_sockets_by_name_and_the_rest_as_public() -> None:
    made = [socket.socket() for _ in range(4)]
    try:
        named = [
            ListenSocket(name=name, socket=sock)
            for name, sock in zip(["public", "ops", "http", "ops"], made, strict=True)
        ]
        roles = by_role(named)
        assert roles.public == (made[0], made[2])
        assert roles.ops == (made[1], made[3])
    finally:
        for sock in made:
            sock.close()
