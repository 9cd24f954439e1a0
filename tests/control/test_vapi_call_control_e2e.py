"""Vapi's own call-control webhooks end to end on loopback: ``transfer-destination-request``
and ``phone-call-control`` (``forward``, ``hang-up``), for a call this process holds and
for one another process holds (through the simulated Twilio REST API).

The simulated Vapi's record of each live call gives the webhook what Vapi would send:
the call's id and ``assistantOverrides`` (its CallSid in the metadata), posted to the
call's ``server.url`` and signed with its credential. Each message arrives while the
assistant is speaking, so the test shows that turn playing to its end first.

Charter: as ``test_webhook_e2e``: loopback only, port 0, a ``trio.fail_after`` guard,
calls that can share a server run at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio

from tests.control.test_webhook_e2e import (
    HMAC_CREDENTIAL,
    HUMAN,
    OTHER_DESK,
    sections,
    speech_span_ms,
    wait_for,
)
from tests.harness import SHORT_ASSISTANT, Bridge, running_bridge
from voicebridge.bridge.outcome import Outcome
from voicebridge.config import Secret
from voicebridge.control.routes import vapi_server_override
from voicebridge.observability.logs import record_fields
from voicebridge.sim.caller import CallReport, place_call
from voicebridge.sim.server_messages import SimServerCredential, auth_headers
from voicebridge.sim.twilio_rest import SimTwilioRest
from voicebridge.sim.vapi import ENDED_CUSTOMER, SimVapiCallRecord

#: The assistant greets (3.7 s) and then waits: the callers here never speak.
GREETER = attrs.evolve(SHORT_ASSISTANT, greeting_clip="greeting")
NOT_ALLOWED = "+15559999999"
REFUSED = {"error": "that destination is not an allowed transfer target"}


def forward(number: str) -> dict[str, Any]:
    return {
        "type": "phone-call-control",
        "request": "forward",
        "destination": {"type": "number", "number": number},
    }


HANG_UP: Mapping[str, Any] = {"type": "phone-call-control", "request": "hang-up"}
DESTINATION_REQUEST: Mapping[str, Any] = {"type": "transfer-destination-request"}


async def post_server_message(
    vapi_call: SimVapiCallRecord,
    message: Mapping[str, Any],
    *,
    server: Mapping[str, Any] | None = None,
    credential: SimServerCredential | None = None,
) -> tuple[int, Any]:
    """POST ``message`` about ``vapi_call`` as Vapi does: to the call's server URL, signed
    with its credential (or to ``server`` with ``credential``); (status, answer)."""
    if server is None:
        server, credential = vapi_call.overrides["server"], vapi_call.server_credential
    call = vapi_call.call_object()
    body = orjson.dumps(
        {"message": {**message, "timestamp": int(time.time() * 1000), "call": call}}
    )
    headers = auth_headers(server, credential, body, now=time.time())
    headers["Content-Type"] = "application/json"
    async with httpx.AsyncClient() as http:
        response = await http.post(server["url"], content=body, headers=headers)
    return response.status_code, response.json()


def greeting_of(bridge: Bridge, call_sid: str) -> SimVapiCallRecord | None:
    """The call's Vapi record once its greeting is being sent, else None."""
    for vapi_call in bridge.vapi.calls.values():
        if vapi_call.call_sid == call_sid and vapi_call.turns and vapi_call.turns[0].sent_bytes:
            return vapi_call
    return None


@attrs.frozen
class Controlled:
    """A call that got webhooks mid-greeting: what the caller, the bridge and Vapi saw."""

    report: CallReport
    vapi_call: SimVapiCallRecord
    answers: list[tuple[int, Any]]
    #: Bytes of the greeting Vapi had sent when the first webhook was answered.
    greeting_sent_then: int


async def control_mid_greeting(
    bridge: Bridge, call_sid: str, messages: list[Mapping[str, Any]]
) -> Controlled:
    """Place a call that only listens; post ``messages`` while the greeting plays."""
    reports: list[CallReport] = []

    async def call() -> None:
        reports.append(await place_call(bridge.caller, (), call_sid=call_sid))

    async with trio.open_nursery() as call_nursery:
        call_nursery.start_soon(call)
        await wait_for(lambda: greeting_of(bridge, call_sid) is not None)
        vapi_call = greeting_of(bridge, call_sid)
        assert vapi_call is not None
        answers = [await post_server_message(vapi_call, message) for message in messages]
        sent_then = vapi_call.turns[0].sent_bytes
    return Controlled(reports[0], vapi_call, answers, sent_then)


