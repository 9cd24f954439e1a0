"""Tell systemd how the service is doing: sd_notify(3) over ``$NOTIFY_SOCKET``, and the watchdog.

A ``Notifier`` sends ``KEY=value`` lines in one ``AF_UNIX`` datagram to the socket
systemd names in ``$NOTIFY_SOCKET`` (a path, or an abstract-namespace name when it
starts with ``@``). Without ``$NOTIFY_SOCKET`` (not run by systemd, or not
``Type=notify``) every method does nothing.

Sending never blocks and never raises: a notification systemd cannot take right now
is dropped (systemd reads its notify socket constantly, so that only happens when it
is wedged), and a vanished socket is logged once. A notification is advice to the
service manager, never a reason to disturb calls.

``run_watchdog`` sends ``WATCHDOG=1`` from the trio loop itself, at half the interval
systemd asked for in ``$WATCHDOG_USEC``: if the loop is blocked, the pings stop and
systemd restarts the service.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import NoReturn

import trio

from voicebridge.observability.logs import log_event

logger = logging.getLogger(__name__)

#: Environment variables sd_notify(3) and the watchdog read.
NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"

StateValue = str | int


class Notifier:
    """Sends sd_notify state changes to systemd; a no-op without a notify socket.

    Create it with ``Notifier.from_environ()``. Methods return True when systemd's
    socket accepted the datagram, False when nothing was sent or it was dropped.
    """

    def __init__(self, address: str | None) -> None:
        """``address``: the ``$NOTIFY_SOCKET`` value (``@name`` = abstract), or None."""
        self.address = address or None
        #: Datagrams not delivered (socket full or gone) since this notifier was made.
        self.failures = 0
        # Invariant: True between a failure that was logged and the next success, so a
        # vanished socket is logged once, not once per watchdog ping.
        self._failure_logged = False
        self._target: str | bytes | None = None
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._target = (
                b"\0" + self.address[1:].encode() if self.address.startswith("@") else self.address
            )
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_environ(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> Notifier:
        """The notifier ``$NOTIFY_SOCKET`` asks for (``os.environ`` by default).

        ``unset_environment=True`` removes the variable, so that child processes do not
        notify on our behalf.
        """
        env = os.environ if environ is None else environ
        address = env.get(NOTIFY_SOCKET_ENV)
        if unset_environment:
            env.pop(NOTIFY_SOCKET_ENV, None)
        return cls(address)

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return self._sock is not None

    def notify(self, **state: StateValue) -> bool:
        """Send ``KEY=value`` for each keyword (names upper-cased) in one datagram.

        ``notify(ready=1, status="Serving")`` sends ``READY=1\\nSTATUS=Serving``. Newlines in
        values are replaced by spaces: the protocol has no way to carry them.
        """
        if self._sock is None or self._target is None or not state:
            return False
        lines = [f"{name.upper()}={_one_line(value)}" for name, value in state.items()]
        try:
            self._sock.sendto("\n".join(lines).encode(), self._target)
        except OSError as exc:
            self.failures += 1
            if not self._failure_logged:
                self._failure_logged = True
                log_event(
                    logger,
                    logging.WARNING,
                    "sd-notify-failed",
                    f"could not notify systemd at {self.address}: {exc}",
                    notify_socket=self.address,
                    errno=exc.errno,
                )
            return False
        self._failure_logged = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (with ``STATUS=`` when given): startup or a reload is complete."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """``STATUS=text``: a one-line summary shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown (the drain) has begun."""
        return self.notify(STOPPING=1)

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: the current state (here: stopping) may take ``seconds``
        more from now; systemd waits that long past ``TimeoutStopSec`` before it kills,
        and another call before then extends again."""
        return self.notify(EXTEND_TIMEOUT_USEC=math.ceil(seconds * 1_000_000))

    def reloading(self) -> bool:
        """``RELOADING=1`` + ``MONOTONIC_USEC=now``: a reload has begun; ``ready()`` ends it."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=now_usec)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive."""
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        """Close the socket; later calls send nothing."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(value: StateValue) -> str:
    return str(value).replace("\n", " ")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is asked for.

    That is half of ``$WATCHDOG_USEC`` (as sd_watchdog_enabled(3) recommends), provided
    ``$WATCHDOG_PID`` is unset or names this process. An unparsable or zero value
    means no watchdog.
    """
    env = os.environ if environ is None else environ
    pid = env.get(WATCHDOG_PID_ENV)
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(env.get(WATCHDOG_USEC_ENV, ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


async def run_watchdog(
    notifier: Notifier,
    interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Send ``WATCHDOG=1`` every ``interval`` seconds, first at ``interval``, until cancelled.

    Start it with ``nursery.start``. The pings come from this trio task, so anything
    that blocks the loop delays them; when the loop wakes up late it pings at once and
    then keeps the cadence from there (no burst of catch-up pings). Runs until
    cancelled; never raises (see ``Notifier.notify``).
    """
    if interval <= 0:
        raise ValueError(f"watchdog interval must be positive, not {interval!r}")
    task_status.started()
    deadline = trio.current_time() + interval
    while True:
        await trio.sleep_until(deadline)
        notifier.watchdog()
        deadline += interval
        now = trio.current_time()
        if deadline <= now:  # the loop was blocked past a whole interval
            deadline = now + interval
