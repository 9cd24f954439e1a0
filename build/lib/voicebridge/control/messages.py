"""Vapi's server webhooks, sans-I/O: the raw body in, one frozen message out; answers out.

``parse_webhook`` reads the ``{"message": {…}}`` envelope of PROTOCOLS.md §3 and
turns the message into one event: ``ToolCallsRequest`` (``tool-calls`` in every
documented shape, and the legacy ``function-call``), ``StatusReport``,
``EndOfCallReport``, ``TransferDestinationRequest``, ``PhoneCallControl``, or
``OtherMessage`` for any other type. A body that is not a JSON object, lacks the
envelope or a string ``type``, or is a known type with a required field missing or
ill-typed raises ``MalformedWebhook``; its message names the field, never its
content. ``encode_results`` builds the answer to a tool call. No I/O, no clock, no
logging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeAlias

import orjson
from attrs import frozen

from voicebridge.errors import RemoteProtocolError
from voicebridge.vapi.transport import ToolCall

__all__ = [
    "CallRef",
    "EndOfCallReport",
    "MalformedWebhook",
    "OtherMessage",
    "PhoneCallControl",
    "ServerMessage",
    "StatusReport",
    "ToolCall",
    "ToolCallsRequest",
    "ToolResult",
    "TransferDestinationRequest",
    "encode_results",
    "parse_webhook",
    "single_line",
]

#: Where the bridge puts the Twilio CallSid in the call's metadata (vapi/client.py).
CALL_SID_KEY: Final = "twilioCallSid"
#: A tool result or error is cut to this many characters: it goes into the model's
#: context, and a handler that returns megabytes would only cost tokens and time.
MAX_RESULT_CHARS: Final = 8000
#: Longest message ``type`` kept from an unknown message (it ends up in a debug line).
MAX_TYPE_CHARS: Final = 100
#: The ``request`` values of ``phone-call-control``.
PHONE_CALL_REQUESTS: Final = ("forward", "hang-up")


class MalformedWebhook(RemoteProtocolError):
    """The body is not a Vapi server message we can use (answer 400)."""


@frozen(kw_only=True)
class CallRef:
    """Which call a message is about: Vapi's id and, when the bridge created it, the CallSid."""

    vapi_call_id: str = ""
    call_sid: str = ""


@frozen(kw_only=True)
class ToolCallsRequest:
    """``tool-calls`` (or the legacy ``function-call``: one call, answered with ``result``).

    Each call is a ``vapi.transport.ToolCall`` (``id``, ``name``, parsed ``arguments``).
    """

    call: CallRef
    tool_calls: tuple[ToolCall, ...]
    legacy: bool = False


@frozen(kw_only=True)
class StatusReport:
    """``status-update``; ``ended_reason`` comes with ``ended``, ``destination`` with
    ``forwarding``."""

    call: CallRef
    status: str
    ended_reason: str = ""
    destination: str = ""


@frozen(kw_only=True)
class EndOfCallReport:
    """``end-of-call-report``: how the Vapi call ended and what it cost."""

    call: CallRef
    ended_reason: str = ""
    cost: float | None = None
    summary: str = ""
    started_at: str = ""
    ended_at: str = ""
    recording_url: str = ""


@frozen(kw_only=True)
class TransferDestinationRequest:
    """``transfer-destination-request``: Vapi asks where to transfer the call."""

    call: CallRef


@frozen(kw_only=True)
class PhoneCallControl:
    """``phone-call-control``: Vapi hands us a ``forward`` (to ``destination``) or ``hang-up``."""

    call: CallRef
    request: str
    destination: str = ""


@frozen(kw_only=True)
class OtherMessage:
    """Any other message type (Vapi adds types); acknowledged and ignored."""

    call: CallRef
    type: str


ServerMessage: TypeAlias = (
    ToolCallsRequest
    | StatusReport
    | EndOfCallReport
    | TransferDestinationRequest
    | PhoneCallControl
    | OtherMessage
)


@frozen(kw_only=True)
class ToolResult:
    """The answer to one tool call: exactly one of ``result`` and ``error``."""

    tool_call_id: str
    name: str
    result: str | None = None
    error: str | None = None


# --- parsing ---------------------------------------------------------------------------


