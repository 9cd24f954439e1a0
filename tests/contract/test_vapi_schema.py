"""Contract tests: what voicebridge and the simulated Vapi exchange, against Vapi's own types.

Every ``POST /call`` body voicebridge sends, the simulated Vapi's answer to it, every
message the simulated Vapi sends on the transport socket, every webhook it posts and
every answer voicebridge gives to a webhook is checked strictly (``tests.contract.strict``:
unknown keys, enum values, required fields, nested all the way down) against the types
of ``vapi-server-sdk`` (Fern-generated from Vapi's OpenAPI). The simulators are written
from the same reading of Vapi as the bridge; this is the check that does not share it.

Where the SDK is known to be wrong, ``SDK_HOLES`` and ``CLOSEST_TYPE`` say so, each with
its reason; nothing else is let through. A mismatch of the simulated Vapi is an
``xfail(strict=True)`` naming it, so that fixing the simulator turns it into a failure
to be removed (there is none today).

Charter: loopback only, port 0, a ``trio.fail_after`` guard; the simulated calls run
once for the module, at the same time on one server (about 15 s of real time).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import httpx
import orjson
import pydantic
import pytest
import trio

from tests.contract.sdk import (
    AssistantOverrides,
    Call,
    CallTransport_VapiWebsocket,
    ClientInboundMessageMessage,
    ClientMessageMessage,
    RawCallsClient,
    ServerMessage,
    ServerMessageMessage,
    ServerMessageResponseToolCalls,
    ServerMessageResponseTransferDestinationRequest,
    ServerMessageStatusUpdate,
    SubscriptionLimits,
)
from tests.contract.strict import Holes, mismatches, model_from_signature
from tests.control.test_vapi_call_control_e2e import (
    DESTINATION_REQUEST,
    GREETER,
    HANG_UP,
    NOT_ALLOWED,
    Controlled,
    control_mid_greeting,
    forward,
    greeting_of,
)
from tests.control.test_webhook_e2e import (
    HMAC_CREDENTIAL,
    HUMAN,
    OTHER_DESK,
    sections,
    wait_for,
)
from tests.harness import SHORT_ASSISTANT, Bridge, running_bridge
from voicebridge.config import Config
from voicebridge.control.routes import vapi_server_override
from voicebridge.loopback import loopback_config
from voicebridge.sim.caller import (
    CallReport,
    Hangup,
    PressDigit,
    Silence,
    Speak,
    WaitForAssistant,
    WaitForAssistantDone,
    place_call,
)
from voicebridge.sim.server_messages import (
    SimToolCall,
    ToolCallShape,
    ToolExchange,
    WebhookExchange,
)
from voicebridge.sim.vapi import (
    CREATE_CALL_KEYS,
    ENDED_ASSISTANT,
    ENDED_CONCURRENCY_LIMIT,
    ENDED_CUSTOMER,
    SentMessage,
    SimTransfer,
    SimVapiCallRecord,
)
from voicebridge.vapi import transport
from voicebridge.vapi.client import build_create_body
from voicebridge.vapi.endings import NORMAL_REASONS, OVER_LIMIT_REASONS

#: The body of ``POST /call``: the SDK spells it only as ``calls.create``'s arguments.
CreateCallRequest = model_from_signature("CreateCallRequest", RawCallsClient.create)

#: Where vapi-server-sdk 3.0.0 is known to be wrong: keys Vapi sends or accepts that the
#: SDK does not declare. Each is allowed on its one model; nothing else is let through.
SDK_HOLES: Holes = {
    # The create answer's transport carries the socket URL; Vapi's own websocket tester
    # reads it (PROTOCOLS.md section 2). The SDK's websocket transport type lacks it.
    CallTransport_VapiWebsocket: {
        "websocketCallUrl": "the call's socket URL; missing from the SDK's transport type",
    },
    # Vapi's API takes the assistant's silence timeout under this name (docs.vapi.ai,
    # "Call timeout settings": silenceTimeoutSeconds, 5-3600 s); the SDK has it only on
    # TransferAssistant (reported as VapiAI/server-sdk-python issue 24). The bridge must
    # send it: it derives its own silence deadline from it.
    AssistantOverrides: {
        "silenceTimeoutSeconds": "Vapi's silence timeout; missing from the SDK's overrides",
    },
}

#: The SDK's client-message union lacks ``status-update`` (the ``clientMessages`` enum and
#: Vapi's websocket tester have it): such messages are checked against the server message
#: of the same name, the closest type the SDK has (same fields, PROTOCOLS.md section 2).
CLOSEST_TYPE: Mapping[str, Any] = {"status-update": ServerMessageStatusUpdate}

#: Every client-message type the simulated Vapi is known to send; each has its test
#: below, and a type not listed here fails ``test_every_client_message_type_is_checked``.
CLIENT_MESSAGE_TYPES = (
    "speech-update",
    "transcript",
    "user-interrupted",
    "status-update",
    "transfer-update",
)
#: The server messages (other than tool calls) the simulated Vapi posts; likewise.
WEBHOOK_TYPES = ("status-update", "end-of-call-report", "transfer-destination-request")

#: The tool-call webhook shapes the simulated Vapi can send (``SimToolCall.shape``).
TOOL_SHAPES: tuple[ToolCallShape, ...] = (
    "canonical",
    "toolCallList",
    "toolWithToolCallList",
    "toolCalls",
    "function-call",
)


class NoAnswerExpected(pydantic.BaseModel):
    """The answer to a webhook for which Vapi expects none (``phone-call-control``).

    The SDK has no response type for it (its ``ServerMessageResponse`` says only
    assistant-request, tool-calls and transfer-destination-request expect one). The
    bridge answers ``{}``, or says why it refused in ``error``, the field every SDK
    response type has for that; nothing else is allowed.
    """

    error: str | None = None


def problems(value: Any, annotation: Any) -> list[str]:
    return [str(m) for m in mismatches(value, annotation, holes=SDK_HOLES)]


NO_TOOL_WITH_TOOL_CALL_LIST = "missing required 'toolWithToolCallList' (ServerMessageToolCalls)"


def unexplained(found: list[str], *known: str) -> list[str]:
    """The mismatches in ``found`` that contain none of the ``known`` texts."""
    return [problem for problem in found if not any(text in problem for text in known)]


# --- the traffic: a few simulated calls through the real server, once for the module -------

BARGE_IN_SID = "CA" + "b" * 32
HANG_UP_SID = "CA" + "c" * 32
TOOLS_SID = "CA" + "d" * 32
#: The assistant transfers with Vapi's built-in tool, to a number / asking the server.
TRANSFER_SID = "CA" + "1" * 32
ASKED_SID = "CA" + "2" * 32
#: The assistant's LLM fails mid-greeting; Vapi ends the call and closes without a status.
FAILED_SID = "CA" + "3" * 32
#: Vapi's concurrency limit blocks the call it created (201, concurrencyBlocked).
BLOCKED_SID = "CA" + "4" * 32
#: Live Call Control: say, control and add-message POSTed to the call's controlUrl.
LIVE_CONTROL_SID = "CA" + "5" * 32
LIVE_CONTROL: list[dict[str, Any]] = [
    {"type": "control", "control": "mute-customer"},
    {"type": "control", "control": "unmute-customer"},
    {"type": "say", "content": "One moment, please.", "endCallAfterSpoken": False},
    {"type": "add-message", "message": {"role": "system", "content": "Be brief."}},
    {"type": "say", "content": "Goodbye.", "endCallAfterSpoken": True},
]
#: The calls Vapi's call-control webhooks are posted for, mid-greeting.
CONTROLLED: Mapping[str, list[Mapping[str, Any]]] = {
    "CA" + "e" * 32: [DESTINATION_REQUEST, forward(HUMAN)],
    "CA" + "f" * 32: [forward(NOT_ALLOWED), forward(OTHER_DESK)],
    "CA" + "0" * 32: [HANG_UP],
}
#: Every shape of tool call, after the caller's first turn: a tool that answers and one
#: that fails, so that both kinds of result come back. Arguments are a JSON string where
#: the schema has them (``function.arguments``), an object where a variant puts them.
TOOLS_ASSISTANT = attrs.evolve(
    SHORT_ASSISTANT,
    tool_calls=(
        # Given as an object: the canonical shape sends it as a JSON string.
        SimToolCall(name="lookup_order", arguments={"order": 6}, shape="canonical"),
        SimToolCall(name="lookup_order", arguments='{"order": 7}', shape="toolCallList"),
        SimToolCall(name="explode", arguments='{"order": 8}', shape="toolWithToolCallList"),
        SimToolCall(name="lookup_order", arguments={"order": 9}, shape="toolCalls"),
        SimToolCall(name="explode", arguments={"order": 10}, shape="function-call"),
    ),
)
BEHAVIOURS = {
    TOOLS_SID: TOOLS_ASSISTANT,
    BARGE_IN_SID: GREETER,
    TRANSFER_SID: attrs.evolve(
        SHORT_ASSISTANT, transfer=SimTransfer(number=OTHER_DESK, say_clip="caller_3")
    ),
    ASKED_SID: attrs.evolve(SHORT_ASSISTANT, transfer=SimTransfer(end_after_s=0.2)),
    FAILED_SID: attrs.evolve(
        GREETER,
        end_after_s=1.0,
        ended_reason="pipeline-error-openai-llm-failed",
        close_code=1005,
    ),
    BLOCKED_SID: attrs.evolve(SHORT_ASSISTANT, concurrency_blocked=True),
    LIVE_CONTROL_SID: GREETER,
    **dict.fromkeys(CONTROLLED, GREETER),
}
#: A caller who listens to the greeting, says one thing, and listens on.
ASK_AND_LISTEN = (WaitForAssistantDone(quiet_s=0.4), Speak("caller_2"), Silence(8))
SCRIPTS = {
    # The caller talks over the greeting (user-interrupted), then hears the goodbye.
    BARGE_IN_SID: (WaitForAssistant(heard_ms=300), Speak("caller_2"), WaitForAssistantDone(0.4)),
    # The caller keys in an entry mid-greeting (one add-message), then hangs up: the
    # bridge ends the Vapi leg (end-call).
    HANG_UP_SID: (
        WaitForAssistant(heard_ms=300),
        PressDigit("4"),
        PressDigit("2"),
        PressDigit("#"),
        Silence(0.3),
        Hangup(),
    ),
    TOOLS_SID: (WaitForAssistantDone(quiet_s=0.4), Speak("caller_2"), WaitForAssistantDone(0.4)),
    TRANSFER_SID: ASK_AND_LISTEN,
    ASKED_SID: ASK_AND_LISTEN,
    FAILED_SID: (Silence(8),),
    BLOCKED_SID: (Silence(8),),
}


@attrs.frozen(kw_only=True)
class Traffic:
    """What crossed the wire in the module's simulated calls."""

    create_bodies: list[dict[str, Any]]
    create_answer: Any
    blocked_answer: Any
    vapi_calls: list[SimVapiCallRecord]
    reports: dict[str, CallReport]
    controlled: dict[str, Controlled]

    @property
    def client_messages(self) -> list[SentMessage]:
        return [event for call in self.vapi_calls for event in call.events]

    @property
    def socket_messages(self) -> list[dict[str, Any]]:
        """What the bridge sent on the transport sockets (``end-call`` is not kept)."""
        return [m for call in self.vapi_calls for m in (*call.add_messages, *call.control_messages)]

    @property
    def tool_exchanges(self) -> list[ToolExchange]:
        return [exchange for call in self.vapi_calls for exchange in call.tool_exchanges]

    @property
    def webhooks(self) -> list[WebhookExchange]:
        return [exchange for call in self.vapi_calls for exchange in call.webhooks]

    def vapi_call(self, call_sid: str) -> SimVapiCallRecord:
        [call] = [call for call in self.vapi_calls if call.call_sid == call_sid]
        return call


