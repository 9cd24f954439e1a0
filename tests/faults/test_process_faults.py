"""The process misbehaving: SIGTERM mid-call, a blocked event loop, many calls ending at once.

SIGTERM runs the real ``voicebridge serve`` in a subprocess (the helpers of
``tests/test_systemd_integration.py``); the others run the real server in this
process on loopback, beside witness calls (``tests/faults/loopback.py``).
"""

from __future__ import annotations

import itertools
import signal
import socket
import tempfile
import time
from pathlib import Path

import trio

from tests.faults.loopback import (
    WITNESS_ASSISTANT,
    WITNESS_SCRIPT,
    WITNESSES,
    assert_metrics,
    assert_witness_untouched,
    run_with_witnesses,
    vapi_call_of,
)
from tests.harness import running_bridge
from tests.test_systemd_integration import (
    FALLBACK_WORDS,
    OVERFLOW_WORDS,
    a_box,
    activated_server,
    is_ready,
    is_stopping,
    listener,
    status_is,
)
from voicebridge.bridge.outcome import Outcome
from voicebridge.sdnotify import Notifier, run_watchdog
from voicebridge.sim.caller import CallReport, Silence, place_call
from voicebridge.soak import count_tasks, open_fds

#: How long the test blocks the event loop (a stuck synchronous call, a GC pause …).
BLOCK_S = 0.6
#: The watchdog's ping interval here (systemd would ask for half of WatchdogSec=).
WATCHDOG_INTERVAL_S = 0.2


async def test_sigterm_mid_call_drains_without_touching_the_calls(tmp_path: Path) -> None:
    # SIGTERM while two witnesses are mid-conversation (the assistant speaking to one,
    # the other about to barge in) and a third call waits in silence. The witnesses'
    # calls go on exactly as without the signal; the silent one is ended at the drain
    # deadline with the fallback; a new caller hears the overflow; the exit is 0.
    sock, port = listener()
    witnesses: list[CallReport] = []
    reports: dict[str, CallReport] = {}
    with trio.fail_after(40), sock:
        async with a_box(tmp_path, WITNESS_ASSISTANT) as box:
            config = box.write_config("vb.toml", public_port=port, drain_deadline_s=4.0)
            caller = box.caller(port=port)
            async with activated_server(box, config, [("http", sock)]) as server:
                await box.notify.wait_for(is_ready)

                async def witness() -> None:
                    witnesses.append(await place_call(caller, WITNESS_SCRIPT))

                async def silent() -> None:
                    reports["silent"] = await place_call(caller, (Silence(10),))

                async with trio.open_nursery() as calls_nursery:
                    for _ in range(WITNESSES):
                        calls_nursery.start_soon(witness)
                    calls_nursery.start_soon(silent)
                    await box.notify.wait_for(status_is(f"{WITNESSES + 1} calls active"))
                    await trio.sleep(0.3)  # mid-greeting
                    sigterm_at = trio.current_time()
                    server.signal(signal.SIGTERM)
                    await box.notify.wait_for(is_stopping)
                    reports["new"] = await place_call(caller, (Silence(1),))
                assert await server.process.wait() == 0
                exited_at = trio.current_time()
    for report in witnesses:
        assert report.protocol_violations == []
        assert (report.ended_by, report.final_action) == ("caller", "hangup")
        [barge_in] = report.barge_ins
        assert barge_in.clear_ms is not None and barge_in.heard_after_clear_ms == 0
        [end_line] = server.log_lines(f"call {report.call_sid} ended")
        assert "OUTCOME=caller-hung-up" in end_line
        assert "FRAMES_DROPPED=0" in end_line
    silent_report = reports["silent"]
    assert (silent_report.ended_by, silent_report.final_action) == ("server", "say")
    assert FALLBACK_WORDS in silent_report.final_say.lower()
    [silent_end] = server.log_lines(f"call {silent_report.call_sid} ended")
    assert "OUTCOME=shutdown" in silent_end
    new = reports["new"]
    assert (new.streamed, new.final_action) == (False, "say")
    assert OVERFLOW_WORDS in new.final_say.lower()
    assert exited_at - sigterm_at < 4.0 + 2.0


def _block_the_loop(seconds: float) -> None:
    """A synchronous call that holds the event loop (what a stray blocking call does)."""
    time.sleep(seconds)


