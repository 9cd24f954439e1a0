"""Routes end to end on loopback: the real server, the simulated Twilio caller dialling
different numbers, the simulated Vapi, and a decision hook server; real time.

Two numbers reach two assistants; a third is dialled straight to a person; the hook
decides a call of a known caller; everything the stream carried was under the token.
"""

from __future__ import annotations

import logging
import secrets

import attrs
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import SHORT_ASSISTANT, running_bridge
from tests.test_admission_e2e import (
    CapturedWebhook,
    assistant_calls,
    start_stream,
    stream_parameters,
)
from voicebridge.bridge.outcome import Outcome
from voicebridge.config import RouteConfig, RouteHookConfig, Secret
from voicebridge.observability.logs import record_fields
from voicebridge.routing import AssistantChoice, decision_parameters, encode_decision
from voicebridge.sim.caller import (
    CallReport,
    SimTwilioSettings,
    Speak,
    WaitForAssistantDone,
    place_call,
)
from voicebridge.sim.route_hook import SimRouteHook

SALES = "+15550001111"
SUPPORT = "+15550002222"
NIGHT = "+15550003333"
HUMAN = "+15550009999"
VIP = "+15557770000"
PREMIUM = "+19005550000"
#: Hear the greeting, say something, hear the goodbye (the assistant ends the call).
SCRIPT = (WaitForAssistantDone(quiet_s=0.4), Speak("caller_2"), WaitForAssistantDone(quiet_s=0.4))
ROUTES = (
    RouteConfig(name="sales", to=(SALES,), assistant_id="asst-sales"),
    RouteConfig(
        name="support",
        to=(SUPPORT,),
        assistant_id="asst-support",
        assistant_overrides={"variableValues": {"team": "support"}, "firstMessage": "Support!"},
    ),
    RouteConfig(name="night", to=(NIGHT,), dial=HUMAN, ask_hook=False),
    RouteConfig(name="blocked", callers=("+1900*",), refuse=True, ask_hook=False),
)
ASSISTANT = attrs.evolve(SHORT_ASSISTANT, end_after_replies=0)


async def calls(dialled: list[SimTwilioSettings]) -> list[CallReport]:
    """One call per settings, all at once; their reports in the same order."""
    reports: dict[int, CallReport] = {}

    async def one(index: int, settings: SimTwilioSettings) -> None:
        reports[index] = await place_call(settings, SCRIPT)

    async with trio.open_nursery() as nursery:
        for index, settings in enumerate(dialled):
            nursery.start_soon(one, index, settings)
    return [reports[i] for i in range(len(dialled))]


async def routed_counts(ops_url: str) -> dict[tuple[str, str, str], float]:
    async with httpx.AsyncClient() as http:
        text = (await http.get(ops_url + "/metrics")).text
    counts: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "voicebridge_calls_routed_total":
                counts[(s.labels["route"], s.labels["action"], s.labels["by"])] = s.value
            if s.name == "voicebridge_calls_total" and s.value:
                counts[(s.labels["route"], s.labels["outcome"], "ended")] = s.value
    return counts


async def test_two_numbers_reach_two_assistants_and_a_third_is_dialled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge")
    with trio.fail_after(40):
        async with running_bridge(behaviour=ASSISTANT, routes=ROUTES) as bridge:
            sales, support, night, other, blocked = await calls(
                [attrs.evolve(bridge.caller, to_number=n)
                 for n in (SALES, SUPPORT, NIGHT, "+15550000000")]
                + [attrs.evolve(bridge.caller, to_number="+15550000000", from_number=PREMIUM)]
            )
            counts = await routed_counts(bridge.ops_url)
    by_sid = {record.call_sid: record for record in bridge.vapi.calls.values()}
    assert by_sid[sales.call_sid].assistant_id == "asst-sales"
    assert by_sid[support.call_sid].assistant_id == "asst-support"
    assert by_sid[other.call_sid].assistant_id == "sim-assistant"  # the default route
    support_overrides = by_sid[support.call_sid].overrides
    assert support_overrides["firstMessage"] == "Support!"
    assert by_sid[support.call_sid].variable_values == {
        "team": "support", "twilioCallSid": support.call_sid,
        "caller": bridge.caller.from_number, "called": SUPPORT,
    }
    for report in (sales, support, other):
        assert report.streamed and report.first_audio_ms is not None
        assert bridge.record(report.call_sid).outcome is Outcome.ASSISTANT_ENDED
    # Straight to a person: no stream, no assistant call, Twilio dials the number.
    assert not night.streamed and night.call_sid not in by_sid
    assert night.final_action == "dial"
    assert f"<Dial>{HUMAN}</Dial>" in night.webhook_twiml
    # A refused caller hears the overflow message (routes before theirs come first).
    assert not blocked.streamed and blocked.call_sid not in by_sid
    assert blocked.final_action == "say"
    assert "all our lines are busy" in blocked.final_say
    # The journal names the route of each call; the metrics count them by route.
    starts = {
        f["CALL_SID"]: f["ROUTE"]
        for r in caplog.records
        if (f := record_fields(r)).get("EVENT") in ("call-start", "call-end")
    }
    assert starts == {sales.call_sid: "sales", support.call_sid: "support",
                      other.call_sid: "default"}
    routed = [record_fields(r) for r in caplog.records
              if record_fields(r).get("EVENT") == "call-routed"]
    assert sorted((f["ROUTE"], f["ACTION"]) for f in routed) == [
        ("blocked", "refuse"), ("night", "dial")
    ]
    assert counts[("night", "dial", "route")] == 1
    assert counts[("blocked", "refuse", "route")] == 1
    assert counts[("sales", "assistant", "route")] == 1
    assert counts[("support", "assistant-ended", "ended")] == 1
    assert counts[("default", "assistant-ended", "ended")] == 1


