"""``voicebridge demo``: real calls through the real server, against the simulated peers.

It starts the simulated Vapi and the real voicebridge server on loopback, places
scripted calls with the simulated Twilio caller (signed webhook, Media Stream,
Twilio's playout buffer), and prints what each caller experienced: the time to
the first word (from the voice webhook reaching the bridge to the greeting heard),
each assistant turn, the barge-in (speech to silence: from the caller starting to
speak to the assistant going quiet, and how much of the cut turn was heard), and
how the call ended. Then three short calls show the routes (``[[routes]]``): two
numbers answered by two assistants, and a known caller's call decided by a decision
hook the demo runs itself. No account and no network: everything stays on 127.0.0.1, and
a realistic latency model (``sim.latency``: the network each way, Twilio's stream
set-up, Vapi's create and reactions) stands in for the distances, unless switched off.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from collections.abc import Sequence
from functools import partial
from typing import TextIO

import attrs
import trio

from voicebridge.bridge.outcome import CallRecord
from voicebridge.config import Config, RouteConfig, RouteHookConfig, Secret
from voicebridge.loopback import LoopbackBridge, loopback_bridge
from voicebridge.observability.logs import configure_logging
from voicebridge.sim.audio import write_wav
from voicebridge.sim.caller import (
    CallReport,
    Hangup,
    Script,
    Speak,
    WaitForAssistant,
    WaitForAssistantDone,
    place_call,
)
from voicebridge.sim.latency import LatencyModel
from voicebridge.sim.route_hook import SimRouteHook
from voicebridge.sim.vapi import SimVapiBehaviour

#: Calls start this far apart so the account reads in order; the server takes them at once.
CALL_STAGGER_S = 0.05
#: The assistant says goodbye and hangs up at the caller turn after this many replies.
DEMO_REPLIES = 2

#: The scripted caller: listen to the greeting, ask, listen, ask again, talk over the
#: (long) second reply 1.5 s into it, listen to the answer; the assistant then says
#: goodbye and ends the call.
DEMO_SCRIPT: Script = (
    WaitForAssistantDone(quiet_s=0.6),
    Speak("caller_1"),
    WaitForAssistantDone(quiet_s=0.6),
    Speak("caller_2"),
    WaitForAssistant(heard_ms=1500),
    Speak("caller_3"),
    WaitForAssistantDone(quiet_s=0.6),
)

#: The routes of the demo: two numbers, two assistants; a hook for known callers.
SALES_NUMBER = "+15550100010"
SUPPORT_NUMBER = "+15550100020"
KNOWN_CALLER = "+15550177777"
DEMO_ROUTES = (
    RouteConfig(name="sales", to=(SALES_NUMBER,), assistant_id="asst-sales"),
    RouteConfig(
        name="support",
        to=(SUPPORT_NUMBER,),
        assistant_id="asst-support",
        assistant_overrides={"variableValues": {"team": "support"}},
        # Only sales calls are worth asking the CRM about.
        ask_hook=False,
    ),
)
#: A routed call: hear the greeting, hang up.
ROUTED_SCRIPT: Script = (WaitForAssistantDone(quiet_s=0.4), Hangup())
#: (dialled number, caller) of the routed calls; the last one is the hook's to decide.
ROUTED_CALLS = (
    (SALES_NUMBER, "+15550100001"),
    (SUPPORT_NUMBER, "+15550100001"),
    (SALES_NUMBER, KNOWN_CALLER),
)


def _hook_answer(message: object) -> dict[str, object] | None:
    """The demo's decision hook: a known caller gets the VIP assistant, by name."""
    customer = message.get("customer") if isinstance(message, dict) else None
    if isinstance(customer, dict) and customer.get("number") == KNOWN_CALLER:
        return {"assistantId": "asst-vip",
                "assistantOverrides": {"variableValues": {"name": "Ada"}}}
    return None  # everyone else: their route


def run_demo(
    *, calls: int = 1, save_audio: str | None = None, verbose: bool = False,
    out: TextIO | None = None, progress: TextIO | None = None,
    latency: LatencyModel | None = None, edge_barge_in: bool = False,
    create_early: bool = False,
) -> int:
    """Run the demo; 0 when every call went as a caller expects, else 1. What each caller
    experienced goes to ``out`` (stdout); a line as each call starts and ends to
    ``progress`` (stderr), so that the ~20 s of a call are not silent.

    ``latency``: the delays of the simulated world; None: loopback's own (none).
    ``edge_barge_in``: the server runs with ``[bridge] edge_barge_in = true``;
    ``create_early`` with ``[vapi] create_early = true``.
    """
    out = out or sys.stdout
    progress = progress or sys.stderr
    configure_logging(logging.INFO if verbose else logging.WARNING)
    return trio.run(
        partial(_demo, calls=calls, save_audio=save_audio, out=out, progress=progress,
                latency=latency, edge_barge_in=edge_barge_in, create_early=create_early)
    )


