"""Event-loop lag: how late this process's trio loop runs a task that asked to wake.

Every call, webhook and watchdog ping of a process shares one event loop. When
something holds that loop (a peer that always has data and a read path that never
yields, a long synchronous computation, a GC pause, the machine swapping), nothing
else runs until it lets go: audio frames pile up, webhooks go unanswered, and past
``WatchdogSec=`` systemd kills every live call of the process. ``watch_loop_lag`` is
the loop's own pulse: a task that sleeps until a time ``TICK_S`` ahead and measures,
on waking, how far past that time it is. That lateness is the longest any task of
the loop could have waited for its turn in between.

Each wake is handed to a ``LagObserver`` (``BridgeMetrics``: a histogram, the largest
lag since the last scrape, a count of stalls). A wake later than ``STALL_WARNING_S``
is a *stall*: it is logged as one WARNING, so an operator sees the loop was blocked
before systemd's watchdog has to say so. That line is rate-limited by construction:
one line per stall, and each stall has held the loop at least ``STALL_WARNING_S``,
so there are never more than ``1 / STALL_WARNING_S`` of them a second.
"""

from __future__ import annotations

import logging
from typing import Final, NoReturn, Protocol

import trio

from voicebridge.observability.logs import log_event

log = logging.getLogger(__name__)

#: How often the monitor wakes. A wake's lateness is measured to the microsecond
#: whatever the tick, so 100 ms resolves every hold a caller would hear and every stall
#: worth a warning, at ten wakes a second: at 100 wakes a second the monitor cost
#: about 4 % of the bridge's CPU at 100 calls (docs/performance.md).
TICK_S: Final = 0.100
#: A wake this late means the loop was blocked: log it. A quarter of a second is far
#: beyond any scheduling noise of a healthy loop (well under a millisecond), is heard
#: by callers as a gap, and is a small fraction of any sane ``WatchdogSec=``.
STALL_WARNING_S: Final = 0.25


class LagObserver(Protocol):
    """What the monitor tells about each wake."""

    def loop_lag(self, seconds: float) -> None:
        """One wake, ``seconds`` after the time it asked for (never negative)."""


def lag_of(due: float, woke: float) -> float:
    """How late a wake at ``woke`` is for ``due``; 0 when on time or early.

    trio's deadlines fire at or after the time asked for; "early" only appears when a
    clock with a coarser resolution rounds, and is no lag.
    """
    return max(0.0, woke - due)


def is_stall(lag: float) -> bool:
    """Whether a wake this late means the loop was blocked (and is worth a WARNING)."""
    return lag >= STALL_WARNING_S


async def watch_loop_lag(observer: LagObserver, *, tick_s: float = TICK_S) -> NoReturn:
    """Wake every ``tick_s`` for ever; tell ``observer`` how late each wake was.

    Measures with ``trio.current_time()`` (the loop's own clock, so a test's virtual
    clock is measured too). The next wake is planned from the moment this one
    happened, not from the one it asked for: after a stall the monitor does not fire
    a burst of catch-up wakes, and each stall is one late wake (one WARNING).
    Cancellation ends it at its sleep; it holds nothing to clean up.
    """
    due = trio.current_time() + tick_s
    while True:
        await trio.sleep_until(due)
        woke = trio.current_time()
        lag = lag_of(due, woke)
        observer.loop_lag(lag)
        if is_stall(lag):
            log_event(
                log,
                logging.WARNING,
                "loop-stalled",
                f"the event loop was blocked for {lag * 1000:.0f} ms: every call, webhook "
                "and watchdog ping of this process waited",
                lag_ms=round(lag * 1000, 1),
            )
        due = woke + tick_s
