"""Several calls at once over memory sockets, on trio's autojump clock.

For faults that need long stretches of time (a 30 s burst, a silent minute, a write
stuck for seconds) at exact virtual times. Each call is the real ``Call`` with the
in-memory peers of ``tests/bridge/peers.py``; all calls share one clock, so a test
can check that one call's fault does not shift another call's timing by a tick.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import attrs
import trio

from tests.bridge.peers import (
    FakeTwilio,
    FakeVapi,
    MemoryConnector,
    Tracker,
    connected_frame,
    start_frame,
    verify_token,
)
from tests.bridge.test_call import settings_with
from voicebridge.bridge.call import AssistantConnector, Call, CallSettings
from voicebridge.bridge.outcome import CallRecord
from voicebridge.sockets import memory_socket_pair

#: The settings of every call here: the call-nursery tests' with the deadlines of
#: ``config.py``'s defaults.
SETTINGS = settings_with(
    twilio={"media_inactivity_s": 5.0}, vapi={"pong_deadline_s": 3.0, "end_deadline_s": 2.0}
)


@attrs.define
class MemoryCallRun:
    """One call of a run: its peers, and its record once it ended."""

    twilio: FakeTwilio
    connector: MemoryConnector
    call: Call | None = None
    record: CallRecord | None = None

    async def vapi(self, nursery: trio.Nursery, *, read: bool = True) -> FakeVapi:
        """Wait for the Vapi socket; a ``FakeVapi`` on it, reading unless told not to."""
        await self.connector.opened.wait()
        assert self.connector.peer is not None
        vapi = FakeVapi(self.connector.peer)
        if read:
            nursery.start_soon(vapi.read)
        return vapi


#: What a test does with one call: it plays both peers from the stream's start on.
Scenario = Callable[[MemoryCallRun, trio.Nursery], Awaitable[None]]


@attrs.frozen
class CallSpec:
    """One call to run: its scenario, and how its peers behave at the socket level."""

    scenario: Scenario
    #: Messages in flight each way on the Twilio socket (``math.inf``: unbounded).
    twilio_buffer: float = math.inf
    #: Whether Twilio reads what the bridge sends (marks are echoed as they play).
    twilio_reads: bool = True
    connector: Callable[[], MemoryConnector] = MemoryConnector


async def run_calls(
    specs: Sequence[CallSpec], *, settings: CallSettings = SETTINGS
) -> list[MemoryCallRun]:
    """Run one call per spec, all at once on the current clock, until every one ended.

    Each call's stream starts (``connected`` + ``start``) at the same instant; then
    its scenario plays both peers. Returns the runs, records filled in.
    """
    runs: list[MemoryCallRun] = []
    with trio.fail_after(3600):
        async with trio.open_nursery() as calls_nursery:
            for spec in specs:
                runs.append(await calls_nursery.start(_one_call, spec, settings))
    for run in runs:
        assert run.record is not None
    return runs


async def _one_call(
    spec: CallSpec,
    settings: CallSettings,
    *,
    task_status: trio.TaskStatus[MemoryCallRun] = trio.TASK_STATUS_IGNORED,
) -> None:
    bridge_side, twilio_side = memory_socket_pair(spec.twilio_buffer)
    run = MemoryCallRun(FakeTwilio(twilio_side), spec.connector())
    tracker = Tracker()
    run.call = call = Call(
        bridge_side,
        settings=settings,
        connector=cast(AssistantConnector, run.connector),
        verify_token=verify_token,
        tracker=tracker,
    )

    async def run_call() -> None:
        run.record = await call.run()

    async with trio.open_nursery() as call_nursery:
        call_nursery.start_soon(run_call)
        if spec.twilio_reads:
            call_nursery.start_soon(run.twilio.read)
        await run.twilio.socket.send(connected_frame())
        await run.twilio.socket.send(start_frame())
        task_status.started(run)
        await spec.scenario(run, call_nursery)
    assert tracker.finished == [run.record]
