"""End to end on loopback: the real server, the simulated Twilio caller, the simulated Vapi.

Real HTTP, real WebSockets, real signatures, real time. Each test asserts what a
caller would notice (what they heard, what Twilio did after the stream) and what
the bridge recorded.
"""

from __future__ import annotations

import json
import logging
import math
from xml.etree import ElementTree

import attrs
import httpx
import pytest
import trio
import trio_websocket

from tests.harness import SHORT_ASSISTANT, Bridge, running_bridge
from voicebridge.bridge.outcome import Outcome
from voicebridge.observability.logs import record_fields
from voicebridge.sim.audio import CLIP_TEXTS
from voicebridge.sim.caller import (
    CallReport,
    Hangup,
    SendRaw,
    Silence,
    Speak,
    WaitForAssistant,
    WaitForAssistantDone,
    place_call,
)
from voicebridge.sim.vapi import SimVapiBehaviour
from voicebridge.twilio.signature import sign

FALLBACK_WORDS = "technical difficulties"
OVERFLOW_WORDS = "all our lines are busy"

#: Listen to the greeting, say something, listen to the goodbye (the assistant ends).
SHORT_SCRIPT = (
    WaitForAssistantDone(quiet_s=0.4),
    Speak("caller_2"),
    WaitForAssistantDone(quiet_s=0.4),
)


def assert_served(report: CallReport, bridge: Bridge) -> None:
    """The caller heard the assistant, Twilio saw clean traffic, the call ended normally."""
    assert report.protocol_violations == []
    assert report.streamed
    assert report.first_audio_ms is not None
    assert report.final_action == "hangup"
    record = bridge.record(report.call_sid)
    assert record.outcome is Outcome.ASSISTANT_ENDED, record.detail
    assert record.frames_dropped == 0


async def test_a_conversation_with_a_barge_in(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge")
    # The assistant greets, answers the caller with its long reply; the caller talks
    # over that reply one second in; the assistant stops, says goodbye, ends the call.
    assistant = attrs.evolve(SHORT_ASSISTANT, end_after_replies=1, tail_after_interrupt_ms=100)
    script = (
        WaitForAssistantDone(quiet_s=0.4),
        Speak("caller_1"),
        WaitForAssistant(heard_ms=1000),
        Speak("caller_2"),
        WaitForAssistantDone(quiet_s=0.4),
    )
    with trio.fail_after(40):
        async with running_bridge(behaviour=assistant) as bridge:
            report = await place_call(bridge.caller, script)
    assert_served(report, bridge)
    [barge_in] = report.barge_ins
    assert barge_in.clear_ms is not None, "the assistant was silenced"
    assert barge_in.heard_after_clear_ms == 0, "not one frame of the cut turn after the clear"
    assert 900 <= barge_in.heard_of_turn_ms <= 1500
    record = bridge.record(report.call_sid)
    [bridge_barge_in] = record.barge_ins
    assert bridge_barge_in.latency_ms < 50
    assert [turn.interrupted for turn in report.turns] == [False, True, False]
    # Caller audio reached Vapi byte for byte: the simulated Vapi recognised the clips.
    [vapi_call] = bridge.vapi.calls.values()
    said = [e.message["transcript"] for e in vapi_call.messages("transcript")
            if e.message["role"] == "user"]
    assert said == [CLIP_TEXTS["caller_1"], CLIP_TEXTS["caller_2"]]
    assert vapi_call.metadata["twilioCallSid"] == report.call_sid
    # One call-start and one call-end line, joined by the CallSid; the simulated Twilio
    # signs the upgrade, so the advisory check says so.
    events = [record_fields(r) for r in caplog.records if record_fields(r).get("CALL_SID")]
    assert [f["EVENT"] for f in events] == ["call-start", "call-end"]
    assert {f["CALL_SID"] for f in events} == {report.call_sid}
    assert events[0]["UPGRADE_SIGNATURE"] == "valid"
    assert events[1]["OUTCOME"] == "assistant-ended"
    assert events[1]["VAPI_CALL_ID"] == vapi_call.id
    assert events[1]["BARGE_INS"] == 1
    assert vapi_call.create_body["transport"]["audioFormat"] == {
        "format": "mulaw", "container": "raw", "sampleRate": 8000,
    }


async def test_twenty_concurrent_calls() -> None:
    with trio.fail_after(60):
        async with running_bridge() as bridge:
            reports: list[CallReport] = []

            async def one() -> None:
                reports.append(await place_call(bridge.caller, SHORT_SCRIPT))

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one)
    assert len(reports) == 20
    for report in reports:
        assert_served(report, bridge)
    assert bridge.listening.registry.active_count == 0


