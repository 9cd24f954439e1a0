"""A busy bridge, in its own process: ``python -m tests.busy_server CONFIG``.

It runs the real ``serve()`` as ``voicebridge serve`` does (the configuration file, logs
on stderr) on the listening socket whose descriptor is in ``$BUSY_LISTEN_FD``. On
SIGUSR1, for ``$BUSY_FOR_S`` seconds, a task of its event loop holds the loop
``$BUSY_HOLD_MS`` at a time and gives the other tasks one turn in between: the loop is
as late for every task as a process whose calls take more than its core, while the
test's probes come from another process over real sockets. The hold sleeps rather
than spins, so that the test does not take a core from a shared machine. It prints
``ready`` once it accepts connections, ``busy`` and ``idle`` around each busy spell, and
``turn N`` before each hold of it: how many turns the loop took while a probe waited, as
the probe sees them come.

With ``$BUSY_EARLY_ANSWER=off`` the front door answers nothing itself (its early answer
declines every request), so that ``bench/shed_answer.py`` can measure the same refusal
the long way, through hypercorn and the app, beside it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from functools import partial

import trio

import voicebridge.server
from voicebridge.config import load_config
from voicebridge.net.front import EarlyRequest, EarlyResponse
from voicebridge.observability.logs import configure_logging
from voicebridge.server import serve
from voicebridge.web import Services


def hold_the_loop(seconds: float) -> None:
    """What a loop with more work than its core does to every other task: nothing runs."""
    time.sleep(seconds)


async def busy_on_signal(for_s: float, hold_s: float) -> None:
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            print("busy", flush=True)
            until = trio.current_time() + for_s
            turn = 0
            while trio.current_time() < until:
                turn += 1
                print(f"turn {turn}", flush=True)
                hold_the_loop(hold_s)
                await trio.lowlevel.checkpoint()
            print("idle", flush=True)


def no_early_answer(services: Services, request: EarlyRequest) -> EarlyResponse | None:
    """The front door's early answer, declining every request."""
    return None


def main() -> int:
    if os.environ.get("BUSY_EARLY_ANSWER", "on") == "off":
        vars(voicebridge.server)["early_overflow"] = no_early_answer  # what serve() calls
    config = load_config(sys.argv[1])
    configure_logging(config.server.log_level.upper(), target="stderr")
    listener = socket.socket(fileno=int(os.environ["BUSY_LISTEN_FD"]))
    for_s = float(os.environ["BUSY_FOR_S"])
    hold_s = float(os.environ["BUSY_HOLD_MS"]) / 1000

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy_on_signal, for_s, hold_s)
            await nursery.start(partial(serve, config, listeners=[listener], handle_signals=True))
            print("ready", flush=True)

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
