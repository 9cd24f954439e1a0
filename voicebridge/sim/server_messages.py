"""The simulated Vapi's server webhooks ("server messages"), POSTed and signed as Vapi does.

A call created with ``assistantOverrides.server`` gets its webhooks at ``server.url``
with ``server.headers`` as given (how the legacy ``X-Vapi-Secret`` and an inline
bearer token travel), or, with ``server.credentialId``, authenticated by the
``SimServerCredential`` registered under that id on the ``SimVapi`` (Vapi keeps
custom credentials, HMAC keys included, on its side). The body is built once and
its bytes are what is signed and sent. Only the types in the call's
``assistantOverrides.serverMessages`` (else Vapi's default set) are sent.

- ``tool-calls``: when a behaviour's ``tool_calls`` say so, in the schema's canonical
  shape (``toolCallList`` and ``toolWithToolCallList`` together, ``function.arguments``
  a JSON string) or one of the variants Vapi's examples show; each exchange is
  recorded as a ``ToolExchange``;
- ``status-update`` (``in-progress``, ``forwarding``, ``ended``), ``end-of-call-report``
  and ``transfer-destination-request`` (``post_message``), each recorded as a
  ``WebhookExchange``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs
import httpx
import orjson

#: The simulated Vapi waits this long for an answer (Vapi's ``server.timeoutSeconds``
#: default is 20 s; tests use short tool deadlines, so 20 s is never reached).
WEBHOOK_TIMEOUT_S: Final = 20.0

#: ``canonical``: the schema's message, ``toolCallList`` and ``toolWithToolCallList``
#: together; the others are variants Vapi's examples show: ``toolCallList`` alone, the
#: flat ``toolCalls``, ``toolWithToolCallList`` alone, the legacy ``function-call``.
ToolCallShape = Literal[
    "canonical", "toolCallList", "toolCalls", "toolWithToolCallList", "function-call"
]
#: Vapi's default ``serverMessages`` (PROTOCOLS section 3), when the call asks for none.
DEFAULT_SERVER_MESSAGES: Final = frozenset(
    {
        "conversation-update",
        "end-of-call-report",
        "function-call",
        "hang",
        "speech-update",
        "status-update",
        "tool-calls",
        "transfer-destination-request",
        "handoff-destination-request",
        "user-interrupted",
        "assistant.started",
    }
)


@attrs.frozen(kw_only=True)
class SimToolCall:
    """One tool call the simulated assistant makes, before its reply number ``before_reply``
    (0: right after the caller's first turn)."""

    name: str
    #: An object, or a JSON string of one. The canonical shape always sends a JSON
    #: string (the schema's ``function.arguments``); the variants send it as given.
    arguments: Mapping[str, Any] | str = attrs.field(factory=dict)
    before_reply: int = 0
    shape: ToolCallShape = "canonical"
    #: Send the same webhook this many more times (a retry, for idempotency).
    repeats: int = 0
    #: A clip the assistant speaks once the webhook is answered (e.g. a goodbye).
    say_after: str | None = None
    #: Afterwards the assistant says nothing more and waits for the bridge to end the call.
    hold: bool = False


@attrs.frozen(kw_only=True)
class SimServerCredential:
    """A Vapi custom credential (``server.credentialId``): bearer token or HMAC."""

    kind: Literal["bearer", "hmac"]
    secret: str = attrs.field(repr=False)
    header_name: str = "Authorization"
    bearer_prefix: str = "Bearer "
    algorithm: Literal["sha256", "sha512", "sha1"] = "sha256"
    signature_header: str = "x-signature"
    timestamp_header: str = "x-timestamp"
    signature_prefix: str = ""
    payload_format: str = "{timestamp}.{body}"
    encoding: Literal["hex", "base64"] = "hex"
    secret_is_base64: bool = False
    #: Send the timestamp in milliseconds instead of seconds.
    timestamp_ms: bool = False


@attrs.frozen(kw_only=True)
class WebhookExchange:
    """One webhook other than ``tool-calls`` and its answer (status 0: no answer)."""

    type: str
    body: bytes = attrs.field(repr=False)
    status: int
    answer: Any

    @property
    def message(self) -> Any:
        """The ``message`` object that was sent."""
        return orjson.loads(self.body)["message"]


@attrs.frozen(kw_only=True)
class ToolExchange:
    """One webhook the simulated Vapi sent and what came back (status 0: no answer)."""

    tool: SimToolCall
    body: bytes = attrs.field(repr=False)
    status: int
    answer: Any


def subscribed(overrides: Mapping[str, Any], message_type: str) -> bool:
    """Whether the call's ``serverMessages`` (else Vapi's default) include ``message_type``."""
    chosen = overrides.get("serverMessages")
    if isinstance(chosen, list):
        return message_type in chosen
    return message_type in DEFAULT_SERVER_MESSAGES


def server_url(overrides: Mapping[str, Any]) -> str | None:
    """The call's ``server.url``, where its webhooks go (None: it has none)."""
    server = overrides.get("server")
    if isinstance(server, dict) and isinstance(server.get("url"), str):
        return str(server["url"])
    return None


CallRef = str | Mapping[str, Any]


def call_object(call: CallRef, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The message's ``call``: the object given, or for a bare call id a minimal one."""
    if not isinstance(call, str):
        return dict(call)
    return {
        "id": call,
        "orgId": "sim-org",
        "type": "vapi.websocketCall",
        "assistantOverrides": dict(overrides),
    }


def tool_calls_body(
    call: CallRef, overrides: Mapping[str, Any], tool: SimToolCall, index: int
) -> bytes:
    """The ``{"message": {"type": "tool-calls", …}}`` body about ``call``, in the tool's shape."""
    call = call_object(call, overrides)
    tool_call_id = f"call_{str(call['id'])[:8]}_{index}"
    arguments = tool.arguments if isinstance(tool.arguments, str) else dict(tool.arguments)
    message: dict[str, Any] = {"timestamp": int(time.time() * 1000), "call": call}
    if tool.shape == "function-call":
        message |= {
            "type": "function-call",
            "functionCall": {"name": tool.name, "parameters": arguments},
        }
        return orjson.dumps({"message": message})
    if tool.shape == "toolCalls":
        # The flat shape of some of Vapi's examples: name and arguments on the item.
        message |= {
            "type": "tool-calls",
            "toolCalls": [{"id": tool_call_id, "name": tool.name, "arguments": arguments}],
        }
        return orjson.dumps({"message": message})
    if tool.shape == "canonical" and not isinstance(arguments, str):
        arguments = orjson.dumps(arguments).decode()
    item = {
        "id": tool_call_id,
        "type": "function",
        "function": {"name": tool.name, "arguments": arguments},
    }
    message["type"] = "tool-calls"
    if tool.shape in ("canonical", "toolCallList"):
        message["toolCallList"] = [item]
    if tool.shape in ("canonical", "toolWithToolCallList"):
        message["toolWithToolCallList"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "parameters": {"type": "object", "properties": {}},
                },
                "toolCall": item,
            }
        ]
    return orjson.dumps({"message": message})


