"""Vapi misbehaving, on loopback: the real server, the simulated Twilio caller and Vapi.

Each test makes the simulated Vapi misbehave for one call (``FAULT_SID``) while two
witness calls run at the same moment, and asserts what the faulty call's caller
heard (the fallback, after a bounded silence), what the operator sees (the call-end
line's OUTCOME and DETAIL, and ``/metrics``), and that the witnesses had perfect
calls. Faults that need long stretches of time (a 30 s burst, a silent minute) are
in ``test_timed_faults.py`` on trio's autojump clock.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import attrs
import pytest
import trio

from tests.faults.loopback import (
    FAST_VAPI,
    WITNESS_ASSISTANT,
    FaultRun,
    assert_fallback,
    assert_journal_matches,
    assert_metrics,
    assert_witnesses_untouched,
    fault_behaviours,
    fault_sid,
    run_with_witnesses,
    vapi_call_of,
    witnesses_and,
)
from tests.harness import Bridge, running_bridge
from tests.test_e2e import OVERFLOW_WORDS
from voicebridge.bridge.outcome import Outcome
from voicebridge.sim.audio import load_clip
from voicebridge.sim.caller import Script, Silence, WaitForAssistant
from voicebridge.sim.vapi import SimVapiBehaviour

#: The fault call's caller says nothing and waits for the bridge to act.
WAIT = (Silence(5),)
#: The fault call's caller waits until it hears the greeting begin, then says nothing.
HEAR_GREETING = (WaitForAssistant(heard_ms=100, timeout_s=5), Silence(5))
#: Slack on a dead-air bound for a loaded CI machine.
SLACK_S = 0.75


async def run_vapi_fault(behaviour: SimVapiBehaviour, script: Script) -> tuple[FaultRun, Bridge]:
    """One fault call whose assistant behaves as ``behaviour``, with the witnesses.

    Checks ``/metrics`` on the way: the witnesses hung up, the fault call's leg failed.
    """
    with trio.fail_after(30):
        async with running_bridge(
            behaviour_for=fault_behaviours(behaviour), vapi=FAST_VAPI
        ) as bridge:
            run = await run_with_witnesses(bridge, script)
            await assert_metrics(bridge, witnesses_and(Outcome.ASSISTANT_LEG_FAILED))
    return run, bridge


async def test_create_refused_401_400_500_gives_the_fallback_and_spares_other_calls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Three callers at once, whose assistant calls Vapi refuses: bad key (401), over
    # the account's concurrency limit (400), Vapi's own fault (500).
    refusals = {fault_sid(str(status)): status for status in (401, 400, 500)}
    kinds = {401: "auth", 500: "server"}
    behaviours = {
        sid: attrs.evolve(WITNESS_ASSISTANT, refuse_create=status)
        for sid, status in refusals.items()
    }
    with trio.fail_after(30):
        async with running_bridge(
            behaviour_for=fault_behaviours(**behaviours), vapi=FAST_VAPI
        ) as bridge:
            run = await run_with_witnesses(bridge, faults={sid: WAIT for sid in refusals})
            expected = witnesses_and(Outcome.ASSISTANT_LEG_FAILED, 2)
            expected[Outcome.ASSISTANT_OVER_LIMIT] = 1
            await assert_metrics(bridge, expected)
    for sid, status in refusals.items():
        if status == 400:
            # Over the limit, the caller hears the overflow message: they may call back.
            report = run.faults[sid]
            assert report.final_action == "say"
            assert OVERFLOW_WORDS in report.final_say.lower()
            record = bridge.record(sid)
            assert record.outcome is Outcome.ASSISTANT_OVER_LIMIT
            assert "create-call failed (limit)" in record.detail
        else:
            record = assert_fallback(
                run.faults[sid], bridge, detail=f"create-call failed ({kinds[status]})"
            )
        assert str(status) in record.detail
        assert record.duration_s < SLACK_S, "the caller hears it at once, no dead air"
        assert record.vapi_call_id == "", "no assistant call exists"
        assert_journal_matches(caplog, record, level=logging.WARNING)
    assert_witnesses_untouched(run, bridge)


@pytest.mark.parametrize(
    ("fault", "script", "detail", "dead_air_s"),
    [
        # Vapi never answers POST /call: silence until vapi.create_deadline_s (1 s).
        pytest.param(
            {"create_delay_s": math.inf},
            WAIT,
            "create-call failed (timeout)",
            1.0,
            id="create-never-answers",
        ),
        # The transport socket's upgrade is refused.
        pytest.param(
            {"reject_socket": 503},
            WAIT,
            "transport connect failed (server)",
            0.0,
            id="socket-refused",
        ),
        # Vapi stops answering pings 0.3 s in: ping every 0.5 s, pong deadline 0.5 s.
        pytest.param(
            {"ignore_pings_after_s": 0.3},
            HEAR_GREETING,
            "unresponsive: no pong",
            1.0,
            id="stops-answering-pings",
        ),
        # One text frame that is not JSON, 0.6 s into the greeting.
        pytest.param(
            {"malformed_after_s": 0.6},
            HEAR_GREETING,
            "protocol: Vapi message",
            0.6,
            id="malformed-json",
        ),
    ],
)
async def test_assistant_leg_failure_gives_the_fallback_and_spares_other_calls(
    caplog: pytest.LogCaptureFixture,
    fault: dict[str, Any],
    script: tuple[Any, ...],
    detail: str,
    dead_air_s: float,
) -> None:
    run, bridge = await run_vapi_fault(attrs.evolve(WITNESS_ASSISTANT, **fault), script)
    record = assert_fallback(run.fault, bridge, detail=detail)
    # Dead air is bounded: from the stream's start to its end (the fallback follows).
    assert record.duration_s < dead_air_s + SLACK_S
    assert_journal_matches(caplog, record, level=logging.WARNING)
    assert_witnesses_untouched(run, bridge)


async def test_vapi_dropping_mid_sentence_gives_the_fallback_and_spares_other_calls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 0.6 s into its 1.25 s greeting, Vapi's TCP connection drops with no close frame.
    behaviour = attrs.evolve(WITNESS_ASSISTANT, drop_after_s=0.6)
    run, bridge = await run_vapi_fault(behaviour, HEAR_GREETING)
    record = assert_fallback(run.fault, bridge, detail="dropped: Vapi socket lost")
    # The caller heard the start of the sentence, not all of it, then the fallback.
    greeting_bytes = len(load_clip(WITNESS_ASSISTANT.greeting_clip))
    assert 0 < run.fault.bytes_heard < greeting_bytes
    assert record.duration_s < 0.6 + SLACK_S
    assert vapi_call_of(bridge, run.fault.call_sid).close_code == 1006
    assert_journal_matches(caplog, record, level=logging.WARNING)
    assert_witnesses_untouched(run, bridge)
