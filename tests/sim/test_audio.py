"""voicebridge.sim.audio: the μ-law codec against G.711, energy/speech detection, clips, WAV.

Plain synchronous tests; ``audioop`` (deprecated, still in 3.11) is used only as
an independent cross-check of the codec when it is importable.
"""

from __future__ import annotations

import random
import struct
import warnings
import wave
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voicebridge.sim import audio
from voicebridge.sim.audio import (
    CLIP_TEXTS,
    FRAME_BYTES,
    FRAME_MS,
    MULAW_SILENCE,
    SAMPLE_RATE,
    SpeechDetector,
    SpeechEnded,
    SpeechStarted,
    UnknownClipError,
    duration_ms,
    frame_energy,
    is_speech,
    iter_frames,
    load_clip,
    pcm16_to_ulaw,
    silence,
    ulaw_to_pcm16,
    write_wav,
)

ASSISTANT_CLIPS = ("greeting", "reply_1", "reply_2", "reply_3", "goodbye")
CALLER_CLIPS = ("caller_1", "caller_2", "caller_3")


def pcm(*samples: int) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def test_frame_constants() -> None:
    assert (FRAME_MS, SAMPLE_RATE, FRAME_BYTES, MULAW_SILENCE) == (20, 8000, 160, 0xFF)
    assert silence(20) == b"\xff" * 160
    assert silence(1000) == b"\xff" * 8000
    assert duration_ms(silence(740)) == 740


@pytest.mark.parametrize(
    ("sample", "code"),
    [
        (0, 0xFF),  # digital silence
        (-1, 0x7E),
        (32767, 0x80),  # positive full scale: segment 7, all bits inverted
        (-32768, 0x00),  # negative full scale
        (32124, 0x80),  # the largest decodable magnitude
        (8, 0xFE),
        (1000, 0xCE),
        (-1000, 0x4E),
    ],
)
def test_encode_known_values(sample: int, code: int) -> None:
    assert pcm16_to_ulaw(pcm(sample)) == bytes([code])


@pytest.mark.parametrize(
    ("code", "sample"),
    [(0xFF, 0), (0x7F, 0), (0x80, 32124), (0x00, -32124), (0xFE, 8), (0xCE, 988), (0x4E, -988)],
)
def test_decode_known_values(code: int, sample: int) -> None:
    assert ulaw_to_pcm16(bytes([code])) == pcm(sample)


def test_decode_is_symmetric_and_monotonic() -> None:
    decoded = struct.unpack("<256h", ulaw_to_pcm16(bytes(range(256))))
    for code in range(128):
        assert decoded[code] == -decoded[code | 0x80]
    positive = decoded[0x80:]  # 0x80 (loudest) … 0xFF (silence)
    assert list(positive) == sorted(positive, reverse=True)


def test_every_code_round_trips_except_negative_zero() -> None:
    codes = bytes(range(256))
    expected = codes.replace(b"\x7f", b"\xff")  # -0 decodes to 0, which encodes as +0
    assert pcm16_to_ulaw(ulaw_to_pcm16(codes)) == expected


@given(st.binary(max_size=400))
def test_round_trip_property(data: bytes) -> None:
    assert pcm16_to_ulaw(ulaw_to_pcm16(data)) == data.replace(b"\x7f", b"\xff")


def test_codec_matches_audioop_over_every_sample() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    every_sample = struct.pack("<65536h", *range(-32768, 32768))
    assert pcm16_to_ulaw(every_sample) == audioop.lin2ulaw(every_sample, 2)
    every_code = bytes(range(256))
    assert ulaw_to_pcm16(every_code) == audioop.ulaw2lin(every_code, 2)


def test_odd_pcm_length_is_refused() -> None:
    with pytest.raises(ValueError, match="even length"):
        pcm16_to_ulaw(b"\x00\x00\x00")


