"""Soak: thousands of short calls through one server process; nothing may grow.

``python -m voicebridge.soak`` runs the real server and the simulated peers on
loopback, in this process, and places short calls (``--calls``) through it,
``--concurrency`` at a time, each slot placing its calls one after another. The
calls are a fixed mix of normal ones, barge-ins and faults on either side. After
every ``--checkpoint`` calls it lets the server go idle and measures it: live trio
tasks, open file descriptors, resident memory. The run passes when the last
checkpoint shows no more tasks and descriptors than the first, and memory grew by
less than ``MAX_RSS_GROWTH_PER_CALL`` per call in between; it prints one line per
checkpoint and exits 0 (flat) or 1 (growth).

Loopback only, bounded in count and time: it sends nothing anywhere else.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from functools import partial
from typing import TextIO

import attrs
import httpx
import trio

from voicebridge.bridge.outcome import Outcome
from voicebridge.loopback import LoopbackBridge, loopback_bridge
from voicebridge.sim.caller import (
    Drop,
    Hangup,
    Script,
    SendRaw,
    Silence,
    Speak,
    WaitForAssistant,
    place_call,
)
from voicebridge.sim.vapi import SimVapiBehaviour

#: Resident memory growth allowed between the first and the last checkpoint, per call
#: in between. The server keeps each finished call's record for its ``<Connect action>``
#: (``registry.MAX_RECORDS``, a few hundred bytes each), so a flat server grows a
#: little; a leaked call (its tasks, buffers and sockets) costs tens of kilobytes.
MAX_RSS_GROWTH_PER_CALL = 8192
#: A call that has not ended after this long is a failure of the soak itself.
CALL_TIMEOUT_S = 30.0

#: The assistant of every call: a 1.25 s greeting, a 1.25 s answer, never hangs up.
_ASSISTANT = SimVapiBehaviour(
    greeting_clip="caller_1",
    reply_clips=("caller_1",),
    end_after_replies=None,
    think_delay_s=0.1,
    customer_audio_timeout_s=None,
)


@attrs.frozen
class Kind:
    """One kind of call in the mix: the caller's script, the assistant's behaviour, and
    the outcome the bridge must record for it."""

    name: str
    script: Script
    outcome: Outcome
    assistant: SimVapiBehaviour = _ASSISTANT


#: The mix, placed in this order over and over.
MIX: tuple[Kind, ...] = (
    Kind(
        "hang-up", (WaitForAssistant(heard_ms=200, timeout_s=10), Hangup()), Outcome.CALLER_HUNG_UP
    ),
    Kind(
        "barge-in",
        (
            WaitForAssistant(heard_ms=200, timeout_s=10),
            Speak("caller_1"),
            WaitForAssistant(heard_ms=100, timeout_s=10),
            Hangup(),
        ),
        Outcome.CALLER_HUNG_UP,
    ),
    Kind("silent-caller", (Silence(0.3), Hangup()), Outcome.CALLER_HUNG_UP),
    Kind(
        "vapi-refuses",
        (Silence(3),),
        Outcome.ASSISTANT_LEG_FAILED,
        attrs.evolve(_ASSISTANT, refuse_create=500),
    ),
    Kind(
        "vapi-drops",
        (Silence(3),),
        Outcome.ASSISTANT_LEG_FAILED,
        attrs.evolve(_ASSISTANT, drop_after_s=0.3),
    ),
    Kind(
        "twilio-drops", (WaitForAssistant(heard_ms=200, timeout_s=10), Drop()), Outcome.STREAM_LOST
    ),
    Kind(
        "bad-frame",
        (WaitForAssistant(heard_ms=200, timeout_s=10), SendRaw("not json"), Silence(3)),
        Outcome.PROTOCOL_ERROR,
    ),
)


@attrs.frozen
class Snapshot:
    """The server's footprint at a checkpoint (idle: no call in flight)."""

    calls: int
    at_s: float
    tasks: int
    fds: int
    rss_bytes: int


@attrs.frozen
class SoakReport:
    snapshots: tuple[Snapshot, ...]
    #: Calls whose outcome was not their kind's, as "CallSid kind: outcome (detail)".
    wrong_outcomes: tuple[str, ...]

    @property
    def rss_growth_per_call(self) -> float:
        first, last = self.snapshots[0], self.snapshots[-1]
        return (last.rss_bytes - first.rss_bytes) / max(1, last.calls - first.calls)

    @property
    def flat(self) -> bool:
        """No more tasks or descriptors at the end than at the first checkpoint, and
        memory within ``MAX_RSS_GROWTH_PER_CALL`` per call."""
        first, last = self.snapshots[0], self.snapshots[-1]
        return (
            last.tasks <= first.tasks
            and last.fds <= first.fds
            and self.rss_growth_per_call < MAX_RSS_GROWTH_PER_CALL
        )


def count_tasks() -> int:
    """Live trio tasks in this run, the root task included."""
    count = 0
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count