async def _live_control(bridge: Bridge, reports: dict[str, CallReport]) -> None:
    """A caller who only listens; Live Call Control requests to its call mid-greeting."""
    async with trio.open_nursery() as call_nursery:

        async def call() -> None:
            reports[LIVE_CONTROL_SID] = await place_call(
                bridge.caller, (Silence(15),), call_sid=LIVE_CONTROL_SID
            )

        call_nursery.start_soon(call)
        await wait_for(lambda: greeting_of(bridge, LIVE_CONTROL_SID) is not None)
        vapi_call = greeting_of(bridge, LIVE_CONTROL_SID)
        assert vapi_call is not None
        async with httpx.AsyncClient() as http:
            for message in LIVE_CONTROL:
                answer = await http.post(bridge.vapi.control_url(vapi_call.id), json=message)
                assert answer.status_code == 200, answer.text


async def _run_traffic() -> Traffic:
    reports: dict[str, CallReport] = {}
    controlled: dict[str, Controlled] = {}
    with trio.fail_after(30):
        async with running_bridge(
            behaviour_for=lambda order, sid: BEHAVIOURS.get(sid or "", SHORT_ASSISTANT),
            **sections("hmac"),
        ) as bridge:
            bridge.vapi.credentials["cred-1"] = HMAC_CREDENTIAL

            async def call(sid: str) -> None:
                reports[sid] = await place_call(bridge.caller, SCRIPTS[sid], call_sid=sid)

            async def control(sid: str) -> None:
                controlled[sid] = await control_mid_greeting(bridge, sid, CONTROLLED[sid])

            async with trio.open_nursery() as calls_nursery:
                for sid in SCRIPTS:
                    calls_nursery.start_soon(call, sid)
                for sid in CONTROLLED:
                    calls_nursery.start_soon(control, sid)
                calls_nursery.start_soon(_live_control, bridge, reports)
            for vapi_call in bridge.vapi.calls.values():
                await vapi_call.wait_webhooks_delivered()
            create_bodies = [a.body for a in bridge.vapi.create_attempts if a.body is not None]
            # The simulated Vapi's answers to a create, asked for directly: the bridge
            # keeps only the id and the URLs of them.
            answers = []
            for sid in ("CA" + "9" * 32, BLOCKED_SID):
                body = build_create_body(
                    bridge.config.vapi, call_sid=sid, caller="+15550100001", called="+15550100002"
                )
                async with httpx.AsyncClient() as http:
                    answer = await http.post(
                        bridge.vapi.base_url + "/call",
                        content=orjson.dumps(body),
                        headers={"Authorization": f"Bearer {bridge.vapi.api_key}"},
                    )
                assert answer.status_code == 201, answer.text
                answers.append(answer.json())
            vapi_calls = [call for call in bridge.vapi.calls.values() if call.ended_at]
    return Traffic(
        create_bodies=create_bodies,
        create_answer=answers[0],
        blocked_answer=answers[1],
        vapi_calls=vapi_calls,
        reports=reports,
        controlled=controlled,
    )


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    """The module's simulated calls, run once (a synchronous fixture: its own trio run)."""
    return trio.run(_run_traffic)