async def test_a_blocked_event_loop_delays_the_watchdog_and_spares_the_calls() -> None:
    # The event loop is blocked for 0.6 s in the middle of two witness calls. The
    # watchdog pings come from that loop, so they stop for exactly that long (which is
    # what makes systemd restart a wedged service), resume at once, once (no burst of
    # catch-up pings) and keep their cadence. The calls go on: nothing times out.
    pings: list[float] = []
    blocked: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as directory:
        address = str(Path(directory) / "notify")
        receiver = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        await receiver.bind(address)
        notifier = Notifier(address)

        async def receive_pings() -> None:
            while True:
                datagram = await receiver.recv(1024)
                if datagram == b"WATCHDOG=1":
                    pings.append(trio.current_time())

        async def block_mid_call() -> None:
            await trio.sleep(1.9)  # the witnesses are between their turns
            start = trio.current_time()
            _block_the_loop(BLOCK_S)
            blocked.append((start, trio.current_time()))

        with trio.fail_after(30), receiver:
            async with (
                running_bridge(behaviour=WITNESS_ASSISTANT) as bridge,
                trio.open_nursery() as watchdog_nursery,
            ):
                watchdog_nursery.start_soon(receive_pings)
                await watchdog_nursery.start(run_watchdog, notifier, WATCHDOG_INTERVAL_S)
                run = await run_with_witnesses(bridge, alongside=block_mid_call)
                await trio.sleep(3 * WATCHDOG_INTERVAL_S)
                watchdog_nursery.cancel_scope.cancel()
        notifier.close()
    [(block_start, block_end)] = blocked
    assert block_end - block_start >= BLOCK_S
    before = [t for t in pings if t <= block_start]
    after = [t for t in pings if t >= block_end]
    assert len(before) + len(after) == len(pings), "no ping while the loop was blocked"
    assert after[0] - block_end < 0.15, "the first ping goes out as soon as the loop runs"
    gaps_after = [b - a for a, b in itertools.pairwise(after)]
    assert len(gaps_after) >= 3
    assert all(gap > WATCHDOG_INTERVAL_S / 2 for gap in gaps_after), "no burst of pings"
    mean_gap = sum(gaps_after) / len(gaps_after)
    assert abs(mean_gap - WATCHDOG_INTERVAL_S) < 0.05, "then the cadence resumes"
    # The calls did not notice beyond a hiccup: caller audio that queued up meanwhile
    # was forwarded (or dropped as stale and counted), nothing timed out.
    for report in run.witnesses:
        record = bridge.record(report.call_sid)
        accounted = record.frames_to_assistant + record.frames_dropped
        assert accounted <= record.frames_from_caller
        assert_witness_untouched(report, bridge, allow_dropped=True)


async def test_many_calls_ending_in_the_same_instant_on_loopback() -> None:
    # Thirty calls are up; the server ends them all in one instant (what the drain
    # deadline does). Each caller hears the fallback, each Vapi call gets its goodbye,
    # and no call outlives its sockets: the server is back to its idle footprint.
    count = 30
    reports: list[CallReport] = []
    with trio.fail_after(40):
        async with running_bridge(behaviour=WITNESS_ASSISTANT) as bridge:
            bridge.vapi.close_connections = True  # no pooled connection to count
            registry = bridge.listening.registry
            idle = (count_tasks(), open_fds())

            async def waiting_call() -> None:
                reports.append(await place_call(bridge.caller, (Silence(10),)))

            async with trio.open_nursery() as calls_nursery:
                for _ in range(count):
                    calls_nursery.start_soon(waiting_call)
                while registry.active_count < count:
                    await registry.wait_changed_since(registry.changes)
                # Every assistant socket open: a call ended while its socket is still
                # connecting says goodbye through the control URL, with no socket to
                # close, and this test asserts each socket's close (a loaded process,
                # its loop stopped by a full collection of what earlier tests left, can
                # take longer than the greeting's half second to get there).
                for _ in range(3000):  # polled: the simulated Vapi signals no event for it
                    calls = bridge.vapi.calls.values()
                    if sum(call.connected_at is not None for call in calls) == count:
                        break
                    await trio.sleep(0.01)
                await trio.sleep(0.5)  # every caller hears the greeting
                busy = (count_tasks(), open_fds())
                ended = registry.end_all(Outcome.SHUTDOWN, "ended at once").count
            assert ended == count
            assert registry.active_count == 0
            await assert_metrics(bridge, {Outcome.SHUTDOWN: count})
            await trio.sleep(0.5)  # the closed connections' last tasks finish
            after = (count_tasks(), open_fds())
            assert after[0] <= idle[0] and after[1] <= idle[1], (idle, busy, after)
    assert busy[0] > idle[0] + count and busy[1] > idle[1] + count
    assert len(reports) == count
    for report in reports:
        assert (report.ended_by, report.final_action) == ("server", "say")
        assert FALLBACK_WORDS in report.final_say.lower()
        assert report.protocol_violations == []
        record = bridge.record(report.call_sid)
        assert (record.outcome, record.detail) == (Outcome.SHUTDOWN, "ended at once")
        vapi_call = vapi_call_of(bridge, report.call_sid)
        assert vapi_call.end_call_received_at is not None
        assert vapi_call.close_code == 1000
