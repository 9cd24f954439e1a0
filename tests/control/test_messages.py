"""Parsing Vapi's server messages (every documented tool-call shape) and encoding answers."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from voicebridge.control import messages as msg

CALL = {"id": "vapi-1", "assistantOverrides": {"metadata": {"twilioCallSid": "CA1"}}}


def parse(message: dict[str, Any]) -> msg.ServerMessage:
    return msg.parse_webhook(orjson.dumps({"message": {"call": CALL, **message}}))


@pytest.mark.parametrize(
    "message",
    [
        {
            "toolCallList": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"order": 7}'},
                }
            ]
        },
        {"toolCallList": [{"id": "t1", "function": {"name": "lookup", "arguments": {"order": 7}}}]},
        {"toolCalls": [{"id": "t1", "name": "lookup", "arguments": {"order": 7}}]},
        {"toolCalls": [{"id": "t1", "name": "lookup", "parameters": '{"order": 7}'}]},
        {
            "toolWithToolCallList": [
                {
                    "type": "function",
                    "function": {"name": "lookup"},
                    "toolCall": {"id": "t1", "function": {"arguments": {"order": 7}}},
                }
            ]
        },
        {
            "toolWithToolCallList": [
                {"name": "lookup", "toolCall": {"id": "t1", "arguments": '{"order": 7}'}}
            ]
        },
    ],
)
def test_every_tool_call_shape(message: dict[str, Any]) -> None:
    parsed = parse({"type": "tool-calls", **message})
    assert isinstance(parsed, msg.ToolCallsRequest) and not parsed.legacy
    [call] = parsed.tool_calls
    assert (call.id, call.name, dict(call.arguments)) == ("t1", "lookup", {"order": 7})
    assert parsed.call == msg.CallRef(vapi_call_id="vapi-1", call_sid="CA1")


def test_legacy_function_call_and_its_answer() -> None:
    parsed = parse({"type": "function-call", "functionCall": {"name": "f", "parameters": {}}})
    assert isinstance(parsed, msg.ToolCallsRequest) and parsed.legacy
    result = msg.ToolResult(tool_call_id=parsed.tool_calls[0].id, name="f", result="ok")
    assert orjson.loads(msg.encode_results([result], legacy=True)) == {"result": "ok"}


def test_results_are_single_lines_in_order() -> None:
    body = msg.encode_results(
        [
            msg.ToolResult(tool_call_id="a", name="x", result="line one\n  line\ttwo"),
            msg.ToolResult(tool_call_id="b", name="y", error="bad\nthing"),
            msg.ToolResult(tool_call_id="c", name="z", result="w" * 10_000),
        ]
    )
    results = orjson.loads(body)["results"]
    assert [r["toolCallId"] for r in results] == ["a", "b", "c"]
    assert results[0] == {"toolCallId": "a", "name": "x", "result": "line one line two"}
    assert results[1] == {"toolCallId": "b", "name": "y", "error": "bad thing"}
    assert len(results[2]["result"]) == msg.MAX_RESULT_CHARS


def test_other_messages() -> None:
    status = parse({"type": "status-update", "status": "ended", "endedReason": "hangup"})
    assert status == msg.StatusReport(call=status.call, status="ended", ended_reason="hangup")
    report = parse(
        {
            "type": "end-of-call-report",
            "endedReason": "customer-ended-call",
            "cost": 0.12,
            "analysis": {"summary": "Asked about an order."},
            "artifact": {"recordingUrl": "https://r.example/1.wav"},
        }
    )
    assert isinstance(report, msg.EndOfCallReport)
    assert (report.cost, report.summary, report.recording_url) == (
        0.12,
        "Asked about an order.",
        "https://r.example/1.wav",
    )
    control = parse(
        {
            "type": "phone-call-control",
            "request": "forward",
            "destination": {"type": "number", "number": "+15550100777"},
        }
    )
    assert control == msg.PhoneCallControl(
        call=control.call, request="forward", destination="+15550100777"
    )
    assert isinstance(
        parse({"type": "transfer-destination-request"}), msg.TransferDestinationRequest
    )
    assert parse({"type": "speech-update"}) == msg.OtherMessage(
        call=status.call, type="speech-update"
    )


def test_call_sid_found_in_variable_values_and_absent_call() -> None:
    body = {
        "message": {
            "type": "hang",
            "call": {"id": "v", "assistantOverrides": {"variableValues": {"twilioCallSid": "CA9"}}},
        }
    }
    assert msg.parse_webhook(orjson.dumps(body)).call.call_sid == "CA9"
    assert msg.parse_webhook(b'{"message": {"type": "hang"}}').call == msg.CallRef()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"type": "tool-calls"}',
        b'{"message": "tool-calls"}',
        b'{"message": {"type": 7}}',
        b'{"message": {"type": "tool-calls"}}',
        b'{"message": {"type": "tool-calls", "toolCallList": [{"id": "t"}]}}',
        b'{"message": {"type": "tool-calls", "toolCallList": [{"id": "t", "name": "x", '
        b'"arguments": "{broken"}]}}',
        b'{"message": {"type": "tool-calls", "toolCallList": [{"name": "x"}]}}',
        b'{"message": {"type": "phone-call-control", "request": "explode"}}',
        b'{"message": {"type": "status-update"}}',
    ],
)
def test_malformed(body: bytes) -> None:
    with pytest.raises(msg.MalformedWebhook):
        msg.parse_webhook(body)
