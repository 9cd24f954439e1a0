"""sd_notify and the watchdog, against a real AF_UNIX datagram socket standing in for systemd.

Charter: each test binds its own notify socket (a path under tmp_path, or a unique
abstract name) and reads exactly the datagrams systemd would. Cadence is checked on
trio's ``autojump_clock`` with exact virtual times; only the blocked-loop test runs on
the real clock, because blocking the loop is a real-time event by nature.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from voicebridge.observability.logs import record_fields
from voicebridge.sdnotify import Notifier, run_watchdog, watchdog_interval


class NotifySocket:
    """The systemd side: a bound datagram socket and what arrived on it."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        #: The ``$NOTIFY_SOCKET`` value that names this socket.
        self.address = address

    def received(self) -> list[bytes]:
        """Every datagram queued so far, without waiting."""
        datagrams: list[bytes] = []
        while True:
            try:
                datagrams.append(self.sock.recv(4096, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return datagrams


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if request.param == "path":
            path = str(tmp_path / "notify")
            sock.bind(path)
            yield NotifySocket(sock, path)
        else:
            name = f"voicebridge-test-{secrets.token_hex(8)}"
            sock.bind(b"\0" + name.encode())
            yield NotifySocket(sock, "@" + name)


@pytest.fixture
def notifier(notify_socket: NotifySocket) -> Iterator[Notifier]:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_socket.address})
    yield notifier
    notifier.close()


# -- the wire format ---------------------------------------------------------------


def test_each_notification_is_one_exact_datagram(
    notifier: Notifier, notify_socket: NotifySocket
) -> None:
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.ready(status="Serving: 0 active calls")
    assert notifier.status("Serving: 3 active calls")
    assert notifier.status("Draining: 2 active calls\nsecond line")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.extend_timeout(19.5)
    assert notifier.notify(errno=5, buserror="x")
    assert notify_socket.received() == [
        b"READY=1",
        b"READY=1\nSTATUS=Serving: 0 active calls",
        b"STATUS=Serving: 3 active calls",
        b"STATUS=Draining: 2 active calls second line",
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"EXTEND_TIMEOUT_USEC=19500000",
        b"ERRNO=5\nBUSERROR=x",
    ]


