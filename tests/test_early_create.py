"""The Vapi call created early (``voicebridge.bridge.early``, ``[vapi] create_early``).

Charter: the real Vapi connector against the simulated Vapi on loopback (port 0), the
real shared directory in ``tmp_path`` (two ``EarlyCalls`` on one directory are two
processes of a box, as ``SharedDir`` sees them), no mocks. The deadlines are short
real times (the simulated Vapi is a real server); every test is guarded by
``trio.fail_after``. What is asserted is what Vapi sees: how many calls it was asked
for, which of them ended, and how.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from voicebridge.boxstate import SharedDir
from voicebridge.bridge.assistant import VapiConnector
from voicebridge.bridge.early import EarlyCalls, EarlyConnector, EarlyFate
from voicebridge.config import VapiConfig
from voicebridge.loopback import loopback_config
from voicebridge.server import build_services
from voicebridge.sim.vapi import SimVapi, SimVapiBehaviour, SimVapiCallRecord
from voicebridge.twilio.token import StreamClaims
from voicebridge.vapi.client import VapiCall, VapiError, end_call

GUARD_S = 10.0
API_KEY = "test-key"
CALL_SID = "CA" + "0123456789abcdef" * 2
#: How long an early call waits for its stream here (``twilio.start_deadline_s``).
WAIT_S = 0.4
CLAIMS = StreamClaims(call_sid=CALL_SID, assistant="", caller="+15550001111", called="+15550002222")


@attrs.define
class Process:
    """One process of the box: its early calls and the connector its calls use."""

    early: EarlyCalls
    connector: EarlyConnector
    fates: list[EarlyFate]
    scope: trio.CancelScope


@attrs.define
class World:
    sim: SimVapi
    inner: VapiConnector
    nursery: trio.Nursery

    async def process(self, shared: SharedDir | None = None) -> Process:
        fates: list[EarlyFate] = []
        early = EarlyCalls(shared=shared, on_fate=fates.append)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await early.run(task_status=task_status)

        await self.nursery.start(run)
        connector = EarlyConnector(
            early, self.inner, wait_s=WAIT_S, create_deadline_s=2.0, end_deadline_s=1.0
        )
        return Process(early, connector, fates, scope)

    def calls_for(self, call_sid: str = CALL_SID) -> list[SimVapiCallRecord]:
        return [call for call in self.sim.calls.values() if call.call_sid == call_sid]


@pytest.fixture
async def world(nursery: trio.Nursery) -> AsyncIterator[World]:
    sim = SimVapi(API_KEY)
    await nursery.start(sim.serve)
    async with httpx.AsyncClient() as http:
        config = VapiConfig(base_url=sim.base_url, assistant_id="asst-1")
        yield World(sim, VapiConnector(http, config, API_KEY), nursery)


async def stream_create(process: Process) -> VapiCall:
    """What the stream's ``Call`` does: create (or take) its assistant call."""
    call = await process.connector.create(
        call_sid=CALL_SID, caller=CLAIMS.caller, called=CLAIMS.called
    )
    assert isinstance(call, VapiCall)
    return call


async def talk_and_end(process: Process, call: VapiCall) -> None:
    """The stream's call connects its socket and, later, ends it."""
    async with process.connector.connect(call) as socket:
        await end_call(socket, deadline_s=1.0)


async def test_the_stream_takes_the_call_created_while_twilio_set_it_up(world: World) -> None:
    with trio.fail_after(GUARD_S):
        process = await world.process()
        assert process.connector.start_early(CLAIMS)
        await trio.sleep(0.1)  # Twilio sets up the stream meanwhile
        [created] = world.calls_for()
        call = await stream_create(process)
        assert call.id == created.id
        assert created.connected_at is None  # only the create is early
        await talk_and_end(process, call)
        await created.wait_ended()
        assert len(world.sim.create_attempts) == 1
        assert process.fates == ["taken"]
        assert process.early.pending == 0


async def test_a_stream_before_the_create_answered_waits_for_it(world: World) -> None:
    world.sim.behaviour = SimVapiBehaviour(create_delay_s=0.2)
    with trio.fail_after(GUARD_S):
        process = await world.process()
        process.connector.start_early(CLAIMS)
        call = await stream_create(process)  # at once: the create is in flight
        assert [c.id for c in world.calls_for()] == [call.id]
        await talk_and_end(process, call)
        assert len(world.sim.create_attempts) == 1


async def test_a_repeated_webhook_creates_no_second_call(world: World) -> None:
    with trio.fail_after(GUARD_S):
        process = await world.process()
        assert process.connector.start_early(CLAIMS)
        assert not process.connector.start_early(CLAIMS)
        call = await stream_create(process)
        await talk_and_end(process, call)
        assert len(world.sim.create_attempts) == 1


async def test_a_call_no_stream_takes_is_ended_counted_and_logged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(GUARD_S):
        process = await world.process()
        started = trio.current_time()
        process.connector.start_early(CLAIMS)
        await trio.sleep(0.05)
        [created] = world.calls_for()
        await created.wait_ended()
        assert trio.current_time() - started >= WAIT_S
        assert created.end_call_received_at is not None  # said goodbye, not dropped
        assert process.fates == ["unused"]
        assert process.early.pending == 0
    [line] = [r for r in caplog.records if getattr(r, "EVENT", None) == "early-call-unused"
              or "no media stream took" in r.getMessage()]
    assert CALL_SID in line.getMessage()