async def test_the_hook_decides_a_known_callers_call() -> None:
    secret = secrets.token_hex(16)

    def answer(message: dict[str, object]) -> dict[str, object] | None:
        customer = message.get("customer")
        if isinstance(customer, dict) and customer.get("number") == VIP:
            return {"assistantId": "asst-vip",
                    "assistantOverrides": {"variableValues": {"tier": "gold"}}}
        return None  # everyone else: their route

    hook = SimRouteHook(secret.encode(), answer=answer)
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            await nursery.start(hook.serve)
            async with running_bridge(
                behaviour=ASSISTANT,
                routes=ROUTES,
                route_hook=RouteHookConfig(url=hook.url),
                credentials={"route_hook_secret": Secret(secret)},
            ) as bridge:
                vip, plain, night = await calls([
                    attrs.evolve(bridge.caller, to_number=SALES, from_number=VIP),
                    attrs.evolve(bridge.caller, to_number=SALES),
                    attrs.evolve(bridge.caller, to_number=NIGHT),
                ])
                counts = await routed_counts(bridge.ops_url)
            nursery.cancel_scope.cancel()
    by_sid = {record.call_sid: record for record in bridge.vapi.calls.values()}
    assert by_sid[vip.call_sid].assistant_id == "asst-vip"
    assert by_sid[vip.call_sid].variable_values["tier"] == "gold"
    assert by_sid[plain.call_sid].assistant_id == "asst-sales"
    assert bridge.record(vip.call_sid).route == "sales"
    # Asked twice (the night line does not ask), each request signed.
    assert sorted(r.message["customer"]["number"] for r in hook.requests) == sorted(
        [VIP, bridge.caller.from_number]
    )
    assert all(r.signature_valid for r in hook.requests)
    assert night.final_action == "dial"
    assert counts[("sales", "assistant", "hook")] == 1
    assert counts[("sales", "assistant", "route")] == 1


async def test_a_stream_that_changes_its_route_or_decision_is_refused() -> None:
    call_sid = "CA" + "8" * 32
    with trio.fail_after(40):
        async with running_bridge(behaviour=ASSISTANT, routes=ROUTES) as bridge, \
                httpx.AsyncClient() as http:
            support = attrs.evolve(bridge.caller, to_number=SUPPORT)
            answer = await CapturedWebhook.sent_by(support, call_sid).post(http, bridge)
            signed = stream_parameters(answer.text)
            forged = encode_decision(AssistantChoice(
                overrides={"variableValues": {"team": "support"}, "firstMessage": "Pay now!"}
            ))
            changes = {
                "another route": {"route": "sales"},
                "no route": {"route": ""},
                "another decision": decision_parameters(forged),
                "no decision": {"decision": ""},
                "another assistant": {"assistant": "asst-sales"},
            }
            received = {
                what: await start_stream(bridge, call_sid, {**signed, **change})
                for what, change in changes.items()
            }
            created_before = assistant_calls(bridge)
            report = await place_call(support, SCRIPT, call_sid=call_sid)
    assert signed["route"] == "support" and signed["assistant"] == "asst-support"
    assert "decision" in signed
    assert received == dict.fromkeys(changes, 0)
    assert created_before == []
    # The genuine stream after all that: the refusals did not use its token up.
    assert report.streamed and report.webhook_twiml == answer.text
    assert bridge.record(call_sid).outcome is Outcome.ASSISTANT_ENDED
    [vapi_call] = bridge.vapi.calls.values()
    assert vapi_call.overrides["firstMessage"] == "Support!"