def test_the_calls_went_as_scripted(traffic: Traffic) -> None:
    """The traffic below is what it claims to be: otherwise a pass would prove little."""
    assert {event.type for event in traffic.client_messages} == set(CLIENT_MESSAGE_TYPES)
    statuses = {e.message["status"] for e in traffic.client_messages if e.type == "status-update"}
    assert statuses == {"in-progress", "forwarding", "ended"}
    assert len(traffic.create_bodies) == len(SCRIPTS) + len(CONTROLLED) + 1
    assert {exchange.tool.shape for exchange in traffic.tool_exchanges} == set(TOOL_SHAPES)
    assert all(exchange.status == 200 for exchange in traffic.tool_exchanges)
    assert {exchange.type for exchange in traffic.webhooks} == set(WEBHOOK_TYPES)
    assert all(exchange.status == 200 for exchange in traffic.webhooks)
    assert [m["type"] for m in traffic.socket_messages] == ["add-message"]
    assert all(not call.unknown_messages for call in traffic.vapi_calls)
    ended = {call.call_sid: call.ended_reason for call in traffic.vapi_calls}
    assert (ended[HANG_UP_SID], ended[BARGE_IN_SID]) == (ENDED_CUSTOMER, ENDED_ASSISTANT)
    assert ended[FAILED_SID] == "pipeline-error-openai-llm-failed"
    assert ended[BLOCKED_SID] == ENDED_CONCURRENCY_LIMIT
    assert [t["number"] for t in traffic.vapi_call(TRANSFER_SID).transfers] == [OTHER_DESK]
    assert [t["number"] for t in traffic.vapi_call(ASKED_SID).transfers] == [HUMAN]
    assert traffic.vapi_call(LIVE_CONTROL_SID).control_posts == LIVE_CONTROL
    answers = [answer for call in traffic.controlled.values() for answer in call.answers]
    assert len(answers) == 5 and all(status == 200 for status, _ in answers)