def test_energy_of_silence_noise_and_speech() -> None:
    assert frame_energy(silence(20)) == 0.0
    assert frame_energy(b"") == 0.0
    assert not is_speech(silence(20))
    rng = random.Random(7)
    hiss = pcm16_to_ulaw(pcm(*(rng.randint(-60, 60) for _ in range(FRAME_BYTES))))
    assert not is_speech(hiss)
    loud = pcm16_to_ulaw(pcm(*([3000, -3000] * (FRAME_BYTES // 2))))
    assert frame_energy(loud) == pytest.approx(3000, rel=0.05)
    assert is_speech(loud)


@pytest.mark.parametrize("name", ASSISTANT_CLIPS + CALLER_CLIPS)
def test_clips_are_mostly_voiced(name: str) -> None:
    frames = list(iter_frames(load_clip(name)))
    voiced = sum(map(is_speech, frames))
    assert voiced / len(frames) > 0.4
    assert is_speech(max(frames, key=frame_energy))


def test_clip_set_durations_and_size() -> None:
    assert set(CLIP_TEXTS) == set(ASSISTANT_CLIPS + CALLER_CLIPS)
    assert CLIP_TEXTS["greeting"] == "Hello, thanks for calling. How can I help you today?"
    seconds = {name: duration_ms(load_clip(name)) / 1000 for name in CLIP_TEXTS}
    for name in ("greeting", "reply_1", "reply_3", "goodbye"):
        assert 2 <= seconds[name] <= 5, name
    assert 6 <= seconds["reply_2"] <= 8  # long enough to be interrupted
    for name in CALLER_CLIPS:
        assert 0.8 <= seconds[name] <= 2.5, name
    assert sum(len(load_clip(name)) for name in CLIP_TEXTS) < 400 * 1024


def test_clips_are_trimmed() -> None:
    for name in CLIP_TEXTS:
        samples = struct.unpack(f"<{len(load_clip(name))}h", ulaw_to_pcm16(load_clip(name)))
        edge = SAMPLE_RATE * FRAME_MS // 1000
        # No leading or trailing silence: sound (not necessarily voice) at both ends.
        assert max(map(abs, samples[:edge])) >= 150, name
        assert max(map(abs, samples[-edge:])) >= 150, name


def test_unknown_clip_is_a_clear_key_error() -> None:
    with pytest.raises(KeyError) as info:
        load_clip("no_such_clip")
    assert isinstance(info.value, UnknownClipError)
    assert "no_such_clip" in str(info.value) and "greeting" in str(info.value)


def test_iter_frames_pads_the_last_frame_with_silence() -> None:
    frames = list(iter_frames(b"\x00" * 170))
    assert [len(frame) for frame in frames] == [160, 160]
    assert frames[1] == b"\x00" * 10 + b"\xff" * 150


def test_wav_is_standard_pcm16_mono_8k(tmp_path: Path) -> None:
    clip = load_clip("caller_1")
    path = tmp_path / "caller_1.wav"
    write_wav(path, clip)
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 8000)
        assert wav.getnframes() == len(clip)
        assert wav.readframes(wav.getnframes()) == ulaw_to_pcm16(clip)


def utterance(name: str, *, lead_ms: int = 1000, trail_ms: int = 1000) -> bytes:
    return silence(lead_ms) + load_clip(name) + silence(trail_ms)


def test_detector_finds_one_utterance() -> None:
    detector = SpeechDetector()
    events = detector.feed(utterance("caller_1"))
    assert [type(event) for event in events] == [SpeechStarted, SpeechEnded]
    started, ended = events
    assert isinstance(started, SpeechStarted) and isinstance(ended, SpeechEnded)
    clip_ms = duration_ms(load_clip("caller_1"))
    # Onset ~60 ms after the first voiced frame (the clip's first frames are quiet).
    assert 1000 + audio.SPEECH_ONSET_MS <= started.at_ms <= 1000 + 200
    assert clip_ms - 200 <= ended.duration_ms <= clip_ms + FRAME_MS
    assert ended.at_ms == pytest.approx(1000 + clip_ms + audio.SPEECH_END_MS, abs=200)
    assert load_clip("caller_1")[FRAME_BYTES * 5 : FRAME_BYTES * 20] in ended.audio
    assert not detector.speaking


def test_detector_result_does_not_depend_on_chunking() -> None:
    data = utterance("caller_3") + utterance("caller_2")
    whole = SpeechDetector().feed(data)
    detector = SpeechDetector()
    chunked = []
    rng = random.Random(3)
    position = 0
    while position < len(data):
        size = rng.randint(1, 700)
        chunked += detector.feed(data[position : position + size])
        position += size
    assert chunked == whole
    assert [type(event) for event in whole] == [SpeechStarted, SpeechEnded] * 2


def test_detector_ignores_clicks_and_silence() -> None:
    loud = pcm16_to_ulaw(pcm(*([5000, -5000] * (FRAME_BYTES // 2))))
    click = silence(500) + loud * 2 + silence(500)  # 40 ms: below the onset
    assert SpeechDetector().feed(click * 3) == []
    detector = SpeechDetector()
    assert detector.feed(silence(2000)) == []
    assert [type(e) for e in detector.feed(loud * 3)] == [SpeechStarted]
    assert detector.speaking
