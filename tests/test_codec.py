"""The Vapi-leg audio converter: formats other than Twilio's μ-law/8 kHz."""

from __future__ import annotations

import pytest

from voicebridge.codec import LegCodec, pcm16_to_ulaw, ulaw_to_pcm16
from voicebridge.sim.audio import frame_energy, load_clip


def test_mulaw_8k_passes_through_untouched() -> None:
    codec = LegCodec("mulaw", 8000)
    clip = load_clip("caller_1")
    assert codec.passthrough
    assert codec.to_assistant(clip) is clip
    assert codec.from_assistant(clip) is clip


@pytest.mark.parametrize(("fmt", "rate", "bytes_per_ms"), [
    ("pcm_s16le", 8000, 16), ("pcm_s16le", 16000, 32), ("mulaw", 16000, 16),
])
def test_round_trip_keeps_duration_and_loudness(fmt: str, rate: int, bytes_per_ms: int) -> None:
    clip = load_clip("caller_1")[: 8 * 1000]  # 1 s
    codec = LegCodec(fmt, rate)
    wire = b"".join(codec.to_assistant(clip[i : i + 160]) for i in range(0, len(clip), 160))
    assert len(wire) == 1000 * bytes_per_ms
    # Back in odd-sized chunks, as Vapi sends them: nothing lost at the boundaries.
    back = b"".join(codec.from_assistant(wire[i : i + 743]) for i in range(0, len(wire), 743))
    assert len(back) == len(clip)
    assert frame_energy(back) == pytest.approx(frame_energy(clip), rel=0.1)


def test_g711_round_trip_of_every_code_is_stable() -> None:
    every = bytes(range(256))
    assert pcm16_to_ulaw(ulaw_to_pcm16(every)).replace(b"\x7f", b"\xff") == every.replace(
        b"\x7f", b"\xff"
    )


def test_unsupported_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        LegCodec("opus", 48000)
