"""Call control end to end on loopback: the real server, the simulated Vapi (its webhooks
signed every supported way), the simulated caller and the simulated Twilio REST API.

Charter: loopback only, port 0, a ``trio.fail_after`` guard on every test, short clips
(``tests.harness.SHORT_ASSISTANT``); calls that can share a server run at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio

from tests.harness import SHORT_ASSISTANT, Bridge, running_bridge
from voicebridge.bridge.outcome import Outcome
from voicebridge.config import Secret, TransferConfig
from voicebridge.control.routes import CALLS_PATH, WEBHOOK_PATH, vapi_server_override
from voicebridge.observability.logs import record_fields
from voicebridge.sim.audio import FRAME_MS, is_speech, iter_frames, load_clip
from voicebridge.sim.caller import (
    CallReport,
    PressDigit,
    Silence,
    Speak,
    WaitForAssistantDone,
    place_call,
)
from voicebridge.sim.server_messages import (
    SimServerCredential,
    SimToolCall,
    auth_headers,
    send_tool_calls,
    tool_calls_body,
)
from voicebridge.sim.twilio_rest import SimTwilioRest

WEBHOOK_SECRET = "vapi-webhook-secret-0123456789"
API_TOKEN = "control-api-token-0123456789"
HUMAN = "+15550100777"
OTHER_DESK = "+15550100778"
HANDLERS = {
    name: f"tests.control.handlers:{name}"
    for name in (
        "lookup_order",
        "lookup_order_async",
        "explode",
        "hang",
        "hang_in_thread",
        "not_text",
        "json_data",
        "counted",
        "digit_menu",
    )
}
#: How often ``wait_for`` looks.
POLL_S = 0.05
HMAC_CREDENTIAL = SimServerCredential(kind="hmac", secret=WEBHOOK_SECRET)
#: Listen to the greeting, then say something; then listen until the bridge ends the call.
GREET_AND_ASK = (WaitForAssistantDone(quiet_s=0.4), Speak("caller_2"))


def sections(auth: str = "hmac", **control: Any) -> dict[str, Any]:
    return {
        "control": {
            "enabled": True,
            "auth": auth,
            "credential_id": "cred-1" if auth == "hmac" else "",
            **control,
        },
        "tools": {"handlers": HANDLERS, "deadline_s": 0.5},
        "transfer": {
            "default_destination": HUMAN,
            "allowed": (OTHER_DESK,),
            "goodbye_wait_s": 1.0,
            "goodbye_deadline_s": 6.0,
            "remote_delay_s": 0.2,
        },
        "credentials": {
            "vapi_webhook_secret": Secret(WEBHOOK_SECRET),
            "control_api_token": Secret(API_TOKEN),
        },
    }


def tool_result(exchanges: list[Any]) -> Any:
    [exchange] = exchanges
    assert exchange.status == 200, exchange.answer
    return exchange.answer


async def post(bridge: Bridge, body: bytes, headers: Mapping[str, str]) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(bridge.url + WEBHOOK_PATH, content=body, headers=dict(headers))


# --- authentication: every way Vapi can sign, and every way a request can be bad ------------


@pytest.mark.parametrize(
    ("auth", "control", "credential"),
    [
        ("secret", {}, None),
        ("bearer", {}, None),
        (
            "bearer",
            {"credential_id": "cred-b", "bearer_header": "X-Key"},
            SimServerCredential(kind="bearer", secret=WEBHOOK_SECRET, header_name="X-Key"),
        ),
        ("hmac", {}, HMAC_CREDENTIAL),
        (
            "hmac",
            {
                "hmac_algorithm": "sha512",
                "hmac_signature_prefix": "v1=",
                "hmac_payload_format": "{method}:{url}:{timestamp}:{body}",
                "hmac_signature_encoding": "base64",
            },
            attrs.evolve(
                HMAC_CREDENTIAL,
                algorithm="sha512",
                signature_prefix="v1=",
                payload_format="{method}:{url}:{timestamp}:{body}",
                encoding="base64",
                timestamp_ms=True,
            ),
        ),
    ],
)
async def test_a_tool_call_signed_each_way_reaches_its_handler(
    auth: str, control: dict[str, Any], credential: SimServerCredential | None
) -> None:
    with trio.fail_after(10):
        async with running_bridge(**sections(auth, **control)) as bridge:
            server = vapi_server_override(bridge.config)
            assert server is not None and server["url"] == bridge.url + WEBHOOK_PATH
            assert WEBHOOK_SECRET not in str(server.get("credentialId", ""))
            tool = SimToolCall(name="lookup_order", arguments='{"order": 7}')
            answer = tool_result(
                await send_tool_calls("vapi-x", {"server": server}, credential, tool, 0)
            )
    assert answer == {
        "results": [
            {
                "toolCallId": "call_vapi-x_0",
                "name": "lookup_order",
                "result": "Order 7 for nobody ships tomorrow.",
            }
        ]
    }


async def test_bad_webhooks_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    tool = SimToolCall(name="lookup_order")
    with trio.fail_after(10):
        async with running_bridge(**sections("hmac", max_body_bytes=4096)) as bridge:
            server = {"url": bridge.url + WEBHOOK_PATH}
            body = tool_calls_body("vapi-x", {}, tool, 0)
            now = time.time()
            good = auth_headers(server, HMAC_CREDENTIAL, body, now=now)
            assert (await post(bridge, body, good)).status_code == 200
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="voicebridge.control.routes"):
                unsigned = await post(bridge, body, {})
                wrong_key = attrs.evolve(HMAC_CREDENTIAL, secret="not-the-secret-0123456789")
                wrong = await post(bridge, body, auth_headers(server, wrong_key, body, now=now))
                tampered = await post(bridge, body.replace(b"lookup", b"lookum"), good)
                old = auth_headers(server, HMAC_CREDENTIAL, body, now=now - 3600)
                replayed = await post(bridge, body, old)
            rejected = [
                record_fields(r).get("REASON")
                for r in caplog.records
                if r.name == "voicebridge.control.routes"
            ]
            big = b'{"message": {"type": "x", "pad": "' + b"x" * 5000 + b'"}}'
            too_big = await post(bridge, big, auth_headers(server, HMAC_CREDENTIAL, big, now=now))
            garbage = [
                await post(bridge, bad, auth_headers(server, HMAC_CREDENTIAL, bad, now=now))
                for bad in (b"not json", b'{"type": "tool-calls"}', b'{"message": {"type": 1}}')
            ]
            unknown_type = b'{"message": {"type": "knowledge-base-request"}}'
            unknown = await post(
                bridge, unknown_type, auth_headers(server, HMAC_CREDENTIAL, unknown_type, now=now)
            )
    assert [r.status_code for r in (unsigned, wrong, tampered, replayed)] == [401] * 4
    assert rejected == ["missing", "mismatch", "mismatch", "stale"], "one log line each"
    assert too_big.status_code == 413
    assert [r.status_code for r in garbage] == [400, 400, 400]
    assert (unknown.status_code, unknown.json()) == (200, {})


async def test_failing_tools_still_answer_in_order_within_the_deadline() -> None:
    names = [
        "explode",
        "hang",
        "hang_in_thread",
        "not_text",
        "json_data",
        "nope",
        "lookup_order_async",
        "transfer_to_human",
    ]
    items = [
        {"id": f"t{i}", "type": "function", "function": {"name": name, "arguments": {}}}
        for i, name in enumerate(names)
    ]
    items[4]["function"]["arguments"] = {"sku": "A1"}
    items[7]["function"]["arguments"] = {"destination": "+15559999999"}
    body = orjson.dumps(
        {"message": {"type": "tool-calls", "toolCallList": items, "call": {"id": "vapi-x"}}}
    )
    with trio.fail_after(10):
        async with running_bridge(**sections("hmac")) as bridge:
            server = {"url": bridge.url + WEBHOOK_PATH}
            started = trio.current_time()
            response = await post(
                bridge, body, auth_headers(server, HMAC_CREDENTIAL, body, now=time.time())
            )
            elapsed = trio.current_time() - started
    assert response.status_code == 200
    assert elapsed < 1.5, "every tool is bounded by tools.deadline_s (0.5 s), all at once"
    results = response.json()["results"]
    assert [r["toolCallId"] for r in results] == [f"t{i}" for i in range(len(names))]
    by_name = {r["name"]: r for r in results}
    assert by_name["explode"]["error"] == "the tool failed (RuntimeError)"
    assert by_name["hang"]["error"] == "the tool did not answer within 0.5 s"
    assert by_name["hang_in_thread"]["error"] == "the tool did not answer within 0.5 s"
    assert by_name["not_text"]["error"] == "the tool returned a object, not text"
    assert by_name["json_data"]["result"] == '{"stock":3,"sku":"A1"}'
    assert by_name["nope"]["error"] == "unknown tool nope"
    assert by_name["lookup_order_async"]["result"] == "Async order ? ships tomorrow."
    assert by_name["transfer_to_human"]["error"] == (
        "that destination is not an allowed transfer target"
    )


async def test_a_retried_tool_call_runs_once() -> None:
    tool = SimToolCall(name="counted", repeats=2)
    with trio.fail_after(10):
        async with running_bridge(**sections("hmac")) as bridge:
            server = {"url": bridge.url + WEBHOOK_PATH}
            exchanges = await send_tool_calls(
                "vapi-retry", {"server": server}, HMAC_CREDENTIAL, tool, 0
            )
    assert [e.answer["results"][0]["result"] for e in exchanges] == ["run 1"] * 3


# --- flows through a real call ------------------------------------------------------------


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll a condition of the simulated peers (they offer no event for it); the test's
    ``fail_after`` bounds it."""
    while not condition():  # noqa: ASYNC110  # nothing to wait on: the peers are polled
        await trio.sleep(POLL_S)