# --- POST /call --------------------------------------------------------------------------


def _config(**sections_: Any) -> Config:
    config = loopback_config(
        port=8080, vapi_base_url="http://127.0.0.1:9", auth_token="t" * 32, api_key="k"
    )
    for name, changes in sections_.items():
        config = config.evolve(**{name: attrs.evolve(getattr(config, name), **changes)})
    return config


#: The inline assistant of docs/configuration.md, as an operator would write it.
INLINE_ASSISTANT = {
    "firstMessage": "Hello, how can I help?",
    "model": {"provider": "openai", "model": "gpt-4o"},
}


@pytest.mark.parametrize(
    ("name", "config", "assistant"),
    [
        ("assistant id", _config(), ""),
        ("inline assistant", _config(vapi={"assistant_id": "", "assistant": INLINE_ASSISTANT}), ""),
        ("outbound call's assistant", _config(), "asst-sales"),
        ("pcm_s16le at 16 kHz", _config(vapi={"audio_format": "pcm_s16le", "sample_rate": 16000}),
         ""),
        ("call control, secret header", _config(**sections("secret")), ""),
        ("call control, bearer header", _config(**sections("bearer")), ""),
        ("call control, HMAC credential", _config(**sections("hmac")), ""),
    ],
)  # fmt: skip
def test_create_bodies_voicebridge_builds(name: str, config: Config, assistant: str) -> None:
    server = vapi_server_override(config)
    assert (server is not None) == name.startswith("call control")
    body = build_create_body(
        config.vapi,
        call_sid="CA" + "1" * 32,
        caller="+15550100001",
        called="+15550100002",
        server=server,
        assistant=assistant,
    )
    assert problems(body, CreateCallRequest) == []
    overrides = body["assistantOverrides"]
    assert {"maxDurationSeconds", "silenceTimeoutSeconds", "clientMessages"} <= overrides.keys()
    assert "transfer-update" in overrides["clientMessages"]
    assert ("serverMessages" in overrides) == (server is not None)


