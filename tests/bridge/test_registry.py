"""The call registry: one admission and one stream per CallSid, the drain's waits, and
sharing admissions, streams and outcomes between processes.

Charter: the registry alone, on trio's ``autojump_clock`` (every wait asserted at its
exact virtual time); calls are stood in for by recording ``end`` callbacks and the
webhook's answer by a counting ``Answers``; two registries on one ``SharedDir`` stand
for two processes of one box (the directory's wall clock follows the virtual one).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing

from tests.test_boxstate import a_record
from voicebridge.boxstate import SharedDir
from voicebridge.bridge import registry as registry_module
from voicebridge.bridge.outcome import Outcome
from voicebridge.bridge.registry import (
    CALL_MEMORY_S,
    DRAIN_RESERVATION_GRACE_S,
    Answer,
    CallRegistry,
    Full,
    Spent,
)
from voicebridge.loopback import loopback_config
from voicebridge.observability.looplag import LoopPressure
from voicebridge.server import build_services

TTL_S = 60.0
NOW = 1_800_000_000.0


class Ended:
    """A call's ``end`` callback that remembers how it was ended."""

    def __init__(self) -> None:
        self.calls: list[tuple[Outcome, str]] = []

    def __call__(self, outcome: Outcome, detail: str) -> float:
        self.calls.append((outcome, detail))
        return 0.0


class Answers:
    """The voice webhook's answer maker: a new TwiML (a new token) each time it is asked."""

    def __init__(self, call_sid: str) -> None:
        self.call_sid = call_sid
        self.made = 0

    def __call__(self) -> str:
        self.made += 1
        return f"<Response>{self.call_sid} token {self.made}</Response>"


def registry(max_calls: int = 10, shared: SharedDir | None = None) -> CallRegistry:
    return CallRegistry(max_calls=max_calls, reservation_ttl_s=TTL_S, shared=shared)


def shared_dir(path: Path) -> SharedDir:
    """A process's view of the box's directory, on a wall clock that follows trio's."""
    return SharedDir(path, clock=lambda: NOW + trio.current_time())


def new_answer(calls: CallRegistry, call_sid: str, answers: Answers) -> str:
    """The TwiML a new admission of ``call_sid`` is answered with."""
    decision = calls.admit(call_sid, answers)
    assert isinstance(decision, Answer) and not decision.repeat, decision
    return decision.twiml


def admitted(calls: CallRegistry, call_sid: str) -> bool:
    """Admit ``call_sid`` as a new call (not a repeat): the old boolean question."""
    return calls.admit(call_sid, Answers(call_sid)) == Answer(
        f"<Response>{call_sid} token 1</Response>", repeat=False
    )


async def test_draining_refuses_new_calls_and_keeps_the_admitted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = registry()
    first = Answers("CA1")
    assert calls.admit("CA1", first) == Answer("<Response>CA1 token 1</Response>", repeat=False)
    calls.start_draining()
    assert calls.admit("CA2", Answers("CA2")) == Full("draining")
    # A webhook retry of an admitted call keeps its slot and gets its answer.
    assert calls.admit("CA1", first) == Answer("<Response>CA1 token 1</Response>", repeat=True)
    assert first.made == 1
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
    assert admitted(calls, "CA-ringing")  # the caller hung up while it rang
    await trio.sleep(1)
    calls.start_draining()
    await calls.wait_idle()
    assert trio.current_time() == 1 + DRAIN_RESERVATION_GRACE_S


