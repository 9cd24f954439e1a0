"""The simulated Vapi's server webhooks: a ``tool-calls`` message POSTed, signed as Vapi signs.

A call created with ``assistantOverrides.server`` gets its webhooks at ``server.url``
with ``server.headers`` as given (how the legacy ``X-Vapi-Secret`` and an inline
bearer token travel), or, with ``server.credentialId``, authenticated by the
``SimServerCredential`` registered under that id on the ``SimVapi`` (Vapi keeps
custom credentials, HMAC keys included, on its side). The body is built once and
its bytes are what is signed and sent. Used by ``sim.vapi`` when a behaviour's
``tool_calls`` say so; every exchange is recorded as a ``ToolExchange``.
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

ToolCallShape = Literal["toolCallList", "toolCalls", "toolWithToolCallList", "function-call"]


@attrs.frozen(kw_only=True)
class SimToolCall:
    """One tool call the simulated assistant makes, before its reply number ``before_reply``
    (0: right after the caller's first turn)."""

    name: str
    #: As sent: an object, or a JSON string of one (Vapi sends both).
    arguments: Mapping[str, Any] | str = attrs.field(factory=dict)
    before_reply: int = 0
    shape: ToolCallShape = "toolCallList"
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
class ToolExchange:
    """One webhook the simulated Vapi sent and what came back (status 0: no answer)."""

    tool: SimToolCall
    body: bytes = attrs.field(repr=False)
    status: int
    answer: Any


def tool_calls_body(
    call_id: str, overrides: Mapping[str, Any], tool: SimToolCall, index: int
) -> bytes:
    """The ``{"message": {"type": "tool-calls", …}}`` body, in the tool's shape."""
    tool_call_id = f"call_{call_id[:8]}_{index}"
    arguments = tool.arguments if isinstance(tool.arguments, str) else dict(tool.arguments)
    call = {
        "id": call_id,
        "orgId": "sim-org",
        "type": "vapi.websocketCall",
        "assistantOverrides": dict(overrides),
    }
    message: dict[str, Any] = {"timestamp": int(time.time() * 1000), "call": call}
    if tool.shape == "function-call":
        message |= {
            "type": "function-call",
            "functionCall": {"name": tool.name, "parameters": arguments},
        }
    elif tool.shape == "toolWithToolCallList":
        message |= {
            "type": "tool-calls",
            "toolWithToolCallList": [
                {
                    "type": "function",
                    "function": {"name": tool.name, "parameters": {"type": "object"}},
                    "toolCall": {
                        "id": tool_call_id,
                        "type": "function",
                        "function": {"arguments": arguments},
                    },
                }
            ],
        }
    elif tool.shape == "toolCalls":
        # The flat shape of some of Vapi's examples: name and arguments on the item.
        message |= {
            "type": "tool-calls",
            "toolCalls": [{"id": tool_call_id, "name": tool.name, "arguments": arguments}],
        }
    else:
        message |= {
            "type": "tool-calls",
            "toolCallList": [
                {
                    "id": tool_call_id,
                    "type": "function",
                    "function": {"name": tool.name, "arguments": arguments},
                }
            ],
        }
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
    call_id: str,
    overrides: Mapping[str, Any],
    credential: SimServerCredential | None,
    tool: SimToolCall,
    index: int,
) -> list[ToolExchange]:
    """POST the tool call (``1 + tool.repeats`` times) to the call's server URL."""
    server = overrides.get("server")
    if not isinstance(server, dict) or not isinstance(server.get("url"), str):
        return []
    body = tool_calls_body(call_id, overrides, tool, index)
    exchanges = []
    async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S) as http:
        for _ in range(1 + tool.repeats):
            headers = auth_headers(server, credential, body, now=time.time())
            headers["Content-Type"] = "application/json"
            try:
                response = await http.post(server["url"], content=body, headers=headers)
            except httpx.HTTPError:
                exchanges.append(ToolExchange(tool=tool, body=body, status=0, answer=None))
                continue
            try:
                answer = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                answer = response.text
            exchanges.append(
                ToolExchange(tool=tool, body=body, status=response.status_code, answer=answer)
            )
    return exchanges
