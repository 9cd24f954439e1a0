"""The JSON text frames of Vapi's WebSocket transport, sans-I/O: text in, frozen events out.

``parse_message`` turns one text frame from Vapi into one ``VapiEvent``; the encoders
(``end_call``, ``add_message``, ``say``, ``control``) return the exact text of a frame to
send. Binary frames (the audio) never come here. This module does no I/O, reads no clock
and logs nothing; see PROTOCOLS.md section 2 for the wire format it implements.

Errors: a frame that is not a JSON object, has no string ``type``, or is a known type
with a required field missing or ill-typed raises ``RemoteProtocolError`` (Vapi's
fault). Its message names the field and the JSON type found, never the frame's
content: frames carry a large ``call`` object that holds the socket's bearer URL.
Optional fields that arrive ill-typed are read as absent: the bridge does not depend
on them, and a call is not worth ending over them. Unknown fields are ignored; unknown
types become ``Unrecognized``. Asking an encoder for something the protocol cannot
carry is our bug: ``LocalProtocolError``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, TypeAlias, get_args

import orjson
from attrs import frozen

from voicebridge.errors import LocalProtocolError, RemoteProtocolError

#: The ``clientMessages`` the bridge asks for in ``assistantOverrides`` when it creates
#: the call (an assistant configured in Vapi's dashboard may have trimmed its own list).
#: The bridge acts on ``user-interrupted`` (barge-in), ``speech-update`` (optional
#: barge-in, turn logging) and ``status-update`` (``ended`` ends the call); it logs
#: ``transcript``. The override *replaces* the assistant's list, so this is also the
#: list of what we stop receiving: ``model-output`` (a frame per token chunk),
#: ``conversation-update`` (the whole history, every turn), ``voice-input``,
#: ``tool-calls``, ``hang`` … — none of which the bridge acts on, and every frame costs
#: CPU on the hot path (ARCHITECTURE.md, "Facts about the stack": cost is per message).
#: ``parse_message`` still understands them, for assistants used without the override.
REQUIRED_CLIENT_MESSAGES: Final[tuple[str, ...]] = (
    "speech-update",
    "user-interrupted",
    "status-update",
    "transcript",
    "transfer-update",
)

#: ``Unrecognized.type`` is cut to this many characters: no Vapi type name comes near
#: it, and an unknown type ends up in a log line.
MAX_UNRECOGNIZED_TYPE_CHARS: Final = 100

ControlAction: TypeAlias = Literal[
    "mute-assistant", "unmute-assistant", "mute-customer", "unmute-customer", "say-first-message"
]
CONTROL_ACTIONS: Final[tuple[str, ...]] = get_args(ControlAction)


# --- Events Vapi sends (one class per message type) ---------------------------------


@frozen(kw_only=True)
class SpeechUpdate:
    """``speech-update``: the user or the assistant started or stopped speaking.

    ``turn`` is Vapi's 0-based turn counter, when it sends one.
    """

    status: Literal["started", "stopped"]
    role: str
    turn: int | None = None


@frozen(kw_only=True)
class UserInterrupted:
    """``user-interrupted``: the caller talked over the assistant — the barge-in signal."""

    turn_id: str | None = None


@frozen(kw_only=True)
class Transcript:
    """``transcript``: what ``role`` said; ``transcript_type`` is ``partial`` or ``final``."""

    role: str
    transcript_type: str
    transcript: str


@frozen(kw_only=True)
class StatusUpdate:
    """``status-update``: the Vapi call's status changed (``ended`` ends the call).

    ``ended_reason`` comes with ``ended``; ``destination`` with ``forwarding``.
    """

    status: str
    ended_reason: str | None = None
    destination: Mapping[str, Any] | None = None


@frozen(kw_only=True)
class ModelOutput:
    """``model-output``: a chunk of the model's output, as text (structured output as JSON)."""

    output: str
    turn_id: str | None = None


