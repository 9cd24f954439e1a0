"""A goodbye longer than every deadline stays a normal end, on trio's autojump clock.

The assistant may send its whole goodbye in one burst and end the call at once; the
caller then hears it for as long as it lasts. While it plays nobody reads the
assistant's socket, so liveness (ping/pong) must not be judged any more, and a drain
must let it finish rather than cut it into the fallback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from trio import Nursery

from tests.bridge.peers import (
    FakeTwilio,
    FakeVapi,
    MemoryConnector,
    connected_frame,
    start_frame,
    verify_token,
)
from tests.bridge.test_call import SETTINGS, run_call, settings_with, start_vapi
from voicebridge.bridge.call import Call, EndCall
from voicebridge.bridge.outcome import CallRecord, Outcome
from voicebridge.config import Config
from voicebridge.sockets import memory_socket_pair
from voicebridge.web import after_stream_twiml

#: Longer than the ping interval plus the pong deadline (5 + 2 s), the media
#: inactivity deadline (3 s) and the end deadline (1 s) of ``SETTINGS``.
GOODBYE_MS = 20_000
#: The assistant silence deadline: the derived one (45 s), and one the goodbye outlasts.
SILENCE_DEADLINES_S = [0.0, GOODBYE_MS / 1000 / 2]
ENDED = {"type": "status-update", "status": "ended", "endedReason": "assistant-ended-call"}


@pytest.mark.parametrize("silence_deadline_s", SILENCE_DEADLINES_S)
async def test_a_burst_goodbye_longer_than_every_deadline_is_heard_whole(
    autojump_clock: trio.testing.MockClock, silence_deadline_s: float
) -> None:
    seen: dict[str, float] = {}

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        seen["t0"] = trio.current_time()
        await vapi.speak(GOODBYE_MS, paced=False)
        await vapi.send_json(ENDED)
        # From here nothing on the bridge's side reads this socket until the goodbye
        # has played: over a real WebSocket no pong would be noticed.
        assert connector.peer is not None
        connector.peer.answers_pings = False

    settings = settings_with(vapi={"silence_deadline_s": silence_deadline_s})
    record, twilio, _ = await run_call(scenario, settings=settings)
    assert record.outcome is Outcome.ASSISTANT_ENDED
    assert record.detail == "assistant-ended-call"
    assert twilio.heard_bytes == GOODBYE_MS * 8
    # The goodbye plays in real time from the burst; the stream closes once the last
    # mark confirms it played.
    assert twilio.closed_at == pytest.approx(seen["t0"] + GOODBYE_MS / 1000, abs=0.2)
    assert "<Hangup" in after_stream_twiml(Config(), record.call_sid, record)


@pytest.mark.parametrize("silence_deadline_s", SILENCE_DEADLINES_S)
async def test_a_clean_close_after_a_long_goodbye_is_a_normal_end(
    autojump_clock: trio.testing.MockClock, silence_deadline_s: float
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.speak(GOODBYE_MS, paced=False)
        await vapi.socket.aclose(1000)

    settings = settings_with(vapi={"silence_deadline_s": silence_deadline_s})
    record, twilio, _ = await run_call(scenario, settings=settings)
    assert record.outcome is Outcome.ASSISTANT_ENDED
    assert twilio.heard_bytes == GOODBYE_MS * 8


class _Tracker:
    """Keeps each call's ``end``, as the registry does, so the test can drain."""

    def __init__(self) -> None:
        self.ends: list[EndCall] = []
        self.records: list[CallRecord] = []

    def begin(self, call_sid: str, end: EndCall) -> bool:
        self.ends.append(end)
        return True

    def finish(self, record: CallRecord) -> None:
        self.records.append(record)


async def drain_after(speak: Callable[[FakeVapi], Awaitable[None]]) -> tuple[
    CallRecord, FakeTwilio, float, float
]:
    """Run a call whose assistant does ``speak`` (from its first instant), then, 5 s
    later, end it as the drain deadline does: its record, Twilio's side, when
    ``speak`` returned, and what ``end`` answered (the goodbye left, in seconds)."""
    connector = MemoryConnector()
    bridge_side, twilio_side = memory_socket_pair()
    twilio = FakeTwilio(twilio_side)
    tracker = _Tracker()
    call = Call(
        bridge_side,
        settings=SETTINGS,
        connector=connector,
        verify_token=verify_token,
        tracker=tracker,
    )
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call.run)
            nursery.start_soon(twilio.read)
            await twilio.socket.send(connected_frame())
            await twilio.socket.send(start_frame())
            nursery.start_soon(twilio.stream_media)
            await speak(await start_vapi(connector, nursery))
            spoken_at = trio.current_time()
            await trio.sleep(5.0)
            [end] = tracker.ends
            left_s = end(Outcome.SHUTDOWN, "drain deadline passed")
    [record] = tracker.records
    return record, twilio, spoken_at, left_s


async def test_a_drain_during_the_goodbye_lets_it_finish_as_a_normal_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def goodbye(vapi: FakeVapi) -> None:
        await vapi.speak(GOODBYE_MS, paced=False)
        await vapi.send_json(ENDED)

    record, twilio, t_ended, left_s = await drain_after(goodbye)
    assert record.outcome is Outcome.ASSISTANT_ENDED
    assert twilio.heard_bytes == GOODBYE_MS * 8
    # What was left: the goodbye's 20 s from the burst, less the 5 s already played,
    # plus the slack for the last mark (GOODBYE_SLACK_S).
    assert left_s == pytest.approx(GOODBYE_MS / 1000 - 5.0 + 1.0, abs=0.2)
    assert twilio.closed_at == pytest.approx(t_ended + GOODBYE_MS / 1000, abs=0.2)


async def test_a_drain_before_the_assistant_ended_still_ends_the_call_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def long_turn(vapi: FakeVapi) -> None:
        await vapi.speak(GOODBYE_MS, paced=False)  # a long turn, not a goodbye

    record, twilio, spoken_at, left_s = await drain_after(long_turn)
    assert left_s == 0.0
    assert record.outcome is Outcome.SHUTDOWN
    assert twilio.closed_at == pytest.approx(spoken_at + 5.0, abs=0.1)