def speech_span_ms(clip: str) -> int:
    """From the clip's first speech frame to the end of its last: what a caller hears of it."""
    speech = [i for i, frame in enumerate(iter_frames(load_clip(clip))) if is_speech(frame)]
    return (speech[-1] - speech[0] + 1) * FRAME_MS


def served_call_ids(bridge: Bridge, report: CallReport) -> Any:
    [vapi_call] = [c for c in bridge.vapi.calls.values() if c.call_sid == report.call_sid]
    return vapi_call


async def test_transfer_end_call_dtmf_and_a_tool_during_calls() -> None:
    """Four calls at once on one server: each flow of call control through a real call."""
    goodbye_ms = speech_span_ms("caller_3")
    behaviours = {
        "CA" + "1" * 32: attrs.evolve(
            SHORT_ASSISTANT,
            tool_calls=(
                SimToolCall(
                    name="transfer_to_human",
                    arguments={"destination": OTHER_DESK},
                    say_after="caller_3",
                    hold=True,
                ),
            ),
        ),
        "CA" + "2" * 32: attrs.evolve(
            SHORT_ASSISTANT,
            tool_calls=(
                SimToolCall(
                    name="end_call", shape="toolWithToolCallList", say_after="caller_3", hold=True
                ),
            ),
        ),
        "CA" + "3" * 32: SHORT_ASSISTANT,
        "CA" + "4" * 32: attrs.evolve(
            SHORT_ASSISTANT,
            tool_calls=(
                SimToolCall(name="lookup_order", arguments={"order": 42}, shape="toolCalls"),
            ),
        ),
    }
    scripts = {
        "CA" + "1" * 32: GREET_AND_ASK,
        "CA" + "2" * 32: GREET_AND_ASK,
        "CA" + "3" * 32: (
            WaitForAssistantDone(quiet_s=0.4),
            PressDigit("5"),
            Silence(0.2),
            Speak("caller_2"),
            WaitForAssistantDone(quiet_s=0.4),
        ),
        "CA" + "4" * 32: (*GREET_AND_ASK, WaitForAssistantDone(quiet_s=0.4)),
    }
    reports: dict[str, CallReport] = {}
    config = sections(
        "hmac", dtmf_wording="The caller pressed key {digit}.", dtmf_tool="digit_menu"
    )
    config["keypad"] = {"batch": False}  # one message per key press, with its own wording
    with trio.fail_after(30):
        async with running_bridge(
            behaviour_for=lambda order, sid: behaviours[sid or ""], **config
        ) as bridge:
            bridge.vapi.credentials["cred-1"] = HMAC_CREDENTIAL

            async def call(sid: str) -> None:
                reports[sid] = await place_call(bridge.caller, scripts[sid], call_sid=sid)

            async with trio.open_nursery() as calls_nursery:
                for sid in scripts:
                    calls_nursery.start_soon(call, sid)
            transferred, ended, dtmf, tool = (reports[sid] for sid in scripts)

            # Transfer: the goodbye played to its end, then the caller was dialled through.
            assert (transferred.final_action, transferred.final_dial) == ("dial", OTHER_DESK)
            record = bridge.record(transferred.call_sid)
            assert (record.outcome, record.transfer_to) == (Outcome.TRANSFERRED, OTHER_DESK)
            goodbye = transferred.turns[-1]
            assert not goodbye.interrupted and goodbye.heard_ms >= goodbye_ms - 40
            vapi_call = served_call_ids(bridge, transferred)
            assert vapi_call.end_call_received_at is not None, "the Vapi leg was ended"
            answer = vapi_call.tool_exchanges[0].answer["results"][0]
            assert answer["result"] == bridge.config.transfer.result

            # End call: the goodbye played, then a clean hang-up on both legs.
            assert ended.final_action == "hangup" and ended.protocol_violations == []
            assert bridge.record(ended.call_sid).outcome is Outcome.ENDED_BY_CONTROL
            assert not ended.turns[-1].interrupted
            assert ended.turns[-1].heard_ms >= goodbye_ms - 40
            assert served_call_ids(bridge, ended).end_call_received_at is not None

            # DTMF: the configured wording as a user message, the tool's answer as a system one.
            added = [m["message"] for m in served_call_ids(bridge, dtmf).add_messages]
            assert {"role": "user", "content": "The caller pressed key 5."} in added
            assert {"role": "system", "content": "Menu option 5 is billing."} in added
            assert bridge.record(dtmf.call_sid).outcome is Outcome.ASSISTANT_ENDED

            # A configured tool, its result back to Vapi, with the call's CallSid known.
            exchange = served_call_ids(bridge, tool).tool_exchanges[0]
            assert exchange.answer["results"][0]["result"] == (
                f"Order 42 for {tool.call_sid} ships tomorrow."
            )
            assert bridge.record(tool.call_sid).outcome is Outcome.ASSISTANT_ENDED


