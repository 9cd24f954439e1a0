"""Generate the simulator's voice clips (run once; the outputs are committed).

Each clip is spoken by espeak-ng (``apt-get install espeak-ng``), resampled to
8 kHz with a windowed-sinc low-pass, trimmed of leading and trailing silence,
normalised, encoded to G.711 μ-law and written as a raw ``<name>.ulaw`` file in
``voicebridge/sim/clips/``, together with ``clips.txt`` (``name<TAB>text``).

    PYTHONPATH=. .venv/bin/python tools/make_clips.py [--out DIR] [--wav-dir DIR]

``--wav-dir`` also writes a playable WAV of each clip for listening.
Pure Python (no numpy); takes a few seconds.
"""

from __future__ import annotations

import argparse
import math
import operator
import subprocess
import sys
import tempfile
import wave
from array import array
from pathlib import Path

import attrs

from voicebridge.sim.audio import SAMPLE_RATE, duration_ms, pcm16_to_ulaw, write_wav

#: The assistant's voice: espeak-ng American English, a female variant, medium speed.
ASSISTANT_VOICE = ("en-us+f3", 165, 55)  # (voice, words per minute, pitch 0-99)
#: The caller's voice: British English, a male variant, lower pitch — audibly different.
CALLER_VOICE = ("en-gb+m3", 175, 35)


@attrs.frozen(kw_only=True)
class ClipSpec:
    name: str
    text: str
    voice: tuple[str, int, int]


CLIPS = (
    ClipSpec(
        name="greeting",
        text="Hello, thanks for calling. How can I help you today?",
        voice=ASSISTANT_VOICE,
    ),
    ClipSpec(
        name="reply_1",
        text="Sure, I can help with that. Could you give me your order number, please?",
        voice=ASSISTANT_VOICE,
    ),
    # Long on purpose (6-8 s): the caller interrupts this one in scripted calls.
    ClipSpec(
        name="reply_2",
        text=(
            "I found your order. It left our warehouse yesterday, "
            "and it should arrive by Thursday. You will get a text with the tracking link."
        ),
        voice=ASSISTANT_VOICE,
    ),
    ClipSpec(
        name="reply_3",
        text="Of course. Is there anything else I can help you with today?",
        voice=ASSISTANT_VOICE,
    ),
    ClipSpec(
        name="goodbye",
        text="Thanks for calling, and have a great day. Goodbye!",
        voice=ASSISTANT_VOICE,
    ),
    ClipSpec(name="caller_1", text="Hi, where is my order?", voice=CALLER_VOICE),
    ClipSpec(name="caller_2", text="Sorry, when will it get here?", voice=CALLER_VOICE),
    ClipSpec(name="caller_3", text="No, that's all. Thanks!", voice=CALLER_VOICE),
)

#: Low-pass cutoff for the 8 kHz output (Hz): under the 4 kHz Nyquist, like a phone line.
CUTOFF_HZ = 3600
#: Half-width of the resampling filter, in input samples each side.
FILTER_HALF_WIDTH = 32
#: |sample| (16-bit) below which leading/trailing audio counts as silence when trimming.
TRIM_LEVEL = 200
#: Peak level after normalisation (fraction of full scale): -6 dBFS leaves headroom.
PEAK_LEVEL = 0.5


def speak(spec: ClipSpec, espeak: str, workdir: Path) -> tuple[list[int], int]:
    """Run espeak-ng; return its 16-bit samples and sample rate."""
    voice, speed, pitch = spec.voice
    wav_path = workdir / f"{spec.name}.wav"
    subprocess.run(
        [espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav_path), spec.text],
        check=True,
    )
    with wave.open(str(wav_path), "rb") as wav:
        if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise SystemExit(f"unexpected espeak output format in {wav_path}")
        rate = wav.getframerate()
        samples = array("h")
        samples.frombytes(wav.readframes(wav.getnframes()))
    if sys.byteorder == "big":
        samples.byteswap()
    return list(samples), rate


def resample(samples: list[int], rate_in: int, rate_out: int) -> list[float]:
    """Band-limited resampling by polyphase windowed-sinc (Blackman window)."""
    step = math.gcd(rate_in, rate_out)
    up, down = rate_out // step, rate_in // step  # output n sits at input n*down/up
    cutoff = CUTOFF_HZ / rate_in  # cycles per input sample
    phases: list[list[float]] = []
    for phase in range(up):
        frac = phase * down % up / up
        taps = []
        for k in range(-FILTER_HALF_WIDTH + 1, FILTER_HALF_WIDTH + 1):
            x = k - frac
            angle = 2 * math.pi * cutoff * x
            sinc = 1.0 if x == 0 else math.sin(angle) / angle
            w = (x + FILTER_HALF_WIDTH) / (2 * FILTER_HALF_WIDTH)
            window = 0.42 - 0.5 * math.cos(2 * math.pi * w) + 0.08 * math.cos(4 * math.pi * w)
            taps.append(2 * cutoff * sinc * window)
        phases.append(taps)
    padded = [0] * FILTER_HALF_WIDTH + samples + [0] * FILTER_HALF_WIDTH
    out: list[float] = []
    for n in range(len(samples) * up // down):
        base = n * down // up  # input index at or before the output instant
        window_samples = padded[base + 1 : base + 1 + 2 * FILTER_HALF_WIDTH]
        out.append(sum(map(operator.mul, phases[n % up], window_samples)))
    return out


def trim_and_normalise(samples: list[float]) -> list[int]:
    first = next(i for i, s in enumerate(samples) if abs(s) >= TRIM_LEVEL)
    last = max(i for i, s in enumerate(samples) if abs(s) >= TRIM_LEVEL)
    voiced = samples[first : last + 1]
    gain = PEAK_LEVEL * 32767 / max(abs(s) for s in voiced)
    return [max(-32768, min(32767, round(s * gain))) for s in voiced]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    repo = Path(__file__).resolve().parent.parent
    parser.add_argument("--out", type=Path, default=repo / "voicebridge" / "sim" / "clips")
    parser.add_argument("--wav-dir", type=Path, default=None)
    parser.add_argument("--espeak", default="espeak-ng")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    index_lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in CLIPS:
            raw, rate = speak(spec, args.espeak, Path(tmp))
            pcm = trim_and_normalise(resample(raw, rate, SAMPLE_RATE))
            samples = array("h", pcm)
            if sys.byteorder == "big":
                samples.byteswap()
            ulaw = pcm16_to_ulaw(samples.tobytes())
            (args.out / f"{spec.name}.ulaw").write_bytes(ulaw)
            if args.wav_dir is not None:
                args.wav_dir.mkdir(parents=True, exist_ok=True)
                write_wav(args.wav_dir / f"{spec.name}.wav", ulaw)
            index_lines.append(f"{spec.name}\t{spec.text}\n")
            print(f"{spec.name:10} {duration_ms(ulaw) / 1000:5.2f} s  {len(ulaw):6} bytes")
    (args.out / "clips.txt").write_text("".join(index_lines), encoding="utf-8")


if __name__ == "__main__":
    main()