async def test_one_call_sending_garbage_while_nineteen_finish() -> None:
    garbage = (WaitForAssistant(heard_ms=300), SendRaw("this is not JSON"), Silence(5))
    with trio.fail_after(60):
        async with running_bridge() as bridge:
            reports: list[CallReport] = []
            bad: list[CallReport] = []

            async def one(script: tuple[object, ...], into: list[CallReport]) -> None:
                into.append(await place_call(bridge.caller, script))  # type: ignore[arg-type]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, garbage, bad)
                for _ in range(19):
                    nursery.start_soon(one, SHORT_SCRIPT, reports)
    for report in reports:
        assert_served(report, bridge)
    [report] = bad
    record = bridge.record(report.call_sid)
    assert record.outcome is Outcome.PROTOCOL_ERROR
    assert "JSON" in record.detail
    assert FALLBACK_WORDS in report.final_say.lower()


@pytest.mark.parametrize(
    ("fault", "detail"),
    [
        ({"refuse_create": 401}, "auth"),
        ({"refuse_create": 500}, "server"),
        ({"create_delay_s": math.inf}, "timeout"),
        ({"reject_socket": 503}, "server"),
        ({"drop_after_s": 1.0}, "dropped"),
        ({"malformed_after_s": 1.0}, "protocol"),
        ({"ignore_pings_after_s": 0.5}, "unresponsive"),
    ],
)
async def test_assistant_leg_failures_give_the_caller_the_fallback(
    fault: dict[str, object], detail: str
) -> None:
    assistant = attrs.evolve(SHORT_ASSISTANT, **fault)  # type: ignore[arg-type]
    vapi = {"create_deadline_s": 1.0, "ping_interval_s": 0.5, "pong_deadline_s": 0.5}
    with trio.fail_after(30):
        async with running_bridge(behaviour=assistant, vapi=vapi) as bridge:
            report = await place_call(bridge.caller, (Silence(8),))
    record = bridge.record(report.call_sid)
    assert record.outcome is Outcome.ASSISTANT_LEG_FAILED
    assert detail in record.detail
    assert report.ended_by == "server", "the bridge ended the stream, not the caller"
    assert report.final_action == "say"
    assert FALLBACK_WORDS in report.final_say.lower()
    assert report.protocol_violations == []


async def test_vapis_concurrency_limit_gives_the_caller_the_overflow_message() -> None:
    # Vapi answers POST /call with 400 "Over Concurrency Limit.": the caller may call
    # back, so they hear the overflow message, not the fallback.
    assistant = attrs.evolve(SHORT_ASSISTANT, refuse_create=400)
    with trio.fail_after(30):
        async with running_bridge(behaviour=assistant) as bridge:
            report = await place_call(bridge.caller, (Silence(8),))
    record = bridge.record(report.call_sid)
    assert record.outcome is Outcome.ASSISTANT_OVER_LIMIT
    assert "max_concurrent_calls" in record.detail
    assert report.ended_by == "server"
    assert report.final_action == "say"
    assert OVERFLOW_WORDS in report.final_say.lower()


async def test_caller_hang_up_ends_the_vapi_leg_politely() -> None:
    with trio.fail_after(30):
        async with running_bridge() as bridge:
            report = await place_call(bridge.caller, (WaitForAssistant(heard_ms=500), Hangup()))
            [vapi_call] = bridge.vapi.calls.values()
            with trio.fail_after(5):
                await vapi_call.wait_ended()
    assert bridge.record(report.call_sid).outcome is Outcome.CALLER_HUNG_UP
    assert vapi_call.end_call_received_at is not None
    assert vapi_call.close_code == 1000


async def test_webhook_signatures() -> None:
    async with running_bridge() as bridge, httpx.AsyncClient() as http:
        url = bridge.config.server.public_url + "/twilio/voice"
        form = {"CallSid": "CA" + "5" * 32, "AccountSid": bridge.caller.account_sid,
                "From": "+15550100001", "To": "+15550100002"}
        good = sign(url, form, bridge.caller.auth_token)
        missing = await http.post(url, data=form)
        wrong = await http.post(url, data=form, headers={"X-Twilio-Signature": good[::-1]})
        tampered = await http.post(url, data={**form, "From": "+15550199999"},
                                   headers={"X-Twilio-Signature": good})
        ok = await http.post(url, data=form, headers={"X-Twilio-Signature": good})
    assert (missing.status_code, wrong.status_code, tampered.status_code) == (403, 403, 403)
    assert ok.status_code == 200
    assert "<Connect" in ok.text and "<Parameter" in ok.text