async def test_end_all_ends_the_active_calls_and_any_that_begin_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = registry()
    first, late = Ended(), Ended()
    assert admitted(calls, "CA2")
    assert calls.begin("CA1", first)
    calls.start_draining()
    assert calls.end_all(Outcome.SHUTDOWN, "drain deadline passed").count == 1
    assert first.calls == [(Outcome.SHUTDOWN, "drain deadline passed")]
    assert calls.load == 1, "the reservation is no longer waited for"
    assert calls.begin("CA2", late)  # its stream arrived after the deadline
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
    admitted_it = registry(max_calls=1, shared=shared_dir(tmp_path))
    streams_it = registry(max_calls=1, shared=shared_dir(tmp_path))
    assert admitted(admitted_it, "CA1")
    assert admitted_it.admit("CA2", Answers("CA2")) == Full("at-capacity"), "CA1 holds it"
    assert streams_it.begin("CA1", Ended())  # Twilio's media socket landed on the other process
    assert admitted_it.load == 0
    assert admitted(admitted_it, "CA2")
    assert streams_it.load == 1


# --- one admission, one stream per CallSid --------------------------------------------


async def test_a_repeated_webhook_gets_the_same_answer_and_no_second_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = registry(max_calls=1)
    answers = Answers("CA1")
    first = new_answer(calls, "CA1", answers)
    await trio.sleep(TTL_S - 0.001)
    for _ in range(3):  # Twilio retried, or someone replays the captured webhook
        assert calls.admit("CA1", answers) == Answer(first, repeat=True)
    assert answers.made == 1, "no second token"
    assert calls.load == 1
    assert calls.admit("CA2", Answers("CA2")) == Full("at-capacity"), "no second slot"


