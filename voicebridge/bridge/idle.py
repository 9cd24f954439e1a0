"""Idle deadlines: a scope cancelled a period after its reader's last message, cheaply."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import TracebackType

import trio


class IdleWatch:
    """The idle deadlines of one call's readers, kept by one watcher task.

    A reader that must give up after a period without a message could push its cancel
    scope's deadline forward on every message. But setting the deadline of an entered
    scope re-registers it with trio (a context manager, a push on the run's deadline
    heap, a stale entry to prune later), fifty times a second per leg, for a deadline
    that almost never fires. Here a message stores its time (``IdleDeadline.touch``)
    and nothing else. The watcher task sleeps until the earliest ``last activity +
    period`` of what it watches; when it wakes, it sleeps again until the new one if
    activity came meanwhile, or else cancels that reader's scope. A scope is so
    cancelled at the very instant its own deadline would have fired, and its
    ``cancelled_caught`` says so as it would.

    The watcher runs in ``nursery`` only while something is watched: it starts with the
    first ``watch`` and returns as soon as the last one is left, so it never holds the
    nursery open, and never cancels a scope its reader has left. Cancelled (its nursery
    is), it simply ends; a ``watch`` after that starts it again.

    # Invariant: ``_wake`` is None exactly when no watcher task runs or is about to
    #   start: one watcher task at most. While the watcher sleeps in it, its deadline
    #   is no later than the earliest due time of what is watched.
    # Invariant: ``_watched`` holds the deadlines entered, not yet left or stopped, and
    #   not yet expired.
    """

    __slots__ = ("_now", "_nursery", "_wake", "_watched")

    def __init__(self, nursery: trio.Nursery) -> None:
        """Within a trio run; ``nursery``: where the watcher task runs (the call's)."""
        self._nursery = nursery
        # The run's clock itself: the value ``trio.current_time()`` returns, read
        # without its two calls through the runner.
        self._now: Callable[[], float] = trio.lowlevel.current_clock().current_time
        self._watched: list[IdleDeadline] = []
        self._wake: trio.CancelScope | None = None

    def watch(self, scope: trio.CancelScope, period_s: float) -> IdleDeadline:
        """A deadline that cancels ``scope`` after ``period_s`` without activity.

        It counts from entering its ``with`` block, which must lie within ``scope``'s,
        and ends with the block; ``touch`` marks activity, ``stop`` ends it early.
        """
        return IdleDeadline(self, scope, period_s)

    def _enter(self, deadline: IdleDeadline) -> None:
        self._watched.append(deadline)
        wake = self._wake
        if wake is None:
            self._wake = trio.CancelScope()
            self._nursery.start_soon(self._watcher)
        elif deadline.due < wake.deadline:
            wake.deadline = deadline.due

    def _leave(self, deadline: IdleDeadline) -> None:
        if deadline in self._watched:
            self._watched.remove(deadline)
            if not self._watched and self._wake is not None:
                self._wake.cancel(reason="nothing left to watch")

    async def _watcher(self) -> None:
        """Sleep until the earliest due time; cancel the scopes past theirs; repeat while
        anything is watched. Cancelled: ends, and a later ``watch`` starts a new one."""
        try:
            while self._watched:
                wake = self._wake
                assert wake is not None, "set before this task starts, and by it"
                wake.deadline = min(deadline.due for deadline in self._watched)
                with wake:
                    await trio.sleep_forever()
                now = self._now()
                for deadline in [d for d in self._watched if d.due <= now]:
                    self._watched.remove(deadline)
                    deadline.expire()
                self._wake = trio.CancelScope()
        finally:
            self._wake = None


class IdleDeadline:
    """One reader's idle deadline (``IdleWatch.watch``); a context manager."""

    __slots__ = ("_active_at", "_now", "_period_s", "_scope", "_watch")

    def __init__(self, watch: IdleWatch, scope: trio.CancelScope, period_s: float) -> None:
        self._watch = watch
        self._now = watch._now
        self._scope = scope
        self._period_s = period_s
        self._active_at = -math.inf

    @property
    def due(self) -> float:
        """When the scope is cancelled, unless activity comes first."""
        return self._active_at + self._period_s

    def touch(self) -> None:
        """Activity now: the scope lives until ``period_s`` after it. Never a checkpoint;
        the one cost per message, a clock read and a stored float."""
        self._active_at = self._now()

    def stop(self) -> None:
        """No idle deadline from now on, whatever comes (what the reader still waits
        for has a bound of its own); leaving the ``with`` block does it too."""
        self._watch._leave(self)

    def expire(self) -> None:
        """Cancel the scope now: nothing came for the period (called by the watcher)."""
        self._scope.cancel(reason=f"nothing for {self._period_s:g} s")

    def __enter__(self) -> IdleDeadline:
        self._active_at = self._now()
        self._watch._enter(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
