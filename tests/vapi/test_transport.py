"""voicebridge.vapi.transport: plain synchronous tests fed the frame shapes of PROTOCOLS.md §2."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from voicebridge.errors import LocalProtocolError, RemoteProtocolError
from voicebridge.vapi import transport
from voicebridge.vapi.transport import (
    AssistantStarted,
    ConversationUpdate,
    Hang,
    ModelOutput,
    SpeechUpdate,
    StatusUpdate,
    ToolCall,
    ToolCalls,
    Transcript,
    TransferUpdate,
    Unrecognized,
    UserInterrupted,
    VapiEvent,
    VoiceInput,
    parse_message,
)

SOCKET_URL = "wss://api.vapi.ai/7f3c2d0e-secret-call-id/transport"

#: What Vapi attaches to every message: never to be kept, copied or quoted.
CALL_OBJECT: dict[str, Any] = {
    "id": "7f3c2d0e",
    "type": "vapi.websocketCall",
    "transport": {"provider": "vapi.websocket", "websocketCallUrl": SOCKET_URL},
    "assistantOverrides": {"metadata": {"twilioCallSid": "CA" + "0" * 32}},
}


def bare(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


def enveloped(message: dict[str, Any]) -> str:
    return orjson.dumps({"message": message}).decode()


def with_call(message: dict[str, Any]) -> str:
    """The shape seen in the field: bare, with a timestamp and the whole call object."""
    return orjson.dumps({**message, "timestamp": 1716900000123, "call": CALL_OBJECT}).decode()


FRAMINGS = pytest.mark.parametrize("frame", [bare, enveloped, with_call], ids=lambda f: f.__name__)

WELL_FORMED: list[tuple[dict[str, Any], VapiEvent]] = [
    (
        {"type": "speech-update", "status": "started", "role": "user", "turn": 2},
        SpeechUpdate(status="started", role="user", turn=2),
    ),
    (
        {"type": "speech-update", "status": "stopped", "role": "assistant"},
        SpeechUpdate(status="stopped", role="assistant", turn=None),
    ),
    ({"type": "user-interrupted", "turnId": "t-7"}, UserInterrupted(turn_id="t-7")),
    ({"type": "user-interrupted"}, UserInterrupted(turn_id=None)),
    (
        {"type": "transcript", "role": "user", "transcriptType": "final", "transcript": "Hi"},
        Transcript(role="user", transcript_type="final", transcript="Hi"),
    ),
    ({"type": "status-update", "status": "in-progress"}, StatusUpdate(status="in-progress")),
    (
        {
            "type": "status-update",
            "status": "ended",
            "endedReason": "assistant-ended-call",
        },
        StatusUpdate(status="ended", ended_reason="assistant-ended-call"),
    ),
    (
        {
            "type": "status-update",
            "status": "forwarding",
            "destination": {"type": "number", "number": "+15550100"},
        },
        StatusUpdate(status="forwarding", destination={"type": "number", "number": "+15550100"}),
    ),
    (
        {"type": "model-output", "output": "Hello th", "turnId": "t-1"},
        ModelOutput(output="Hello th", turn_id="t-1"),
    ),
    (
        {"type": "model-output", "output": [{"id": "call_1", "type": "function"}]},
        ModelOutput(output='[{"id":"call_1","type":"function"}]'),
    ),
    ({"type": "voice-input", "input": "Hello there."}, VoiceInput(input="Hello there.")),
    (
        {
            "type": "tool-calls",
            "toolCallList": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"order": 42}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "transfer", "arguments": {"to": "sales"}},
                },
            ],
        },
        ToolCalls(
            tool_calls=(
                ToolCall(id="call_1", name="lookup", arguments={"order": 42}),
                ToolCall(id="call_2", name="transfer", arguments={"to": "sales"}),
            )
        ),
    ),
    (
        {"type": "transfer-update", "destination": {"type": "number", "number": "+15550100"}},
        TransferUpdate(destination={"type": "number", "number": "+15550100"}),
    ),
    (
        {"type": "conversation-update", "messages": [{"role": "bot"}, {"role": "user"}]},
        ConversationUpdate(message_count=2),
    ),
    ({"type": "hang"}, Hang()),
    ({"type": "assistant.started"}, AssistantStarted()),
    (
        {"type": "language-change-detected", "language": "fr"},
        Unrecognized(type="language-change-detected"),
    ),
    ({"type": "workflow.node.started"}, Unrecognized(type="workflow.node.started")),
]


@FRAMINGS
@pytest.mark.parametrize(
    ("message", "expected"), WELL_FORMED, ids=[str(m["type"]) for m, _ in WELL_FORMED]
)
def test_parses_every_message_type(
    frame: Callable[[dict[str, Any]], str], message: dict[str, Any], expected: VapiEvent
) -> None:
    assert parse_message(frame(message)) == expected


def test_hang_is_a_stall_not_an_end() -> None:
    event = parse_message('{"type":"hang"}')
    assert isinstance(event, Hang)
    assert not isinstance(event, StatusUpdate)


def test_unknown_fields_are_ignored() -> None:
    event = parse_message(
        with_call({"type": "user-interrupted", "turnId": "t-3", "artifact": {"x": [1, 2]}})
    )
    assert event == UserInterrupted(turn_id="t-3")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            {"type": "speech-update", "status": "started", "role": "user", "turn": "2"},
            SpeechUpdate(status="started", role="user", turn=None),
        ),
        (
            {"type": "speech-update", "status": "started", "role": "user", "turn": True},
            SpeechUpdate(status="started", role="user", turn=None),
        ),
        ({"type": "user-interrupted", "turnId": 5}, UserInterrupted(turn_id=None)),
        (
            {"type": "status-update", "status": "ended", "endedReason": 3, "destination": "x"},
            StatusUpdate(status="ended"),
        ),
        ({"type": "transfer-update", "destination": ["x"]}, TransferUpdate(destination=None)),
    ],
)
def test_ill_typed_optional_fields_read_as_absent(
    message: dict[str, Any], expected: VapiEvent
) -> None:
    assert parse_message(bare(message)) == expected


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"a": 1, "b": [true]}', {"a": 1, "b": [True]}),
        ({"a": 1, "b": [True]}, {"a": 1, "b": [True]}),
        ("", {}),
        (None, {}),
        ("{}", {}),
    ],
    ids=["json-string", "object", "empty-string", "null", "empty-object-string"],
)
def test_tool_call_arguments_as_string_or_object(arguments: Any, expected: dict[str, Any]) -> None:
    function: dict[str, Any] = {"name": "lookup"}
    if arguments is not None:
        function["arguments"] = arguments
    event = parse_message(
        bare({"type": "tool-calls", "toolCallList": [{"id": "c1", "function": function}]})
    )
    assert event == ToolCalls(tool_calls=(ToolCall(id="c1", name="lookup", arguments=expected),))


@pytest.mark.parametrize(
    "message",
    [
        {"type": "tool-calls", "toolCalls": [{"id": "c1", "function": {"name": "f"}}]},
        {
            "type": "tool-calls",
            "toolWithToolCallList": [
                {"name": "f", "toolCall": {"id": "c1", "function": {"name": "f"}}}
            ],
        },
    ],
    ids=["toolCalls", "toolWithToolCallList"],
)
def test_tool_call_list_under_its_other_documented_names(message: dict[str, Any]) -> None:
    assert parse_message(bare(message)) == ToolCalls(
        tool_calls=(ToolCall(id="c1", name="f", arguments={}),)
    )


def test_unrecognized_type_is_cut_for_the_log() -> None:
    event = parse_message(bare({"type": "x" * 10_000}))
    assert event == Unrecognized(type="x" * transport.MAX_UNRECOGNIZED_TYPE_CHARS)


MALFORMED: list[tuple[str, str]] = [
    ("", "not JSON"),
    ("{", "not JSON"),
    ("type: hang", "not JSON"),
    ("[]", "JSON array, not an object"),
    ('"hang"', "JSON string, not an object"),
    ("42", "JSON number, not an object"),
    ("null", "JSON null, not an object"),
    ("{}", "no 'type'"),
    ('{"status":"ended"}', "no 'type'"),
    ('{"type":null}', "no 'type'"),
    ('{"type":7}', "'type' must be a string, got number"),
    ('{"type":["hang"]}', "'type' must be a string, got array"),
    ('{"message":"hang"}', "envelope 'message' must be an object, got string"),
    ('{"message":{}}', "no 'type'"),
    ('{"message":{"type":{}}}', "'type' must be a string, got object"),
    (
        '{"type":"speech-update","role":"user"}',
        "'speech-update' message: field 'status' is missing",
    ),
    (
        '{"type":"speech-update","status":"paused","role":"user"}',
        "field 'status' must be 'started' or 'stopped', got 'paused'",
    ),
    (
        '{"type":"speech-update","status":1,"role":"user"}',
        "field 'status' must be a string, got number",
    ),
    ('{"type":"speech-update","status":"started"}', "field 'role' is missing"),
    (
        '{"type":"transcript","role":"user","transcriptType":"final"}',
        "'transcript' message: field 'transcript' is missing",
    ),
    (
        '{"type":"transcript","role":"user","transcriptType":false,"transcript":"x"}',
        "field 'transcriptType' must be a string, got boolean",
    ),
    ('{"type":"status-update"}', "'status-update' message: field 'status' is missing"),
    ('{"type":"status-update","status":{}}', "field 'status' must be a string, got object"),
    ('{"type":"model-output"}', "'model-output' message: field 'output' is missing"),
    ('{"type":"model-output","output":null}', "field 'output' is missing"),
    ('{"type":"voice-input"}', "'voice-input' message: field 'input' is missing"),
    ('{"type":"voice-input","input":3.5}', "field 'input' must be a string, got number"),
    ('{"type":"tool-calls"}', "'tool-calls' message: field 'toolCallList' is missing"),
    ('{"type":"tool-calls","toolCallList":{}}', "field 'toolCallList' must be an array"),
    ('{"type":"tool-calls","toolCallList":[1]}', "toolCallList[0] must be an object, got number"),
    (
        '{"type":"tool-calls","toolCallList":[{"function":{"name":"f"}}]}',
        "toolCallList[0].id must be a string, got null",
    ),
    ('{"type":"tool-calls","toolCallList":[{"id":"c"}]}', "toolCallList[0].function must be"),
    (
        '{"type":"tool-calls","toolCallList":[{"id":"c","function":{}}]}',
        "toolCallList[0].function.name must be a string, got null",
    ),
    (
        '{"type":"tool-calls","toolCallList":[{"id":"c","function":{"name":"f","arguments":"{"}}]}',
        "toolCallList[0].function.arguments is a string but not JSON",
    ),
    (
        '{"type":"tool-calls","toolCallList":[{"id":"c","function":{"name":"f","arguments":"[1]"}}]}',
        "toolCallList[0].function.arguments must hold a JSON object, got array",
    ),
    (
        '{"type":"tool-calls","toolCallList":[{"id":"c","function":{"name":"f","arguments":7}}]}',
        "arguments must be an object or a JSON string, got number",
    ),
    (
        '{"type":"tool-calls","toolWithToolCallList":["x"]}',
        "toolWithToolCallList[0] must be an object, got string",
    ),
    (
        '{"type":"tool-calls","toolWithToolCallList":[{"name":"f"}]}',
        "toolWithToolCallList[0].toolCall must be an object, got null",
    ),
    ('{"type":"conversation-update"}', "field 'messages' is missing"),
    ('{"type":"conversation-update","messages":"x"}', "field 'messages' must be an array"),
]


@pytest.mark.parametrize(("text", "reason"), MALFORMED)
def test_malformed_frames_raise_remote_protocol_error(text: str, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_message(text)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_frame_errors_never_quote_the_frame() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_message(with_call({"type": "speech-update", "role": "user"}))
    assert SOCKET_URL not in str(info.value)
    assert "secret" not in str(info.value)


def test_encoders_return_the_exact_frames() -> None:
    assert transport.end_call() == '{"type":"end-call"}'
    assert (
        transport.add_message(role="system", content="The caller pressed 5.")
        == '{"type":"add-message","message":{"role":"system","content":"The caller pressed 5."},'
        '"triggerResponseEnabled":true}'
    )
    assert (
        transport.add_message(role="user", content="é", trigger_response=False)
        == '{"type":"add-message","message":{"role":"user","content":"é"},'
        '"triggerResponseEnabled":false}'
    )
    assert (
        transport.say("One moment.")
        == '{"type":"say","content":"One moment.","endCallAfterSpoken":false}'
    )
    assert (
        transport.say("Goodbye.", end_call_after=True)
        == '{"type":"say","content":"Goodbye.","endCallAfterSpoken":true}'
    )


@pytest.mark.parametrize("action", transport.CONTROL_ACTIONS)
def test_control_encodes_every_action(action: transport.ControlAction) -> None:
    assert transport.control(action) == f'{{"type":"control","control":"{action}"}}'


def test_control_rejects_an_unknown_action_as_our_bug() -> None:
    with pytest.raises(LocalProtocolError):
        transport.control("mute-everyone")  # type: ignore[arg-type]


def test_unencodable_text_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError):
        transport.say("\ud800")


def test_required_client_messages_cover_what_the_bridge_acts_on() -> None:
    assert {"user-interrupted", "speech-update", "status-update", "transcript"} <= set(
        transport.REQUIRED_CLIENT_MESSAGES
    )


# --- Property: any text gives an event or RemoteProtocolError, nothing else ----------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
KNOWN_TYPES = st.sampled_from(
    [
        "speech-update",
        "user-interrupted",
        "transcript",
        "status-update",
        "model-output",
        "voice-input",
        "tool-calls",
        "transfer-update",
        "conversation-update",
        "hang",
        "assistant.started",
        "something-new",
    ]
)
FIELD_NAMES = st.sampled_from(
    [
        "status",
        "role",
        "turn",
        "turnId",
        "transcriptType",
        "transcript",
        "endedReason",
        "destination",
        "output",
        "input",
        "toolCallList",
        "toolCalls",
        "toolWithToolCallList",
        "messages",
        "message",
        "type",
    ]
)
MESSAGES = st.builds(
    lambda type_, fields: {**fields, "type": type_},
    KNOWN_TYPES,
    st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=6),
)


def _text_of(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except (orjson.JSONEncodeError, TypeError):  # integers past 64 bits, lone surrogates
        return "null"


FRAMES = (
    st.text()
    | JSON_VALUES.map(_text_of)
    | MESSAGES.map(_text_of)
    | MESSAGES.map(lambda message: _text_of({"message": message}))
)


@given(FRAMES)
def test_any_text_gives_an_event_or_remote_protocol_error(text: str) -> None:
    try:
        event = parse_message(text)
    except RemoteProtocolError:
        return
    assert isinstance(event, VapiEvent)
