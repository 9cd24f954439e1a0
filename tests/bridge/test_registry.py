"""The call registry: admission, the drain's waits, and sharing outcomes between processes.

Charter: the registry alone, on trio's ``autojump_clock`` (every wait asserted at its
exact virtual time); calls are stood in for by recording ``end`` callbacks; two
registries on one ``SharedDir`` stand for two processes of one box.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from tests.test_boxstate import a_record
from voicebridge.boxstate import SharedDir
from voicebridge.bridge.outcome import Outcome
from voicebridge.bridge.registry import DRAIN_RESERVATION_GRACE_S, CallRegistry

TTL_S = 60.0


class Ended:
    """A call's ``end`` callback that remembers how it was ended."""

    def __init__(self) -> None:
        self.calls: list[tuple[Outcome, str]] = []

    def __call__(self, outcome: Outcome, detail: str) -> float:
        self.calls.append((outcome, detail))
        return 0.0


def registry(max_calls: int = 10, shared: SharedDir | None = None) -> CallRegistry:
    return CallRegistry(max_calls=max_calls, reservation_ttl_s=TTL_S, shared=shared)


async def test_draining_refuses_new_calls_and_keeps_the_admitted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = registry()
    assert calls.try_admit("CA1")
    calls.start_draining()
    assert not calls.try_admit("CA2")
    assert calls.try_admit("CA1"), "a webhook retry of an admitted call keeps its slot"
    assert not calls.admitting


async def test_wait_idle_waits_for_the_last_call(autojump_clock: trio.testing.MockClock) -> None:
    calls = registry()
    calls.begin("CA1", Ended())
    calls.begin("CA2", Ended())
    calls.start_draining()

    async def finish_later() -> None:
        await trio.sleep(3)
        calls.finish(a_record("CA1"))
        await trio.sleep(4)
        calls.finish(a_record("CA2"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish_later)
        await calls.wait_idle()
        assert trio.current_time() == 7


async def test_draining_lets_unstarted_reservations_go_after_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = registry()
    assert calls.try_admit("CA-ringing")  # the caller hung up while it rang
    await trio.sleep(1)
    calls.start_draining()
    await calls.wait_idle()
    assert trio.current_time() == 1 + DRAIN_RESERVATION_GRACE_S


async def test_end_all_ends_the_active_calls_and_any_that_begin_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = registry()
    first, late = Ended(), Ended()
    calls.try_admit("CA2")
    calls.begin("CA1", first)
    calls.start_draining()
    assert calls.end_all(Outcome.SHUTDOWN, "drain deadline passed").count == 1
    assert first.calls == [(Outcome.SHUTDOWN, "drain deadline passed")]
    assert calls.load == 1, "the reservation is no longer waited for"
    calls.begin("CA2", late)  # its stream arrived after the deadline
    assert late.calls == [(Outcome.SHUTDOWN, "drain deadline passed")]


async def test_the_drain_waits_for_the_actions_of_calls_it_ended(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = registry()
    calls.begin("CA0", Ended())
    calls.finish(a_record("CA0"))  # before the drain: not waited for
    calls.begin("CA1", Ended())
    calls.start_draining()
    calls.finish(a_record("CA1", outcome=Outcome.SHUTDOWN))
    assert calls.awaiting_action == 1

    async def twilio_asks_for_the_action() -> None:
        await trio.sleep(0.5)
        record = calls.record_for_action("CA1")
        assert record is not None and record.outcome is Outcome.SHUTDOWN

    async with trio.open_nursery() as nursery:
        nursery.start_soon(twilio_asks_for_the_action)
        await calls.wait_actions_answered()
        assert trio.current_time() == 0.5
    assert calls.awaiting_action == 0


async def test_changes_are_never_missed(autojump_clock: trio.testing.MockClock) -> None:
    calls = registry()
    seen = calls.changes
    calls.begin("CA1", Ended())
    # A change made before the wait is reported at once.
    seen = await calls.wait_changed_since(seen)
    assert trio.current_time() == 0

    async def change_later() -> None:
        await trio.sleep(2)
        calls.finish(a_record("CA1"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(change_later)
        assert await calls.wait_changed_since(seen) == seen + 1
        assert trio.current_time() == 2


async def test_another_process_answers_the_action_from_the_shared_record(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    ran_it = registry(shared=SharedDir(tmp_path))
    answers = registry(shared=SharedDir(tmp_path))
    ran_it.begin("CA1", Ended())
    ran_it.finish(a_record("CA1", outcome=Outcome.CALLER_HUNG_UP))
    record = answers.record_for_action("CA1")
    assert record is not None and record.outcome is Outcome.CALLER_HUNG_UP
    assert answers.record_for("CA-unknown") is None


async def test_a_reservation_is_released_when_the_stream_starts_in_another_process(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    admitted_it = registry(max_calls=1, shared=SharedDir(tmp_path))
    streams_it = registry(max_calls=1, shared=SharedDir(tmp_path))
    assert admitted_it.try_admit("CA1")
    assert not admitted_it.try_admit("CA2"), "full: CA1 holds the only slot"
    streams_it.begin("CA1", Ended())  # Twilio's media socket landed on the other process
    assert admitted_it.load == 0
    assert admitted_it.try_admit("CA2")
    assert streams_it.load == 1