@frozen(kw_only=True)
class VoiceInput:
    """``voice-input``: the text Vapi is about to send to its text-to-speech."""

    input: str


@frozen(kw_only=True)
class ToolCall:
    """One tool call of a ``tool-calls`` message; ``arguments`` already parsed."""

    id: str
    name: str
    arguments: Mapping[str, Any]


@frozen(kw_only=True)
class ToolCalls:
    """``tool-calls``: the assistant called tools (informational on this socket)."""

    tool_calls: tuple[ToolCall, ...]


@frozen(kw_only=True)
class TransferUpdate:
    """``transfer-update``: the assistant asked for a transfer to ``destination``."""

    destination: Mapping[str, Any] | None = None


@frozen(kw_only=True)
class ConversationUpdate:
    """``conversation-update``: the history changed; only its length is kept."""

    message_count: int


@frozen(kw_only=True)
class Hang:
    """``hang``: the assistant is *stalling* (slow model, voice or tool).

    This is NOT a hang-up: nothing ends. At most it is worth a log line or a metric.
    """


@frozen(kw_only=True)
class AssistantStarted:
    """``assistant.started``: the assistant of the call has started."""


@frozen(kw_only=True)
class Unrecognized:
    """Any other message type (Vapi adds types); ``type`` is the message's ``type``."""

    type: str


VapiEvent: TypeAlias = (
    SpeechUpdate
    | UserInterrupted
    | Transcript
    | StatusUpdate
    | ModelOutput
    | VoiceInput
    | ToolCalls
    | TransferUpdate
    | ConversationUpdate
    | Hang
    | AssistantStarted
    | Unrecognized
)


# --- Parsing -------------------------------------------------------------------------


def parse_message(text: str) -> VapiEvent:
    """Parse one JSON text frame from Vapi, bare ``{"type": …}`` or ``{"message": {…}}``.

    Raises ``RemoteProtocolError`` for a malformed frame (see the module docstring).
    Never keeps a reference to anything but the fields the event holds.
    """
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        # orjson's message gives a position and a reason, never the content.
        raise RemoteProtocolError(f"Vapi text frame is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise RemoteProtocolError(
            f"Vapi text frame is a JSON {_json_type(document)}, not an object"
        )
    message = _unwrap(document)
    message_type = message.get("type")
    if message_type is None:
        raise RemoteProtocolError("Vapi message has no 'type'")
    if not isinstance(message_type, str):
        raise RemoteProtocolError(
            f"Vapi message 'type' must be a string, got {_json_type(message_type)}"
        )
    parser = _PARSERS.get(message_type)
    if parser is None:
        return Unrecognized(type=message_type[:MAX_UNRECOGNIZED_TYPE_CHARS])
    return parser(_Fields(message_type, message))


def _unwrap(document: dict[str, Any]) -> dict[str, Any]:
    """The message itself: ``document``, or its ``message`` member for the envelope form."""
    if "type" in document or "message" not in document:
        return document
    inner = document["message"]
    if not isinstance(inner, dict):
        raise RemoteProtocolError(
            f"Vapi envelope 'message' must be an object, got {_json_type(inner)}"
        )
    return inner


class _Fields:
    """Typed access to one message's fields, raising precise ``RemoteProtocolError``s."""

    __slots__ = ("_message", "_type")

    def __init__(self, message_type: str, message: Mapping[str, Any]) -> None:
        self._type = message_type
        self._message = message

    def error(self, what: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"Vapi {self._type!r} message: {what}")

    def required(self, key: str) -> Any:
        value = self._message.get(key)
        if value is None:
            raise self.error(f"field {key!r} is missing")
        return value

    def required_str(self, key: str) -> str:
        value = self.required(key)
        if not isinstance(value, str):
            raise self.error(f"field {key!r} must be a string, got {_json_type(value)}")
        return value

    def required_list(self, key: str) -> list[Any]:
        value = self.required(key)
        if not isinstance(value, list):
            raise self.error(f"field {key!r} must be an array, got {_json_type(value)}")
        return value

    def optional(self, key: str) -> Any:
        return self._message.get(key)

    def optional_str(self, key: str) -> str | None:
        value = self._message.get(key)
        return value if isinstance(value, str) else None

    def optional_int(self, key: str) -> int | None:
        value = self._message.get(key)
        # JSON true/false arrive as bool, which Python counts as int.
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def optional_object(self, key: str) -> Mapping[str, Any] | None:
        value = self._message.get(key)
        return value if isinstance(value, dict) else None


