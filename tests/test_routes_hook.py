"""The decision hook against a real HTTP server on loopback (``sim.route_hook``): success,
slow (the route decides at exactly the deadline), error, malformed, a destination not
allowed; the signature checked with the documented recipe, written out here."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from voicebridge.config import Config, config_from_mapping
from voicebridge.observability.metrics import BridgeMetrics
from voicebridge.routing import AssistantChoice, Decision, DialChoice, RefuseChoice, Router
from voicebridge.routing_hook import RouteHook, decide
from voicebridge.sim.route_hook import SimRouteHook

SECRET = b"route-hook-secret-0123456789abcdef"
CALL_SID = "CA" + "1" * 32
SALES = "+15550001111"
CALLER = "+15557654321"
HUMAN = "+15550009999"
GUARD_S = 10


def config(url: str, deadline_s: float = 1.5) -> Config:
    return config_from_mapping(
        {
            "vapi": {"assistant_id": "asst-default"},
            "transfer": {"allowed": [HUMAN]},
            "route_hook": {"url": url, "deadline_s": deadline_s},
            "routes": [{"name": "sales", "to": [SALES], "assistant_id": "asst-sales"}],
        },
        environ={"VOICEBRIDGE_ROUTE_HOOK_SECRET": SECRET.decode()},
        require_complete=False,
    )


@asynccontextmanager
async def hook_server(sim: SimRouteHook) -> AsyncIterator[SimRouteHook]:
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve)
        yield sim
        nursery.cancel_scope.cancel()


async def ask(sim: SimRouteHook, metrics: BridgeMetrics, deadline_s: float = 1.5) -> Decision:
    cfg = config(sim.url, deadline_s)
    async with httpx.AsyncClient() as http:
        return await decide(
            Router(cfg),
            RouteHook.from_config(cfg, http),
            call_sid=CALL_SID,
            caller=CALLER,
            called=SALES,
            observer=metrics,
        )


def samples(metrics: BridgeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition(active_calls=0, admitting=True).decode()
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "worker"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def failures(metrics: BridgeMetrics) -> dict[str, float]:
    return {
        labels[0][1]: count
        for (name, labels), count in samples(metrics).items()
        if name == "voicebridge_route_hook_failures_total" and count
    }


def hook_answers(metrics: BridgeMetrics) -> float:
    return samples(metrics)[("voicebridge_route_hook_seconds_count", ())]


async def test_the_hook_decides_and_its_request_verifies_with_the_documented_recipe() -> None:
    def answer(message: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "assistantId": "asst-vip",
            "assistantOverrides": {"variableValues": {"name": "Ada"}, "firstMessage": "Hi Ada"},
        }

    metrics = BridgeMetrics()
    with trio.fail_after(GUARD_S):
        async with hook_server(SimRouteHook(SECRET, answer=answer)) as sim:
            decision = await ask(sim, metrics)
    assert decision.route == "sales" and decision.by == "hook"
    assert decision.choice == AssistantChoice(
        assistant_id="asst-vip",
        overrides={"variableValues": {"name": "Ada"}, "firstMessage": "Hi Ada"},
    )
    [request] = sim.requests
    assert request.signature_valid  # the simulator's own check
    # The recipe of docs/call-control.md, step by step.
    timestamp = request.headers["x-voicebridge-timestamp"]
    assert abs(int(timestamp) - time.time()) < 60
    expected = hmac.new(SECRET, f"{timestamp}.".encode() + request.body, hashlib.sha256)
    assert request.headers["x-voicebridge-signature"] == "v1=" + expected.hexdigest()
    assert request.headers["content-type"] == "application/json"
    message = request.message
    assert message["type"] == "assistant-request"
    assert message["customer"] == {"number": CALLER}
    assert message["phoneNumber"] == {"number": SALES}
    assert message["call"]["phoneCallProviderId"] == CALL_SID
    assert message["route"] == "sales"
    assert failures(metrics) == {} and hook_answers(metrics) == 1


async def test_a_forged_request_is_refused_by_the_server_and_the_route_decides(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = BridgeMetrics()
    with trio.fail_after(GUARD_S):
        async with hook_server(SimRouteHook(b"another-secret-0123456789", answer=dict)) as sim:
            decision = await ask(sim, metrics)
    assert not sim.requests[0].signature_valid
    assert decision.by == "route" and decision.choice == AssistantChoice(assistant_id="asst-sales")
    assert failures(metrics) == {"error": 1}
    [line] = [r for r in caplog.records if "route hook" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert line.getMessage() == (
        f"call {CALL_SID}: the route hook gave no decision (error: HTTP 401); "
        "route sales decides: assistant asst-sales"
    )


async def test_a_slow_hook_leaves_the_call_to_its_route_at_exactly_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = BridgeMetrics()
    with trio.fail_after(GUARD_S):
        async with hook_server(SimRouteHook(SECRET, answer=dict, delay_s=5.0)) as sim:
            started = trio.current_time()
            decision = await ask(sim, metrics, deadline_s=1.5)
            assert trio.current_time() - started == 1.5
    assert decision.by == "route" and decision.choice == AssistantChoice(assistant_id="asst-sales")
    assert failures(metrics) == {"timeout": 1}
    assert hook_answers(metrics) == 1


@pytest.mark.parametrize(
    ("raw", "status", "kind"),
    [
        (b'{"assistantId": "asst-vip"}', 500, "error"),
        (b"<html>not json</html>", 200, "malformed"),
        (b'["assistantId"]', 200, "malformed"),
        (b'{"assistantId": 42}', 200, "malformed"),
        (b'{"assistantId": "a", "destination": {"type": "number", "number": "+15550009999"}}',
         200, "malformed"),
        (b'{"squadId": "sq-1"}', 200, "malformed"),
        (b'{"destination": {"type": "sip", "sipUri": "sip:x@y"}}', 200, "malformed"),
        (b'{"destination": {"type": "number", "number": "+19005550000"}}', 200, "refused"),
        (b'{"error": ""}', 200, "malformed"),
    ],
)
async def test_a_bad_answer_leaves_the_call_to_its_route(
    raw: bytes, status: int, kind: str
) -> None:
    metrics = BridgeMetrics()
    with trio.fail_after(GUARD_S):
        async with hook_server(SimRouteHook(SECRET, raw_answer=raw, status=status)) as sim:
            decision = await ask(sim, metrics)
    assert decision.by == "route" and decision.choice == AssistantChoice(assistant_id="asst-sales")
    assert failures(metrics) == {kind: 1}


@pytest.mark.parametrize(
    ("answer", "choice"),
    [
        ({"destination": {"type": "number", "number": HUMAN, "message": "One moment."}},
         DialChoice(number=HUMAN, say="One moment.")),
        ({"assistant": {"name": "inline"}}, AssistantChoice(assistant={"name": "inline"})),
        ({"assistantOverrides": {"variableValues": {"vip": True}}},
         AssistantChoice(overrides={"variableValues": {"vip": True}})),
    ],
)
async def test_the_hook_may_dial_give_an_inline_assistant_or_only_overrides(
    answer: dict[str, Any], choice: Any
) -> None:
    metrics = BridgeMetrics()
    with trio.fail_after(GUARD_S):
        async with hook_server(SimRouteHook(SECRET, answer=lambda m: answer)) as sim:
            decision = await ask(sim, metrics)
    assert (decision.by, decision.choice) == ("hook", choice)


async def test_an_error_is_read_to_the_caller_and_an_empty_answer_leaves_the_route() -> None:
    metrics = BridgeMetrics()
    with trio.fail_after(GUARD_S):
        async with hook_server(
            SimRouteHook(SECRET, answer=lambda m: {"error": "We are closed <today>."})
        ) as sim:
            refused = await ask(sim, metrics)
        async with hook_server(SimRouteHook(SECRET, answer=lambda m: None)) as sim:
            no_content = await ask(sim, metrics)  # 204
        async with hook_server(SimRouteHook(SECRET, answer=lambda m: {})) as sim:
            empty = await ask(sim, metrics)
    assert isinstance(refused.choice, RefuseChoice)
    assert "<Say>We are closed &lt;today&gt;.</Say><Hangup /></Response>" in refused.choice.twiml
    assert no_content.by == empty.by == "route"
    assert failures(metrics) == {}


async def test_no_hook_is_asked_for_a_route_that_says_so() -> None:
    sim = SimRouteHook(SECRET, answer=lambda m: {"assistantId": "asst-vip"})
    with trio.fail_after(GUARD_S):
        async with hook_server(sim):
            cfg = config_from_mapping(
                {
                    "vapi": {"assistant_id": "asst-default"},
                    "route_hook": {"url": sim.url},
                    "routes": [{"name": "s", "to": [SALES], "ask_hook": False}],
                },
                environ={"VOICEBRIDGE_ROUTE_HOOK_SECRET": SECRET.decode()},
                require_complete=False,
            )
            async with httpx.AsyncClient() as http:
                hook = RouteHook.from_config(cfg, http)
                kept = await decide(Router(cfg), hook, call_sid=CALL_SID, caller="", called=SALES)
                other = await decide(Router(cfg), hook, call_sid=CALL_SID, caller="", called="+1")
                full = await decide(
                    Router(cfg), hook, call_sid=CALL_SID, caller="", called="+1", ask=False
                )
    assert (kept.route, kept.by) == ("s", "route")
    assert (other.route, other.by) == ("default", "hook")
    assert (full.route, full.by) == ("default", "route")
    assert len(sim.requests) == 1


async def test_past_its_limit_of_requests_in_flight_a_call_takes_its_route_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = BridgeMetrics()
    ended: list[tuple[float, str]] = []
    with trio.fail_after(GUARD_S):
        async with hook_server(SimRouteHook(SECRET, answer=dict, delay_s=5.0)) as sim:
            cfg = config(sim.url)
            async with httpx.AsyncClient() as http:
                hook = RouteHook(http, url=sim.url, secret=SECRET, deadline_s=1.5,
                                 allowed=(), max_in_flight=2)

                async def one() -> None:
                    decision = await decide(Router(cfg), hook, call_sid=CALL_SID,
                                            caller=CALLER, called=SALES, observer=metrics)
                    ended.append((trio.current_time(), decision.by))

                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(one)
    # Two wait for the slow hook until the deadline; the third does not wait at all.
    assert sorted(ended) == [(0.0, "route"), (1.5, "route"), (1.5, "route")]
    assert failures(metrics) == {"error": 1, "timeout": 2}
