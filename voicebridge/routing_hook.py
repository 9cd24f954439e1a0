"""The decision hook: the operator's server decides a call (``[route_hook]``).

For every inbound call whose route allows it (``ask_hook``), the voice webhook POSTs a
JSON request to ``route_hook.url``, shaped like Vapi's ``assistant-request`` server
message, and signed::

    X-Voicebridge-Timestamp: <seconds since the epoch>
    X-Voicebridge-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>

(``secret`` is the ``route-hook-secret`` credential, ``body`` the exact bytes sent.) The
answer is Vapi's: ``assistantId`` or ``assistant`` (with ``assistantOverrides``), a
``destination`` (``{"type": "number", "number": …}``) to dial at once, or ``error`` (the
caller hears it, then the call ends); ``{}`` or 204 leaves the call to its route. Any
other answer, an HTTP error, or no answer within ``route_hook.deadline_s``: the route's
own choice, one rate-limited warning, one count of ``voicebridge_route_hook_failures``.
See docs/call-control.md.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal, Protocol

import httpx
import orjson
import trio

from voicebridge.config import ASSISTANT_ID, CallerAction, Config
from voicebridge.errors import VoicebridgeError
from voicebridge.observability.logs import log_event
from voicebridge.routing import (
    MAX_DECISION_CHARS,
    AssistantChoice,
    Choice,
    Decision,
    DialChoice,
    RefuseChoice,
    Router,
    describe,
    encode_decision,
)
from voicebridge.twilio import twiml

log = logging.getLogger(__name__)

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "HookFailed",
    "RouteHook",
    "decide",
    "parse_answer",
    "sign",
]

TIMESTAMP_HEADER = "X-Voicebridge-Timestamp"
SIGNATURE_HEADER = "X-Voicebridge-Signature"
SIGNATURE_VERSION = "v1"
#: The most of an answer read: an inline assistant is a few KiB; a decision the call
#: cannot carry (``routing.MAX_DECISION_CHARS``) is refused anyway.
MAX_ANSWER_BYTES = 256 * 1024
#: The longest ``error`` the caller is read out.
MAX_ERROR_CHARS = 500
#: Hook requests in flight at once. The hook shares the server's HTTP client (and its
#: pool of 100 connections) with Vapi's ``POST /call``: a hook that hangs must not take
#: the connections calls need. A call past this takes its route's choice at once.
MAX_IN_FLIGHT = 32

FailureKind = Literal["timeout", "error", "malformed", "refused"]


class HookFailed(VoicebridgeError):
    """The hook gave no usable decision. ``kind``: ``timeout`` (no complete answer by
    the deadline), ``error`` (no connection, an HTTP error status), ``malformed`` (not
    an answer this version reads), ``refused`` (a destination that is not allowed)."""

    def __init__(self, kind: FailureKind, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind: FailureKind = kind
        self.detail = detail


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Voicebridge-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def request_body(*, call_sid: str, caller: str, called: str, route: str, now_s: float) -> bytes:
    """The request: Vapi's ``assistant-request`` message, with Twilio's call in it."""
    return orjson.dumps(
        {
            "message": {
                "type": "assistant-request",
                "timestamp": math.floor(now_s * 1000),
                "call": {
                    "type": "inboundPhoneCall",
                    "phoneCallProvider": "twilio",
                    "phoneCallProviderId": call_sid,
                    "customer": {"number": caller},
                    "phoneNumber": {"number": called},
                },
                "customer": {"number": caller},
                "phoneNumber": {"number": called},
                "route": route,
            }
        }
    )


def _malformed(detail: str) -> HookFailed:
    return HookFailed("malformed", detail)


def _object(answer: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = answer.get(key, {})
    if not isinstance(value, dict):
        raise _malformed(f"{key} is not an object")
    return value


def parse_answer(body: bytes, *, allowed_destinations: Collection[str]) -> Choice | None:
    """The choice of an answer's JSON ``body``; None when it leaves the call to its route
    (``{}``). Raises ``HookFailed`` (``malformed``, or ``refused`` for a destination
    not in ``allowed_destinations``)."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _malformed(f"not JSON ({exc})") from None
    if not isinstance(answer, dict):
        raise _malformed("not a JSON object")
    given = [k for k in ("assistantId", "assistant", "destination", "error") if k in answer]
    if "squadId" in answer or "squad" in answer or "workflowId" in answer:
        raise _malformed("squads and workflows are not supported; answer assistantId")
    if not given:
        if "assistantOverrides" in answer:
            return AssistantChoice(overrides=_object(answer, "assistantOverrides"))
        return None
    if len(given) > 1 and not (set(given) <= {"assistantId", "assistant"}):
        raise _malformed(f"gives {' and '.join(given)}: one at most")
    if "error" in answer:
        error = answer["error"]
        if not isinstance(error, str) or not error.strip():
            raise _malformed("error is not a non-empty string")
        say = error[:MAX_ERROR_CHARS]
        return RefuseChoice(twiml=twiml.caller_action(CallerAction(say=say)))
    if "destination" in answer:
        destination = _object(answer, "destination")
        if destination.get("type") != "number":
            raise _malformed("destination.type must be 'number' (sip is not supported)")
        number = destination.get("number")
        if not isinstance(number, str):
            raise _malformed("destination.number is not a string")
        if number not in allowed_destinations:
            raise HookFailed("refused", f"destination {number[:40]!r} is not an allowed number")
        message = destination.get("message", "")
        if not isinstance(message, str):
            raise _malformed("destination.message is not a string")
        return DialChoice(number=number, say=message[:MAX_ERROR_CHARS])
    assistant_id = answer.get("assistantId", "")
    if "assistantId" in answer and not (
        isinstance(assistant_id, str) and ASSISTANT_ID.fullmatch(assistant_id)
    ):
        raise _malformed("assistantId is not an assistant id")
    choice = AssistantChoice(
        assistant_id=assistant_id,
        assistant={} if assistant_id else _object(answer, "assistant"),
        overrides=_object(answer, "assistantOverrides"),
    )
    if not choice.assistant_id and not choice.assistant:
        raise _malformed("assistant is empty")
    if len(encode_decision(choice)) > MAX_DECISION_CHARS:
        raise _malformed(
            f"inline assistant and overrides too large to carry ({MAX_DECISION_CHARS} "
            "characters compressed); answer a saved assistant's assistantId"
        )
    return choice