def test_reloading_carries_the_monotonic_clock(
    notifier: Notifier, notify_socket: NotifySocket
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [datagram] = notify_socket.received()
    first, second = datagram.split(b"\n")
    assert first == b"RELOADING=1"
    name, _, value = second.partition(b"=")
    assert name == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_without_notify_socket_nothing_is_sent(
    environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_sockets(*args: object, **kwargs: object) -> socket.socket:
        raise AssertionError("a disabled notifier must not even open a socket")

    monkeypatch.setattr(socket, "socket", no_sockets)
    notifier = Notifier.from_environ(environ)
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.reloading()
    assert not notifier.stopping()
    assert not notifier.watchdog()


def test_from_environ_can_unset_the_variable(notify_socket: NotifySocket) -> None:
    environ = {"NOTIFY_SOCKET": notify_socket.address, "OTHER": "kept"}
    notifier = Notifier.from_environ(environ, unset_environment=True)
    assert environ == {"OTHER": "kept"}
    assert notifier.ready()
    assert notify_socket.received() == [b"READY=1"]
    notifier.close()


def test_vanished_socket_never_raises_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        notifier = Notifier(path)
        assert notifier.watchdog()
    os.unlink(path)  # systemd is gone (or the socket was never ours)
    with caplog.at_level(logging.WARNING, logger="voicebridge.sdnotify"):
        assert not notifier.watchdog()
        assert not notifier.watchdog()
        assert not notifier.status("still here")
    assert notifier.failures == 3
    [record] = caplog.records
    assert record_fields(record)["EVENT"] == "sd-notify-failed"
    assert record_fields(record)["NOTIFY_SOCKET"] == path
    notifier.close()


# -- the watchdog interval ---------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, 0.1),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, None),  # meant for another pid
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "ten"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    environ: dict[str, str], interval: float | None
) -> None:
    assert watchdog_interval(environ) == interval


# -- cadence, in virtual time ------------------------------------------------------


class RecordingNotifier(Notifier):
    """A notifier that notes the virtual time of each watchdog ping instead of sending."""

    def __init__(self) -> None:
        super().__init__(None)
        self.pings: list[float] = []

    def watchdog(self) -> bool:
        self.pings.append(trio.current_time())
        return True


async def test_watchdog_pings_at_half_the_interval(autojump_clock: trio.testing.MockClock) -> None:
    interval = watchdog_interval({"WATCHDOG_USEC": "10000000"})
    assert interval is not None
    notifier = RecordingNotifier()
    async with trio.open_nursery() as watchdog_nursery:
        await watchdog_nursery.start(run_watchdog, notifier, interval)
        await trio.sleep(16)
        watchdog_nursery.cancel_scope.cancel(reason="test over")
    assert notifier.pings == [5.0, 10.0, 15.0]


async def test_late_wakeup_pings_at_once_without_a_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    notifier = RecordingNotifier()
    async with trio.open_nursery() as watchdog_nursery:
        await watchdog_nursery.start(run_watchdog, notifier, 5.0)
        autojump_clock.jump(12)  # as if the loop had been stuck for 12 s
        await trio.sleep(11)
        watchdog_nursery.cancel_scope.cancel(reason="test over")
    assert notifier.pings == [12.0, 17.0, 22.0]


async def test_watchdog_sends_real_datagrams(
    autojump_clock: trio.testing.MockClock, notifier: Notifier, notify_socket: NotifySocket
) -> None:
    async with trio.open_nursery() as watchdog_nursery:
        await watchdog_nursery.start(run_watchdog, notifier, 5.0)
        await trio.sleep(4.5)
        assert notify_socket.received() == []
        await trio.sleep(1)
        assert notify_socket.received() == [b"WATCHDOG=1"]
        await trio.sleep(10)
        assert notify_socket.received() == [b"WATCHDOG=1", b"WATCHDOG=1"]
        watchdog_nursery.cancel_scope.cancel(reason="test over")


# -- a blocked loop, in real time --------------------------------------------------

BLOCK_S = 0.5


def block_the_loop(seconds: float) -> None:
    """Block the calling thread (here: the trio loop) on purpose, as a wedged call would."""
    time.sleep(seconds)


def record_arrivals(sock: socket.socket, arrivals: list[float], stop: threading.Event) -> None:
    """Receiver thread: the monotonic time each datagram arrives, independent of trio."""
    sock.settimeout(0.05)
    while not stop.is_set():
        try:
            if sock.recv(4096) == b"WATCHDOG=1":
                arrivals.append(time.monotonic())
        except TimeoutError:
            continue


async def test_blocked_loop_stops_the_pings(tmp_path: Path) -> None:
    interval = watchdog_interval({"WATCHDOG_USEC": "200000"})
    assert interval == 0.1
    path = str(tmp_path / "notify")
    arrivals: list[float] = []
    stop = threading.Event()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        receiver = threading.Thread(target=record_arrivals, args=(sock, arrivals, stop))
        receiver.start()
        notifier = Notifier(path)
        try:
            with trio.fail_after(5):
                async with trio.open_nursery() as watchdog_nursery:
                    await watchdog_nursery.start(run_watchdog, notifier, interval)
                    await trio.sleep(0.35)
                    blocked_at = time.monotonic()
                    block_the_loop(BLOCK_S)
                    unblocked_at = time.monotonic()
                    await trio.sleep(0.35)
                    watchdog_nursery.cancel_scope.cancel(reason="test over")
        finally:
            notifier.close()
            stop.set()
            receiver.join()

    before = [t for t in arrivals if t < blocked_at]
    # A ping sent just before the block may be stamped a little late by the thread.
    during = [t for t in arrivals if blocked_at + interval < t < unblocked_at]
    after = [t for t in arrivals if t >= unblocked_at]
    assert len(before) >= 2, arrivals
    assert during == [], "pings arrived while the loop was blocked"
    assert after, "pings did not resume"
    assert after[0] - unblocked_at < 2 * interval, "no prompt ping after the block"
    assert len(after) >= 2