async def test_a_stream_after_the_wait_gets_a_new_call_after_the_first_ended(
    world: World,
) -> None:
    with trio.fail_after(GUARD_S):
        process = await world.process()
        process.connector.start_early(CLAIMS)
        await trio.sleep(0.05)
        [first] = world.calls_for()
        await first.wait_ended()
        call = await stream_create(process)
        assert call.id != first.id
        second = world.sim.calls[call.id]
        assert first.ended_at is not None and first.ended_at <= second.created_at
        await talk_and_end(process, call)


async def test_the_stream_lands_on_another_process(world: World, tmp_path: Path) -> None:
    with trio.fail_after(GUARD_S):
        webhook = await world.process(SharedDir(tmp_path))
        stream = await world.process(SharedDir(tmp_path))
        assert webhook.connector.start_early(CLAIMS)
        call = await stream_create(stream)  # waits across the directory for the create
        [created] = world.calls_for()
        assert call.id == created.id
        async with stream.connector.connect(call) as socket:
            await trio.sleep(WAIT_S + 0.2)  # the webhook's process must leave it alone
            assert created.end_call_received_at is None and created.ended_at is None
            await end_call(socket, deadline_s=1.0)
        assert webhook.fates == ["taken"]
        assert len(world.sim.create_attempts) == 1
        assert list((tmp_path / "early").iterdir()) == []


async def test_a_drain_before_the_stream_ends_the_call(world: World, tmp_path: Path) -> None:
    with trio.fail_after(GUARD_S):
        webhook = await world.process(SharedDir(tmp_path))
        other = await world.process(SharedDir(tmp_path))
        webhook.connector.start_early(CLAIMS)
        await trio.sleep(0.1)
        [first] = world.calls_for()
        webhook.scope.cancel()  # the process stops (its drain is over)
        await first.wait_ended()
        assert first.end_call_received_at is not None
        assert webhook.fates == ["unused"]
        # The stream, late, on another process: a call of its own, the first one over.
        call = await stream_create(other)
        assert call.id != first.id
        await talk_and_end(other, call)


async def test_a_failed_early_create_lets_the_stream_create_its_own(world: World) -> None:
    world.sim.behaviour_for = lambda order, _sid: SimVapiBehaviour(
        refuse_create=500 if order == 0 else None
    )
    with trio.fail_after(GUARD_S):
        process = await world.process()
        process.connector.start_early(CLAIMS)
        call = await stream_create(process)
        assert [a.status for a in world.sim.create_attempts] == [500, 201]
        assert process.fates == ["failed"]
        await talk_and_end(process, call)


async def test_nothing_is_created_early_when_the_box_cannot_be_told(
    world: World, tmp_path: Path
) -> None:
    shared = SharedDir(tmp_path)
    with trio.fail_after(GUARD_S):
        process = await world.process(shared)
        (tmp_path / "early").rmdir()  # the directory fails: another process would not know
        assert not process.connector.start_early(CLAIMS)
        await trio.sleep(0.05)
        assert world.sim.create_attempts == []


async def test_the_simulated_vapi_ends_an_unconnected_call_when_told_to(world: World) -> None:
    world.sim.behaviour = SimVapiBehaviour(unconnected_timeout_s=0.2)
    with trio.fail_after(GUARD_S):
        process = await world.process()
        process.connector.start_early(CLAIMS)
        await trio.sleep(0.05)
        [created] = world.calls_for()
        await created.wait_ended()
        assert created.ended_reason == "silence-timed-out"
        call = VapiCall(id=created.id, websocket_url=f"ws://127.0.0.1:{world.sim.port}/"
                        f"{created.id}/transport")
        with pytest.raises(VapiError):
            async with process.connector.connect(call):
                pass  # pragma: no cover - the connect is refused


def test_the_shared_directory_hands_an_early_call_to_one_process(tmp_path: Path) -> None:
    now = [1_000_000.0]
    first, second = (SharedDir(tmp_path, clock=lambda: now[0]) for _ in "ab")
    assert first.publish_early_call(CALL_SID, b"creating", first=True)
    assert not second.publish_early_call(CALL_SID, b"mine", first=True)
    assert first.publish_early_call(CALL_SID, b"ready", first=False)
    assert second.load_early_call(CALL_SID) == b"ready"
    assert second.take_early_call(CALL_SID) == b"ready"
    assert first.take_early_call(CALL_SID) is None
    assert first.failures == second.failures == 0
    # One a dead process left behind is swept, in time.
    assert first.publish_early_call(CALL_SID, b"ready", first=True)
    assert first.sweep() == 0
    now[0] += 601
    assert first.sweep() == 1
    assert second.load_early_call(CALL_SID) is None


async def test_after_a_reload_turns_it_off_the_stream_still_takes_its_early_call(
    world: World,
) -> None:
    config = loopback_config(
        port=1, vapi_base_url=world.sim.base_url, auth_token="t", api_key=API_KEY
    )
    with trio.fail_after(GUARD_S):
        process = await world.process()
        on = config.evolve(vapi=attrs.evolve(config.vapi, create_early=True))
        async with httpx.AsyncClient() as http:
            before = build_services(on, http, connector=world.inner, early=process.early)
            assert before.early is not None and before.early.start_early(CLAIMS)
            after = build_services(config, http, connector=world.inner, early=process.early)
            assert after.early is None  # no new call is created early
            call = await after.connector.create(
                call_sid=CALL_SID, caller=CLAIMS.caller, called=CLAIMS.called
            )
        assert isinstance(call, VapiCall)
        assert [c.id for c in world.calls_for()] == [call.id]
        await talk_and_end(process, call)