def test_create_bodies_sent_in_real_calls(traffic: Traffic) -> None:
    """What the simulated Vapi received from the bridge, call control on."""
    for body in traffic.create_bodies:
        assert problems(body, CreateCallRequest) == []
        assert "server" in body["assistantOverrides"]


def test_the_simulated_create_answer(traffic: Traffic) -> None:
    # One call: a ``Call`` (``CreateCallsResponse``'s other member answers ``customers``).
    assert problems(traffic.create_answer, Call) == []
    assert traffic.create_answer["transport"]["websocketCallUrl"].startswith("ws://127.0.0.1:")
    assert traffic.create_answer["monitor"]["controlUrl"].startswith("http://127.0.0.1:")


#: Where the simulated Vapi departs from the SDK on purpose, following docs/protocols.md
#: (section 2) and the bridge: the 201 of a call the concurrency limit blocked carries
#: ``subscriptionLimits`` beside the call's own fields. The SDK declares SubscriptionLimits
#: only on the batch answer (``CallBatchResponse``, ``customers`` given), never on a
#: ``Call``; which one Vapi sends for a single blocked call is not documented.
BLOCKED_CALL_DEPARTURE = "$.subscriptionLimits: unknown key (Call declares no 'subscriptionLimits')"


def test_the_simulated_answer_for_a_call_over_the_concurrency_limit(traffic: Traffic) -> None:
    answer = traffic.blocked_answer
    assert problems(answer, Call) == [BLOCKED_CALL_DEPARTURE]
    assert problems(answer["subscriptionLimits"], SubscriptionLimits) == []
    assert answer["subscriptionLimits"]["concurrencyBlocked"] is True


def test_the_simulated_vapi_takes_every_field_the_sdk_sends() -> None:
    """``POST /call`` accepts exactly the body's fields of the SDK's ``calls.create``."""
    assert set(CREATE_CALL_KEYS) == {info.alias for info in CreateCallRequest.model_fields.values()}


# --- messages on the transport socket ----------------------------------------------------