async def test_behind_a_proxy_signatures_cover_the_public_url() -> None:
    # Twilio calls https://bridge.example.com; the proxy forwards to 127.0.0.1. The
    # server must check signatures against the public URL, not the one it sees.
    with trio.fail_after(30):
        async with running_bridge(public_url="https://bridge.example.com") as bridge:
            report = await place_call(bridge.caller, SHORT_SCRIPT)
    assert_served(report, bridge)
    assert 'url="wss://bridge.example.com/twilio/stream"' in report.webhook_twiml


async def test_over_the_limit_callers_hear_the_overflow_message() -> None:
    first: list[CallReport] = []
    with trio.fail_after(30):
        async with (
            running_bridge(server={"max_concurrent_calls": 1}) as bridge,
            trio.open_nursery() as nursery,
        ):

            async def first_call() -> None:
                first.append(await place_call(bridge.caller, SHORT_SCRIPT))

            nursery.start_soon(first_call)
            await trio.sleep(0.5)
            second = await place_call(bridge.caller, SHORT_SCRIPT)
    assert_served(first[0], bridge)
    assert second.webhook_status == 200
    assert not second.streamed
    assert second.final_action == "say"
    assert OVERFLOW_WORDS in second.final_say.lower()


async def test_a_replayed_stream_token_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(30):
        async with running_bridge() as bridge:
            report = await place_call(bridge.caller, SHORT_SCRIPT)
            # Take the parameters out of the TwiML the first call was given, and use them
            # again: the token, and the numbers it vouches for.
            stream = ElementTree.fromstring(report.webhook_twiml).find("Connect/Stream")
            assert stream is not None
            parameters = {p.get("name"): p.get("value") for p in stream.iter("Parameter")}
            start = {
                "event": "start", "sequenceNumber": "1", "streamSid": "MZ" + "9" * 32,
                "start": {
                    "accountSid": bridge.caller.account_sid, "streamSid": "MZ" + "9" * 32,
                    "callSid": report.call_sid, "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                    "channels": 1},
                    "customParameters": parameters,
                },
            }
            url = f"ws://127.0.0.1:{bridge.listening.port}/twilio/stream"
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message(json.dumps(start))
                with pytest.raises(trio_websocket.ConnectionClosed):
                    while True:
                        await ws.get_message()
            await trio.sleep(0.1)
    # The real call's record is untouched; the replay is one log line.
    assert_served(report, bridge)
    rejected = [r for r in caplog.records if "token-rejected (stream token reused)" in r.message]
    assert len(rejected) == 1
    assert len(bridge.vapi.calls) == 1, "no second assistant call for a replay"


async def test_health_and_readiness() -> None:
    async with running_bridge(server={"max_concurrent_calls": 1}) as bridge, \
            httpx.AsyncClient() as http:
        health = await http.get(bridge.ops_url + "/healthz")
        ready = await http.get(bridge.ops_url + "/readyz")
    assert (health.status_code, ready.status_code) == (200, 200)


@pytest.mark.parametrize("behaviour", [SimVapiBehaviour(audio_burst=True, end_after_replies=0,
                                                        greeting_clip="caller_1",
                                                        goodbye_clip="caller_3",
                                                        customer_audio_timeout_s=None)])
async def test_assistant_audio_faster_than_real_time_is_paced(
    behaviour: SimVapiBehaviour,
) -> None:
    with trio.fail_after(30):
        async with running_bridge(behaviour=behaviour) as bridge:
            report = await place_call(bridge.caller, SHORT_SCRIPT)
    assert_served(report, bridge)
    assert report.protocol_violations == []


@pytest.mark.parametrize(("audio_format", "sample_rate"), [("pcm_s16le", 8000),
                                                           ("pcm_s16le", 16000)])
async def test_a_vapi_leg_in_pcm_is_converted_both_ways(
    audio_format: str, sample_rate: int
) -> None:
    vapi = {"audio_format": audio_format, "sample_rate": sample_rate}
    with trio.fail_after(30):
        async with running_bridge(vapi=vapi) as bridge:
            report = await place_call(bridge.caller, SHORT_SCRIPT)
    assert_served(report, bridge)
    [vapi_call] = bridge.vapi.calls.values()
    assert vapi_call.audio_format == (audio_format, sample_rate)
    # The simulated Vapi heard the caller speak (energy-based detection on PCM).
    assert [e.message["role"] for e in vapi_call.messages("transcript")].count("user") == 1
    assert report.bytes_heard > 8000  # over a second of assistant audio reached the caller