def parse_webhook(body: bytes) -> ServerMessage:
    """Parse a webhook's raw body. Raises ``MalformedWebhook`` (see the module docstring)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedWebhook(f"body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise MalformedWebhook(f"body is a JSON {_json_type(document)}, not an object")
    message = document.get("message")
    if not isinstance(message, dict):
        raise MalformedWebhook(f"'message' must be an object, got {_json_type(message)}")
    message_type = message.get("type")
    if not isinstance(message_type, str):
        raise MalformedWebhook(f"'message.type' must be a string, got {_json_type(message_type)}")
    call = _call_ref(message)
    if message_type == "tool-calls":
        return ToolCallsRequest(call=call, tool_calls=_tool_calls(message))
    if message_type == "function-call":
        return ToolCallsRequest(call=call, tool_calls=(_function_call(message),), legacy=True)
    if message_type == "status-update":
        return StatusReport(
            call=call,
            status=_required_str(message, "status"),
            ended_reason=_optional_str(message, "endedReason"),
            destination=_destination(message.get("destination")),
        )
    if message_type == "end-of-call-report":
        return _end_of_call_report(call, message)
    if message_type == "transfer-destination-request":
        return TransferDestinationRequest(call=call)
    if message_type == "phone-call-control":
        request = _required_str(message, "request")
        if request not in PHONE_CALL_REQUESTS:
            raise MalformedWebhook(f"'request' must be forward or hang-up, got {request[:40]!r}")
        return PhoneCallControl(
            call=call, request=request, destination=_destination(message.get("destination"))
        )
    return OtherMessage(call=call, type=message_type[:MAX_TYPE_CHARS])


def _call_ref(message: Mapping[str, Any]) -> CallRef:
    call = message.get("call")
    if not isinstance(call, dict):
        return CallRef()
    call_id = call.get("id")
    return CallRef(
        vapi_call_id=call_id if isinstance(call_id, str) else "", call_sid=_call_sid(message, call)
    )


def _call_sid(message: Mapping[str, Any], call: Mapping[str, Any]) -> str:
    """The CallSid the bridge put in the call's metadata (or variable values)."""
    overrides = call.get("assistantOverrides")
    places: list[Any] = [call.get("metadata")]
    if isinstance(overrides, dict):
        places += [overrides.get("metadata"), overrides.get("variableValues")]
    assistant = message.get("assistant")
    if isinstance(assistant, dict):
        places.append(assistant.get("metadata"))
    for place in places:
        if isinstance(place, dict) and isinstance(place.get(CALL_SID_KEY), str):
            return str(place[CALL_SID_KEY])
    return ""


def _tool_calls(message: Mapping[str, Any]) -> tuple[ToolCall, ...]:
    """Every documented shape: ``toolCallList``, ``toolCalls``, ``toolWithToolCallList``."""
    for key in ("toolCallList", "toolCalls"):
        items = message.get(key)
        if items:
            if not isinstance(items, list):
                raise MalformedWebhook(f"'{key}' must be an array, got {_json_type(items)}")
            return tuple(_tool_call(item, f"{key}[{i}]") for i, item in enumerate(items))
    wrappers = message.get("toolWithToolCallList")
    if wrappers:
        if not isinstance(wrappers, list):
            raise MalformedWebhook(
                f"'toolWithToolCallList' must be an array, got {_json_type(wrappers)}"
            )
        calls = []
        for index, wrapper in enumerate(wrappers):
            path = f"toolWithToolCallList[{index}]"
            if not isinstance(wrapper, dict):
                raise MalformedWebhook(f"{path} must be an object, got {_json_type(wrapper)}")
            calls.append(_tool_call(wrapper.get("toolCall"), f"{path}.toolCall", outer=wrapper))
        return tuple(calls)
    raise MalformedWebhook("no 'toolCallList', 'toolCalls' or 'toolWithToolCallList'")


