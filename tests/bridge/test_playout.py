"""What the caller hears of the assistant's speech: every byte, nothing inserted.

On trio's autojump clock, through the real ``Call`` and its playout, with the
assistant's audio chunked as live Vapi sends it (170–743 bytes at real-time pace,
jittered, some chunks in bursts) and Twilio modelled by ``FakeTwilio`` (playback at
real time, mark echoes when played). The caller's stream must carry each turn's
audio byte for byte; silence may follow a turn's last partial frame and nowhere
else. Marks: echoes that stop, and echoes naming no mark sent, must not stall or
overfill Twilio's buffer; echoes that stop for good must not leave the caller in
dead air.
"""

from __future__ import annotations

import base64
import json
import random

import pytest
import trio
import trio.testing
from trio import Nursery

from tests.bridge.peers import STREAM_SID, FakeTwilio, FakeVapi, MemoryConnector, stop_frame
from tests.bridge.test_call import run_call, start_vapi
from voicebridge.bridge.outcome import Outcome
from voicebridge.bridge.playout import FRAME_BYTES, MULAW_SILENCE

STARTED = {"type": "speech-update", "status": "started", "role": "assistant"}
STOPPED = {"type": "speech-update", "status": "stopped", "role": "assistant"}
CHUNK_MIN_BYTES = 170
CHUNK_MAX_BYTES = 743
#: How late a chunk may come after its real-time due time (network jitter).
JITTER_S = 0.040
#: Chance that the next chunk rides along with this one (a burst ahead of real time).
BURST_CHANCE = 0.2


def turn_audio(turn: int, ms: int, extra_bytes: int) -> bytes:
    """A turn's audio: never the silence byte, different in every turn and position."""
    length = ms * 8 + extra_bytes
    return bytes((turn * 37 + i) % 0xFF for i in range(length))


def media_bytes(twilio: FakeTwilio) -> bytes:
    return b"".join(
        base64.b64decode(r.message["media"]["payload"]) for r in twilio.events("media")
    )


def with_turn_end_padding(audio: bytes) -> bytes:
    return audio + MULAW_SILENCE * (-len(audio) % FRAME_BYTES)