def _client_message_problems(traffic: Traffic, message_type: str) -> list[str]:
    found = []
    messages = [event.message for event in traffic.client_messages if event.type == message_type]
    assert messages, f"the simulated calls sent no {message_type}"
    for message in messages:
        annotation = CLOSEST_TYPE.get(message_type, ClientMessageMessage)
        found += [f"{message_type}: {p}" for p in problems(message, annotation)]
    return found


@pytest.mark.parametrize("message_type", CLIENT_MESSAGE_TYPES)
def test_client_messages(traffic: Traffic, message_type: str) -> None:
    assert _client_message_problems(traffic, message_type) == []


@pytest.mark.parametrize("reason", sorted(NORMAL_REASONS | OVER_LIMIT_REASONS))
def test_the_ended_reasons_voicebridge_names_are_vapis(reason: str) -> None:
    """A reason misspelt in the ending policy would never match: the call would fail."""
    ended_reason = ServerMessageStatusUpdate.model_fields["ended_reason"].annotation
    assert problems(reason, ended_reason) == []
    assert problems(reason + "s", ended_reason) != []


def test_every_client_message_type_is_checked(traffic: Traffic) -> None:
    assert {event.type for event in traffic.client_messages} <= set(CLIENT_MESSAGE_TYPES)


# --- messages voicebridge sends on the transport socket ---------------------------------


@pytest.mark.parametrize(
    "text",
    [
        transport.end_call(),
        transport.add_message(role="user", content="(The caller entered 42 on the keypad.)"),
        transport.add_message(role="system", content="x", trigger_response=False),
        transport.say("One moment."),
        transport.say("Goodbye.", end_call_after=True),
        *(transport.control(action) for action in transport.CONTROL_ACTIONS),
    ],
)
def test_socket_messages_voicebridge_encodes(text: str) -> None:
    assert problems(orjson.loads(text), ClientInboundMessageMessage) == []


def test_socket_messages_sent_in_real_calls(traffic: Traffic) -> None:
    for message in traffic.socket_messages:
        assert problems(message, ClientInboundMessageMessage) == []


# --- webhooks the simulated Vapi posts, and the bridge's answers ---------------------------


def _webhook(exchange: ToolExchange) -> Any:
    return orjson.loads(exchange.body)


def _exchanges(traffic: Traffic, shape: ToolCallShape) -> list[ToolExchange]:
    found = [e for e in traffic.tool_exchanges if e.tool.shape == shape]
    assert found, f"no {shape} tool call was made"
    return found


def test_the_canonical_tool_calls_webhook(traffic: Traffic) -> None:
    [exchange] = _exchanges(traffic, "canonical")
    assert problems(_webhook(exchange), ServerMessage) == []
    message = _webhook(exchange)["message"]
    [item] = message["toolCallList"]
    [wrapper] = message["toolWithToolCallList"]
    assert wrapper["toolCall"] == item
    assert item["function"]["arguments"] == '{"order":6}'


@pytest.mark.parametrize("message_type", WEBHOOK_TYPES)
def test_the_other_webhooks(traffic: Traffic, message_type: str) -> None:
    exchanges = [e for e in traffic.webhooks if e.type == message_type]
    assert exchanges, f"no {message_type} webhook was sent"
    for exchange in exchanges:
        assert problems(orjson.loads(exchange.body), ServerMessage) == []


def test_every_webhook_type_is_checked(traffic: Traffic) -> None:
    assert {exchange.type for exchange in traffic.webhooks} <= set(WEBHOOK_TYPES)


def test_answers_to_status_and_report_webhooks(traffic: Traffic) -> None:
    """Vapi expects no answer to these; the bridge gives ``{}``."""
    for exchange in traffic.webhooks:
        if exchange.type != "transfer-destination-request":
            assert exchange.answer == {}
            assert problems(exchange.answer, NoAnswerExpected) == []