def _parse_speech_update(fields: _Fields) -> SpeechUpdate:
    status = fields.required_str("status")
    if status != "started" and status != "stopped":
        raise fields.error(f"field 'status' must be 'started' or 'stopped', got {status[:40]!r}")
    return SpeechUpdate(
        status="started" if status == "started" else "stopped",  # as a Literal, for mypy
        role=fields.required_str("role"),
        turn=fields.optional_int("turn"),
    )


def _parse_user_interrupted(fields: _Fields) -> UserInterrupted:
    return UserInterrupted(turn_id=fields.optional_str("turnId"))


def _parse_transcript(fields: _Fields) -> Transcript:
    return Transcript(
        role=fields.required_str("role"),
        transcript_type=fields.required_str("transcriptType"),
        transcript=fields.required_str("transcript"),
    )


def _parse_status_update(fields: _Fields) -> StatusUpdate:
    return StatusUpdate(
        status=fields.required_str("status"),
        ended_reason=fields.optional_str("endedReason"),
        destination=fields.optional_object("destination"),
    )


def _parse_model_output(fields: _Fields) -> ModelOutput:
    output = fields.required("output")
    if not isinstance(output, str):
        # Structured output (tool-call deltas, objects): keep it as its JSON text.
        output = orjson.dumps(output).decode()
    return ModelOutput(output=output, turn_id=fields.optional_str("turnId"))


def _parse_voice_input(fields: _Fields) -> VoiceInput:
    return VoiceInput(input=fields.required_str("input"))


def _parse_tool_calls(fields: _Fields) -> ToolCalls:
    # PROTOCOLS.md documents the list under three names; the client message uses the first.
    for key in ("toolCallList", "toolCalls"):
        if fields.optional(key) is not None:
            items = fields.required_list(key)
            return ToolCalls(
                tool_calls=tuple(
                    _parse_tool_call(fields, f"{key}[{index}]", item)
                    for index, item in enumerate(items)
                )
            )
    if fields.optional("toolWithToolCallList") is not None:
        wrappers = fields.required_list("toolWithToolCallList")
        calls = []
        for index, wrapper in enumerate(wrappers):
            path = f"toolWithToolCallList[{index}]"
            if not isinstance(wrapper, dict):
                raise fields.error(f"{path} must be an object, got {_json_type(wrapper)}")
            calls.append(_parse_tool_call(fields, f"{path}.toolCall", wrapper.get("toolCall")))
        return ToolCalls(tool_calls=tuple(calls))
    raise fields.error("field 'toolCallList' is missing")


def _parse_tool_call(fields: _Fields, path: str, item: Any) -> ToolCall:
    if not isinstance(item, dict):
        raise fields.error(f"{path} must be an object, got {_json_type(item)}")
    call_id = item.get("id")
    if not isinstance(call_id, str):
        raise fields.error(f"{path}.id must be a string, got {_json_type(call_id)}")
    function = item.get("function")
    if not isinstance(function, dict):
        raise fields.error(f"{path}.function must be an object, got {_json_type(function)}")
    name = function.get("name")
    if not isinstance(name, str):
        raise fields.error(f"{path}.function.name must be a string, got {_json_type(name)}")
    return ToolCall(
        id=call_id,
        name=name,
        arguments=_parse_arguments(fields, f"{path}.function.arguments", function.get("arguments")),
    )