def allowed_destinations(config: Config) -> frozenset[str]:
    """Where a hook may send a call: the numbers a transfer may reach, and those the
    routes dial (the operator wrote them all)."""
    numbers = {*config.transfer.allowed, *(r.dial for r in config.routes)}
    numbers.add(config.transfer.default_destination)
    numbers.discard("")
    return frozenset(numbers)


class RouteHook:
    """The client of ``[route_hook]``. One per configuration; shares the server's
    ``httpx.AsyncClient``."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        url: str,
        secret: bytes,
        deadline_s: float,
        allowed: Collection[str],
        clock: Callable[[], float] = time.time,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._http = http
        self.url = url
        self._secret = secret
        self.deadline_s = deadline_s
        self._allowed = allowed
        self._clock = clock
        self._in_flight = trio.CapacityLimiter(max_in_flight)

    @classmethod
    def from_config(cls, config: Config, http: httpx.AsyncClient) -> RouteHook | None:
        if not config.route_hook.url:
            return None
        return cls(
            http,
            url=config.route_hook.url,
            secret=config.credentials.route_hook_secret.reveal().encode(),
            deadline_s=config.route_hook.deadline_s,
            allowed=allowed_destinations(config),
        )

    async def ask(self, *, call_sid: str, caller: str, called: str, route: str) -> Choice | None:
        """The hook's choice for the call (None: its route's). Raises ``HookFailed``.

        The whole exchange is bounded by ``deadline_s`` (a trio deadline: connect,
        request and the complete answer); with ``max_in_flight`` requests already
        waiting, it fails at once (``error``). Cancellation abandons the request.
        """
        try:
            self._in_flight.acquire_nowait()
        except trio.WouldBlock:
            raise HookFailed(
                "error", f"{self._in_flight.total_tokens:g} requests in flight already"
            ) from None
        try:
            return await self._ask(call_sid=call_sid, caller=caller, called=called, route=route)
        finally:
            self._in_flight.release()

    async def _ask(self, *, call_sid: str, caller: str, called: str, route: str) -> Choice | None:
        now = self._clock()
        body = request_body(
            call_sid=call_sid, caller=caller, called=called, route=route, now_s=now
        )
        timestamp = str(math.floor(now))
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
        }
        content: bytes | None = None
        status = 0
        with trio.move_on_after(self.deadline_s):
            try:
                async with self._http.stream("POST", self.url, content=body, headers=headers) as r:
                    status = r.status_code
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in r.aiter_bytes():
                        size += len(chunk)
                        if size > MAX_ANSWER_BYTES:
                            raise _malformed(f"answer over {MAX_ANSWER_BYTES} bytes")
                        chunks.append(chunk)
                    content = b"".join(chunks)
            except httpx.HTTPError as exc:
                raise HookFailed("error", f"{type(exc).__name__}: {exc}") from None
        if content is None:
            raise HookFailed("timeout", f"no complete answer within {self.deadline_s:g} s")
        if status == 204:
            return None
        if not 200 <= status < 300:
            raise HookFailed("error", f"HTTP {status}")
        return parse_answer(content, allowed_destinations=self._allowed)


class HookObserver(Protocol):
    """What ``decide`` reports (``BridgeMetrics``)."""

    def route_hook_answered(self, seconds: float, failure: FailureKind | None) -> None:
        """The hook answered (or failed, ``failure``) after ``seconds``."""


async def decide(
    router: Router,
    hook: RouteHook | None,
    *,
    call_sid: str,
    caller: str,
    called: str,
    observer: HookObserver | None = None,
    ask: bool = True,
) -> Decision:
    """The call's decision: its route's, or the hook's when the route asks it (and
    ``ask``). A failed hook is logged (one rate-limited warning; its text is peer text,
    escaped by the log outputs) and counted, and the route's choice stands."""
    decision = router.match(to=called, caller=caller)
    if hook is None or not decision.ask_hook or not ask:
        return decision
    started = trio.current_time()
    failure: FailureKind | None = None
    try:
        choice = await hook.ask(
            call_sid=call_sid, caller=caller, called=called, route=decision.route
        )
    except HookFailed as exc:
        failure = exc.kind
        log_event(
            log,
            logging.WARNING,
            "route-hook-failed",
            f"call {call_sid}: the route hook gave no decision ({exc}); "
            f"route {decision.route} decides: {describe(decision.choice)}",
            call_sid=call_sid,
            route=decision.route,
            reason=exc.kind,
            detail=exc.detail,
        )
        choice = None
    finally:
        if observer is not None:
            observer.route_hook_answered(trio.current_time() - started, failure)
    if choice is None:
        return decision
    return Decision(
        route=decision.route,
        choice=choice,
        why=f"the route hook decided (route {decision.route}: {decision.why})",
        ask_hook=True,
        by="hook",
    )
