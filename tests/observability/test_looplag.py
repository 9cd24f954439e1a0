"""The event loop's pulse (``observability.looplag``): what it measures, what it logs.

Timed behaviour runs on trio's autojump clock, where a loop held by synchronous code is
modelled exactly: ``MockClock.jump`` moves virtual time forward while the test's task
keeps the loop (no other task runs until it yields). One test holds the real loop with
a real ``time.sleep``, with a bound that follows from the hold itself.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import attrs
import pytest
import trio
import trio.testing

from voicebridge.observability.logs import record_fields
from voicebridge.observability.looplag import STALL_WARNING_S, LoopPressure, watch_loop_lag

#: The tick these tests run the monitor at: fine, so exact times show each wake.
TICK_S = 0.010


@attrs.define
class Wakes:
    """Every wake the monitor reported: (virtual time of the report, lag)."""

    seen: list[tuple[float, float]] = attrs.field(factory=list)

    def loop_lag(self, seconds: float) -> None:
        self.seen.append((trio.current_time(), seconds))

    @property
    def lags(self) -> list[float]:
        return [lag for _, lag in self.seen]


def stall_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if record_fields(r).get("EVENT") == "loop-stalled"]


async def test_a_free_loop_wakes_the_monitor_on_time_every_tick(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    wakes = Wakes()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(watch_loop_lag, wakes, tick_s=TICK_S))
        await trio.sleep(0.1 + TICK_S / 2)
        nursery.cancel_scope.cancel()
    assert [at for at, _ in wakes.seen] == pytest.approx([TICK_S * n for n in range(1, 11)])
    assert wakes.lags == [0.0] * 10
    assert stall_lines(caplog) == []


async def test_a_held_loop_is_one_late_wake_and_one_warning(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="voicebridge")
    wakes = Wakes()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(watch_loop_lag, wakes, tick_s=TICK_S))
        await trio.sleep(0.055)  # the monitor woke at 0.05 and asked for 0.06
        # Synchronous work holds the loop for 0.3 s: nothing else can run meanwhile.
        autojump_clock.jump(0.3)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    times = [at for at, _ in wakes.seen]
    # On time until the hold; then one wake 0.295 s late, at 0.355; then every tick
    # from there (no burst of catch-up wakes).
    assert times == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05, 0.355, 0.365, 0.375,
                                   0.385, 0.395, 0.405, 0.415, 0.425, 0.435, 0.445])
    assert wakes.lags == pytest.approx([0.0] * 5 + [0.295] + [0.0] * 9)
    [line] = stall_lines(caplog)
    assert line.levelno == logging.WARNING
    assert record_fields(line)["LAG_MS"] == 295.0
    assert "blocked for 295 ms" in line.getMessage()


async def test_a_hold_shorter_than_the_stall_threshold_is_measured_but_not_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    wakes = Wakes()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(watch_loop_lag, wakes, tick_s=TICK_S))
        await trio.sleep(0.015)
        autojump_clock.jump(STALL_WARNING_S - 0.001 + 0.005)  # 5 ms until it was due
        await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert max(wakes.lags) == pytest.approx(STALL_WARNING_S - 0.001)
    assert stall_lines(caplog) == []


async def test_a_real_blocking_call_shows_as_lag_and_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Real clock. The monitor is due at most one tick after the hold begins and cannot
    # wake before it ends, so its lag is at least HOLD_S - TICK_S, however loaded the
    # machine (only a lower bound: timing is never asserted from above).
    hold_s = 0.3
    caplog.set_level(logging.WARNING, logger="voicebridge")
    wakes = Wakes()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(watch_loop_lag, wakes, tick_s=TICK_S))
            await trio.sleep(2 * TICK_S)
            time.sleep(hold_s)  # noqa: ASYNC251 -- holding the loop is the point
            await trio.sleep(2 * TICK_S)
            nursery.cancel_scope.cancel()
    assert max(wakes.lags) >= hold_s - TICK_S
    assert len(stall_lines(caplog)) >= 1


# -- LoopPressure: when the loop counts as behind (shedding) ---------------------------

SHED_S = 0.050
WINDOW_S = 1.0


async def hog(clock: trio.testing.MockClock, hold_s: float) -> None:
    """A loop with more work than its core: every turn of this task holds it ``hold_s``."""
    while True:
        clock.jump(hold_s)
        await trio.lowlevel.checkpoint()


async def test_the_loop_is_behind_while_its_mean_lag_over_the_window_is_over_the_threshold(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pressure = LoopPressure(threshold_s=SHED_S, window_s=WINDOW_S, tick_s=TICK_S)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(watch_loop_lag, pressure, tick_s=TICK_S))
        await trio.sleep(1.0)
        assert (pressure.lag_s(), pressure.behind()) == (0.0, None)
        # One pause of 300 ms (a garbage collection): one wake, overdue by about that, among
        # the 70 of the second's window that the pause left.
        autojump_clock.jump(0.3)
        assert pressure.behind() is None
        assert pressure.lag_s() == pytest.approx(0.3 / 71, abs=2e-4)
        await trio.sleep(1.0)
        # More work than the core carries: every wake is late by about a hold.
        async with trio.open_nursery() as hog_nursery:
            hog_nursery.start_soon(hog, autojump_clock, 0.080)
            await trio.sleep(0.2)
            assert pressure.behind() is None, "a fifth of the window is not enough"
            await trio.sleep(WINDOW_S)
            lag = pressure.behind()
            assert lag is not None and 0.060 <= lag <= 0.160
            hog_nursery.cancel_scope.cancel()
        stopped = trio.current_time()
        # The loop is free again: behind until the late wakes are the minority, and not
        # at all once they have left the window.
        await trio.sleep_until(stopped + 0.05)
        assert pressure.behind() is not None
        await trio.sleep_until(stopped + WINDOW_S + TICK_S)
        assert (pressure.lag_s(), pressure.behind()) == (0.0, None)
        nursery.cancel_scope.cancel()


async def test_a_loop_held_now_is_behind_before_the_monitor_wakes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pressure = LoopPressure(threshold_s=SHED_S, window_s=WINDOW_S, tick_s=TICK_S)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(watch_loop_lag, pressure, tick_s=TICK_S))
        await trio.sleep(0.5 + TICK_S / 2)
        autojump_clock.jump(3.0)  # held for longer than the window: no wake in it
        assert pressure.behind() == pytest.approx(3.0 - TICK_S / 2)
        nursery.cancel_scope.cancel()


async def test_no_monitor_and_no_threshold_are_never_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    unwatched = LoopPressure(threshold_s=SHED_S, window_s=WINDOW_S, tick_s=TICK_S)
    off = LoopPressure(threshold_s=0.0, window_s=WINDOW_S, tick_s=TICK_S)
    off.loop_lag(1.0)
    autojump_clock.jump(5.0)
    assert (unwatched.behind(), off.behind()) == (None, None)
    assert off.lag_s() > 0
