"""A long goodbye sent in one burst, end to end: the real server, the simulated peers.

The assistant answers the caller's first turn with a 7.5 s goodbye sent all at once,
then ends the call (``status-update`` ``ended``, close 1000). With pings every 0.5 s
and a 0.5 s pong deadline, the goodbye outlasts every liveness deadline many times:
the caller must hear all of it and then be hung up, never get the fallback.
"""

from __future__ import annotations

import attrs
import trio

from tests.harness import SHORT_ASSISTANT, running_bridge
from tests.test_e2e import SHORT_SCRIPT
from voicebridge.bridge.outcome import Outcome
from voicebridge.sim.audio import load_clip
from voicebridge.sim.caller import CallReport, place_call

#: About 7.5 s of speech.
LONG_GOODBYE = "reply_2"


async def test_a_burst_goodbye_longer_than_the_pong_deadline_ends_normally() -> None:
    assistant = attrs.evolve(SHORT_ASSISTANT, goodbye_clip=LONG_GOODBYE, audio_burst=True)
    vapi = {"ping_interval_s": 0.5, "pong_deadline_s": 0.5}
    with trio.fail_after(40):
        async with running_bridge(behaviour=assistant, vapi=vapi) as bridge:
            report = await place_call(bridge.caller, SHORT_SCRIPT)
    record = bridge.record(report.call_sid)
    assert record.outcome is Outcome.ASSISTANT_ENDED, record.detail
    assert report.final_action == "hangup"
    assert report.protocol_violations == []
    [_, goodbye] = report.turns
    clip_ms = len(load_clip(LONG_GOODBYE)) / 8
    assert not goodbye.interrupted
    # The whole clip but its quiet edges (the caller counts speech frames).
    assert goodbye.heard_ms >= clip_ms - 300, (goodbye.heard_ms, clip_ms)


async def test_the_drain_deadline_during_a_goodbye_lets_it_finish() -> None:
    assistant = attrs.evolve(SHORT_ASSISTANT, goodbye_clip=LONG_GOODBYE, audio_burst=True)
    with trio.fail_after(40):
        async with running_bridge(behaviour=assistant) as bridge:
            registry = bridge.listening.registry
            async with trio.open_nursery() as nursery:
                reports: list[CallReport] = []

                async def call() -> None:
                    reports.append(await place_call(bridge.caller, SHORT_SCRIPT))

                nursery.start_soon(call)
                for _ in range(100):  # the assistant call is created within a second
                    if bridge.vapi.calls:
                        break
                    await trio.sleep(0.05)
                [vapi_call] = bridge.vapi.calls.values()
                # The assistant sent its goodbye in one burst and ended the call; a
                # second later the drain deadline passes (what server._drain does).
                await vapi_call.wait_ended()
                await trio.sleep(1.0)
                ending = registry.end_all(Outcome.SHUTDOWN, "drain deadline passed")
                assert ending.count == 1
                assert 4.0 < ending.goodbye_s < 8.5  # what is left of 7.5 s, plus slack
    [report] = reports
    record = bridge.record(report.call_sid)
    assert record.outcome is Outcome.ASSISTANT_ENDED, record.detail
    assert report.final_action == "hangup"
    [_, goodbye] = report.turns
    assert goodbye.heard_ms >= len(load_clip(LONG_GOODBYE)) / 8 - 300

