"""Loopback fault runs: one misbehaving call among well-behaved witness calls.

Charter (as ``tests/harness.py``): loopback only, port 0, a ``trio.fail_after`` guard
on every test, real sockets and real time, so every script lasts a few seconds. A
fault test places its fault call at the same moment as ``WITNESSES`` normal calls
whose lives overlap the fault, then asserts what the faulty call's caller
experienced (``assert_fallback``, or the test's own checks) and that every witness
had a perfect call (``assert_witness_untouched``).

The simulated Vapi tells the calls apart by CallSid: the fault call is ``FAULT_SID``
and gets the test's fault behaviour; the witnesses get ``WITNESS_ASSISTANT``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import attrs
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import SHORT_ASSISTANT, Bridge
from voicebridge.bridge.outcome import CallRecord, Outcome
from voicebridge.observability.logs import record_fields
from voicebridge.sim.audio import CLIP_TEXTS
from voicebridge.sim.caller import (
    CallReport,
    Hangup,
    Script,
    Speak,
    WaitForAssistant,
    place_call,
)
from voicebridge.sim.vapi import BehaviourChooser, SimVapiBehaviour, SimVapiCallRecord

#: The CallSid of the misbehaving call in every fault run.
FAULT_SID = "CA" + "fa" * 16
#: Well-behaved calls placed alongside each fault call.
WITNESSES = 2
#: Words of the configured fallback (``Config.fallback``): the caller hears them
#: instead of dead air when the assistant leg fails.
FALLBACK_WORDS = "technical difficulties"

#: The witnesses' assistant: a 1.25 s greeting (which the caller talks over), then a
#: 1.9 s answer to each caller turn; it never hangs up by itself.
WITNESS_ASSISTANT = attrs.evolve(SHORT_ASSISTANT, reply_clips=("caller_3",), end_after_replies=None)
#: What a witness says over the greeting.
WITNESS_WORDS = "caller_1"
#: A witness hears 300 ms of the greeting, talks over it (a barge-in), hears 200 ms
#: of the answer and hangs up: under three seconds, overlapping every fault.
WITNESS_SCRIPT: Script = (
    WaitForAssistant(heard_ms=300, timeout_s=10),
    Speak(WITNESS_WORDS),
    WaitForAssistant(heard_ms=200, timeout_s=10),
    Hangup(),
)
#: Vapi deadlines short enough for a Vapi fault to show within a witness's call.
FAST_VAPI: dict[str, object] = {
    "create_deadline_s": 1.0,
    "ping_interval_s": 0.5,
    "pong_deadline_s": 0.5,
}
#: A fault call's caller stays on the line this long at most; the bridge must end
#: the stream first (``ended_by == "server"``), or the test fails.
FAULT_CALL_MAX_S = 6.0
#: Bridge-side barge-in latency (signal from Vapi → ``clear`` to Twilio) a witness may
#: see on a loaded CI machine; an idle loop takes well under a millisecond.
WITNESS_BARGE_IN_MAX_MS = 100.0


def fault_behaviours(
    fault: SimVapiBehaviour | None = None, **faults: SimVapiBehaviour
) -> BehaviourChooser:
    """The simulated Vapi's choice: ``fault`` for ``FAULT_SID``, ``faults[sid]`` for the
    other fault calls, the witness assistant for everyone else."""
    chosen = dict(faults)
    if fault is not None:
        chosen[FAULT_SID] = fault

    def choose(order: int, call_sid: str | None) -> SimVapiBehaviour:
        return chosen.get(call_sid or "", WITNESS_ASSISTANT)

    return choose


def fault_sid(tag: str) -> str:
    """A CallSid for one of several fault calls in a run (``tag``: a few hex digits)."""
    return "CA" + tag.rjust(32, "f")


@attrs.frozen
class FaultRun:
    """The reports of one fault run: the fault calls by CallSid, and the witnesses."""

    faults: Mapping[str, CallReport]
    witnesses: tuple[CallReport, ...]

    @property
    def fault(self) -> CallReport:
        """The report of the fault call ``FAULT_SID``."""
        return self.faults[FAULT_SID]


async def run_with_witnesses(
    bridge: Bridge,
    fault_script: Script | None = None,
    *,
    faults: Mapping[str, Script] | None = None,
    alongside: Callable[[], Awaitable[None]] | None = None,
    witness_http: httpx.AsyncClient | None = None,
) -> FaultRun:
    """Place the fault calls and ``WITNESSES`` witness calls at the same moment.

    ``fault_script`` is the script of the fault call ``FAULT_SID``; ``faults`` maps
    the CallSids of more fault calls to their scripts. ``alongside``, if given, runs
    concurrently too (an attacker's socket, a loop blocker …). The witnesses' Twilio
    uses ``witness_http`` if given. Returns when every call has ended, its
    ``<Connect action>`` included.
    """
    scripts = dict(faults or {})
    if fault_script is not None:
        scripts[FAULT_SID] = fault_script
    fault_settings = attrs.evolve(bridge.caller, max_call_s=FAULT_CALL_MAX_S)
    reports: dict[str, CallReport] = {}
    witnesses: list[CallReport] = []

    async def place_fault(call_sid: str, script: Script) -> None:
        reports[call_sid] = await place_call(fault_settings, script, call_sid=call_sid)

    async def place_witness() -> None:
        witnesses.append(await place_call(bridge.caller, WITNESS_SCRIPT, http=witness_http))

    async with trio.open_nursery() as calls_nursery:
        for call_sid, script in scripts.items():
            calls_nursery.start_soon(place_fault, call_sid, script)
        for _ in range(WITNESSES):
            calls_nursery.start_soon(place_witness)
        if alongside is not None:
            calls_nursery.start_soon(alongside)
    return FaultRun(faults=reports, witnesses=tuple(witnesses))


def vapi_call_of(bridge: Bridge, call_sid: str) -> SimVapiCallRecord:
    """The simulated Vapi's record of the assistant call the bridge made for ``call_sid``."""
    [record] = [call for call in bridge.vapi.calls.values() if call.call_sid == call_sid]
    return record


def assert_witness_untouched(
    report: CallReport, bridge: Bridge, *, allow_dropped: bool = False
) -> None:
    """A witness's call went exactly as a normal call does, whatever the fault did.

    The caller heard the greeting, talked over it and was obeyed at once (not one
    frame of the cut turn after the clear), heard the answer and hung up; Twilio saw
    clean traffic; every caller frame reached Vapi byte for byte (Vapi recognised
    the words) and none was dropped (``allow_dropped``: stale frames may have been,
    and were counted); Vapi was told goodbye and closed cleanly.
    """
    label = f"witness {report.call_sid}"
    assert report.protocol_violations == [], label
    assert report.ended_by == "caller", (label, report.ended_by, report.timed_out_step)
    assert report.final_action == "hangup", label
    [barge_in] = report.barge_ins
    assert barge_in.clear_ms is not None, f"{label}: the assistant was not silenced"
    assert barge_in.heard_after_clear_ms == 0, f"{label}: assistant audio after the clear"
    assert [turn.interrupted for turn in report.turns] == [True, False], label
    record = bridge.record(report.call_sid)
    assert record.outcome is Outcome.CALLER_HUNG_UP, (label, record.detail)
    assert allow_dropped or record.frames_dropped == 0, label
    [bridge_barge_in] = record.barge_ins
    assert bridge_barge_in.latency_ms < WITNESS_BARGE_IN_MAX_MS, label
    vapi_call = vapi_call_of(bridge, report.call_sid)
    said = [
        event.message["transcript"]
        for event in vapi_call.messages("transcript")
        if event.message["role"] == "user"
    ]
    if not record.frames_dropped:
        assert said == [CLIP_TEXTS[WITNESS_WORDS]], label
    assert vapi_call.end_call_received_at is not None, label
    assert vapi_call.close_code == 1000, label


def assert_witnesses_untouched(run: FaultRun, bridge: Bridge) -> None:
    assert len(run.witnesses) == WITNESSES
    for report in run.witnesses:
        assert_witness_untouched(report, bridge)


def assert_fallback(
    report: CallReport,
    bridge: Bridge,
    *,
    outcome: Outcome = Outcome.ASSISTANT_LEG_FAILED,
    detail: str,
) -> CallRecord:
    """The bridge ended the stream and the caller heard the fallback, not dead air.

    Also: Twilio saw nothing malformed, and the call's record carries ``outcome``
    and a detail containing ``detail``. Returns the record.
    """
    assert report.ended_by == "server", "the bridge ended the stream, not the caller"
    assert report.final_action == "say", report.action_twiml
    assert FALLBACK_WORDS in report.final_say.lower()
    assert report.protocol_violations == []
    record = bridge.record(report.call_sid)
    assert record.outcome is outcome, record.detail
    assert detail in record.detail
    return record


def assert_journal_matches(
    caplog: pytest.LogCaptureFixture, record: CallRecord, *, level: int
) -> None:
    """The operator's view: one call-end line with the record's outcome and detail."""
    [entry] = [
        entry
        for entry in caplog.records
        if record_fields(entry).get("EVENT") == "call-end"
        and record_fields(entry).get("CALL_SID") == record.call_sid
    ]
    fields = record_fields(entry)
    assert fields["OUTCOME"] == record.outcome.value
    assert fields["DETAIL"] == record.detail
    assert entry.levelno == level


async def calls_by_outcome(bridge: Bridge) -> dict[str, float]:
    """``voicebridge_calls_total`` by outcome, read from the server's ``/metrics``."""
    async with httpx.AsyncClient() as http:
        response = await http.get(bridge.ops_url + "/metrics")
    response.raise_for_status()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "voicebridge_calls_total":
                outcome = sample.labels["outcome"]  # summed over the routes
                counts[outcome] = counts.get(outcome, 0.0) + sample.value
    return {outcome: count for outcome, count in counts.items() if count}


async def assert_metrics(bridge: Bridge, expected: Mapping[Outcome, int]) -> None:
    """``/metrics`` counts exactly ``expected`` calls by outcome (and nothing else)."""
    counts = await calls_by_outcome(bridge)
    assert counts == {outcome.value: float(n) for outcome, n in expected.items()}, counts


def witnesses_and(outcome: Outcome, count: int = 1) -> dict[Outcome, int]:
    """The outcome counts of a run: the witnesses hung up, the fault call ``outcome``."""
    expected = {Outcome.CALLER_HUNG_UP: WITNESSES}
    expected[outcome] = expected.get(outcome, 0) + count
    return expected


def log_level_of(outcome: Outcome) -> int:
    """The level of a call-end line: bugs ERROR, fallbacks WARNING, normal ends INFO."""
    if outcome is Outcome.INTERNAL_ERROR:
        return logging.ERROR
    return logging.WARNING if outcome.caller_gets_fallback else logging.INFO