async def test_a_webhook_for_a_call_that_streamed_is_refused_for_an_hour(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = registry()
    assert admitted(calls, "CA1")
    await trio.sleep(1)
    assert calls.begin("CA1", Ended())
    assert calls.admit("CA1", Answers("CA1")) == Spent("streamed")
    assert not calls.begin("CA1", Ended()), "one stream per CallSid"
    assert calls.active_count == 1
    await trio.sleep(30)
    calls.finish(a_record("CA1"))
    assert calls.admit("CA1", Answers("CA1")) == Spent("streamed")
    assert not calls.begin("CA1", Ended()), "not after it ended either"
    await trio.sleep(CALL_MEMORY_S - 0.001)
    assert calls.admit("CA1", Answers("CA1")) == Spent("streamed")
    await trio.sleep(0.001)
    # Forgotten an hour after it ended: Twilio's signatures carry no time, so a webhook
    # replayed this late is admitted afresh (docs/call-flow.md says so).
    assert admitted(calls, "CA1")


async def test_a_lapsed_reservation_is_refused_but_its_token_may_still_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = registry(max_calls=1)
    assert admitted(calls, "CA1")
    await trio.sleep(TTL_S - 0.001)
    assert calls.load == 1
    await trio.sleep(0.001)
    assert calls.load == 0, "the caller hung up while it rang: the slot is free"
    assert calls.admit("CA1", Answers("CA1")) == Spent("lapsed")
    # A stream whose token is still valid proves the admission: it may begin, once.
    assert calls.begin("CA1", Ended())
    assert not calls.begin("CA1", Ended())


async def test_the_memory_of_calls_is_bounded(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "MAX_REMEMBERED_CALLS", 3)
    calls = registry()
    for index in range(4):
        assert calls.begin(f"CA{index}", Ended())
        calls.finish(a_record(f"CA{index}"))
        await trio.sleep(1)
    assert admitted(calls, "CA0"), "the oldest is forgotten first"
    for index in (1, 2, 3):
        assert calls.admit(f"CA{index}", Answers(f"CA{index}")) == Spent("streamed")


async def test_the_processes_of_a_box_admit_and_stream_a_call_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    one = registry(max_calls=1, shared=shared_dir(tmp_path))
    other = registry(max_calls=1, shared=shared_dir(tmp_path))
    answers = Answers("CA1")
    first = new_answer(one, "CA1", answers)
    await trio.sleep(2)
    # The repeat lands on the other process: the same answer, and its slot stays free.
    assert other.admit("CA1", answers) == Answer(first, repeat=True)
    assert answers.made == 1
    assert other.load == 0 and admitted(other, "CA2")
    other.finish(a_record("CA2"))  # (CA2 never streamed: it frees the slot)
    # The stream begins in the other process; the first one lets its reservation go.
    assert other.begin("CA1", Ended())
    assert one.load == 0
    assert not one.begin("CA1", Ended()), "one stream per CallSid on the box"
    for calls in (one, other):
        assert calls.admit("CA1", Answers("CA1")) == Spent("streamed")
    other.finish(a_record("CA1"))
    await trio.sleep(CALL_MEMORY_S - 1)
    for calls in (one, other):
        assert calls.admit("CA1", Answers("CA1")) == Spent("streamed")
        assert not calls.begin("CA1", Ended())


async def test_a_reservation_that_lapsed_in_one_process_is_refused_by_the_others(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    one = registry(shared=shared_dir(tmp_path))
    other = registry(shared=shared_dir(tmp_path))
    assert admitted(one, "CA1")
    await trio.sleep(TTL_S - 0.001)
    assert isinstance(other.admit("CA1", Answers("CA1")), Answer)
    await trio.sleep(0.001)
    assert other.admit("CA1", Answers("CA1")) == Spent("lapsed"), "its age says so"
    assert one.load == 0  # its reservation lapses, and its answer is no longer given out
    third = registry(shared=shared_dir(tmp_path))
    assert third.admit("CA1", Answers("CA1")) == Spent("lapsed")


async def test_a_loop_behind_sheds_new_calls_without_making_their_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pressure = LoopPressure(threshold_s=0.050, window_s=2.0, tick_s=0.1)
    calls = CallRegistry(max_calls=10, reservation_ttl_s=TTL_S, pressure=pressure)
    first = Answers("CA1")
    pressure.loop_lag(0.001)
    assert calls.admit("CA1", first) == Answer("<Response>CA1 token 1</Response>", repeat=False)
    for _ in range(5):  # the loop falls behind: every wake 80 ms late
        await trio.sleep(0.18)
        pressure.loop_lag(0.080)
    late = Answers("CA2")
    assert calls.admit("CA2", late) == Full("loop-behind", loop_lag_s=pytest.approx(0.401 / 6))
    assert late.made == 0, "a shed call costs no token"
    assert not calls.admitting
    # Twilio's retry of the call admitted before keeps its answer: it is not new work.
    assert calls.admit("CA1", first) == Answer("<Response>CA1 token 1</Response>", repeat=True)
    # The loop keeps up again: once the late wakes leave the window, calls are admitted.
    for _ in range(20):
        await trio.sleep(0.1)
        pressure.loop_lag(0.0)
    admitted = calls.admit("CA3", Answers("CA3"))
    assert admitted == Answer("<Response>CA3 token 1</Response>", repeat=False)
    # Capacity and draining are told first: they are what the operator acts on.
    calls.start_draining()
    pressure.loop_lag(1.0)
    assert calls.admit("CA4", Answers("CA4")) == Full("draining")


async def test_a_reload_applies_new_shedding_keys_and_keeps_the_lag_seen(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = loopback_config(
        port=8080, vapi_base_url="http://127.0.0.1:9", auth_token="t" * 32, api_key="k" * 16
    )
    config = config.evolve(server=attrs.evolve(config.server, shed_loop_lag_ms=50))
    async with httpx.AsyncClient() as http:
        services = build_services(config, http)
        pressure = services.registry.pressure
        assert pressure is not None and pressure.threshold_s == 0.050
        pressure.loop_lag(0.030)
        assert services.registry.refusal() is None
        stricter = attrs.evolve(config.server, shed_loop_lag_ms=20, shed_loop_lag_window_s=5.0)
        reloaded = build_services(
            config.evolve(server=stricter), http, registry=services.registry
        )
    assert reloaded.registry.pressure is pressure
    assert (pressure.threshold_s, pressure.window_s) == (0.020, 5.0)
    assert reloaded.registry.refusal() == Full("loop-behind", loop_lag_s=0.030)