def open_fds() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class _Soak:
    def __init__(self, bridge: LoopbackBridge, http: httpx.AsyncClient) -> None:
        self._bridge = bridge
        self._http = http
        # CallSid -> kind, for the calls in flight (the simulated Vapi asks by CallSid).
        self.in_flight: dict[str, Kind] = {}
        self.wrong: list[str] = []
        self.started = trio.current_time()

    def assistant_for(self, order: int, call_sid: str | None) -> SimVapiBehaviour:
        kind = self.in_flight.get(call_sid or "")
        return kind.assistant if kind is not None else _ASSISTANT

    async def place(self, index: int) -> None:
        kind = MIX[index % len(MIX)]
        call_sid = "CA" + secrets.token_hex(16)
        self.in_flight[call_sid] = kind
        try:
            with trio.fail_after(CALL_TIMEOUT_S):
                await place_call(
                    self._bridge.caller, kind.script, call_sid=call_sid, http=self._http
                )
        finally:
            del self.in_flight[call_sid]
        record = self._bridge.listening.registry.record_for(call_sid)
        if record is None or record.outcome is not kind.outcome:
            got = f"{record.outcome.value} ({record.detail})" if record else "no record"
            self.wrong.append(f"{call_sid} {kind.name}: {got}")

    async def run_batch(self, first: int, count: int, concurrency: int) -> None:
        """Calls ``first`` … ``first + count - 1``: ``concurrency`` slots, each placing
        its share one after another."""
        indexes = iter(range(first, first + count))

        async def slot() -> None:
            for index in indexes:
                await self.place(index)

        async with trio.open_nursery() as slots_nursery:
            for _ in range(min(concurrency, count)):
                slots_nursery.start_soon(slot)

    async def snapshot(self, calls: int) -> Snapshot:
        """Let the server go idle, then measure it."""
        registry = self._bridge.listening.registry
        while registry.active_count:
            await registry.wait_changed_since(registry.changes)
        vapi = self._bridge.vapi
        for call in list(vapi.calls.values()):
            if call.connected_at is not None:
                await call.wait_ended()
        vapi.forget_ended()
        await trio.sleep(0.5)  # closed connections' last tasks finish
        gc.collect()
        return Snapshot(
            calls=calls,
            at_s=trio.current_time() - self.started,
            tasks=count_tasks(),
            fds=open_fds(),
            rss_bytes=rss_bytes(),
        )


async def soak(
    *, calls: int, concurrency: int, checkpoint: int, out: TextIO | None = None
) -> SoakReport:
    """Place ``calls`` calls, measuring after every ``checkpoint`` of them."""
    if calls < 2 * checkpoint:
        raise ValueError("a soak needs at least two checkpoints: calls >= 2 * checkpoint")
    holder: list[_Soak] = []

    def chooser(order: int, call_sid: str | None) -> SimVapiBehaviour:
        return holder[0].assistant_for(order, call_sid)

    snapshots: list[Snapshot] = []
    async with (
        loopback_bridge(behaviour_for=chooser) as bridge,
        httpx.AsyncClient() as http,
    ):
        bridge.vapi.close_connections = True
        run = _Soak(bridge, http)
        holder.append(run)
        done = 0
        while done < calls:
            batch = min(checkpoint, calls - done)
            await run.run_batch(done, batch, concurrency)
            done += batch
            snapshots.append(await run.snapshot(done))
            if out is not None:
                print(_line(snapshots[-1]), file=out, flush=True)
    return SoakReport(snapshots=tuple(snapshots), wrong_outcomes=tuple(run.wrong))


def _line(snapshot: Snapshot) -> str:
    return (
        f"{snapshot.calls:6d} calls  {snapshot.at_s:7.1f} s  tasks {snapshot.tasks:4d}  "
        f"fds {snapshot.fds:4d}  rss {snapshot.rss_bytes / 2**20:7.1f} MiB"
    )


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m voicebridge.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--calls", type=int, default=3000, help="calls in all (3000)")
    parser.add_argument("--concurrency", type=int, default=30, help="calls at once (30)")
    parser.add_argument(
        "--checkpoint", type=int, default=1000, help="measure after every N calls (1000)"
    )
    args = parser.parse_args(argv)
    out = out or sys.stdout
    # Faulty calls log a warning each; the soak's figures are what to read.
    logging.basicConfig(level=logging.ERROR)
    report = trio.run(
        partial(
            soak,
            calls=args.calls,
            concurrency=args.concurrency,
            checkpoint=args.checkpoint,
            out=out,
        )
    )
    first, last = report.snapshots[0], report.snapshots[-1]
    print(
        f"first → last checkpoint: tasks {first.tasks} → {last.tasks}, "
        f"fds {first.fds} → {last.fds}, rss {report.rss_growth_per_call:+.0f} bytes/call; "
        f"{len(report.wrong_outcomes)} unexpected outcomes",
        file=out,
    )
    for line in report.wrong_outcomes[:20]:
        print(f"  unexpected: {line}", file=out)
    ok = report.flat and not report.wrong_outcomes
    print("flat" if ok else "GROWTH OR WRONG OUTCOMES", file=out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
