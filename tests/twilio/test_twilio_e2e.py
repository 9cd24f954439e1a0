"""What Twilio really does, against the real server on loopback: shared-key signed
webhooks, ``<Stream statusCallback>`` events, a start announcing more than the inbound
track.

Charter: the real server (``running_bridge``) on 127.0.0.1, port 0, a ``trio.fail_after``
guard on every test; requests are signed by twilio-python's own ``RequestValidator``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families
from twilio.request_validator import RequestValidator

from tests.harness import SHORT_ASSISTANT, Bridge, running_bridge
from voicebridge.config import Secret
from voicebridge.observability.logs import record_fields, render_message
from voicebridge.sim.caller import Speak, WaitForAssistantDone, place_call
from voicebridge.web import STREAM_PATH, STREAM_STATUS_PATH, VOICE_PATH

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_KEY = "shared-key-secret-0123456789abcdef"
KEY_ID = "webhooks_sharedkey_0123456789abcdef"
SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"
#: Hears the greeting, answers; the assistant says goodbye and ends the call.
SHORT_SCRIPT = (
    WaitForAssistantDone(quiet_s=0.4),
    Speak("caller_2"),
    WaitForAssistantDone(quiet_s=0.4),
)


def voice_form(call_sid: str) -> dict[str, str]:
    return {
        "CallSid": call_sid,
        "AccountSid": "AC" + "d" * 32,
        "From": "+15550100001",
        "To": "+15550100002",
        "CallStatus": "ringing",
        "Direction": "inbound",
    }


async def post_signed(
    bridge: Bridge,
    path: str,
    form: dict[str, str],
    *,
    key: str | None = None,
    settings: str | None = None,
    algorithm: str = "HMAC_SHA1",
) -> httpx.Response:
    """POST ``form`` to ``path`` as Twilio does: signed over the public URL with ``key``
    (default: the account's Auth Token) and, for shared-key signing, the settings header."""
    url = bridge.config.server.public_url + path
    validator = RequestValidator(key if key is not None else bridge.caller.auth_token)
    headers = {"X-Twilio-Signature": validator.compute_signature(url, form, algorithm)}
    if settings is not None:
        headers[SETTINGS_HEADER] = settings
    async with httpx.AsyncClient() as http:
        return await http.post(bridge.url + path, data=form, headers=headers)


def shared_key_sections(*, configured: bool = True) -> dict[str, Any]:
    if not configured:
        return {}
    return {
        "twilio": {"shared_key_id": KEY_ID},
        "credentials": {"twilio_shared_key": Secret(SHARED_KEY)},
    }


async def metric(bridge: Bridge, name: str, **labels: str) -> float:
    async with httpx.AsyncClient() as http:
        response = await http.get(bridge.ops_url + "/metrics")
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


# ------------------------------------------------------------- shared-key signing


async def test_shared_key_signed_webhooks_are_accepted_and_others_refused() -> None:
    settings = f"key={KEY_ID},algorithm=HMAC_SHA256"
    with trio.fail_after(20):
        async with running_bridge(**shared_key_sections()) as bridge:
            accepted = await post_signed(
                bridge,
                VOICE_PATH,
                voice_form("CA" + "1" * 32),
                key=SHARED_KEY,
                settings=settings,
                algorithm="HMAC_SHA256",
            )
            # The Auth Token still signs the webhooks not moved to shared-key signing.
            legacy = await post_signed(bridge, VOICE_PATH, voice_form("CA" + "2" * 32))
            other_key = await post_signed(
                bridge,
                VOICE_PATH,
                voice_form("CA" + "3" * 32),
                key=SHARED_KEY,
                settings="key=webhooks_sharedkey_other,algorithm=HMAC_SHA256",
                algorithm="HMAC_SHA256",
            )
            # The settings header with the Auth Token's own signature: not accepted.
            token_signed = await post_signed(
                bridge, VOICE_PATH, voice_form("CA" + "4" * 32), settings=settings
            )
            rejected = await metric(
                bridge, "voicebridge_webhook_auth_failures_total", path=VOICE_PATH
            )
        async with running_bridge(**shared_key_sections(configured=False)) as bridge:
            unconfigured = await post_signed(
                bridge,
                VOICE_PATH,
                voice_form("CA" + "5" * 32),
                key=SHARED_KEY,
                settings=settings,
                algorithm="HMAC_SHA256",
            )
    assert accepted.status_code == 200 and "<Connect" in accepted.text
    assert legacy.status_code == 200 and "<Connect" in legacy.text
    assert [other_key.status_code, token_signed.status_code] == [403, 403]
    assert rejected == 2
    assert unconfigured.status_code == 403


async def test_a_whole_call_whose_webhooks_are_shared_key_signed() -> None:
    """The voice webhook, the status callbacks and the action: all signed with the
    shared key (the simulated Twilio is told to sign that way), and the call is served."""
    with trio.fail_after(30):
        async with running_bridge(**shared_key_sections()) as bridge:
            shared = attrs.evolve(bridge.caller, shared_key=SHARED_KEY, shared_key_id=KEY_ID)
            report = await place_call(shared, SHORT_SCRIPT)
    assert report.protocol_violations == []
    assert report.streamed and report.final_action == "hangup"


# ---------------------------------------------------------- <Stream statusCallback>


async def test_the_stream_reports_its_start_and_stop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="voicebridge.web")
    with trio.fail_after(30):
        async with running_bridge() as bridge:
            report = await place_call(bridge.caller, SHORT_SCRIPT)
            callback = bridge.config.server.public_url + STREAM_STATUS_PATH
            errors = await metric(bridge, "voicebridge_stream_errors_total")
    assert f'statusCallback="{callback}"' in report.webhook_twiml
    assert report.protocol_violations == [], "every status callback was answered 2xx"
    # The status route's own lines (the call's call-start and call-end carry the
    # stream's id too, when an earlier test left the call's logger at INFO).
    events = [
        record_fields(r)
        for r in caplog.records
        if r.name == "voicebridge.web" and record_fields(r).get("STREAM_SID")
    ]
    assert [(e["EVENT"], e["CALL_SID"], e["STREAM_SID"]) for e in events] == [
        ("stream-started", report.call_sid, report.stream_sid),
        ("stream-stopped", report.call_sid, report.stream_sid),
    ]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "voicebridge.web")
    assert errors == 0


