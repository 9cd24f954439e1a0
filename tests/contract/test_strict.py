"""The strict check itself: it must fail where Vapi's schema says no, and only there.

Plain synchronous tests against real SDK types (imported through ``tests.contract.sdk``).
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest

from tests.contract.sdk import (
    AssistantOverrides,
    Call,
    CallTransport_VapiWebsocket,
    ClientMessageMessage,
    RawCallsClient,
    ServerMessageResponseToolCalls,
    ServerMessageResponseTransferDestinationRequest,
)
from tests.contract.strict import Mismatch, mismatches, model_from_signature

CreateCall = model_from_signature("CreateCallRequest", RawCallsClient.create)

GOOD_BODY: dict[str, Any] = {
    "name": "vb CA1",
    "assistantId": "asst-1",
    "assistantOverrides": {"clientMessages": ["status-update"], "metadata": {"n": [1, None]}},
    "transport": {
        "provider": "vapi.websocket",
        "audioFormat": {"format": "mulaw", "container": "raw", "sampleRate": 8000},
    },
}
CALL = {
    "id": "c1",
    "orgId": "o1",
    "createdAt": "2026-12-02T02:00:00.000Z",
    "updatedAt": "2026-12-02T02:00:01.000Z",
    "type": "vapi.websocketCall",
}


def paths(found: list[Mismatch]) -> list[str]:
    return [m.path for m in found]


def with_(document: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``document`` with the value at ``path`` replaced (or added)."""
    copy = dict(document)
    if len(path) == 1:
        copy[path[0]] = value
    else:
        copy[path[0]] = with_(document[path[0]], path[1:], value)
    return copy


def test_a_good_create_body_passes() -> None:
    assert mismatches(GOOD_BODY, CreateCall) == []


def test_the_create_body_model_has_the_sdks_wire_names() -> None:
    """The model's aliases are exactly the keys of the JSON the SDK's ``create`` sends."""
    source = inspect.getsource(RawCallsClient.create)
    sent = set(re.findall(r'^\s+"(\w+)": ', source, re.MULTILINE))
    keys = {info.alias for info in CreateCall.model_fields.values()}
    assert {"assistantId", "assistantOverrides", "phoneNumberId", "transport"} <= keys
    assert keys == sent


@pytest.mark.parametrize(
    ("path", "value", "where", "says"),
    [
        (("metadata",), {"x": 1}, "$.metadata", "unknown key"),
        (("assistantOverrides", "maxDuration"), 600, "$.assistantOverrides.maxDuration", "unknown"),
        (("transport", "provider"), "vapi.websockets", "$.transport.provider", "not one of"),
        (("transport", "audioFormat", "format"), "ulaw", "$.transport.audioFormat.format", "not"),
        (("transport", "audioFormat", "sampleRate"), "8000", "$.transport.audioFormat.sampleRate",
         "expected number"),
        (("assistantOverrides", "clientMessages"), ["status-updates"],
         "$.assistantOverrides.clientMessages[0]", "not one of"),
        (("assistantOverrides", "firstMessage"), 7, "$.assistantOverrides.firstMessage",
         "expected string"),
        (("assistantOverrides", "maxDurationSeconds"), True,
         "$.assistantOverrides.maxDurationSeconds", "expected number"),
        (("name",), 40, "$.name", "expected string"),
    ],
)  # fmt: skip
def test_a_create_body_with_one_fault_fails_there(
    path: tuple[str, ...], value: Any, where: str, says: str
) -> None:
    [found] = mismatches(with_(GOOD_BODY, path, value), CreateCall)
    assert found.path == where
    assert says in found.problem


def test_a_missing_required_field_fails() -> None:
    body = with_(GOOD_BODY, ("transport", "audioFormat"), {"format": "mulaw"})
    [found] = mismatches(body, CreateCall)
    assert (found.path, found.problem) == (
        "$.transport.audioFormat",
        "missing required 'sampleRate' (AudioFormat)",
    )


