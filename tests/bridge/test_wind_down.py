"""How a call ends when it is cancelled from outside, or ended as it begins, on trio's
autojump clock: the assistant still gets its goodbye, the tracker the record, Twilio
its close, all within the wind-down's budget, and ``Cancelled`` still propagates.
"""

from __future__ import annotations

import trio
import trio.testing

from tests.bridge.peers import (
    FakeTwilio,
    FakeVapi,
    MemoryConnector,
    Tracker,
    connected_frame,
    start_frame,
    verify_token,
)
from tests.bridge.test_call import SETTINGS, start_vapi
from voicebridge.bridge.call import Call
from voicebridge.bridge.outcome import CallRecord, Outcome
from voicebridge.sockets import memory_socket_pair

ENDED = {"type": "status-update", "status": "ended", "endedReason": "assistant-ended-call"}


class DrainingTracker(Tracker):
    """A tracker past its drain deadline: a call that begins is ended at once
    (``registry.CallRegistry.begin`` does the same)."""

    def begin(self, call_sid: str, end: object) -> bool:
        super().begin(call_sid, end)
        assert callable(end)
        end(Outcome.SHUTDOWN, "drain deadline passed")
        return True


class CancelledCall:
    """One ``Call`` whose ``run`` the test cancels from outside."""

    def __init__(self, tracker: Tracker | None = None) -> None:
        bridge_side, twilio_side = memory_socket_pair()
        self.twilio = FakeTwilio(twilio_side)
        self.connector = MemoryConnector()
        self.tracker = tracker or Tracker()
        self.call = Call(
            bridge_side,
            settings=SETTINGS,
            connector=self.connector,
            verify_token=verify_token,
            tracker=self.tracker,
        )
        self.scope = trio.CancelScope()
        self.returned: CallRecord | None = None
        self.run_ended_at: float | None = None

    async def run(self) -> None:
        with self.scope:
            try:
                self.returned = await self.call.run()
            finally:
                self.run_ended_at = trio.current_time()

    async def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.run)
        nursery.start_soon(self.twilio.read)
        await self.twilio.socket.send(connected_frame())
        await self.twilio.socket.send(start_frame())

    @property
    def record(self) -> CallRecord:
        [record] = self.tracker.finished
        return record


async def test_a_call_cancelled_from_outside_says_goodbye_and_ends_as_stream_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = CancelledCall()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await run.start(nursery)
            nursery.start_soon(run.twilio.stream_media)
            vapi = await start_vapi(run.connector, nursery)
            await trio.sleep(2)
            cancelled_at = trio.current_time()
            run.scope.cancel()
    assert run.scope.cancelled_caught, "Cancelled propagated out of run()"
    assert run.returned is None
    assert run.record.outcome is Outcome.STREAM_LOST
    assert run.record.detail == "media socket closed by the peer or server"
    # The goodbye to the assistant, the record and Twilio's close: nothing waited.
    assert [message["type"] for _, message in vapi.text] == ["end-call"]
    assert vapi.closed_at == cancelled_at
    assert run.twilio.closed_at == cancelled_at
    assert run.run_ended_at == cancelled_at


async def test_a_call_cancelled_during_the_assistants_goodbye_keeps_its_normal_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = CancelledCall()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await run.start(nursery)
            nursery.start_soon(run.twilio.stream_media)
            vapi: FakeVapi = await start_vapi(run.connector, nursery)
            await vapi.speak(5000, paced=False)
            await vapi.send_json(ENDED)
            await trio.sleep(2)  # the goodbye is playing
            cancelled_at = trio.current_time()
            run.scope.cancel()
    assert run.scope.cancelled_caught
    assert run.record.outcome is Outcome.ASSISTANT_ENDED
    assert run.record.detail == "assistant-ended-call"
    # The assistant ended the call itself: it is not told to end it again.
    assert [message["type"] for _, message in vapi.text] == []
    assert run.twilio.closed_at == cancelled_at


async def test_a_call_ended_as_it_begins_winds_down_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = CancelledCall(DrainingTracker())
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            began_at = trio.current_time()
            await run.start(nursery)
    assert not run.scope.cancelled_caught
    assert run.returned == run.record
    assert run.record.outcome is Outcome.SHUTDOWN
    assert run.record.detail == "drain deadline passed"
    assert run.connector.peer is None, "no assistant socket was opened"
    assert run.twilio.closed_at == began_at