async def test_a_stream_error_is_one_warning_and_counted_by_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge")
    call_sid, stream_sid = "CA" + "6" * 32, "MZ" + "6" * 32

    def status(error: str) -> dict[str, str]:
        return {
            "AccountSid": "AC" + "d" * 32,
            "CallSid": call_sid,
            "StreamSid": stream_sid,
            "StreamName": stream_sid,
            "StreamEvent": "stream-error",
            "StreamError": error,
            "Timestamp": "2026-12-02T01:02:03.456Z",
        }

    hostile = "31920 Stream - WebSocket - Handshake Error\nWARNING forged line \x1b[2J"
    with trio.fail_after(20):
        async with running_bridge() as bridge:
            answers = [
                (await post_signed(bridge, STREAM_STATUS_PATH, status(error))).status_code
                for error in (
                    hostile,
                    "31910 Stream - WebSocket - Protocol Error",
                    "broken",
                    "31921 Stream - WebSocket - Close Error",
                )
            ]
            # Unsigned: refused like every Twilio webhook, and neither logged nor counted.
            async with httpx.AsyncClient() as http:
                unsigned = await http.post(
                    bridge.url + STREAM_STATUS_PATH, data=status("31920 forged")
                )
            counts = {
                code: await metric(bridge, "voicebridge_stream_errors_total", code=code)
                for code in ("31920", "31910", "unknown", "31921")
            }
    assert answers == [204, 204, 204, 204]
    assert unsigned.status_code == 403
    assert counts == {"31920": 1, "31910": 1, "unknown": 1, "31921": 1}
    warnings = [r for r in caplog.records if record_fields(r).get("EVENT") == "stream-error"]
    assert [(r.levelno, record_fields(r)["ERROR_CODE"]) for r in warnings] == [
        (logging.WARNING, "31920"),
        (logging.WARNING, "31910"),
        (logging.WARNING, "unknown"),
        (logging.INFO, "31921"),  # the bridge closing the stream on purpose
    ]
    assert {record_fields(r)["CALL_SID"] for r in warnings} == {call_sid}
    # Twilio's words are peer text: one line, escaped, in every output.
    shown = render_message(warnings[0])
    assert "\n" not in shown and "\x1b" not in shown
    assert shown.startswith(f"call {call_sid}: Twilio reports media stream error 31920: ")
    assert "\\nWARNING forged line \\x1b[2J" in shown


