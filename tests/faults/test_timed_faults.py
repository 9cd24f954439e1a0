"""Faults that take time, on trio's autojump clock: exact virtual times, no real waiting.

Each test runs the faulty call alongside two witness calls on the same clock, over
memory sockets (``tests/faults/memory.py``). A witness's assistant talks, is
interrupted at a chosen instant, and talks again every few seconds; the witness's
``clear`` must land at that very instant and its figures must be exactly those of a
call without any fault around it.
"""

from __future__ import annotations

import json

import attrs
import pytest
import trio
import trio.testing

from tests.bridge.peers import CALL_SID, FakeVapi, MemoryConnector, start_frame, stop_frame
from tests.faults.memory import (
    SETTINGS,
    CallSpec,
    MemoryCallRun,
    run_calls,
)
from voicebridge.bridge.call import CALLER_AUDIO_BUFFER_FRAMES, CallSettings
from voicebridge.bridge.outcome import CallRecord, Outcome
from voicebridge.bridge.playout import BYTES_PER_MS, MAX_PENDING_BYTES, Playout
from voicebridge.config import Config
from voicebridge.errors import SocketClosed
from voicebridge.sockets import WRITE_DEADLINE_S
from voicebridge.twilio.media import MediaStream
from voicebridge.web import after_stream_twiml

FALLBACK_WORDS = "technical difficulties"
#: The default silence deadline: Vapi's silence timeout (30 s) plus the margin.
ASSISTANT_SILENCE_S = SETTINGS.assistant_silence_s
#: ``FakeVapi.speak``'s chunk: paced assistant audio arrives in 40 ms pieces.
SPEAK_CHUNK_MS = 40


def speech_started(turn: int) -> dict[str, object]:
    return {"type": "speech-update", "status": "started", "role": "assistant", "turn": turn}


