"""Barge-in at the edge, reversible: on trio's autojump clock, through the real ``Call``.

The caller's microphone sends Twilio's 20 ms frames: silence, or recorded speech (a
cough is 200 ms of it). Over the assistant's turn, the onset (three speech frames)
must clear Twilio's buffer at once; the assistant's confirmation within the window
drops the turn, and without one the turn resumes with the first audio the caller
had not finished hearing, byte for byte.
"""

from __future__ import annotations

import base64
import random

import attrs
import pytest
import trio
import trio.testing
from trio import Nursery

from tests.bridge.peers import FakeTwilio, FakeVapi, MemoryConnector, media_frame, stop_frame
from tests.bridge.test_call import SETTINGS, run_call, start_vapi
from voicebridge.bridge import voice_activity
from voicebridge.bridge.edge import EdgeBargeIn
from voicebridge.bridge.playout import FRAME_BYTES, MULAW_SILENCE
from voicebridge.bridge.voice_activity import SpeechOnset
from voicebridge.config import BridgeConfig
from voicebridge.errors import ConfigError, SocketClosed
from voicebridge.sim.audio import iter_frames, load_clip

CONFIRM_S = 0.8
EDGE = attrs.evolve(
    SETTINGS, edge_barge_in=EdgeBargeIn(aggressiveness=3, onset_frames=3, confirm_s=CONFIRM_S)
)
STARTED = {"type": "speech-update", "status": "started", "role": "assistant"}
STOPPED = {"type": "speech-update", "status": "stopped", "role": "assistant"}
CHUNK_BYTES = SETTINGS.playout_chunk_ms * 8
LEAD_BYTES = SETTINGS.playout_lead_ms * 8


def _speech_frames(count: int) -> list[bytes]:
    """``count`` frames of recorded speech that WebRTC's detector (mode 3) calls speech."""
    frames = list(iter_frames(load_clip("caller_1")))
    onset = SpeechOnset(aggressiveness=3, onset_frames=count)
    for start in range(len(frames) - count):
        run = frames[start : start + count]
        if any(onset.feed(frame) for frame in run):
            return run
        onset.reset()
    raise AssertionError("no run of speech in the clip")


COUGH = _speech_frames(10)  # 200 ms


class Microphone:
    """The caller's side of the stream: a frame every 20 ms, speech when told to."""

    def __init__(self, twilio: FakeTwilio) -> None:
        self._twilio = twilio
        self._speech: list[bytes] = []

    def say(self, frames: list[bytes]) -> None:
        self._speech.extend(frames)

    async def run(self) -> None:
        start = trio.current_time()
        n = 0
        while True:
            await trio.sleep_until(start + n * 0.02)
            payload = self._speech.pop(0) if self._speech else MULAW_SILENCE * FRAME_BYTES
            try:
                await self._twilio.socket.send(media_frame(self._twilio.next_seq(), payload))
            except SocketClosed:
                return
            n += 1


def turn_audio(ms: int) -> bytes:
    """Audio that never repeats itself (and holds no silence byte)."""
    rng = random.Random(ms)
    return bytes(rng.randrange(0, 0xFF) for _ in range(ms * 8))


def payloads(twilio: FakeTwilio, *, after: float | None = None, before: float | None = None,
             ) -> bytes:
    return b"".join(
        base64.b64decode(r.message["media"]["payload"])
        for r in twilio.events("media")
        if (after is None or r.at >= after) and (before is None or r.at < before)
    )


async def _assistant_speaks(
    twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery, audio: bytes
) -> tuple[Microphone, FakeVapi]:
    microphone = Microphone(twilio)
    nursery.start_soon(microphone.run)
    vapi = await start_vapi(connector, nursery)
    await vapi.send_json(STARTED | {"turn": 0})
    await vapi.socket.send(audio)
    return microphone, vapi


async def test_a_cough_silences_the_assistant_at_once_and_the_turn_resumes_where_it_was_cut(
    autojump_clock: trio.testing.MockClock,
) -> None:
    audio = turn_audio(3000)
    seen: dict[str, float] = {}

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        microphone, vapi = await _assistant_speaks(twilio, connector, nursery, audio)
        await trio.sleep(1.01)
        seen["cough"] = trio.current_time()
        microphone.say(COUGH)
        await trio.sleep(4.0)
        await vapi.send_json(STOPPED | {"turn": 0})
        await trio.sleep(0.5)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, _ = await run_call(scenario, settings=EDGE)
    [clear] = twilio.events("clear")
    # The third speech frame is the onset: sent 40 ms after the first, cleared then.
    assert seen["cough"] < clear.at <= seen["cough"] + 0.06
    before, after = payloads(twilio, before=clear.at), payloads(twilio, after=clear.at)
    # Resumed with the first chunk not confirmed played: nothing lost, at most the
    # lead sent again; then the rest of the turn, byte for byte.
    resumed_at = len(audio) - len(after)
    assert resumed_at % CHUNK_BYTES == 0
    assert len(before) - LEAD_BYTES <= resumed_at <= len(before)
    assert after == audio[resumed_at:]
    media_after = [r for r in twilio.events("media") if r.at >= clear.at]
    assert media_after[0].at == clear.at + CONFIRM_S
    assert (record.early_barge_ins, record.early_confirmed, record.early_resumed) == (1, 0, 1)
    assert record.barge_ins == ()


async def test_when_the_assistant_confirms_the_held_turn_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    audio = turn_audio(3000)
    seen: dict[str, float] = {}

    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        microphone, vapi = await _assistant_speaks(twilio, connector, nursery, audio)
        await trio.sleep(1.01)
        microphone.say(COUGH)
        await trio.sleep(0.3)  # the assistant's own detection and a network trip
        await vapi.send_json({"type": "user-interrupted"})
        await trio.sleep(2.0)
        seen["next_turn"] = trio.current_time()
        await vapi.send_json(STARTED | {"turn": 1})
        await vapi.socket.send(b"\x07" * 1600)
        await trio.sleep(1.0)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, _ = await run_call(scenario, settings=EDGE)
    first_clear = twilio.events("clear")[0]
    after = [r for r in twilio.events("media") if r.at >= first_clear.at]
    assert all(r.at >= seen["next_turn"] for r in after), "none of the cut turn played"
    assert payloads(twilio, after=first_clear.at) == b"\x07" * 1600
    assert (record.early_barge_ins, record.early_confirmed, record.early_resumed) == (1, 1, 0)
    assert len(record.barge_ins) == 1


async def test_the_callers_speech_is_not_listened_to_while_the_assistant_is_silent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(twilio: FakeTwilio, connector: MemoryConnector, nursery: Nursery) -> None:
        microphone = Microphone(twilio)
        nursery.start_soon(microphone.run)
        await start_vapi(connector, nursery)
        await trio.sleep(0.5)
        microphone.say(COUGH * 3)
        await trio.sleep(1.0)
        await twilio.socket.send(stop_frame(twilio.next_seq()))

    record, twilio, _ = await run_call(scenario, settings=EDGE)
    assert twilio.events("clear") == []
    assert record.early_barge_ins == 0


def test_edge_barge_in_is_refused_at_start_without_the_detector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(voice_activity, "available", lambda: False)
    with pytest.raises(ConfigError, match="edge_barge_in: needs WebRTC's voice-activity"):
        BridgeConfig(edge_barge_in=True)
    assert BridgeConfig(edge_barge_in=False).edge_barge_in is False
