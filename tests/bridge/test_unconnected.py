"""A call that ends before its assistant socket opened still ends its Vapi call.

Charter: the real ``Call`` over a memory Twilio socket (``peers.py``), with the real
Vapi connector against the simulated Vapi on loopback (port 0), every test on trio's
autojump clock (loopback I/O takes no virtual time), asserting exact virtual times.
The simulated Vapi holds the socket's upgrade (``upgrade_delay_s``), so the caller
hangs up while the bridge is still connecting, or the connect times out. What is
asserted is what Vapi saw (whether, when and how its call was ended), when Twilio was
let go, and the log line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import trio
import trio.testing

from tests.bridge.peers import (
    CALL_SID,
    FakeTwilio,
    Tracker,
    connected_frame,
    start_frame,
    stop_frame,
    verify_token,
)
from tests.bridge.test_call import settings_with
from voicebridge.bridge.assistant import VapiConnector
from voicebridge.bridge.call import Call
from voicebridge.bridge.outcome import CallRecord, Outcome
from voicebridge.config import VapiConfig
from voicebridge.observability.logs import FieldValue, record_fields
from voicebridge.sim.vapi import ENDED_CUSTOMER, SimVapi, SimVapiBehaviour, SimVapiCallRecord
from voicebridge.sockets import memory_socket_pair

API_KEY = "test-key"
#: The call's end deadline: the whole of the goodbye to a call whose socket never opened.
END_DEADLINE_S = 2.0
CONNECT_DEADLINE_S = 1.5
#: How long the simulated Vapi holds each upgrade of the call's socket.
HOLD_S = 1.0
#: When the caller hangs up, after the Vapi call's create: while the upgrade is held.
HANG_UP_S = 0.5
SETTINGS = settings_with(vapi={"end_deadline_s": END_DEADLINE_S})

Events = Callable[[str], list[dict[str, FieldValue]]]


@pytest.fixture
async def sim(nursery: trio.Nursery) -> SimVapi:
    sim = SimVapi(API_KEY)
    await nursery.start(sim.serve)
    return sim


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Events:
    """The fields of every log line of one ``EVENT``."""
    caplog.set_level(logging.INFO, logger="voicebridge")

    def of(name: str) -> list[dict[str, FieldValue]]:
        lines = [dict(record_fields(r)) for r in caplog.records]
        return [line for line in lines if line.get("EVENT") == name]

    return of


async def run_call(
    sim: SimVapi, http: httpx.AsyncClient, *, hang_up_s: float | None = HANG_UP_S
) -> tuple[CallRecord, FakeTwilio, SimVapiCallRecord]:
    """One call through the real connector; the caller hangs up ``hang_up_s`` after the
    stream's start, when the Vapi call is created (None: never; the call ends itself)."""
    config = VapiConfig(
        base_url=sim.base_url,
        assistant_id="asst-1",
        connect_deadline_s=CONNECT_DEADLINE_S,
        end_deadline_s=END_DEADLINE_S,
    )
    bridge_side, twilio_side = memory_socket_pair()
    twilio = FakeTwilio(twilio_side)
    tracker = Tracker()
    call = Call(
        bridge_side,
        settings=SETTINGS,
        connector=VapiConnector(http, config, API_KEY),
        verify_token=verify_token,
        tracker=tracker,
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call.run)
            nursery.start_soon(twilio.read)
            await twilio.socket.send(connected_frame())
            await twilio.socket.send(start_frame())
            if hang_up_s is not None:
                await trio.sleep(hang_up_s)
                await twilio.socket.send(stop_frame(twilio.next_seq()))
    [record] = tracker.finished
    [vapi_call] = sim.calls.values()
    assert vapi_call.call_sid == CALL_SID
    return record, twilio, vapi_call


async def test_a_hang_up_while_connecting_ends_the_vapi_call_through_its_control_url(
    autojump_clock: trio.testing.MockClock, sim: SimVapi, http: httpx.AsyncClient, events: Events
) -> None:
    sim.behaviour = SimVapiBehaviour(upgrade_delay_s=HOLD_S)
    record, twilio, vapi_call = await run_call(sim, http)
    hung_up_at = vapi_call.created_at + HANG_UP_S
    assert record.outcome is Outcome.CALLER_HUNG_UP
    # Ended at the hang-up, by the bridge's end-call, never connected.
    assert vapi_call.end_call_received_at == vapi_call.ended_at == hung_up_at
    assert vapi_call.ended_reason == ENDED_CUSTOMER
    assert vapi_call.control_posts == [{"type": "end-call"}]
    assert vapi_call.connected_at is None
    assert twilio.closed_at == hung_up_at
    [line] = events("unconnected-call-ended")
    assert (line["CALL_SID"], line["VAPI_CALL_ID"], line["VIA"]) == (
        CALL_SID, vapi_call.id, "control"
    )
    assert events("unconnected-call-end-failed") == []