async def speak_like_vapi(vapi: FakeVapi, audio: bytes, rng: random.Random) -> None:
    """Send ``audio`` in Vapi-sized chunks, each due when the audio before it has played.

    A chunk goes out up to ``JITTER_S`` late (never before the one before it), and
    sometimes together with the next one, ahead of time. Returns at the turn's
    real-time end.
    """
    start = trio.current_time()
    sent = 0
    while sent < len(audio):
        due = start + sent / 8000
        await trio.sleep_until(max(trio.current_time(), due + rng.uniform(0, JITTER_S)))
        pieces = 2 if rng.random() < BURST_CHANCE else 1
        for _ in range(pieces):
            size = rng.randint(CHUNK_MIN_BYTES, CHUNK_MAX_BYTES)
            await vapi.socket.send(audio[sent : sent + size])
            sent += size
            if sent >= len(audio):
                break
    await trio.sleep_until(start + len(audio) / 8000)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_every_byte_of_each_turn_reaches_the_caller_and_silence_only_at_turn_ends(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    rng = random.Random(seed)
    turns = [turn_audio(n, rng.randint(1500, 4000), rng.randint(1, 159)) for n in range(4)]

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        for number, audio in enumerate(turns):
            await vapi.send_json(STARTED | {"turn": number})
            await speak_like_vapi(vapi, audio, rng)
            await vapi.send_json(STOPPED | {"turn": number})
            await trio.sleep(rng.uniform(0.3, 1.2))  # the caller's turn
        await trio.sleep(1.0)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, _ = await run_call(scenario)
    assert media_bytes(twilio) == b"".join(with_turn_end_padding(audio) for audio in turns)
    assert record.heard_ms == sum(len(with_turn_end_padding(a)) for a in turns) // 8
    assert record.outcome is Outcome.CALLER_HUNG_UP


async def test_without_speech_updates_silence_comes_only_in_the_pauses_between_turns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # An assistant whose clientMessages leave out speech updates: the end of a turn is
    # only a pause in its audio, in which the caller hears silence anyway.
    rng = random.Random(7)
    turns = [turn_audio(n, rng.randint(1500, 3000), rng.randint(1, 159)) for n in range(3)]
    padded_at: list[float] = []

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        for audio in turns:
            await speak_like_vapi(vapi, audio, rng)
            await trio.sleep(1.0)
            padded_at.append(trio.current_time())
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    _, twilio, _ = await run_call(scenario)
    assert media_bytes(twilio) == b"".join(with_turn_end_padding(audio) for audio in turns)
    # Each turn's padded last frame went out within its pause, not after the next began.
    last_frames = [
        r.at
        for r in twilio.events("media")
        if base64.b64decode(r.message["media"]["payload"]).endswith(MULAW_SILENCE)
    ]
    assert len(last_frames) == len(turns)
    assert all(at < end for at, end in zip(last_frames, padded_at, strict=True))


async def test_a_late_chunk_is_waited_for_while_twilio_still_plays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 200 ms arrive at once, then the rest of the frame 150 ms late: Twilio still
    # holds audio then, so the partial frame waits, and the caller hears no click.
    first = turn_audio(0, 200, 80)
    rest = turn_audio(1, 600, 0)

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.send_json(STARTED | {"turn": 0})
        await vapi.socket.send(first)
        await trio.sleep(0.150)
        assert twilio.play_until > trio.current_time(), "Twilio still has audio to play"
        await vapi.socket.send(rest)
        await trio.sleep(1.0)
        await vapi.send_json(STOPPED | {"turn": 0})
        await trio.sleep(0.5)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    _, twilio, _ = await run_call(scenario)
    assert media_bytes(twilio) == with_turn_end_padding(first + rest)


async def test_while_echoes_are_missing_the_clock_keeps_the_turn_playing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Twilio plays everything but loses its echoes for half a second mid-turn: playout
    # goes on by the clock, never more than the lead (300 ms) ahead of the caller's
    # ear, and the caller never hears a gap; the first echo after confirms it all.
    audio = turn_audio(0, 5000, 0)

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.send_json(STARTED | {"turn": 0})
        await vapi.socket.send(audio)  # a burst: the lead alone paces it
        t0 = trio.current_time()
        while trio.current_time() < t0 + 4.8:
            twilio.echoes = not t0 + 1.0 <= trio.current_time() < t0 + 1.5
            await trio.sleep(0.01)
            ahead = twilio.play_until - trio.current_time()
            assert 0 < ahead <= 0.3 + 1e-9, "no gap, and never more than the lead"
        await trio.sleep(1.0)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, _ = await run_call(scenario)
    assert media_bytes(twilio) == audio
    assert record.heard_ms == 5000
    assert record.presumed_heard_ms == 0  # every presumption was confirmed later


async def test_when_echoes_stop_for_good_the_turn_plays_on_by_the_clock(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A Twilio that never echoes, though its media keeps coming: the lead, then one more
    # lead by the clock as each chunk's echo becomes overdue; then, once no echo came
    # for MARKS_MISSING_S (1 s), the turn plays on to its end at real time, never more
    # than the lead (300 ms) ahead of the clock's estimate of the caller's ear.
    audio = turn_audio(0, 5000, 0)
    seen: dict[str, float] = {}
    ahead: list[tuple[float, float]] = []

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        twilio.echoes = False
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.send_json(STARTED | {"turn": 0})
        await vapi.socket.send(audio)
        t0 = seen["t0"] = trio.current_time()
        while trio.current_time() < t0 + 6.0:
            await trio.sleep(0.01)
            ahead.append((trio.current_time() - t0, twilio.play_until - trio.current_time()))
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, _ = await run_call(scenario)
    assert media_bytes(twilio) == audio, "the whole turn reached the caller"
    # The first lead at once; one 100 ms chunk each time one is presumed heard, 150 ms
    # (MARK_GRACE_S) after the clock says it ended, up to a lead past the last echo
    # (none: the first send). At 1 s the echoes count as missing: the clock, which says
    # Twilio ran dry at 0.6 s, lets a lead out at once, then one chunk per 100 ms.
    sent_at = [r.at - seen["t0"] for r in twilio.events("media")]
    assert sent_at == pytest.approx(
        [0.0, 0.0, 0.0, 0.25, 0.35, 0.45, 1.0, 1.0, 1.0]
        + [1.25 + 0.1 * n for n in range(41)]
    )
    # Never faster than real time plus the lead, and from 1 s to the turn's end no gap.
    assert max(late for _, late in ahead) <= 0.3 + 1e-9
    assert all(late > 0 for at, late in ahead if 1.0 < at < 5.3)
    assert record.heard_ms == 0
    assert record.presumed_heard_ms == 5000
    [warning] = [r for r in caplog.records if "no mark echo" in r.getMessage()]
    assert warning.levelname == "WARNING"


async def test_one_echo_ends_the_clock_alone_and_a_late_one_is_no_stranger(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Echoes stop for 2 s, then come back: playout went on by the clock, and the echoes
    # that come back pace it again (never more than the lead ahead). Late echoes of
    # chunks the clock forgot are ours, not counted as unknown.
    audio = turn_audio(0, 5000, 0)
    echoed_late: list[dict[str, object]] = []

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.send_json(STARTED | {"turn": 0})
        await vapi.socket.send(audio)
        t0 = trio.current_time()
        while trio.current_time() < t0 + 4.8:
            twilio.echoes = not t0 + 1.0 <= trio.current_time() < t0 + 3.0
            await trio.sleep(0.01)
            assert twilio.play_until - trio.current_time() <= 0.3 + 1e-9
            if t0 + 3.2 <= trio.current_time() < t0 + 3.21:
                # Late echoes of marks sent at the start of the hole.
                for sent in twilio.events("mark"):
                    if t0 + 1.0 <= sent.at < t0 + 1.3:
                        late = {
                            "event": "mark",
                            "sequenceNumber": str(twilio.next_seq()),
                            "streamSid": STREAM_SID,
                            "mark": {"name": sent.message["mark"]["name"]},
                        }
                        await twilio.socket.send(json.dumps(late))
                        echoed_late.append(late)
        await trio.sleep(1.0)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, _ = await run_call(scenario)
    assert media_bytes(twilio) == audio
    assert echoed_late and record.unknown_marks == 0
    assert record.heard_ms + record.presumed_heard_ms == 5000
    assert 0 < record.presumed_heard_ms < 5000
    assert len([r for r in caplog.records if "no mark echo" in r.getMessage()]) == 1


async def test_with_echoes_nothing_is_presumed_and_the_marks_pace_playout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    audio = turn_audio(0, 3000, 0)
    seen: dict[str, float] = {}

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.socket.send(audio)
        seen["t0"] = trio.current_time()
        await trio.sleep(4.0)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, _ = await run_call(scenario)
    media = twilio.events("media")
    # Each chunk goes out the instant the echo of the one 300 ms before it comes back.
    assert [r.at - seen["t0"] for r in media] == pytest.approx(
        [0.0] * 3 + [0.1 * n for n in range(1, 28)]
    )
    assert record.heard_ms == 3000
    assert record.presumed_heard_ms == 0


async def test_an_echo_naming_no_mark_sent_is_ignored_and_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Taken as "everything played", a stray name would let a whole burst into
    # Twilio's buffer, and a barge-in would then cut far more than the lead.
    audio = turn_audio(0, 3000, 0)

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        nursery.start_soon(twilio.stream_media)
        vapi = await start_vapi(connector, nursery)
        await vapi.socket.send(audio)
        for n in range(5):
            await trio.sleep(0.05)
            stray = {
                "event": "mark",
                "sequenceNumber": str(twilio.next_seq()),
                "streamSid": STREAM_SID,
                "mark": {"name": f"not-ours-{n}"},
            }
            await twilio.socket.send(json.dumps(stray))
            assert twilio.play_until - trio.current_time() <= 0.3 + 1e-9
        await trio.sleep(3.5)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, _ = await run_call(scenario)
    assert media_bytes(twilio) == audio
    assert record.unknown_marks == 5
    assert record.heard_ms == 3000
