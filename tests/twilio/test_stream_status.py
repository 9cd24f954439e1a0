"""Parsing Twilio's ``<Stream statusCallback>`` forms (sans-I/O: plain functions)."""

from __future__ import annotations

import pytest

from voicebridge.twilio.stream_status import (
    MAX_ERROR_CHARS,
    UNKNOWN_CODE,
    StreamStatus,
    StreamStatusUnrecognized,
    parse_stream_status,
)

CALL_SID = "CA" + "1" * 32
STREAM_SID = "MZ" + "2" * 32


def form(event: str, **extra: str) -> dict[str, str]:
    return {
        "AccountSid": "AC" + "3" * 32,
        "CallSid": CALL_SID,
        "StreamSid": STREAM_SID,
        "StreamName": STREAM_SID,
        "StreamEvent": event,
        "Timestamp": "2026-12-02T01:02:03.456Z",
        **extra,
    }


@pytest.mark.parametrize("event", ["stream-started", "stream-stopped"])
def test_start_and_stop(event: str) -> None:
    assert parse_stream_status(form(event)) == StreamStatus(
        event=event,  # type: ignore[arg-type]  # the parametrized Literal
        call_sid=CALL_SID,
        stream_sid=STREAM_SID,
        error="",
        code="",
        timestamp="2026-12-02T01:02:03.456Z",
    )


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"StreamError": "31920 Stream - WebSocket - Handshake Error"}, "31920"),
        ({"StreamError": "Handshake failed (error 31920): got 403"}, "31920"),
        ({"StreamError": "Stream error", "ErrorCode": "31910"}, "31910"),
        # ErrorCode wins over a number in the text; a malformed one does not count.
        ({"StreamError": "31920 x", "ErrorCode": "31910"}, "31910"),
        ({"StreamError": "31920 x", "ErrorCode": "3191O"}, "31920"),
        # Longer or shorter numbers are not Twilio codes.
        ({"StreamError": "took 123456 ms, code 3192"}, UNKNOWN_CODE),
        ({"StreamError": ""}, UNKNOWN_CODE),
        ({}, UNKNOWN_CODE),
    ],
)
def test_an_error_and_its_code(extra: dict[str, str], code: str) -> None:
    status = parse_stream_status(form("stream-error", **extra))
    assert isinstance(status, StreamStatus)
    assert (status.event, status.code, status.error) == (
        "stream-error",
        code,
        extra.get("StreamError", ""),
    )


def test_a_long_error_is_cut() -> None:
    status = parse_stream_status(form("stream-error", StreamError="31920 " + "x" * 5000))
    assert isinstance(status, StreamStatus)
    assert len(status.error) == MAX_ERROR_CHARS and status.code == "31920"


def test_an_unknown_event_is_unrecognized_not_an_error() -> None:
    assert parse_stream_status(form("stream-paused" + "!" * 100)) == StreamStatusUnrecognized(
        event=("stream-paused" + "!" * 100)[:40], call_sid=CALL_SID
    )
    assert parse_stream_status({}) == StreamStatusUnrecognized(event="", call_sid="")
