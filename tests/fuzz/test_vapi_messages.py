"""Property tests of the Vapi transport parser: messages shaped like Vapi's, fields mangled.

``parse_message`` faces the network: every text frame on the Vapi socket goes through
it. For any message of any known type, bare or in the ``{"message": …}`` envelope,
with any field replaced, removed or ill-typed, the only outcomes are an event of that
type (or ``Unrecognized``) and ``RemoteProtocolError``; and neither the event nor the
error ever carries the socket URL that rides in the message's ``call`` object.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import event as note_event
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.strategies import json_values as strategy_json_values
from voicebridge.errors import RemoteProtocolError
from voicebridge.vapi import transport as vp

#: A bearer secret: it must never surface in an event or an error.
SOCKET_URL = "wss://api.vapi.ai/3f1c-secret-call-id/transport"

json_values = strategy_json_values(max_leaves=6)

#: One well-formed example per type the parser knows, as Vapi sends it.
EXAMPLES: dict[str, dict[str, Any]] = {
    "speech-update": {"status": "started", "role": "assistant", "turn": 2},
    "user-interrupted": {"turnId": "t-1"},
    "transcript": {"role": "user", "transcriptType": "final", "transcript": "hello"},
    "status-update": {"status": "ended", "endedReason": "customer-ended-call"},
    "model-output": {"output": "Sure", "turnId": "t-2"},
    "voice-input": {"input": "Sure, one moment."},
    "tool-calls": {
        "toolCallList": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
        ]
    },
    "transfer-update": {"destination": {"type": "number", "number": "+15550100003"}},
    "conversation-update": {"messages": [{"role": "user", "message": "hi"}]},
    "hang": {},
    "assistant.started": {},
}
EVENT_TYPES: dict[str, type[object]] = {
    "speech-update": vp.SpeechUpdate,
    "user-interrupted": vp.UserInterrupted,
    "transcript": vp.Transcript,
    "status-update": vp.StatusUpdate,
    "model-output": vp.ModelOutput,
    "voice-input": vp.VoiceInput,
    "tool-calls": vp.ToolCalls,
    "transfer-update": vp.TransferUpdate,
    "conversation-update": vp.ConversationUpdate,
    "hang": vp.Hang,
    "assistant.started": vp.AssistantStarted,
}


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, str]:
    """(the type asked for, the frame's text)."""
    kind = draw(st.sampled_from([*EXAMPLES, "some-new-type"]))
    message: dict[str, Any] = {"type": kind, **EXAMPLES.get(kind, {})}
    message["call"] = {"id": "c", "transport": {"websocketCallUrl": SOCKET_URL}}
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        key = draw(st.sampled_from(sorted(message)))
        if draw(st.booleans()):
            message[key] = draw(json_values)
        else:
            del message[key]
    document: Any = {"message": message} if draw(st.booleans()) else message
    return kind, json.dumps(document)  # not orjson: it cannot encode integers past 64 bits


@settings(max_examples=400, deadline=None)
@given(messages())
def test_mangled_messages_give_their_event_or_a_protocol_error(case: tuple[str, str]) -> None:
    kind, text = case
    try:
        event = vp.parse_message(text)
    except RemoteProtocolError as exc:
        note_event("RemoteProtocolError")
        assert "secret-call-id" not in str(exc)
        return
    note_event(type(event).__name__)
    assert "secret-call-id" not in repr(event)
    expected = EVENT_TYPES.get(kind)
    assert isinstance(event, (expected, vp.Unrecognized) if expected else vp.Unrecognized)