def _tool_call(item: Any, path: str, outer: Mapping[str, Any] | None = None) -> ToolCall:
    """``{id, function: {name, arguments}}`` or the flat ``{id, name, arguments}``.

    In ``toolWithToolCallList`` the name may also sit on the tool (``outer``).
    """
    if not isinstance(item, dict):
        raise MalformedWebhook(f"{path} must be an object, got {_json_type(item)}")
    call_id = item.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise MalformedWebhook(f"{path}.id must be a non-empty string, got {_json_type(call_id)}")
    function = item.get("function")
    source = function if isinstance(function, dict) else item
    name = source.get("name")
    if not isinstance(name, str) and outer is not None:
        outer_function = outer.get("function")
        name = outer_function.get("name") if isinstance(outer_function, dict) else None
        if not isinstance(name, str):
            name = outer.get("name")
    if not isinstance(name, str) or not name:
        raise MalformedWebhook(f"{path}: the tool's name must be a non-empty string")
    raw = source.get("arguments", source.get("parameters"))
    return ToolCall(id=call_id, name=name, arguments=_arguments(raw, f"{path} arguments"))


def _function_call(message: Mapping[str, Any]) -> ToolCall:
    function = message.get("functionCall")
    if not isinstance(function, dict):
        raise MalformedWebhook(f"'functionCall' must be an object, got {_json_type(function)}")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise MalformedWebhook("'functionCall.name' must be a non-empty string")
    call_id = function.get("id")
    raw = function.get("parameters", function.get("arguments"))
    return ToolCall(
        # The legacy message has no id of its own: the name stands in (no idempotency).
        id=call_id if isinstance(call_id, str) and call_id else f"function-call:{name}",
        name=name,
        arguments=_arguments(raw, "functionCall parameters"),
    )


def _arguments(raw: Any, what: str) -> Mapping[str, Any]:
    """Arguments arrive as an object or as a JSON string of one; absent means none."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise MalformedWebhook(f"{what} are a string but not JSON") from None
    if not isinstance(raw, dict):
        raise MalformedWebhook(f"{what} must be an object, got {_json_type(raw)}")
    return raw


def _destination(value: Any) -> str:
    """A transfer destination's number or SIP URI, from an object or a bare string."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in ("number", "sipUri"):
            if isinstance(value.get(key), str):
                return str(value[key])
    return ""


def _end_of_call_report(call: CallRef, message: Mapping[str, Any]) -> EndOfCallReport:
    cost = message.get("cost")
    analysis = message.get("analysis")
    summary = message.get("summary")
    if not isinstance(summary, str) and isinstance(analysis, dict):
        summary = analysis.get("summary")
    artifact = message.get("artifact")
    recording = artifact.get("recordingUrl") if isinstance(artifact, dict) else None
    if not isinstance(recording, str):
        recording = message.get("recordingUrl")
    return EndOfCallReport(
        call=call,
        ended_reason=_optional_str(message, "endedReason"),
        cost=float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None,
        summary=summary if isinstance(summary, str) else "",
        started_at=_optional_str(message, "startedAt"),
        ended_at=_optional_str(message, "endedAt"),
        recording_url=recording if isinstance(recording, str) else "",
    )


def _required_str(message: Mapping[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str):
        raise MalformedWebhook(f"'{key}' must be a string, got {_json_type(value)}")
    return value


def _optional_str(message: Mapping[str, Any], key: str) -> str:
    value = message.get(key)
    return value if isinstance(value, str) else ""


#: JSON's names of the types orjson parses to, for error messages (never the value).
_JSON_TYPES: Final[Mapping[type, str]] = {
    type(None): "null",
    bool: "boolean",
    int: "number",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


# --- answering -------------------------------------------------------------------------


def single_line(text: str) -> str:
    """``text`` on one line (runs of whitespace become one space), cut to MAX_RESULT_CHARS."""
    line = " ".join(text.split())
    if len(line) > MAX_RESULT_CHARS:
        line = line[: MAX_RESULT_CHARS - 1] + "…"
    return line


def encode_results(results: Sequence[ToolResult], *, legacy: bool = False) -> bytes:
    """The HTTP 200 body answering tool calls, in call order.

    ``{"results": [{"toolCallId", "name", "result" | "error"}]}``; the legacy
    ``function-call`` gets ``{"result": …}`` (or ``{"error": …}``) for its one call.
    """
    items: list[dict[str, str]] = []
    for result in results:
        item = {"toolCallId": result.tool_call_id, "name": result.name}
        if result.error is not None:
            item["error"] = single_line(result.error)
        else:
            item["result"] = single_line(result.result or "")
        items.append(item)
    if legacy and len(items) == 1:
        only = items[0]
        return orjson.dumps({k: v for k, v in only.items() if k in ("result", "error")})
    return orjson.dumps({"results": items})