@attrs.define
class Witness:
    """A well-behaved call: the assistant speaks a 2 s turn every ``every_s``; the
    caller interrupts the first one ``barge_in_s`` into it and hangs up at ``hang_up_s``."""

    hang_up_s: float
    every_s: float = 20.0
    barge_in_s: float = 1.5
    started_at: float = 0.0
    interrupted_at: float = 0.0

    async def __call__(self, run: MemoryCallRun, nursery: trio.Nursery) -> None:
        nursery.start_soon(run.twilio.stream_media)
        vapi = await run.vapi(nursery)
        self.started_at = t0 = trio.current_time()
        async with trio.open_nursery() as assistant_nursery:
            assistant_nursery.start_soon(self._talk, vapi, t0)
            await trio.sleep_until(t0 + self.hang_up_s)
            await run.twilio.socket.send(stop_frame(run.twilio.next_seq()))
            assistant_nursery.cancel_scope.cancel()

    async def _talk(self, vapi: FakeVapi, t0: float) -> None:
        await vapi.send_json(speech_started(0))
        async with trio.open_nursery() as speaker:
            speaker.start_soon(vapi.speak, 2000)
            await trio.sleep_until(t0 + self.barge_in_s)
            self.interrupted_at = trio.current_time()
            await vapi.send_json({"type": "user-interrupted"})
            speaker.cancel_scope.cancel()
        turn = 1
        while True:
            await trio.sleep_until(t0 + turn * self.every_s)
            await vapi.send_json(speech_started(turn))
            await vapi.speak(2000)
            turn += 1

    def check(self, run: MemoryCallRun) -> None:
        """Exactly the figures of this call alone: the fault elsewhere changed nothing.

        The assistant's audio comes paced, in 40 ms chunks (``FakeVapi.speak``), so
        Twilio holds about one chunk: the caller heard the first turn up to the last
        chunk that finished playing before the barge-in, then every later turn whole.
        """
        record = run.record
        assert record is not None
        assert record.outcome is Outcome.CALLER_HUNG_UP, record.detail
        assert record.frames_dropped == 0
        assert record.duration_s == pytest.approx(self.hang_up_s)
        [clear] = run.twilio.events("clear")
        assert clear.at == self.interrupted_at, "cleared at the very instant of the signal"
        [barge_in] = record.barge_ins
        assert barge_in.latency_ms == 0
        barge_in_ms = round(self.barge_in_s * 1000)
        assert barge_in_ms % SPEAK_CHUNK_MS, "not on a chunk boundary (a tie in time)"
        heard_of_first = barge_in_ms // SPEAK_CHUNK_MS * SPEAK_CHUNK_MS
        assert barge_in.heard_of_turn_ms == heard_of_first
        later = [k * self.every_s for k in range(1, int(self.hang_up_s // self.every_s) + 1)]
        assert all(start + 2.5 < self.hang_up_s for start in later), "no turn cut by the hang-up"
        assert record.heard_ms == heard_of_first + 2000 * len(later)


def fallback(record: CallRecord | None) -> str:
    assert record is not None
    return after_stream_twiml(Config(), CALL_SID, record)


async def test_a_30_s_audio_burst_is_paced_and_a_longer_one_is_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Two assistants send a whole turn at once, far faster than real time: 30 s of
    # audio, and 45 s. Playout never lets more than its lead (300 ms) sit at Twilio,
    # so the caller hears each at real pace; what it holds back is capped at 30 s
    # (MAX_PENDING_BYTES), so the 45 s burst loses its last 15 s, counted, not memory.
    lead_s = SETTINGS.playout_lead_ms / 1000
    worst_lead: dict[int, float] = {}

    def burst(seconds: int) -> CallSpec:
        async def scenario(run: MemoryCallRun, nursery: trio.Nursery) -> None:
            nursery.start_soon(run.twilio.stream_media)
            vapi = await run.vapi(nursery)
            await vapi.send_json(speech_started(0))
            await vapi.speak(seconds * 1000, chunk_ms=100, paced=False)
            t0 = trio.current_time()
            worst = 0.0
            while trio.current_time() < t0 + 40:
                await trio.sleep(0.1)
                worst = max(worst, run.twilio.play_until - trio.current_time())
            worst_lead[seconds] = worst
            await run.twilio.socket.send(stop_frame(run.twilio.next_seq()))

        return CallSpec(scenario)

    witnesses = [
        Witness(hang_up_s=41.0, every_s=19.0),
        Witness(hang_up_s=41.0, every_s=19.0, barge_in_s=0.7),
    ]
    runs = await run_calls([burst(30), burst(45), *(CallSpec(w) for w in witnesses)])
    thirty, forty_five = runs[0], runs[1]
    assert max(worst_lead.values()) <= lead_s + 1e-9, "never more than the lead at Twilio"
    assert thirty.record is not None and forty_five.record is not None
    assert thirty.record.heard_ms == 30_000
    assert thirty.twilio.heard_bytes == 30_000 * BYTES_PER_MS
    # The caller heard it at real pace: the last audio reached Twilio 30 s - lead in.
    last_media = thirty.twilio.events("media")[-1].at
    assert last_media - thirty.twilio.events("media")[0].at == pytest.approx(30 - lead_s, abs=0.1)
    # Held back: 30 s at most; sent ahead: the lead. The rest was dropped.
    max_heard_ms = MAX_PENDING_BYTES // BYTES_PER_MS + SETTINGS.playout_lead_ms
    assert 30_000 <= forty_five.record.heard_ms <= max_heard_ms
    assert forty_five.record.assistant_bytes == 45_000 * BYTES_PER_MS
    for run, witness in zip(runs[2:], witnesses, strict=True):
        witness.check(run)


async def test_a_barge_in_during_a_burst_silences_it_for_good(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 30 s arrive at once; the caller interrupts 2 s in. The clear goes out in the same
    # instant, and not one byte of the remaining 28 s reaches Twilio afterwards.
    interrupted: list[float] = []

    async def scenario(run: MemoryCallRun, nursery: trio.Nursery) -> None:
        nursery.start_soon(run.twilio.stream_media)
        vapi = await run.vapi(nursery)
        await vapi.send_json(speech_started(0))
        await vapi.speak(30_000, chunk_ms=100, paced=False)
        await trio.sleep(2.0)
        interrupted.append(trio.current_time())
        await vapi.send_json({"type": "user-interrupted"})
        await trio.sleep(5.0)
        await run.twilio.socket.send(stop_frame(run.twilio.next_seq()))

    witnesses = [Witness(hang_up_s=8.0), Witness(hang_up_s=8.0, barge_in_s=1.1)]
    runs = await run_calls([CallSpec(scenario), *(CallSpec(w) for w in witnesses)])
    burst = runs[0]
    [clear] = burst.twilio.events("clear")
    assert clear.at == interrupted[0]
    assert not [r for r in burst.twilio.events("media") if r.at >= clear.at]
    assert burst.record is not None
    [barge_in] = burst.record.barge_ins
    assert barge_in.latency_ms == 0
    assert 1700 <= barge_in.heard_of_turn_ms <= 2000
    for run, witness in zip(runs[1:], witnesses, strict=True):
        witness.check(run)


async def test_vapi_silent_for_a_minute_gives_the_fallback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The assistant's socket stays up (pings answered) but nothing comes: no audio, no
    # message. After ASSISTANT_SILENCE_S of that, the caller gets the fallback instead
    # of more dead air. A quiet assistant that speaks again in time is left alone.
    connected: list[float] = []

    async def silent(run: MemoryCallRun, nursery: trio.Nursery) -> None:
        nursery.start_soon(run.twilio.stream_media)
        await run.vapi(nursery)
        connected.append(trio.current_time())

    witnesses = [
        Witness(hang_up_s=61.0, every_s=ASSISTANT_SILENCE_S - 1),
        Witness(hang_up_s=61.0, every_s=19.0),
    ]
    runs = await run_calls([CallSpec(silent), *(CallSpec(w) for w in witnesses)])
    record = runs[0].record
    assert record is not None
    assert record.outcome is Outcome.ASSISTANT_LEG_FAILED
    assert record.detail == f"unresponsive: nothing from Vapi for {ASSISTANT_SILENCE_S:g} s"
    assert runs[0].twilio.closed_at == connected[0] + ASSISTANT_SILENCE_S
    assert FALLBACK_WORDS in fallback(record)
    for run, witness in zip(runs[1:], witnesses, strict=True):
        witness.check(run)


def test_the_silence_deadline_is_derived_by_default_and_configurable() -> None:
    config = Config()
    assert config.vapi.assistant_silence_s == ASSISTANT_SILENCE_S == 45.0
    quick = config.evolve(vapi=attrs.evolve(config.vapi, silence_deadline_s=7.5))
    assert CallSettings.from_config(quick).assistant_silence_s == 7.5


async def test_vapi_that_stops_reading_drops_stale_caller_audio_then_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Vapi stops reading for 1 s (TCP pushes back after 4 messages), then for good.
    # The Twilio reader never waits on it: audio that cannot go is stale and is
    # dropped and counted; when a write has been stuck for WRITE_DEADLINE_S, the leg
    # has failed and the caller gets the fallback.
    buffer = 4

    async def scenario(run: MemoryCallRun, nursery: trio.Nursery) -> None:
        nursery.start_soon(run.twilio.stream_media)
        vapi = await run.vapi(nursery, read=False)
        async with trio.open_nursery() as reader_nursery:
            reader_nursery.start_soon(vapi.read)
            await trio.sleep(1.0)
            reader_nursery.cancel_scope.cancel()
        await trio.sleep(1.0)  # stuck: 50 caller frames arrive meanwhile
        nursery.start_soon(vapi.read)  # reads again
        await trio.sleep(1.0)
        await run.twilio.socket.send(stop_frame(run.twilio.next_seq()))

    async def stops_for_good(run: MemoryCallRun, nursery: trio.Nursery) -> None:
        nursery.start_soon(run.twilio.stream_media)
        await run.vapi(nursery, read=False)

    def bounded() -> MemoryConnector:
        return MemoryConnector(buffer=buffer)

    witnesses = [Witness(hang_up_s=10.0), Witness(hang_up_s=10.0)]
    recovering = CallSpec(scenario, connector=bounded)
    [recovered, stuck, *others] = await run_calls(
        [recovering, CallSpec(stops_for_good, connector=bounded), *(CallSpec(w) for w in witnesses)]
    )
    # 1 s of 20 ms frames arrived while Vapi was stuck: the socket took `buffer`, the
    # sender held one in its write, the channel CALLER_AUDIO_BUFFER_FRAMES; the rest
    # was stale and dropped.
    record = recovered.record
    assert record is not None
    held = buffer + 1 + CALLER_AUDIO_BUFFER_FRAMES
    assert abs(record.frames_dropped - (50 - held)) <= 1  # ± the frame on the boundary
    # Every frame is accounted for (the first may have come before the leg was up).
    accounted = record.frames_to_assistant + record.frames_dropped
    assert record.frames_from_caller - 1 <= accounted <= record.frames_from_caller
    # Caller audio flowed again once Vapi read again, and the call went on.
    assert record.outcome is Outcome.CALLER_HUNG_UP
    stuck_record = stuck.record
    assert stuck_record is not None
    assert stuck_record.outcome is Outcome.ASSISTANT_LEG_FAILED
    assert stuck_record.detail == "unresponsive: Vapi stopped reading"
    assert stuck_record.frames_dropped > 0
    assert FALLBACK_WORDS in fallback(stuck_record)
    for run, witness in zip(others, witnesses, strict=True):
        witness.check(run)


async def test_twilio_that_never_reads_ends_the_call_at_the_write_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Twilio's side stops reading and its socket holds two messages: the bridge's
    # third write (media, mark, media …) cannot complete. After WRITE_DEADLINE_S the
    # socket counts as dead: the call ends, Vapi is told goodbye, nothing hangs.

    async def scenario(run: MemoryCallRun, nursery: trio.Nursery) -> None:
        nursery.start_soon(run.twilio.stream_media)
        vapi = await run.vapi(nursery)
        await vapi.send_json(speech_started(0))
        await vapi.speak(1000, paced=False)

    witnesses = [Witness(hang_up_s=8.0), Witness(hang_up_s=8.0)]
    [deaf, *others] = await run_calls(
        [CallSpec(scenario, twilio_buffer=2, twilio_reads=False), *(CallSpec(w) for w in witnesses)]
    )
    record = deaf.record
    assert record is not None
    assert record.outcome is Outcome.STREAM_LOST
    assert record.detail.startswith("media socket failed while sending")
    assert record.duration_s == pytest.approx(WRITE_DEADLINE_S, abs=0.05)
    for run, witness in zip(others, witnesses, strict=True):
        witness.check(run)


async def test_many_calls_ending_in_the_same_instant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Sixty calls end at the same virtual instant, twelve in each way a call can end
    # from its peers: the caller hangs up, the assistant ends the call, Vapi's socket
    # drops, Twilio's socket drops, or the server ends it (the drain deadline). Each
    # gets its own outcome; none waits on another; every socket is closed.
    end_at = trio.current_time() + 3.0
    ways = ["stop", "assistant-ended", "vapi-dropped", "twilio-dropped", "drain"]

    def ending(way: str) -> CallSpec:
        async def scenario(run: MemoryCallRun, nursery: trio.Nursery) -> None:
            nursery.start_soon(run.twilio.stream_media)
            vapi = await run.vapi(nursery)
            await trio.sleep_until(end_at)
            if way == "stop":
                await run.twilio.socket.send(stop_frame(run.twilio.next_seq()))
            elif way == "assistant-ended":
                await vapi.send_json(
                    {"type": "status-update", "status": "ended",
                     "endedReason": "assistant-ended-call"}
                )
                await vapi.socket.aclose(1000)  # Vapi closes right after ending the call
            elif way == "vapi-dropped":
                await vapi.socket.aclose(1006)
            elif way == "twilio-dropped":
                await run.twilio.socket.aclose(1006)
            else:
                assert run.call is not None
                run.call.end(Outcome.SHUTDOWN, "drain deadline passed")

        return CallSpec(scenario)

    runs = await run_calls([ending(way) for way in ways for _ in range(12)])
    expected = {
        "stop": Outcome.CALLER_HUNG_UP,
        "assistant-ended": Outcome.ASSISTANT_ENDED,
        "vapi-dropped": Outcome.ASSISTANT_LEG_FAILED,
        "twilio-dropped": Outcome.STREAM_LOST,
        "drain": Outcome.SHUTDOWN,
    }
    for index, run in enumerate(runs):
        way = ways[index // 12]
        assert run.record is not None
        assert run.record.outcome is expected[way], (way, run.record.detail)
        assert run.record.duration_s == pytest.approx(3.0, abs=0.01), way


class _StopArrivesDuringWrites:
    """Twilio's socket, as the bridge's playout sees it, while the call's reader reads
    Twilio's ``stop`` during the playout's second write (writes are shielded: the
    cancellation that the stop causes only lands once the write is over)."""

    def __init__(self, stream: MediaStream) -> None:
        self.stream = stream
        self.sent: list[str] = []

    async def receive(self) -> str | bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(self, message: str | bytes) -> None:
        assert isinstance(message, str)
        self.sent.append(message)
        if len(self.sent) == 2:
            self.stream.receive(stop_frame(99))
        await trio.lowlevel.checkpoint()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        await trio.lowlevel.checkpoint()


async def test_a_stop_read_during_a_playout_write_ends_playout_not_the_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The caller hangs up mid-sentence: Twilio's stop is read while playout writes
    # (between a chunk and its mark). Playout must take that as the end of the stream,
    # like a closed socket, never encode another frame for a stopped stream (which
    # would be a LocalProtocolError: an internal error for a plain hang-up).
    stream = MediaStream()
    stream.receive(start_frame())
    socket = _StopArrivesDuringWrites(stream)
    playout = Playout(
        socket,
        stream,
        lead_ms=SETTINGS.playout_lead_ms,
        chunk_ms=SETTINGS.playout_chunk_ms,
        resume_gap_ms=SETTINGS.barge_in_resume_gap_ms,
        call_started_at=trio.current_time(),
    )
    playout.feed(b"\x55" * 8000)
    with pytest.raises(SocketClosed):
        await playout.run()
    assert [json.loads(m)["event"] for m in socket.sent] == ["media", "mark"]