async def _demo(
    *, calls: int, save_audio: str | None, out: TextIO, progress: TextIO,
    latency: LatencyModel | None, edge_barge_in: bool, create_early: bool,
) -> int:
    behaviour = SimVapiBehaviour(end_after_replies=DEMO_REPLIES)
    secret = secrets.token_hex(16)
    hook = SimRouteHook(secret.encode(), answer=_hook_answer)
    async with trio.open_nursery() as hook_nursery:
        await hook_nursery.start(hook.serve)

        def with_routes(config: Config) -> Config:
            return config.evolve(
                routes=DEMO_ROUTES,
                route_hook=RouteHookConfig(url=hook.url),
                credentials=attrs.evolve(config.credentials, route_hook_secret=Secret(secret)),
                bridge=attrs.evolve(config.bridge, edge_barge_in=edge_barge_in),
                vapi=attrs.evolve(config.vapi, create_early=create_early),
            )

        async with loopback_bridge(
            behaviour=behaviour, latency=latency, customize=with_routes
        ) as bridge:
            ok = await _demo_calls(
                bridge, calls=calls, save_audio=save_audio, out=out, progress=progress,
                latency=latency,
            )
            ok &= await _demo_routes(bridge, hook, out)
        hook_nursery.cancel_scope.cancel()
    print("\nresult: " + ("every caller was served as expected" if ok else "SOMETHING WENT WRONG"),
          file=out)
    return 0 if ok else 1


async def _demo_calls(
    bridge: LoopbackBridge, *, calls: int, save_audio: str | None, out: TextIO,
    progress: TextIO, latency: LatencyModel | None,
) -> bool:
    print(
        f"voicebridge demo: {calls} call{'s' if calls > 1 else ''} through the real server "
        f"on 127.0.0.1:{bridge.listening.port},\n"
        "  simulated Twilio caller  <->  voicebridge  <->  simulated Vapi assistant\n"
        + (f"  latency model: {latency.describe()}\n" if latency is not None
           else "  no latency model: the peers answer at loopback speed\n"),
        file=out,
    )
    reports: list[CallReport | None] = [None] * calls

    async def one_call(index: int) -> None:
        await trio.sleep(index * CALL_STAGGER_S)
        started = trio.current_time()
        print(f"voicebridge demo: call {index + 1} ringing…", file=progress, flush=True)
        reports[index] = await place_call(bridge.caller, DEMO_SCRIPT)
        print(f"voicebridge demo: call {index + 1} ended after "
              f"{trio.current_time() - started:.1f} s", file=progress, flush=True)

    async with trio.open_nursery() as calls_nursery:
        for index in range(calls):
            calls_nursery.start_soon(one_call, index)
    registry = bridge.listening.registry
    records = {sid: registry.record_for(sid) for sid in _sids(reports)}

    done = [report for report in reports if report is not None]
    webhook_trip_ms = latency.webhook_trip_ms() if latency is not None else 0.0
    ok = True
    for number, report in enumerate(done, 1):
        ok &= _print_call(number, report, records.get(report.call_sid), webhook_trip_ms, out)
        if save_audio:
            os.makedirs(save_audio, exist_ok=True)
            path = os.path.join(save_audio, f"call-{number}-{report.call_sid}.wav")
            write_wav(path, report.heard_audio)
            print(f"  saved what the caller heard: {path}", file=out)
    if calls > 1:
        _print_summary(done, webhook_trip_ms, out)
    return ok


async def _demo_routes(bridge: LoopbackBridge, hook: SimRouteHook, out: TextIO) -> bool:
    """Three short calls at once: two numbers, two assistants; one call the hook decides."""
    print("\nroutes: which assistant answers (voicebridge route --to … --from …)", file=out)
    reports: list[CallReport | None] = [None] * len(ROUTED_CALLS)

    async def one_call(index: int, to: str, caller: str) -> None:
        settings = attrs.evolve(bridge.caller, to_number=to, from_number=caller)
        reports[index] = await place_call(settings, ROUTED_SCRIPT)

    async with trio.open_nursery() as nursery:
        for index, (to, caller) in enumerate(ROUTED_CALLS):
            nursery.start_soon(one_call, index, to, caller)
    created = {record.call_sid: record for record in bridge.vapi.calls.values()}
    expected = ("asst-sales", "asst-support", "asst-vip")
    ok = True
    for report, (to, caller), want in zip(reports, ROUTED_CALLS, expected, strict=True):
        assert report is not None
        record = bridge.listening.registry.record_for(report.call_sid)
        vapi_call = created.get(report.call_sid)
        assistant = vapi_call.assistant_id if vapi_call is not None else None
        asked = any(
            r.message.get("call", {}).get("phoneCallProviderId") == report.call_sid
            for r in hook.requests
        )
        extras = {
            k: v for k, v in (vapi_call.variable_values if vapi_call is not None else {}).items()
            if k not in ("twilioCallSid", "caller", "called")
        }
        route = record.route if record is not None else "?"
        print(f"  call to {to} from {caller}: route {route}, hook "
              f"{'asked' if asked else 'not asked'}; Vapi got assistant {assistant}"
              + "".join(f", {k}={v}" for k, v in extras.items()), file=out)
        if assistant != want or not report.streamed or report.protocol_violations:
            print(f"  PROBLEM: expected assistant {want}", file=out)
            ok = False
    print(f"  the hook was asked {len(hook.requests)} times, every request signed: "
          f"{all(r.signature_valid for r in hook.requests)}", file=out)
    return ok and all(r.signature_valid for r in hook.requests)


