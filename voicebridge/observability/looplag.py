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

``LoopPressure`` turns the wakes into an admission signal: the loop is *behind* while
the mean lag of the wakes of the last few seconds is at or above a threshold (the
``[server] shed_loop_lag_ms`` key). A process whose every task waits that long for its
turn has more work than its core carries; the voice webhook then answers new calls
with the overflow TwiML (``bridge.registry``) rather than adding to the work of the
calls it has.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
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


class LagObservers:
    """Several observers of one monitor, told of each wake in turn."""

    def __init__(self, *observers: LagObserver) -> None:
        self._observers = observers

    def loop_lag(self, seconds: float) -> None:
        for observer in self._observers:
            observer.loop_lag(seconds)


class LoopPressure:
    """Whether the event loop is behind: the mean lag of the monitor's wakes over the
    last ``window_s``, at or above ``threshold_s`` (0: never).

    A mean over a window, not the last wake: one garbage-collector pause or one slow
    request is a single late wake among the twenty of two seconds and does not count as
    overload, while a loop that has more work than its core carries is late on every
    wake. A wake that is *overdue* now (the monitor asked to wake ``tick_s`` after its
    last wake and has not yet) counts as one more wake that late, so a loop held right
    now is behind before the monitor gets its turn to say so. Without any wake (no
    monitor) the loop is never behind. Not thread-safe (trio: one thread).
    """

    def __init__(
        self,
        *,
        threshold_s: float,
        window_s: float,
        tick_s: float = TICK_S,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.threshold_s = threshold_s
        self.window_s = window_s
        self._tick_s = tick_s
        self._clock = clock
        # (when the monitor woke, how late), oldest first, none older than window_s.
        # Invariant: _sum is the sum of the lags in _wakes.
        self._wakes: deque[tuple[float, float]] = deque()
        self._sum = 0.0
        # When the monitor last woke (None: never), so when the next wake is due.
        self._last_woke: float | None = None

    def loop_lag(self, seconds: float) -> None:
        """One wake of the monitor, ``seconds`` late (``LagObserver``)."""
        now = self._clock()
        self._last_woke = now
        self._wakes.append((now, seconds))
        self._sum += seconds
        self._forget_before(now - self.window_s)

    def lag_s(self) -> float:
        """The mean lag of the wakes of the last ``window_s``, the overdue one included."""
        now = self._clock()
        self._forget_before(now - self.window_s)
        total, count = self._sum, len(self._wakes)
        if self._last_woke is not None:
            overdue = now - (self._last_woke + self._tick_s)
            if overdue > 0:
                total += overdue
                count += 1
        return max(0.0, total / count) if count else 0.0

    def behind(self) -> float | None:
        """The mean lag when it is at or above the threshold (the loop is behind), else None."""
        if self.threshold_s <= 0:
            return None
        lag = self.lag_s()
        return lag if lag >= self.threshold_s else None

    def _forget_before(self, oldest: float) -> None:
        wakes = self._wakes
        while wakes and wakes[0][0] < oldest:
            self._sum -= wakes.popleft()[1]
        if not wakes:
            self._sum = 0.0  # no float residue from the subtractions


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