def _parse_arguments(fields: _Fields, path: str, arguments: Any) -> Mapping[str, Any]:
    """Tool arguments arrive as an object or as a JSON string of one; absent means none."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            raise fields.error(f"{path} is a string but not JSON") from None
        if not isinstance(arguments, dict):
            raise fields.error(f"{path} must hold a JSON object, got {_json_type(arguments)}")
        return arguments
    if isinstance(arguments, dict):
        return arguments
    raise fields.error(f"{path} must be an object or a JSON string, got {_json_type(arguments)}")


def destination_number(destination: Mapping[str, Any] | None) -> str:
    """The number (or SIP URI) of a transfer ``destination`` object; "" when it has none.

    Vapi's destinations are ``{"type": "number", "number": "+1…"}`` or
    ``{"type": "sip", "sipUri": "sip:…"}`` (an assistant destination has neither).
    """
    if destination is None:
        return ""
    for key in ("number", "sipUri"):
        value = destination.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()[:MAX_DESTINATION_CHARS]
    return ""


#: A destination longer than this is no number or SIP URI (E.164 is 16 characters).
MAX_DESTINATION_CHARS: Final = 256


def _parse_transfer_update(fields: _Fields) -> TransferUpdate:
    return TransferUpdate(destination=fields.optional_object("destination"))


def _parse_conversation_update(fields: _Fields) -> ConversationUpdate:
    return ConversationUpdate(message_count=len(fields.required_list("messages")))


def _parse_hang(fields: _Fields) -> Hang:
    return Hang()


def _parse_assistant_started(fields: _Fields) -> AssistantStarted:
    return AssistantStarted()


_PARSERS: Final[Mapping[str, Callable[[_Fields], VapiEvent]]] = {
    "speech-update": _parse_speech_update,
    "user-interrupted": _parse_user_interrupted,
    "transcript": _parse_transcript,
    "status-update": _parse_status_update,
    "model-output": _parse_model_output,
    "voice-input": _parse_voice_input,
    "tool-calls": _parse_tool_calls,
    "transfer-update": _parse_transfer_update,
    "conversation-update": _parse_conversation_update,
    "hang": _parse_hang,
    "assistant.started": _parse_assistant_started,
}


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for error messages (never the value)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --- Encoding (what we send; bare JSON, no envelope) ---------------------------------


def end_call() -> str:
    """``{"type":"end-call"}``: ask Vapi to end the call (the schema has no ``hangup``)."""
    return _encode({"type": "end-call"})


def add_message(*, role: str, content: str, trigger_response: bool = True) -> str:
    """Add a message to the conversation, e.g. tell the assistant about a DTMF digit.

    ``trigger_response`` asks the assistant to answer it at once.
    """
    return _encode(
        {
            "type": "add-message",
            "message": {"role": role, "content": content},
            "triggerResponseEnabled": trigger_response,
        }
    )


def say(content: str, *, end_call_after: bool = False) -> str:
    """Make the assistant say ``content``; ``end_call_after`` ends the call once spoken."""
    return _encode({"type": "say", "content": content, "endCallAfterSpoken": end_call_after})


def control(action: ControlAction) -> str:
    """A ``control`` message; an action outside ``CONTROL_ACTIONS`` is ``LocalProtocolError``."""
    if action not in CONTROL_ACTIONS:
        raise LocalProtocolError(f"unknown Vapi control action {action!r}")
    return _encode({"type": "control", "control": action})


def _encode(message: Mapping[str, Any]) -> str:
    try:
        return orjson.dumps(message).decode()
    except orjson.JSONEncodeError as exc:
        # e.g. a lone surrogate in a str: not representable as UTF-8 JSON.
        raise LocalProtocolError(f"cannot encode Vapi {message['type']!r} message: {exc}") from None