# ------------------------------------------------------------------ start.tracks


async def test_a_start_with_both_tracks_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """A bidirectional stream carries the caller's audio alone: a start announcing more
    tracks is a protocol error, one line, and no assistant call is made."""
    caplog.set_level(logging.INFO, logger="voicebridge")
    call_sid, stream_sid = "CA" + "7" * 32, "MZ" + "7" * 32
    with trio.fail_after(20):
        async with running_bridge(behaviour=SHORT_ASSISTANT) as bridge:
            answer = await post_signed(bridge, VOICE_PATH, voice_form(call_sid))
            token = answer.text.split('name="token" value="')[1].split('"')[0]
            start = {
                "accountSid": bridge.caller.account_sid,
                "streamSid": stream_sid,
                "callSid": call_sid,
                "tracks": ["inbound", "outbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": {"token": token},
            }
            url = f"ws://127.0.0.1:{bridge.listening.port}{STREAM_PATH}"
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message(
                    json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
                )
                await ws.send_message(
                    json.dumps(
                        {
                            "event": "start",
                            "sequenceNumber": "1",
                            "streamSid": stream_sid,
                            "start": start,
                        }
                    )
                )
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
            vapi_calls = len(bridge.vapi.calls)
    assert closed.value.reason is not None and closed.value.reason.code == 1000
    assert vapi_calls == 0, "no assistant call for a refused start"
    [end] = [
        record_fields(r)
        for r in caplog.records
        if record_fields(r).get("EVENT") == "call-end" and record_fields(r).get("CALL_SID")
    ]
    assert (end["CALL_SID"], end["OUTCOME"]) == (call_sid, "protocol-error")
    assert end["DETAIL"] == "unexpected tracks ['inbound', 'outbound'] (want ['inbound'])"


async def test_forged_stream_errors_from_another_process_are_refused_beside_a_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An attacker posts stream-error callbacks from 127.0.0.2 (its own process) while
    a real call runs: every one is answered 403, none is logged as a stream error or
    counted, and the call beside it is served untouched."""
    caplog.set_level(logging.INFO, logger="voicebridge")
    forged = 60
    with trio.fail_after(40):
        async with running_bridge() as bridge:
            attack: list[dict[str, int]] = []

            async def forger() -> None:
                result = await trio.run_process(
                    [
                        sys.executable,
                        "-m",
                        "tests.twilio.forged_status",
                        f"--target=127.0.0.1:{bridge.listening.port}",
                        "--source=127.0.0.2",
                        f"--public-url={bridge.config.server.public_url}",
                        f"--count={forged}",
                    ],
                    cwd=REPO_ROOT,
                    capture_stdout=True,
                )
                attack.append(json.loads(result.stdout))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(forger)
                witness = await place_call(bridge.caller, SHORT_SCRIPT)
            errors = await metric(bridge, "voicebridge_stream_errors_total")
            rejected = await metric(
                bridge, "voicebridge_webhook_auth_failures_total", path=STREAM_STATUS_PATH
            )
    assert attack == [{"403": forged}]
    assert (errors, rejected) == (0, forged)
    assert witness.protocol_violations == [] and witness.final_action == "hangup"
    assert not [r for r in caplog.records if record_fields(r).get("EVENT") == "stream-error"]
