"""The server under attack, in its own process: ``python -m tests.edge.server_main CONFIG``.

It runs the real ``serve()`` as ``voicebridge serve`` does (the configuration file, the
GC tuning, logs on stderr, sd_notify and the watchdog to ``$NOTIFY_SOCKET``) on the
listening socket whose descriptor is in ``$EDGE_LISTEN_FD``, with the descriptor limit
``$EDGE_NOFILE`` (what its systemd unit would give it). Beside it, in the same event
loop, runs the product's loop-lag monitor (``observability.looplag``) as the test's
ticker: every ``PULSE_REPORT_S`` it prints ``pulse <lag> <busy lag>`` on stdout, the
largest lags (in seconds, see ``Pulse``) since the previous line. It prints ``ready``
once it accepts connections, and exits after the drain that SIGTERM starts (the tests
kill it instead).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import sys
import time

import trio

from voicebridge.config import load_config
from voicebridge.gctuning import tune_gc_for_latency
from voicebridge.observability.logs import configure_logging
from voicebridge.observability.looplag import watch_loop_lag
from voicebridge.sdnotify import Notifier
from voicebridge.server import serve

#: How often the ticker reports: fine enough to place a gap in a few-second attack.
PULSE_REPORT_S = 0.1
#: The watchdog's ping interval (systemd asks for half of ``WatchdogSec=``).
WATCHDOG_INTERVAL_S = 0.1


class Pulse:
    """The largest lags the ticker saw since it was last read.

    Two figures per wake: the lag itself (wall clock: how late the loop woke it), and
    the part of it this thread spent on the CPU (``time.thread_time``, user and
    system). A loop held by its own work (a flood read without yielding, a parse of a
    huge body) burns CPU for the whole lag; a process the kernel did not schedule
    (other processes on a shared machine) does not. The second figure is the server's
    own doing; the first is what its callers lived through.
    """

    def __init__(self) -> None:
        self.largest = 0.0
        self.largest_busy = 0.0
        self._cpu = time.thread_time()

    def loop_lag(self, seconds: float) -> None:
        cpu = time.thread_time()
        busy = min(seconds, cpu - self._cpu)
        self._cpu = cpu
        self.largest = max(self.largest, seconds)
        self.largest_busy = max(self.largest_busy, busy)

    async def report_every(self, interval_s: float) -> None:
        while True:
            await trio.sleep(interval_s)
            print(f"pulse {self.largest:.6f} {self.largest_busy:.6f}", flush=True)
            self.largest = self.largest_busy = 0.0


def main() -> int:
    nofile = int(os.environ["EDGE_NOFILE"])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))
    config = load_config(sys.argv[1])
    configure_logging(config.server.log_level.upper(), target="stderr")
    notifier = Notifier.from_environ(unset_environment=True)
    listener = socket.socket(fileno=int(os.environ["EDGE_LISTEN_FD"]))
    tune_gc_for_latency()
    pulse = Pulse()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            async def serve_then_stop(*, task_status: trio.TaskStatus[object]) -> None:
                await serve(
                    config,
                    listeners=[listener],
                    handle_signals=True,
                    notifier=notifier,
                    watchdog_interval_s=WATCHDOG_INTERVAL_S,
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel(reason="the server stopped")

            await nursery.start(serve_then_stop)
            # From here on: the start-up's own work is not what is measured.
            nursery.start_soon(watch_loop_lag, pulse)
            nursery.start_soon(pulse.report_every, PULSE_REPORT_S)
            print("ready", flush=True)

    trio.run(run)
    logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