def _sids(reports: Sequence[CallReport | None]) -> list[str]:
    return [report.call_sid for report in reports if report is not None]


def time_to_first_word_ms(report: CallReport, webhook_trip_ms: float) -> float | None:
    """The voice webhook reaching the bridge → the caller hearing the first assistant audio.

    The simulated caller times from sending the webhook; its trip to the bridge (a new
    connection's handshake and the request, on the Twilio side of the latency model)
    comes before.
    """
    if report.first_audio_after_webhook_ms is None:
        return None
    return report.first_audio_after_webhook_ms - webhook_trip_ms


def _print_call(
    number: int,
    report: CallReport,
    record: CallRecord | None,
    webhook_trip_ms: float,
    out: TextIO,
) -> bool:
    """Print one call's account; True when it went as a caller expects."""
    print(f"call {number} ({report.call_sid})", file=out)
    first_word = time_to_first_word_ms(report, webhook_trip_ms)
    if first_word is not None and report.first_audio_ms is not None:
        print(f"  time to first word: {first_word:.0f} ms from the voice webhook to the "
              f"greeting heard ({report.first_audio_ms:.0f} ms after the stream started)",
              file=out)
    for index, turn in enumerate(report.turns, 1):
        how = "interrupted by the caller" if turn.interrupted else "played to the end"
        print(f"  assistant turn {index}: at {turn.start_ms / 1000:5.1f} s, "
              f"heard {turn.heard_ms / 1000:.1f} s, {how}", file=out)
    for barge_in in report.barge_ins:
        latency = f"{barge_in.latency_ms:.0f} ms" if barge_in.latency_ms is not None else "never"
        print(f"  barge-in: caller spoke at {barge_in.speech_onset_ms / 1000:.1f} s; "
              f"speech to silence {latency} (the clear); heard "
              f"{barge_in.heard_of_turn_ms / 1000:.1f} s of that turn and "
              f"{barge_in.heard_after_clear_ms:.0f} ms after the clear", file=out)
    if record is not None:
        bridge_figures = ", ".join(
            f"{b.latency_ms:.2f} ms" for b in record.barge_ins
        ) or "none"
        print(f"  bridge: outcome {record.outcome.value} ({record.detail}); "
              f"barge-in signal to clear: {bridge_figures}", file=out)
        if record.early_barge_ins:
            print(f"  bridge: barge-in at the edge: {record.early_barge_ins} heard, "
                  f"{record.early_confirmed} confirmed by the assistant, "
                  f"{record.early_resumed} resumed", file=out)
    print(f"  after the stream: {report.final_action}"
          + (f" ({report.final_say})" if report.final_say else ""), file=out)
    problems = list(report.protocol_violations)
    if not report.barge_ins or any(b.clear_ms is None for b in report.barge_ins):
        problems.append("the barge-in did not silence the assistant")
    if any(b.heard_after_clear_ms > 0 for b in report.barge_ins):
        problems.append("assistant audio was heard after the clear")
    if record is None or record.outcome.caller_gets_fallback:
        problems.append("the call did not end normally")
    for problem in problems:
        print(f"  PROBLEM: {problem}", file=out)
    print(file=out)
    return not problems


def _print_summary(reports: Sequence[CallReport], webhook_trip_ms: float, out: TextIO) -> None:
    silences = sorted(
        b.latency_ms for r in reports for b in r.barge_ins if b.latency_ms is not None
    )
    first = sorted(
        ms for r in reports if (ms := time_to_first_word_ms(r, webhook_trip_ms)) is not None
    )
    if first:
        print(f"time to first word over {len(first)} calls: p50 {percentile(first, 50):.0f} ms, "
              f"p99 {percentile(first, 99):.0f} ms", file=out)
    if silences:
        print(f"speech to silence over {len(silences)} barge-ins: "
              f"p50 {percentile(silences, 50):.0f} ms, p99 {percentile(silences, 99):.0f} ms",
              file=out)


def percentile(ordered: Sequence[float], pct: float) -> float:
    """The ``pct``-th percentile of ``ordered`` (sorted, not empty): nearest rank."""
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