def auth_headers(
    server: Mapping[str, Any],
    credential: SimServerCredential | None,
    body: bytes,
    *,
    now: float,
) -> dict[str, str]:
    """What Vapi adds to a webhook: ``server.headers``, then the credential's header(s)."""
    headers = {str(k): str(v) for k, v in (server.get("headers") or {}).items()}
    if credential is None:
        return headers
    if credential.kind == "bearer":
        headers[credential.header_name] = credential.bearer_prefix + credential.secret
        return headers
    stamp = str(int(now * 1000)) if credential.timestamp_ms else str(int(now))
    key = (
        base64.b64decode(credential.secret)
        if credential.secret_is_base64
        else credential.secret.encode()
    )
    signed = credential.payload_format.encode()
    for name, value in (
        (b"{timestamp}", stamp.encode()),
        (b"{method}", b"POST"),
        (b"{url}", str(server.get("url", "")).encode()),
    ):
        signed = signed.replace(name, value)
    head, _, tail = signed.partition(b"{body}")
    mac = hmac.new(key, head + body + tail, getattr(hashlib, credential.algorithm)).digest()
    text = mac.hex() if credential.encoding == "hex" else base64.b64encode(mac).decode()
    headers[credential.signature_header] = credential.signature_prefix + text
    headers[credential.timestamp_header] = stamp
    return headers


async def send_tool_calls(
    call: CallRef,
    overrides: Mapping[str, Any],
    credential: SimServerCredential | None,
    tool: SimToolCall,
    index: int,
) -> list[ToolExchange]:
    """POST the tool call (``1 + tool.repeats`` times) to the call's server URL."""
    if server_url(overrides) is None:
        return []
    body = tool_calls_body(call, overrides, tool, index)
    return [
        ToolExchange(tool=tool, body=body, status=status, answer=answer)
        for status, answer in [
            await _post(overrides, credential, body) for _ in range(1 + tool.repeats)
        ]
    ]


async def post_message(
    call: CallRef,
    overrides: Mapping[str, Any],
    credential: SimServerCredential | None,
    message: Mapping[str, Any],
) -> WebhookExchange | None:
    """POST one server message about ``call``; None when the call has no server URL or
    did not subscribe to the message's type. Cancellation abandons the request."""
    message_type = str(message["type"])
    if server_url(overrides) is None or not subscribed(overrides, message_type):
        return None
    body = orjson.dumps(
        {
            "message": {
                **message,
                "timestamp": int(time.time() * 1000),
                "call": call_object(call, overrides),
            }
        }
    )
    status, answer = await _post(overrides, credential, body)
    return WebhookExchange(type=message_type, body=body, status=status, answer=answer)


async def _post(
    overrides: Mapping[str, Any], credential: SimServerCredential | None, body: bytes
) -> tuple[int, Any]:
    """(status, parsed answer) of one signed POST to the server URL; (0, None): no answer."""
    server = overrides["server"]
    headers = auth_headers(server, credential, body, now=time.time())
    headers["Content-Type"] = "application/json"
    async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S) as http:
        try:
            response = await http.post(server["url"], content=body, headers=headers)
        except httpx.HTTPError:
            return 0, None
    try:
        return response.status_code, orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.status_code, response.text
