"""What the real Vapi does, end to end: the real server, the simulated caller, the simulated Vapi.

The simulated Vapi ends calls with any ``endedReason`` (failures included), closes its
socket with 1000, 1005 or 1006, sends audio after ``status-update`` ended, transfers
with its built-in tool, refuses calls over the account's concurrency limit both ways,
and acts on ``say``, ``add-message`` and ``control`` (on the socket or POSTed to
``monitor.controlUrl``). Each case asserts what the caller gets: the fallback for a
failure, the goodbye and a hang-up for a normal end, a ``<Dial>`` for a transfer, the
overflow message for the limit, and the words asked for.

Charter: loopback only, port 0, a ``trio.fail_after`` guard on every run, real time.
The ending and transfer cases share one server and run at once, once for the module
(a synchronous fixture with its own trio run, about 10 s).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import httpx
import pytest
import trio

from tests.control.test_vapi_call_control_e2e import GREETER, greeting_of
from tests.control.test_webhook_e2e import HMAC_CREDENTIAL, HUMAN, OTHER_DESK, sections, wait_for
from tests.harness import SHORT_ASSISTANT, Bridge, running_bridge
from tests.test_e2e import FALLBACK_WORDS, OVERFLOW_WORDS, SHORT_SCRIPT
from tests.test_metrics import scrape, value
from voicebridge.bridge.outcome import CallRecord, Outcome
from voicebridge.sim.audio import CLIP_TEXTS, load_clip
from voicebridge.sim.caller import (
    CallReport,
    Hangup,
    PressDigit,
    Script,
    Silence,
    Speak,
    WaitForAssistant,
    WaitForAssistantDone,
    place_call,
)
from voicebridge.sim.vapi import (
    ENDED_CONCURRENCY_LIMIT,
    ENDED_FORWARDED,
    SimTransfer,
    SimVapiBehaviour,
    SimVapiCallRecord,
)

#: The caller listens.
LISTEN: Script = (Silence(8),)
#: The caller listens to the greeting, asks, and listens on until the bridge ends the call.
ASK_AND_LISTEN: Script = (WaitForAssistantDone(quiet_s=0.4), Speak("caller_2"), Silence(8))
#: The goodbye of ``SHORT_ASSISTANT`` (1.9 s).
GOODBYE = SHORT_ASSISTANT.goodbye_clip


def clip_ms(clip: str) -> float:
    return len(load_clip(clip)) / 8


def failing(reason: str, **changes: Any) -> SimVapiBehaviour:
    """Vapi ends the call 1.5 s into the greeting (0.8 s of its speech) with ``reason``."""
    return attrs.evolve(GREETER, end_after_s=1.5, ended_reason=reason, **changes)


def goodbye_then(reason: str = "assistant-ended-call", **changes: Any) -> SimVapiBehaviour:
    """After its goodbye, Vapi ends the call with ``reason``."""
    return attrs.evolve(SHORT_ASSISTANT, ended_reason=reason, **changes)


@attrs.frozen
class Case:
    behaviour: SimVapiBehaviour
    script: Script
    outcome: Outcome
    #: ``say`` (the fallback), ``hangup`` or ``dial``.
    final_action: str
    final_dial: str = ""


def _sid(index: int) -> str:
    return f"CA{index:032d}"


#: Every case, by name; each call gets the CallSid of its position.
CASES: Mapping[str, Case] = {
    # A failure ending: the caller hears the fallback, not a silent hang-up.
    "pipeline-error-openai-llm-failed": Case(
        failing("pipeline-error-openai-llm-failed"), LISTEN, Outcome.ASSISTANT_LEG_FAILED, "say"
    ),
    "call.in-progress.error-vapifault-worker-died": Case(
        failing("call.in-progress.error-vapifault-worker-died"),
        LISTEN,
        Outcome.ASSISTANT_LEG_FAILED,
        "say",
    ),
    "worker-shutdown, close 1006": Case(
        failing("worker-shutdown", close_code=1006), LISTEN, Outcome.ASSISTANT_LEG_FAILED, "say"
    ),
    # A normal ending: the goodbye plays, then the caller is hung up.
    "assistant-said-end-call-phrase": Case(
        goodbye_then("assistant-said-end-call-phrase"),
        SHORT_SCRIPT,
        Outcome.ASSISTANT_ENDED,
        "hangup",
    ),
    # After ended, a close without a status code or without a close frame is normal,
    # and the goodbye's tail sent after the message is played.
    "ended, tail, close 1005": Case(
        goodbye_then(close_code=1005, tail_after_ended_ms=800),
        SHORT_SCRIPT,
        Outcome.ASSISTANT_ENDED,
        "hangup",
    ),
    "ended, tail, close 1006": Case(
        goodbye_then(close_code=1006, tail_after_ended_ms=800),
        SHORT_SCRIPT,
        Outcome.ASSISTANT_ENDED,
        "hangup",
    ),
    # Without ended, the same closes are failures.
    "no ended, close 1006": Case(
        failing("assistant-ended-call", announce_end=False, close_code=1006),
        LISTEN,
        Outcome.ASSISTANT_LEG_FAILED,
        "say",
    ),
    "no ended, close 1005": Case(
        failing("assistant-ended-call", announce_end=False, close_code=1005),
        LISTEN,
        Outcome.ASSISTANT_LEG_FAILED,
        "say",
    ),
    # Vapi's built-in transferCall tool: the tool's message plays, then the caller is
    # dialled. To the tool's number (allowed), or where the server says when it has none.
    "built-in transfer to a number": Case(
        attrs.evolve(SHORT_ASSISTANT, transfer=SimTransfer(number=OTHER_DESK, say_clip="caller_3")),
        ASK_AND_LISTEN,
        Outcome.TRANSFERRED,
        "dial",
        OTHER_DESK,
    ),
    "built-in transfer, destination asked": Case(
        attrs.evolve(SHORT_ASSISTANT, transfer=SimTransfer(say_clip="caller_3")),
        ASK_AND_LISTEN,
        Outcome.TRANSFERRED,
        "dial",
        HUMAN,
    ),
    "built-in transfer, then Vapi ends (assistant-forwarded-call)": Case(
        attrs.evolve(
            SHORT_ASSISTANT,
            transfer=SimTransfer(number=OTHER_DESK, say_clip="caller_3", end_after_s=0.1),
        ),
        ASK_AND_LISTEN,
        Outcome.TRANSFERRED,
        "dial",
        OTHER_DESK,
    ),
}
SIDS = {name: _sid(index) for index, name in enumerate(CASES)}


@attrs.frozen
class Ran:
    report: CallReport
    record: CallRecord
    vapi_call: SimVapiCallRecord


async def _run_cases() -> dict[str, Ran]:
    behaviours = {SIDS[name]: case.behaviour for name, case in CASES.items()}
    reports: dict[str, CallReport] = {}
    with trio.fail_after(30):
        async with running_bridge(
            behaviour_for=lambda order, sid: behaviours[sid or ""], **sections("hmac")
        ) as bridge:
            bridge.vapi.credentials["cred-1"] = HMAC_CREDENTIAL

            async def call(name: str) -> None:
                reports[name] = await place_call(
                    bridge.caller, CASES[name].script, call_sid=SIDS[name]
                )

            async with trio.open_nursery() as calls_nursery:
                for name in CASES:
                    calls_nursery.start_soon(call, name)
            vapi_calls = {call.call_sid: call for call in bridge.vapi.calls.values()}
            for vapi_call in vapi_calls.values():
                await vapi_call.wait_webhooks_delivered()
            return {
                name: Ran(reports[name], bridge.record(SIDS[name]), vapi_calls[SIDS[name]])
                for name in CASES
            }


@pytest.fixture(scope="module")
def ran() -> dict[str, Ran]:
    return trio.run(_run_cases)


@pytest.mark.parametrize("name", list(CASES))
def test_what_the_caller_gets(ran: dict[str, Ran], name: str) -> None:
    case, call = CASES[name], ran[name]
    assert call.record.outcome is case.outcome, call.record.detail
    assert (call.report.final_action, call.report.final_dial) == (
        case.final_action,
        case.final_dial,
    )
    assert (FALLBACK_WORDS in call.report.final_say.lower()) == (case.final_action == "say")
    assert call.report.ended_by == "server", "the bridge ended the stream, not the caller"
    assert call.report.protocol_violations == []


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n].behaviour.end_after_s])
def test_a_failure_comes_mid_greeting(ran: dict[str, Ran], name: str) -> None:
    call = ran[name]
    heard_ms = sum(turn.heard_ms for turn in call.report.turns)
    assert 0 < heard_ms < clip_ms("greeting") - 1000, "the greeting was cut off by the failure"
    if call.vapi_call.behaviour.announce_end:
        assert call.record.ended_reason == call.vapi_call.ended_reason == name.split(",")[0]


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n].final_action == "hangup"])
def test_a_normal_end_plays_the_whole_goodbye(ran: dict[str, Ran], name: str) -> None:
    call = ran[name]
    behaviour = call.vapi_call.behaviour
    [_, goodbye] = call.report.turns
    assert not goodbye.interrupted
    # The whole clip but its quiet edges (the caller counts speech frames); without the
    # tail sent after ended, 800 ms less.
    assert goodbye.heard_ms >= clip_ms(GOODBYE) - 300, (goodbye.heard_ms, clip_ms(GOODBYE))
    tail_bytes = behaviour.tail_after_ended_ms * 8
    assert call.vapi_call.tail_bytes_after_ended == tail_bytes
    assert call.vapi_call.close_code == behaviour.close_code
    assert call.record.ended_reason == behaviour.ended_reason


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n].final_action == "dial"])
def test_a_built_in_transfer_plays_the_tools_message_then_dials(
    ran: dict[str, Ran], name: str
) -> None:
    call = ran[name]
    assert [d["number"] for d in call.vapi_call.transfers] == [CASES[name].final_dial]
    [_, message] = call.report.turns
    assert not message.interrupted
    assert message.heard_ms >= clip_ms("caller_3") - 300
    assert call.record.transfer_to == CASES[name].final_dial
    if call.vapi_call.behaviour.transfer and call.vapi_call.behaviour.transfer.end_after_s:
        assert call.vapi_call.ended_reason == ENDED_FORWARDED
    else:
        assert call.vapi_call.end_call_received_at is not None, "the bridge ended the Vapi leg"


def test_the_destination_request_went_to_the_bridge(ran: dict[str, Ran]) -> None:
    webhooks = ran["built-in transfer, destination asked"].vapi_call.webhooks
    [asked] = [w for w in webhooks if w.type == "transfer-destination-request"]
    assert (asked.status, asked.answer) == (
        200,
        {"destination": {"type": "number", "number": HUMAN}},
    )


@pytest.mark.parametrize("name", list(CASES))
def test_status_and_report_webhooks_reach_the_bridge(ran: dict[str, Ran], name: str) -> None:
    vapi_call = ran[name].vapi_call
    sent = [(w.type, w.message.get("status", "")) for w in vapi_call.webhooks]
    assert sent[0] == ("status-update", "in-progress")
    assert sent[-2:] == [("status-update", "ended"), ("end-of-call-report", "")]
    assert all(w.status == 200 for w in vapi_call.webhooks)
    report = vapi_call.webhooks[-1].message
    assert report["endedReason"] == vapi_call.call_object()["endedReason"]


# --- Vapi's concurrency limit -------------------------------------------------------------


@pytest.mark.parametrize("answer", ["400", "blocked", "ended", "batch"])
async def test_a_call_over_vapis_concurrency_limit_hears_the_overflow_message(
    answer: str,
) -> None:
    """One call in progress, the account's limit 1: Vapi refuses the second call, with a
    400, or with a 201 whose call is ended at once, saying so in ``subscriptionLimits``
    or only on its socket (``status-update`` ended), or with a 201 in the batch answer's
    form (no call, ``subscriptionLimits`` only). That caller can call back: the overflow
    message, counted as its own outcome. The first call goes on."""
    first_sid, second_sid = "CA" + "1" * 32, "CA" + "2" * 32
    with trio.fail_after(30):
        async with running_bridge(behaviour=GREETER) as bridge:
            bridge.vapi.max_concurrent_calls = 1
            bridge.vapi.over_limit_answer = answer  # type: ignore[assignment]
            reports: dict[str, CallReport] = {}

            async def call(sid: str, script: Script) -> None:
                reports[sid] = await place_call(bridge.caller, script, call_sid=sid)

            async with trio.open_nursery() as calls_nursery:
                calls_nursery.start_soon(
                    call, first_sid, (WaitForAssistant(heard_ms=2500), Hangup())
                )
                await wait_for(lambda: greeting_of(bridge, first_sid) is not None)
                calls_nursery.start_soon(call, second_sid, LISTEN)
            samples = await scrape(bridge)
    first, second = bridge.record(first_sid), bridge.record(second_sid)
    assert first.outcome is Outcome.CALLER_HUNG_UP
    assert second.outcome is Outcome.ASSISTANT_OVER_LIMIT
    assert "max_concurrent_calls" in second.detail, "the line says what to change"
    report = reports[second_sid]
    assert (report.final_action, report.ended_by) == ("say", "server")
    assert OVERFLOW_WORDS in report.final_say.lower()
    assert value(
        samples, "voicebridge_calls_total", outcome="assistant-over-limit", route="default"
    ) == 1
    [refused] = [a for a in bridge.vapi.create_attempts if a.order == 1]
    if answer in ("400", "batch"):
        assert (refused.status, refused.call_id) == (400 if answer == "400" else 201, None)
    else:
        assert refused.status == 201 and refused.call_id is not None
        blocked = bridge.vapi.calls[refused.call_id]
        assert blocked.ended_reason == ENDED_CONCURRENCY_LIMIT
        # Told by the answer, the bridge does not open the socket; else it hears the end.
        assert (blocked.connected_at is None) == (answer == "blocked")


# --- say, add-message and control ----------------------------------------------------------


async def _control_mid_call(
    bridge: Bridge, call_sid: str, script: Script, posts: list[tuple[float, dict[str, Any]]]
) -> tuple[CallReport, SimVapiCallRecord]:
    """Place a call; once its greeting plays, POST each message to the call's controlUrl
    after its delay."""
    reports: list[CallReport] = []

    async def call() -> None:
        reports.append(await place_call(bridge.caller, script, call_sid=call_sid))

    async with trio.open_nursery() as call_nursery:
        call_nursery.start_soon(call)
        await wait_for(lambda: greeting_of(bridge, call_sid) is not None)
        vapi_call = greeting_of(bridge, call_sid)
        assert vapi_call is not None
        async with httpx.AsyncClient() as http:
            for delay_s, message in posts:
                await trio.sleep(delay_s)
                answer = await http.post(bridge.vapi.control_url(vapi_call.id), json=message)
                assert answer.status_code == 200, answer.text
    return reports[0], vapi_call


#: An assistant that greets briefly and never ends the call itself.
LISTENER = attrs.evolve(SHORT_ASSISTANT, reply_clips=("reply_3",), end_after_replies=None)


async def test_say_on_the_control_url_is_heard_and_can_end_the_call() -> None:
    """Live Call Control ``say`` after the greeting: the caller hears the words; a
    second with ``endCallAfterSpoken`` is heard too, then the call ends normally."""
    asked = "One moment, please, while I look that up for you."  # no clip's words
    posts: list[tuple[float, dict[str, Any]]] = [
        (2.5, {"type": "say", "content": asked}),
        (5.0, {"type": "say", "content": CLIP_TEXTS["goodbye"], "endCallAfterSpoken": True}),
    ]
    with trio.fail_after(30):
        async with running_bridge(behaviour=LISTENER) as bridge:
            report, vapi_call = await _control_mid_call(
                bridge, "CA" + "3" * 32, (Silence(15),), posts
            )
    record = bridge.record(report.call_sid)
    assert vapi_call.said == [message["content"] for _, message in posts]
    # The greeting and the two things said, each heard whole (turns apart).
    [_, said, goodbye] = report.turns
    assert said.heard_ms >= 10 * 320 - 600  # ten words of stand-in speech
    assert goodbye.heard_ms >= clip_ms("goodbye") - 300  # a shipped clip's exact words
    assert vapi_call.ended_reason == "assistant-ended-call-after-message-spoken"
    assert record.outcome is Outcome.ASSISTANT_ENDED
    assert (report.final_action, report.ended_by) == ("hangup", "server")


async def test_mute_and_unmute_on_the_control_url() -> None:
    """``mute-assistant`` mid-greeting: the caller hears the greeting stop; unmuted 1.5 s
    later, they hear the rest of it."""
    posts = [
        (0.3, {"type": "control", "control": "mute-assistant"}),
        (1.5, {"type": "control", "control": "unmute-assistant"}),
    ]
    with trio.fail_after(30):
        async with running_bridge(behaviour=GREETER) as bridge:
            report, vapi_call = await _control_mid_call(
                bridge, "CA" + "4" * 32, (WaitForAssistantDone(quiet_s=2.5), Hangup()), posts
            )
    assert vapi_call.muted_bytes >= 1.0 * 8000  # about 1.5 s of the greeting not sent
    before, after = report.turns
    assert before.heard_ms + after.heard_ms < clip_ms("greeting") - 1000
    assert after.start_ms - (before.start_ms + before.heard_ms) >= 700, "a gap the caller hears"


async def test_a_keypad_entry_is_one_add_message_and_the_assistant_answers_it() -> None:
    """The caller keys in 42# after the greeting without a word: the bridge sends one
    ``add-message`` asking for a response, and the assistant answers it."""
    script = (
        WaitForAssistantDone(quiet_s=0.4),
        PressDigit("4"),
        PressDigit("2"),
        PressDigit("#"),
        WaitForAssistant(heard_ms=500, timeout_s=10),
        WaitForAssistantDone(quiet_s=0.4),
        Hangup(),
    )
    with trio.fail_after(30):
        async with running_bridge(behaviour=LISTENER) as bridge:
            report = await place_call(bridge.caller, script)
            [vapi_call] = bridge.vapi.calls.values()
    [entry] = vapi_call.add_messages
    assert "42" in entry["message"]["content"]
    assert vapi_call.prompted_replies == 1
    [_, answer] = report.turns
    assert answer.heard_ms >= clip_ms("reply_3") - 300
    assert bridge.record(report.call_sid).outcome is Outcome.CALLER_HUNG_UP


async def test_vapi_ends_the_call_at_the_max_duration_the_bridge_asked_for() -> None:
    """The bridge sends ``maxDurationSeconds`` (10 s, the least it allows); Vapi ends the
    call then with ``exceeded-max-duration``: a normal end, with its own goodbye."""
    with trio.fail_after(30):
        async with running_bridge(behaviour=LISTENER, vapi={"max_duration_s": 10}) as bridge:
            report = await place_call(bridge.caller, (Silence(20),))
            [vapi_call] = bridge.vapi.calls.values()
    record = bridge.record(report.call_sid)
    assert vapi_call.overrides["maxDurationSeconds"] == 10
    assert record.outcome is Outcome.ASSISTANT_ENDED
    assert record.ended_reason == vapi_call.ended_reason == "exceeded-max-duration"
    assert 10 <= vapi_call.ended_at - vapi_call.connected_at < 11  # type: ignore[operator]
    assert (report.final_action, report.ended_by) == ("say", "server")
    assert "time limit for this call" in report.final_say.lower()


async def test_vapi_ends_a_quiet_call_at_the_silence_timeout_the_bridge_asked_for() -> None:
    """The bridge sends ``silenceTimeoutSeconds`` (10 s, the least it allows); after the
    greeting nobody speaks, and Vapi ends the call 10 s after it with
    ``silence-timed-out``: a normal end, so the caller is hung up, not given the fallback
    (and the bridge's own silence deadline, 25 s, does not fire first)."""
    with trio.fail_after(30):
        async with running_bridge(behaviour=LISTENER, vapi={"silence_timeout_s": 10}) as bridge:
            report = await place_call(bridge.caller, (Silence(20),))
            [vapi_call] = bridge.vapi.calls.values()
    record = bridge.record(report.call_sid)
    assert vapi_call.overrides["silenceTimeoutSeconds"] == 10
    assert record.outcome is Outcome.ASSISTANT_ENDED, record.detail
    assert record.ended_reason == vapi_call.ended_reason == "silence-timed-out"
    [greeting] = vapi_call.turns
    assert greeting.completed and greeting.finished_at is not None
    assert 10 <= vapi_call.ended_at - greeting.finished_at < 11  # type: ignore[operator]
    assert (report.final_action, report.ended_by) == ("hangup", "server")
    [heard] = report.turns
    assert heard.heard_ms >= clip_ms(LISTENER.greeting_clip) - 300