def test_a_tagged_union_needs_its_tag() -> None:
    transport = {"audioFormat": {"format": "mulaw", "sampleRate": 8000}}
    [found] = mismatches(with_(GOOD_BODY, ("transport",), transport), CreateCall)
    assert (found.path, found.problem) == ("$.transport", "missing the discriminant 'provider'")


def test_client_messages_are_told_apart_by_type() -> None:
    started = {"type": "speech-update", "status": "started", "role": "user", "turn": 0}
    assert mismatches(started, ClientMessageMessage) == []
    [found] = mismatches({**started, "status": "begun"}, ClientMessageMessage)
    assert (found.path, found.problem) == ("$.status", "'begun' is not one of 'started', 'stopped'")
    [found] = mismatches({**started, "type": "speech-updated"}, ClientMessageMessage)
    assert found.path == "$.type"
    found = mismatches({"type": "transcript", "role": "user"}, ClientMessageMessage)
    assert [str(m) for m in found] == [
        "$: missing required 'transcriptType' (ClientMessageTranscript)",
        "$: missing required 'transcript' (ClientMessageTranscript)",
    ]


def test_nested_models_are_checked_with_their_wire_names() -> None:
    message = {"type": "user-interrupted", "turnId": "t1", "call": CALL}
    assert mismatches(message, ClientMessageMessage) == []
    bare_call = {"id": "c1", "orgId": "o1", "type": "vapi.websocketCall"}
    found = mismatches({**message, "call": bare_call}, ClientMessageMessage)
    assert [str(m) for m in found] == [
        "$.call: missing required 'createdAt' (Call)",
        "$.call: missing required 'updatedAt' (Call)",
    ]
    # A field the SDK types with a name it imports further down keeps its wire name.
    overrides_call = {**CALL, "assistantOverrides": {"maxDurationSeconds": 60}}
    assert mismatches(overrides_call, Call) == []
    assert paths(mismatches({**CALL, "assistant_overrides": {}}, Call)) == ["$.assistant_overrides"]
    assert paths(mismatches({**CALL, "createdAt": "yesterday"}, Call)) == ["$.createdAt"]


def test_responses_are_checked_item_by_item() -> None:
    good = {"results": [{"toolCallId": "t1", "name": "lookup", "result": "ok"}]}
    assert mismatches(good, ServerMessageResponseToolCalls) == []
    bad = {"results": [{"toolCallId": "t1", "result": "ok", "output": "x"}]}
    assert [str(m) for m in mismatches(bad, ServerMessageResponseToolCalls)] == [
        "$.results[0]: missing required 'name' (ToolCallResult)",
        "$.results[0].output: unknown key (ToolCallResult declares no 'output')",
    ]
    destination = {"destination": {"type": "number", "number": "+15550100777"}}
    assert mismatches(destination, ServerMessageResponseTransferDestinationRequest) == []
    phone = {"destination": {"type": "phone", "number": "+15550100777"}}
    [found] = mismatches(phone, ServerMessageResponseTransferDestinationRequest)
    assert found.path == "$.destination.type"


def test_a_hole_is_allowed_on_its_model_only() -> None:
    transport = {"provider": "vapi.websocket", "websocketCallUrl": "wss://x/1/transport"}
    call = {**CALL, "transport": transport}
    [found] = mismatches(call, Call)
    assert found.path == "$.transport.websocketCallUrl"
    holes = {CallTransport_VapiWebsocket: {"websocketCallUrl": "the SDK lacks it"}}
    assert mismatches(call, Call, holes=holes) == []
    overrides = {"websocketCallUrl": "wss://x"}
    assert paths(mismatches(overrides, AssistantOverrides, holes=holes)) == ["$.websocketCallUrl"]


def test_a_type_without_a_rule_is_an_error_not_a_pass() -> None:
    with pytest.raises(TypeError, match="no rule"):
        mismatches(b"x", bytes)
