"""Repeated Vapi auth failures become one rate-limited ERROR; callers' numbers can be masked.

Charter: records go through the real logging setup (``configure_logging`` to a text
stream the test reads, or the real server's log), as an operator reads them; the
alarm's time is a clock the test sets, so its window and interval are exact.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
import trio

from tests import journald_fixture
from tests.harness import running_bridge
from voicebridge.bridge.outcome import CallRecord, Outcome
from voicebridge.config import Secret
from voicebridge.observability.alarms import (
    AUTH_ALARM_INTERVAL_S,
    AUTH_ALARM_WINDOW_S,
    AUTH_FAILURES_TO_ALARM,
    AuthFailureAlarm,
)
from voicebridge.observability.logs import configure_logging, log_event, mask_number
from voicebridge.sim.caller import Hangup, WaitForAssistantDone, place_call


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    with journald_fixture.saved_voicebridge_logging():
        configure_logging(logging.INFO, target="stderr", stderr=stream)
        yield stream


def failed(kind: str = "auth", call_sid: str = "CA1") -> CallRecord:
    return CallRecord(
        call_sid=call_sid, stream_sid="MZ1", vapi_call_id="", outcome=Outcome.ASSISTANT_LEG_FAILED,
        detail=f"Vapi create-call failed ({kind}): HTTP 401", duration_s=0.2,
        frames_from_caller=0, frames_to_assistant=0, frames_dropped=0, assistant_bytes=0,
        media_messages_to_caller=0, heard_ms=0, first_audio_ms=None, barge_ins=(),
        leg_failure=kind,  # type: ignore[arg-type]
    )


def alarms(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if "refused the API key" in line]


def test_repeated_auth_failures_raise_one_error_per_interval(text_log: io.StringIO) -> None:
    now = [0.0]
    alarm = AuthFailureAlarm(clock=lambda: now[0])
    # One failure short of the alarm, plus failures of other kinds: nothing.
    for _ in range(AUTH_FAILURES_TO_ALARM - 1):
        alarm.call_ended(failed())
        now[0] += 1
    alarm.call_ended(failed("timeout"))
    assert alarms(text_log) == []
    alarm.call_ended(failed(call_sid="CA9"))
    [first] = alarms(text_log)
    assert first.startswith("ERROR")
    assert f"for {AUTH_FAILURES_TO_ALARM} calls" in first and "CALL_SID=CA9" in first
    # More failures within the interval: counted, not logged.
    for _ in range(5):
        now[0] += 1
        alarm.call_ended(failed())
    assert len(alarms(text_log)) == 1
    # The next one after the interval reports every failure since the first alarm.
    now[0] = AUTH_FAILURES_TO_ALARM + AUTH_ALARM_INTERVAL_S
    alarm.call_ended(failed())
    assert len(alarms(text_log)) == 2
    assert "for 6 calls" in alarms(text_log)[1]


def test_auth_failures_spread_wider_than_the_window_raise_nothing(text_log: io.StringIO) -> None:
    now = [0.0]
    alarm = AuthFailureAlarm(clock=lambda: now[0])
    for _ in range(10):
        alarm.call_ended(failed())
        now[0] += AUTH_ALARM_WINDOW_S / (AUTH_FAILURES_TO_ALARM - 1) + 1
    assert alarms(text_log) == []


async def test_a_revoked_key_reaches_the_log_as_an_error(text_log: io.StringIO) -> None:
    wrong = {"vapi_api_key": Secret("revoked-" + "0" * 16)}
    with trio.fail_after(30):
        async with running_bridge(credentials=wrong) as bridge:
            for _ in range(AUTH_FAILURES_TO_ALARM):
                await place_call(bridge.caller, (WaitForAssistantDone(quiet_s=0.3),))
    [line] = alarms(text_log)
    assert line.startswith("ERROR") and "vapi-api-key" in line


def test_mask_number_keeps_the_last_four_digits() -> None:
    assert mask_number("+15551230123") == "+xxxxxxx0123"
    assert mask_number("+442071838750") == "+xxxxxxxx8750"
    assert mask_number("123") == "123"
    assert mask_number("anonymous") == "anonymous"


def test_masking_covers_the_number_fields_and_the_message(text_log: io.StringIO) -> None:
    from voicebridge.observability.logs import set_number_masking

    log = logging.getLogger("voicebridge.test.masking")
    log_event(log, logging.INFO, "call-start", "call CA1 started", caller="+15551230123")
    set_number_masking(True)
    log_event(log, logging.INFO, "call-start", "call CA2 started", caller="+15551230123")
    log_event(log, logging.INFO, "call-placed", "outbound call CA3 to +15559870000 placed",
              to="+15559870000", call_sid="CA3")
    set_number_masking(False)
    lines = text_log.getvalue().splitlines()
    assert "CALLER=+15551230123" in lines[0]
    assert "CALLER=+xxxxxxx0123" in lines[1] and "1555123" not in lines[1]
    assert lines[2].count("+xxxxxxx0000") == 2 and "1555987" not in lines[2]


async def test_the_server_masks_callers_when_configured(text_log: io.StringIO) -> None:
    with trio.fail_after(30):
        async with running_bridge(server={"mask_caller_numbers": True}) as bridge:
            await place_call(bridge.caller, (WaitForAssistantDone(quiet_s=0.3), Hangup()))
    [start] = [line for line in text_log.getvalue().splitlines() if "started" in line]
    assert "CALLER=+xxxxxxx" in start