def assert_greeting_played_to_its_end(controlled: Controlled) -> None:
    """The webhook came mid-greeting, and the caller still heard all of it, uncut."""
    greeting = controlled.vapi_call.turns[0]
    assert controlled.greeting_sent_then < greeting.total_bytes, "the webhook came mid-turn"
    [heard] = controlled.report.turns
    assert not heard.interrupted
    assert heard.heard_ms >= speech_span_ms("greeting") - 40
    vapi_call = controlled.vapi_call
    assert greeting.finished_at is not None and vapi_call.end_call_received_at is not None
    assert vapi_call.end_call_received_at > greeting.finished_at, "Vapi ended after the goodbye"


def assert_vapi_leg_ended(vapi_call: SimVapiCallRecord) -> None:
    assert vapi_call.end_call_received_at is not None, "the bridge sent end-call"
    assert (vapi_call.ended_reason, vapi_call.close_code) == (ENDED_CUSTOMER, 1000)


async def test_vapi_transfer_and_hang_up_requests_for_a_call_held_here(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three calls at once: Vapi asks where to transfer, then forwards there (its order
    when ``phone-call-control`` is subscribed); forwards (one refused first); hangs up.
    Each after the assistant's words in progress have played."""
    asked, forwarded, hung_up = ("CA" + digit * 32 for digit in "678")
    plans: dict[str, list[Mapping[str, Any]]] = {
        asked: [DESTINATION_REQUEST, forward(HUMAN)],
        forwarded: [forward(NOT_ALLOWED), forward(OTHER_DESK)],
        hung_up: [HANG_UP],
    }
    done: dict[str, Controlled] = {}
    with trio.fail_after(20):
        async with running_bridge(behaviour=GREETER, **sections("hmac")) as bridge:
            bridge.vapi.credentials["cred-1"] = HMAC_CREDENTIAL

            async def run(sid: str) -> None:
                done[sid] = await control_mid_greeting(bridge, sid, plans[sid])

            with caplog.at_level(logging.INFO, logger="voicebridge.control.plane"):
                async with trio.open_nursery() as calls_nursery:
                    for sid in plans:
                        calls_nursery.start_soon(run, sid)
            records = {sid: bridge.record(sid) for sid in plans}
    # The call-control events (the simulated Vapi's status and report webhooks log too).
    events = [
        fields
        for fields in map(record_fields, caplog.records)
        if fields.get("EVENT") in ("call-handover", "transfer-refused")
    ]

    # transfer-destination-request: Vapi is told the default destination; its forward
    # there is the same handover (acknowledged, not done twice); the caller is dialled
    # there once the greeting has played; the Vapi leg is ended.
    call = done[asked]
    assert call.answers == [(200, {"destination": {"type": "number", "number": HUMAN}}), (200, {})]
    assert_greeting_played_to_its_end(call)
    assert (call.report.final_action, call.report.final_dial) == ("dial", HUMAN)
    assert (records[asked].outcome, records[asked].transfer_to) == (Outcome.TRANSFERRED, HUMAN)
    assert_vapi_leg_ended(call.vapi_call)

    # phone-call-control forward: outside the allow-list refused (the call goes on), then
    # an allowed number: dialled after the greeting.
    call = done[forwarded]
    assert call.answers == [(200, REFUSED), (200, {})]
    assert_greeting_played_to_its_end(call)
    assert (call.report.final_action, call.report.final_dial) == ("dial", OTHER_DESK)
    assert records[forwarded].transfer_to == OTHER_DESK
    assert_vapi_leg_ended(call.vapi_call)

    # phone-call-control hang-up: the greeting plays, then both legs end cleanly.
    call = done[hung_up]
    assert call.answers == [(200, {})]
    assert_greeting_played_to_its_end(call)
    assert (call.report.final_action, call.report.final_dial) == ("hangup", "")
    assert (call.report.ended_by, call.report.close_code) == ("server", 1000)
    assert call.report.protocol_violations == []
    assert records[hung_up].outcome is Outcome.ENDED_BY_CONTROL
    assert_vapi_leg_ended(call.vapi_call)

    # One log line for the refusal and one for each handover.
    assert sorted((e["EVENT"], e["CALL_SID"], e.get("DESTINATION", "")) for e in events) == [
        ("call-handover", asked, HUMAN),
        ("call-handover", forwarded, OTHER_DESK),
        ("call-handover", hung_up, ""),
        ("transfer-refused", forwarded, NOT_ALLOWED),
    ]


async def test_vapi_transfer_and_hang_up_requests_for_a_call_held_elsewhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The webhooks reach a process that does not hold the calls: it moves them through
    Twilio's REST API by CallSid, once each; the holder sees Twilio stop the stream."""
    rest = SimTwilioRest()
    asked, hung_up = "CA" + "a" * 32, "CA" + "b" * 32
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(rest.serve)
            twilio = {"rest_base_url": rest.base_url}
            async with running_bridge(
                behaviour=GREETER, twilio=twilio, **sections("bearer")
            ) as holder:
                rest.settings = holder.caller
                other_sections = sections("bearer")
                other_sections["credentials"]["twilio_auth_token"] = Secret(
                    holder.caller.auth_token
                )
                async with running_bridge(twilio=twilio, **other_sections) as other:
                    server = vapi_server_override(other.config)
                    assert server is not None
                    answers: dict[str, list[tuple[int, Any]]] = {}
                    vapi_calls: dict[str, SimVapiCallRecord] = {}

                    async def run(sid: str, messages: list[Mapping[str, Any]]) -> None:
                        async with trio.open_nursery() as call_nursery:
                            call_nursery.start_soon(partial(rest.place_inbound, (), call_sid=sid))
                            await wait_for(lambda: greeting_of(holder, sid) is not None)
                            vapi_call = greeting_of(holder, sid)
                            assert vapi_call is not None
                            vapi_calls[sid] = vapi_call
                            answers[sid] = [
                                await post_server_message(vapi_call, message, server=server)
                                for message in messages
                            ]

                    with caplog.at_level(logging.INFO, logger="voicebridge.control.plane"):
                        async with trio.open_nursery() as calls_nursery:
                            calls_nursery.start_soon(
                                run, asked, [DESTINATION_REQUEST, forward(HUMAN)]
                            )
                            calls_nursery.start_soon(run, hung_up, [HANG_UP, HANG_UP])
                    registry = holder.listening.registry
                    await wait_for(
                        lambda: all(registry.record_for(sid) for sid in (asked, hung_up))
                    )
                    for vapi_call in vapi_calls.values():
                        await vapi_call.wait_ended()
                    records = {sid: holder.record(sid) for sid in (asked, hung_up)}
            nursery.cancel_scope.cancel(reason="the simulated REST API is no longer needed")
    # The handovers (the simulated Vapi's status and report webhooks log too).
    lines = sorted(
        r.getMessage()
        for r in caplog.records
        if r.name == "voicebridge.control.plane"
        and record_fields(r).get("EVENT") not in ("vapi-status", "vapi-call-report")
    )

    # Asked, then forwarded to the same number; hung up twice (a retry): one handover each.
    assert answers[asked] == [
        (200, {"destination": {"type": "number", "number": HUMAN}}),
        (200, {}),
    ]
    assert answers[hung_up] == [(200, {}), (200, {})]
    assert lines == [
        f"call {asked}: transferred requested (Twilio REST) to {HUMAN}",
        f"call {hung_up}: ended-by-control requested (Twilio REST)",
    ]
    assert rest.transfers == [(asked, HUMAN)]
    assert [(u.call_sid, u.kind, u.value) for u in rest.updates if u.call_sid == hung_up] == [
        (hung_up, "status", "completed")
    ]
    assert (rest.reports[asked].rest_update, rest.reports[asked].final_dial) == (
        "redirect",
        HUMAN,
    )
    assert rest.reports[hung_up].rest_update == "completed"
    # Twilio stopped each stream; the holder ended each Vapi leg.
    for sid in (asked, hung_up):
        assert records[sid].outcome is Outcome.CALLER_HUNG_UP
        assert_vapi_leg_ended(vapi_calls[sid])