NO_TOOL_CALL_LIST = "missing required 'toolCallList' (ServerMessageToolCalls)"
#: How each variant departs from the schema, on purpose (PROTOCOLS.md section 3: Vapi's
#: examples show them, so the bridge parses them; Vapi's schema has only the canonical
#: shape, ``toolCallList`` and ``toolWithToolCallList`` together).
VARIANT_DEPARTURES: Mapping[str, tuple[str, ...]] = {
    "toolCallList": (f"$.message: {NO_TOOL_WITH_TOOL_CALL_LIST}",),
    "toolWithToolCallList": (f"$.message: {NO_TOOL_CALL_LIST}",),
    "toolCalls": (
        f"$.message: {NO_TOOL_CALL_LIST}",
        f"$.message: {NO_TOOL_WITH_TOOL_CALL_LIST}",
        "$.message.toolCalls: unknown key (ServerMessageToolCalls declares no 'toolCalls')",
    ),
    # The legacy message: the schema no longer has the type at all.
    "function-call": ("$.message.type: 'function-call' is not one of",),
}


@pytest.mark.parametrize("shape", list(VARIANT_DEPARTURES))
def test_tool_call_variants_are_off_schema_as_documented(traffic: Traffic, shape: str) -> None:
    for exchange in _exchanges(traffic, shape):  # type: ignore[arg-type]
        found = problems(_webhook(exchange), ServerMessage)
        for departure in VARIANT_DEPARTURES[shape]:
            assert any(problem.startswith(departure) for problem in found), found


@pytest.mark.parametrize("shape", list(VARIANT_DEPARTURES))
def test_tool_call_variants_depart_only_as_documented(traffic: Traffic, shape: str) -> None:
    for exchange in _exchanges(traffic, shape):  # type: ignore[arg-type]
        found = problems(_webhook(exchange), ServerMessage)
        departures = VARIANT_DEPARTURES[shape]
        assert unexplained(found, *departures, "fits none of") == []


@pytest.mark.parametrize(
    "message",
    [DESTINATION_REQUEST, forward(HUMAN), HANG_UP],
    ids=["transfer-destination-request", "forward", "hang-up"],
)
def test_the_call_control_tests_stand_ins_for_vapis_webhooks(message: Mapping[str, Any]) -> None:
    """The call-control tests post these in the simulated Vapi's place, mid-greeting
    (``phone-call-control`` needs a ``serverMessages`` the bridge asks for but the
    simulator has no reason to send): they must be Vapi's shapes (their ``call`` object
    is the simulator's, checked above)."""
    assert problems(dict(message), ServerMessageMessage) == []


def test_tool_call_answers(traffic: Traffic) -> None:
    answers = [e.answer for e in traffic.tool_exchanges if e.tool.shape != "function-call"]
    assert {"result", "error"} == {key for a in answers for key in a["results"][0]} - {
        "toolCallId",
        "name",
    }
    for answer in answers:
        assert problems(answer, ServerMessageResponseToolCalls) == []


def test_the_legacy_function_call_answer(traffic: Traffic) -> None:
    """``function-call`` is gone from Vapi's schema (so is any type for its answer): the
    bridge answers it as Vapi's older docs say, one ``result`` or ``error``."""
    for exchange in _exchanges(traffic, "function-call"):
        assert exchange.answer.keys() <= {"result", "error"} and len(exchange.answer) == 1


def test_transfer_destination_answers(traffic: Traffic) -> None:
    [(status, answer), _] = traffic.controlled["CA" + "e" * 32].answers
    assert (status, answer) == (200, {"destination": {"type": "number", "number": HUMAN}})
    assert problems(answer, ServerMessageResponseTransferDestinationRequest) == []
    refusal = {"error": "no transfer destination is configured"}
    assert problems(refusal, ServerMessageResponseTransferDestinationRequest) == []


def test_phone_call_control_answers(traffic: Traffic) -> None:
    answers = [
        answer
        for sid, call in traffic.controlled.items()
        for (_, answer), message in zip(call.answers, CONTROLLED[sid], strict=True)
        if message["type"] == "phone-call-control"
    ]
    assert {"error"} in [set(a) for a in answers] and {} in answers
    for answer in answers:
        assert problems(answer, NoAnswerExpected) == []


def test_answers_to_webhooks_never_leak_other_keys() -> None:
    """The check of answers can fail: a key Vapi does not know is reported."""
    assert problems({"results": [], "note": "x"}, ServerMessageResponseToolCalls) == [
        "$.note: unknown key (ServerMessageResponseToolCalls declares no 'note')"
    ]
    assert [m.path for m in mismatches({"ok": True}, NoAnswerExpected)] == ["$.ok"]