@pytest.mark.parametrize(
    "behaviour",
    [
        SimVapiBehaviour(upgrade_delay_s=HOLD_S, control_url_in_answer=False),
        # A Vapi whose Live Call Control does not take a call still queued.
        SimVapiBehaviour(upgrade_delay_s=HOLD_S, control_ends_queued=False),
    ],
    ids=["no control URL", "the control URL refuses"],
)
async def test_without_the_control_url_the_bridge_connects_to_say_end_call(
    autojump_clock: trio.testing.MockClock,
    sim: SimVapi,
    http: httpx.AsyncClient,
    events: Events,
    behaviour: SimVapiBehaviour,
) -> None:
    sim.behaviour = behaviour
    record, twilio, vapi_call = await run_call(sim, http)
    assert record.outcome is Outcome.CALLER_HUNG_UP
    # The abandoned upgrade connected nothing; the bridge's second one is held as long,
    # then says end-call at once: within the end deadline of the hang-up.
    goodbye_at = vapi_call.created_at + HANG_UP_S + HOLD_S
    assert vapi_call.connected_at == vapi_call.end_call_received_at == goodbye_at
    assert vapi_call.ended_reason == ENDED_CUSTOMER
    assert vapi_call.control_posts == []  # none, or refused: not taken
    assert vapi_call.caller_audio_bytes == 0
    assert twilio.closed_at == goodbye_at  # the goodbye first, within its deadline
    [line] = events("unconnected-call-ended")
    assert line["VIA"] == "socket"
    assert events("unconnected-call-end-failed") == []


async def test_a_connect_vapi_never_answers_ends_the_call_through_its_control_url(
    autojump_clock: trio.testing.MockClock, sim: SimVapi, http: httpx.AsyncClient
) -> None:
    sim.behaviour = SimVapiBehaviour(upgrade_delay_s=math.inf)
    record, twilio, vapi_call = await run_call(sim, http, hang_up_s=None)
    failed_at = vapi_call.created_at + CONNECT_DEADLINE_S
    assert (record.outcome, record.leg_failure) == (Outcome.ASSISTANT_LEG_FAILED, "timeout")
    assert vapi_call.end_call_received_at == failed_at
    assert vapi_call.control_posts == [{"type": "end-call"}]
    assert twilio.closed_at == failed_at


async def test_a_connect_vapi_never_answers_is_not_tried_again_to_end_the_call(
    autojump_clock: trio.testing.MockClock, sim: SimVapi, http: httpx.AsyncClient
) -> None:
    # Without a control URL the only way is the socket that just failed: the caller's
    # fallback is not held back for a second try.
    sim.behaviour = SimVapiBehaviour(upgrade_delay_s=math.inf, control_url_in_answer=False)
    record, twilio, vapi_call = await run_call(sim, http, hang_up_s=None)
    assert record.outcome is Outcome.ASSISTANT_LEG_FAILED
    assert twilio.closed_at == vapi_call.created_at + CONNECT_DEADLINE_S
    assert vapi_call.ended_at is None and vapi_call.connected_at is None


async def test_a_goodbye_vapi_refuses_is_logged_and_the_call_ends_all_the_same(
    autojump_clock: trio.testing.MockClock, sim: SimVapi, http: httpx.AsyncClient, events: Events
) -> None:
    # Vapi ended the call by itself before the hang-up: the control URL answers 400, and
    # so does the socket tried next, once its held upgrade is answered.
    sim.behaviour = SimVapiBehaviour(upgrade_delay_s=HOLD_S, unconnected_timeout_s=0.2)
    record, twilio, vapi_call = await run_call(sim, http)
    assert record.outcome is Outcome.CALLER_HUNG_UP
    assert twilio.closed_at == vapi_call.created_at + HANG_UP_S + HOLD_S
    assert vapi_call.end_call_received_at is None
    assert events("unconnected-call-ended") == []
    [line] = events("unconnected-call-end-failed")
    assert "control URL: " in str(line["DETAIL"]) and "socket: " in str(line["DETAIL"])
    assert "HTTP 400: Call is not in progress." in str(line["DETAIL"])
    assert line["VAPI_CALL_ID"] == vapi_call.id