# --- through Twilio's REST API: outbound calls, and a call held by another process ----------


async def test_outbound_call_and_a_transfer_of_a_call_held_elsewhere() -> None:
    rest = SimTwilioRest(callee_script=(*GREET_AND_ASK, WaitForAssistantDone(quiet_s=0.4)))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(rest.serve)
            twilio = {"rest_base_url": rest.base_url}
            outbound = {"from_number": "+15550100001", "http_enabled": True}
            async with running_bridge(
                twilio=twilio, outbound=outbound, **sections("bearer")
            ) as holder:
                rest.settings = holder.caller
                token = holder.caller.auth_token
                async with running_bridge(
                    twilio=twilio,
                    **{
                        **sections("bearer"),
                        "credentials": {
                            **sections("bearer")["credentials"],
                            "twilio_auth_token": Secret(token),
                        },
                    },
                ) as other:
                    # Outbound: POST /control/calls → Twilio REST → our voice webhook.
                    async with httpx.AsyncClient() as http:
                        refused = await http.post(holder.url + CALLS_PATH, json={"to": HUMAN})
                        placed = await http.post(
                            holder.url + CALLS_PATH,
                            json={"to": HUMAN},
                            headers={"Authorization": f"Bearer {API_TOKEN}"},
                        )
                    assert refused.status_code == 401
                    assert placed.status_code == 201, placed.text
                    outbound_report = await rest.wait_report(placed.json()["callSid"])

                    # A call the holder runs; the transfer webhook lands on the other one.
                    sid = "CA" + "5" * 32
                    held_script = (*GREET_AND_ASK, Silence(10))
                    async with trio.open_nursery() as call_nursery:
                        call_nursery.start_soon(
                            partial(rest.place_inbound, held_script, call_sid=sid)
                        )
                        await wait_for(
                            lambda: any(
                                c.call_sid == sid and c.connected_at
                                for c in holder.vapi.calls.values()
                            )
                        )
                        server = vapi_server_override(other.config)
                        assert server is not None
                        overrides = {"server": server, "metadata": {"twilioCallSid": sid}}
                        tool = SimToolCall(name="transfer_to_human")
                        answer = tool_result(
                            await send_tool_calls("vapi-y", overrides, None, tool, 0)
                        )
                    held_report = rest.reports[sid]
                    registry = holder.listening.registry
                    await wait_for(lambda: registry.record_for(sid) is not None)
                    held_record = holder.record(sid)
            nursery.cancel_scope.cancel(reason="the simulated REST API is no longer needed")

    assert outbound_report.streamed and outbound_report.first_audio_ms is not None
    assert outbound_report.final_action == "hangup"
    assert answer["results"][0]["result"] == TransferConfig().result
    assert rest.transfers == [(sid, HUMAN)]
    assert (held_report.rest_update, held_report.final_dial) == ("redirect", HUMAN)
    assert held_record.outcome is Outcome.CALLER_HUNG_UP  # Twilio stopped its stream
